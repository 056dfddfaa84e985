//! Where the embedded engine computes: how many of a model's layers go to a
//! GPU, and which of ggml's devices they are on, for GetStatus.
//!
//! Which GPUs exist is ggml's answer at run time, not a compile-time flag: a
//! macOS build has Metal whatever features it was built with (ggml turns it
//! on for Apple targets), and a `cuda` build on a machine without a GPU has
//! none to offer. A `dynamic-backends` build has no backend linked in at
//! all: it loads ggml's backend libraries (the CPU's variants, CUDA's, ...)
//! from a directory before llama.cpp starts.

use std::path::Path;

use llama_cpp_2::{LlamaBackendDevice, LlamaBackendDeviceType, list_llama_ggml_backend_devices};

use super::model::llama;
use crate::backend::{ComputeDevice, DeviceKind};

/// Layers of a model offloaded to the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuLayers {
    /// Every layer, the output layer included (llama.cpp's `-ngl all`).
    All,
    Count(u32),
}

impl GpuLayers {
    /// Whether any layer leaves the CPU.
    pub fn offloads(self) -> bool {
        self != Self::Count(0)
    }
}

impl std::fmt::Display for GpuLayers {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => formatter.write_str("all"),
            Self::Count(layers) => write!(formatter, "{layers}"),
        }
    }
}

/// A layer count was asked for and ggml has no GPU to put layers on.
#[derive(Debug, thiserror::Error)]
#[error(
    "--gpu-layers {requested} (RIGGER_GPU_LAYERS) offloads layers to a GPU, but the embedded \
     engine finds none: this build has no GPU backend (build with `--features cuda` or `vulkan`, \
     e.g. `make run RIGGER_ACCEL=cuda`) or no GPU is visible to it. `--gpu-layers 0` runs on the CPU"
)]
pub struct NoGpu {
    requested: GpuLayers,
}

/// `--ggml-backend-dir` cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum BackendLibraries {
    #[error(
        "--ggml-backend-dir (RIGGER_GGML_BACKEND_DIR) names where a `dynamic-backends` build \
         loads ggml's backend libraries from, but this build has its backends linked in: build \
         with `--features dynamic-backends`, or leave the flag unset"
    )]
    LinkedIn,
    #[error("--ggml-backend-dir (RIGGER_GGML_BACKEND_DIR) {dir}: not a directory")]
    NotADirectory { dir: String },
    #[error(
        "no ggml backend library loaded from {dir}: a `dynamic-backends` build needs at least \
         the CPU's (libggml-cpu-*), which its build puts beside libggml; point \
         --ggml-backend-dir (RIGGER_GGML_BACKEND_DIR) at them"
    )]
    NoneLoaded { dir: String },
}

/// Loads ggml's backend libraries, once per process and before llama.cpp
/// starts, from `dir` or else from where this build put them.
#[cfg(feature = "dynamic-backends")]
pub(super) fn load_backends(dir: Option<&Path>) -> Result<(), BackendLibraries> {
    static LOADED: std::sync::Once = std::sync::Once::new();
    let shown = dir.map_or_else(
        || {
            llama_cpp_sys_2::BACKENDS_DIR
                .unwrap_or("(this build's backend directory)")
                .to_owned()
        },
        |dir| dir.display().to_string(),
    );
    // ggml takes the path as a C string: a directory that is not one (or
    // not UTF-8) is refused here rather than panicking in the binding.
    if let Some(dir) = dir
        && (!dir.is_dir() || dir.to_str().is_none())
    {
        return Err(BackendLibraries::NotADirectory { dir: shown });
    }
    LOADED.call_once(|| match dir {
        Some(dir) => llama_cpp_2::llama_backend::load_backends_from_path(dir),
        None => llama_cpp_2::llama_backend::load_backends(),
    });
    if list_llama_ggml_backend_devices().is_empty() {
        return Err(BackendLibraries::NoneLoaded { dir: shown });
    }
    Ok(())
}

/// A build with its backends linked in has nothing to load.
#[cfg(not(feature = "dynamic-backends"))]
pub(super) fn load_backends(dir: Option<&Path>) -> Result<(), BackendLibraries> {
    match dir {
        Some(_) => Err(BackendLibraries::LinkedIn),
        None => Ok(()),
    }
}

/// The layers to offload: as asked, else every layer when ggml has a GPU
/// and none otherwise. Asking for layers on a GPU that is not there is an
/// error rather than a silent CPU run (llama.cpp itself only warns).
pub(super) fn resolve(requested: Option<GpuLayers>) -> Result<GpuLayers, NoGpu> {
    let available = llama().is_ok_and(|llama| llama.supports_gpu_offload());
    match requested {
        None if available => Ok(GpuLayers::All),
        None => Ok(GpuLayers::Count(0)),
        Some(requested) if requested.offloads() && !available => Err(NoGpu { requested }),
        Some(requested) => Ok(requested),
    }
}

/// The device the layers are on: the GPU llama.cpp offloads to first (a
/// discrete one before an integrated one, as llama.cpp orders them) when any
/// layer is offloaded, else the CPU. Memory figures are read now.
pub(super) fn compute_device(layers: GpuLayers) -> Option<ComputeDevice> {
    llama().ok()?;
    let devices = list_llama_ggml_backend_devices();
    let of_type = |wanted: LlamaBackendDeviceType| {
        devices
            .iter()
            .find(move |device| device.device_type == wanted)
    };
    let gpu = layers
        .offloads()
        .then(|| {
            of_type(LlamaBackendDeviceType::Gpu)
                .or_else(|| of_type(LlamaBackendDeviceType::IntegratedGpu))
        })
        .flatten();
    match gpu {
        Some(device) => Some(ComputeDevice {
            kind: kind_of(device),
            name: device.description.clone(),
            memory_total_bytes: Some(device.memory_total as u64),
            memory_used_bytes: Some(device.memory_total.saturating_sub(device.memory_free) as u64),
            memory_held_bytes: None,
        }),
        // ggml's CPU device reports all of memory as free: no use figure.
        None => of_type(LlamaBackendDeviceType::Cpu).map(|device| ComputeDevice {
            kind: DeviceKind::Cpu,
            name: device.description.clone(),
            memory_total_bytes: Some(device.memory_total as u64),
            memory_used_bytes: None,
            memory_held_bytes: None,
        }),
    }
}

/// A GPU's kind, by the name of its ggml backend.
fn kind_of(device: &LlamaBackendDevice) -> DeviceKind {
    match device.backend.as_str() {
        "CUDA" => DeviceKind::Cuda,
        "MTL" | "Metal" => DeviceKind::Metal,
        "Vulkan" => DeviceKind::Vulkan,
        _ => DeviceKind::OtherGpu,
    }
}
