//! The ghz config files in `deploy/ghz/` run unchanged against a server on
//! `make run`'s address: each names a real method, carries data in the
//! protobuf JSON mapping that decodes into its request, and every call it
//! makes succeeds. They are driven here by `rigger-load`'s engine, which
//! reads ghz's config format (ghz itself is not installable here), with the
//! request count cut down to keep the test short.

mod support;

use std::path::PathBuf;

use rigger_inference::loadgen::{self, Call, GhzConfig, Plan, Stop};
use support::{TestServer, config, repo_path};

fn ghz_configs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_path("deploy/ghz"))
        .expect("deploy/ghz")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn every_ghz_config_runs_against_the_service() {
    let files = ghz_configs();
    assert_eq!(
        files.len(),
        8,
        "reflection and proto variants of four RPCs: {files:?}"
    );
    let server = TestServer::start(config(&["--backend", "embedded"])).await;
    for file in files {
        let name = file.display().to_string();
        let config: GhzConfig =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).expect(&name);
        assert_eq!(config.host, "127.0.0.1:50051", "{name}: make run's address");
        assert!(config.insecure, "{name}: make run serves plaintext");
        if let Some(proto) = &config.proto {
            assert!(
                repo_path(proto).is_file(),
                "{name}: {proto} from the repository root"
            );
            for import in &config.import_paths {
                assert!(repo_path(import).is_dir(), "{name}: {import}");
            }
        }
        let call = Call::from_ghz(&config.call, &config.data).expect(&name);
        let mut plan = Plan::from_ghz(&config).expect(&name);
        let calls = match call {
            Call::GetStatus => 20,
            Call::Generate(_) => 4,
            _ => 1,
        };
        plan.stop = Stop::Total(calls);
        plan.concurrency = plan.concurrency.min(calls);
        let report = loadgen::run(server.channel().await, call, plan).await;
        assert_eq!(report.count(), calls, "{name}");
        assert_eq!(
            report.codes.get("Ok"),
            Some(&calls),
            "{name}: {:?}",
            report.codes
        );
    }
}
