//! The cache directory the service and the tests use (`config::cache_dir`)
//! is the one `scripts/setup-python.sh` fills, for every way the environment
//! can name it: set, unset, or set to an empty string (which the shell's
//! `${VAR:-default}` treats as unset).
//!
//! One test in its own binary: it changes this process's environment.

use std::{path::PathBuf, process::Command};

use rigger_inference::config::cache_dir;

const VARIABLES: [&str; 3] = ["RIGGER_CACHE_DIR", "XDG_CACHE_HOME", "HOME"];

/// The line of the setup script that computes the directory.
fn setup_script_formula() -> String {
    let script = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/setup-python.sh"),
    )
    .expect("read scripts/setup-python.sh");
    script
        .lines()
        .find(|line| line.starts_with("cache_dir="))
        .expect("setup-python.sh assigns cache_dir")
        .to_owned()
}

fn from_setup_script(formula: &str, environment: &[(&str, Option<&str>)]) -> PathBuf {
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg(format!("{formula}; printf %s \"$cache_dir\""));
    for (name, value) in environment {
        match value {
            Some(value) => shell.env(name, value),
            None => shell.env_remove(name),
        };
    }
    let output = shell.output().expect("run sh");
    assert!(output.status.success(), "{output:?}");
    PathBuf::from(String::from_utf8(output.stdout).expect("UTF-8 path"))
}

#[test]
fn the_service_and_the_setup_script_agree_on_the_cache_dir() {
    let formula = setup_script_formula();
    let cases: [[Option<&str>; 3]; 6] = [
        [Some("/r"), Some("/x"), Some("/h")],
        [None, Some("/x"), Some("/h")],
        [Some(""), Some("/x"), Some("/h")],
        [None, None, Some("/h")],
        [Some(""), Some(""), Some("/h")],
        [None, Some(""), Some("/h")],
    ];
    for case in cases {
        let environment: Vec<(&str, Option<&str>)> = VARIABLES.into_iter().zip(case).collect();
        for (name, value) in &environment {
            // SAFETY: this binary's only test; no other thread reads the
            // environment meanwhile.
            unsafe {
                match value {
                    Some(value) => std::env::set_var(name, value),
                    None => std::env::remove_var(name),
                }
            }
        }
        assert_eq!(
            cache_dir(),
            from_setup_script(&formula, &environment),
            "environment {environment:?}"
        );
    }
}
