//! Whether MLX is worth choosing on this machine, asked of the worker's own
//! Python before anything is loaded: `auto` uses the answer to keep MLX's
//! CPU build (about ten times slower than llama.cpp on the same CPU) out of
//! its choice.

use std::{path::Path, process::Stdio, time::Duration};

/// How long Python may take to say whether MLX can be used.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// Exit status of the check when MLX imports but has no accelerator.
const NO_ACCELERATOR: i32 = 3;

/// `Ok` when MLX should be preferred here: on Apple Silicon when mlx-lm
/// imports; elsewhere only with an accelerated (CUDA) MLX build. Otherwise
/// the reason, for logs and GetStatus.
pub async fn preferred(python: &Path) -> Result<(), String> {
    let apple_silicon = cfg!(all(target_os = "macos", target_arch = "aarch64"));
    let check = if apple_silicon {
        "import mlx_lm".to_owned()
    } else {
        format!(
            "import mlx.core as mx, mlx_lm; raise SystemExit(0 if mx.cuda.is_available() else {NO_ACCELERATOR})"
        )
    };
    let status = tokio::process::Command::new(python)
        .args(["-c", &check])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(CHECK_TIMEOUT, status).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) if status.code() == Some(NO_ACCELERATOR) => Err(
            "MLX here has no accelerator (its Linux CPU build is ~10x slower than llama.cpp); INFERENCE_BACKEND=mlx uses it anyway".to_owned(),
        ),
        Ok(Ok(_)) => Err(format!("mlx-lm does not import with {}", python.display())),
        Ok(Err(error)) => Err(format!("cannot run {}: {error}", python.display())),
        Err(_) => Err(format!("importing mlx-lm took over {CHECK_TIMEOUT:?}")),
    }
}
