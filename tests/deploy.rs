//! The deployment files hold up without a cluster: the Kubernetes
//! manifests validate against the API's schemas offline (PyPI
//! `kubernetes-validate`, strict: unknown fields are errors), the probes
//! ask the health entries the service serves, and the Dockerfile builds
//! the way `make run` does.

mod support;

use std::process::Command;

use support::{python, repo_path};

const KUBERNETES_VERSION: &str = "1.33.0";

fn manifests() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo_path("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| {
            path.extension().is_some_and(|ext| ext == "yaml")
                && path
                    .file_name()
                    .is_some_and(|name| name != "kustomization.yaml")
        })
        .map(|path| path.display().to_string())
        .collect();
    files.sort();
    files
}

/// Validates `files` offline against the API schemas (strict), each
/// reported as passed.
fn validate(files: &[String]) {
    let output = Command::new(python())
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES_VERSION,
        ])
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for file in files {
        assert!(
            report.contains(&format!("INFO {file} passed")),
            "{file}: {report}"
        );
    }
}

#[test]
fn kubernetes_manifests_validate_against_the_api_schemas() {
    let files = manifests();
    assert_eq!(files.len(), 6, "{files:?}");
    validate(&files);

    let kustomization = std::fs::read_to_string(repo_path("deploy/kubernetes/kustomization.yaml"))
        .expect("kustomization");
    for file in &files {
        let name = file.rsplit('/').next().unwrap();
        assert!(kustomization.contains(name), "kustomization lists {name}");
    }
}

/// The runtime pool the gateway discovers by DNS.
#[test]
fn the_runtime_pool_validates_and_its_service_is_headless() {
    let dir = repo_path("deploy/kubernetes/runtime-pool");
    let files: Vec<String> = ["statefulset.yaml", "service.yaml"]
        .iter()
        .map(|name| dir.join(name).display().to_string())
        .collect();
    validate(&files);
    let service = std::fs::read_to_string(&files[1]).unwrap();
    assert!(
        service.contains("clusterIP: None"),
        "one DNS address per pod"
    );
    let statefulset = std::fs::read_to_string(&files[0]).unwrap();
    assert!(statefulset.contains("serviceName: llama-pool"));
}

#[test]
fn a_broken_manifest_fails_validation() {
    let broken = std::env::temp_dir().join(format!("rigger-broken-{}.yaml", std::process::id()));
    let deployment = std::fs::read_to_string(repo_path("deploy/kubernetes/deployment.yaml"))
        .expect("deployment");
    std::fs::write(
        &broken,
        deployment.replace("periodSeconds: 5", "periodSecond: 5"),
    )
    .expect("write");
    let status = Command::new(python())
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES_VERSION,
        ])
        .arg(&broken)
        .output()
        .expect("run kubernetes-validate")
        .status;
    let _ = std::fs::remove_file(&broken);
    assert!(!status.success(), "a misspelt field is caught");
}

#[test]
fn probes_and_scrape_settings_match_the_service() {
    let deployment = std::fs::read_to_string(repo_path("deploy/kubernetes/deployment.yaml"))
        .expect("deployment");
    assert!(deployment.contains("service: rigger.inference.v1.InferenceService"));
    assert!(deployment.contains("prometheus.io/port: \"9464\""));
    let config =
        std::fs::read_to_string(repo_path("deploy/kubernetes/configmap.yaml")).expect("configmap");
    assert!(config.contains("RIGGER_METRICS_LISTEN: 0.0.0.0:9464"));
    assert!(config.contains("RIGGER_AUTH_TOKEN_FILE: /var/run/secrets/rigger/token"));
    assert!(deployment.contains("mountPath: /var/run/secrets/rigger"));
}

#[test]
fn the_dockerfile_builds_as_make_run_does() {
    let makefile = std::fs::read_to_string(repo_path("Makefile")).expect("Makefile");
    let dockerfile = std::fs::read_to_string(repo_path("deploy/Dockerfile")).expect("Dockerfile");
    assert!(
        makefile.contains("scripts/setup-python.sh")
            && dockerfile.contains("scripts/setup-python.sh")
    );
    assert!(
        makefile.contains("scripts/setup-build.sh")
            && dockerfile.contains("scripts/setup-build.sh")
    );
    assert!(
        makefile.contains("cargo) build --release --locked")
            || makefile.contains("build --release --locked")
    );
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(dockerfile.contains("USER 10001"), "non-root");
    assert!(dockerfile.contains("HEALTHCHECK"));
}
