//! The examples, built by `cargo test`, run against a broker.

use std::path::PathBuf;
use std::process::Command;

use streambus_server::{Config, FsyncMode, RuntimeKind};

/// `target/<profile>/examples/<name>`, next to this test's own `deps/` folder.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    profile_dir.join("examples").join(name)
}

#[test]
fn examples_run_against_a_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.data_dir = dir.path().to_owned();
    cfg.metrics_listen = None;
    cfg.runtime = RuntimeKind::Tokio;
    cfg.fsync = FsyncMode::Never;
    let b = streambus_server::start(cfg).unwrap();
    let addr = b.addr().to_string();
    for (name, expect) in [
        ("produce_consume", "topic example (3 partitions)"),
        ("blocking", "1: world"),
        ("smol", "9: m9"),
        ("admin", "partition 3: offsets 0..0"),
    ] {
        let path = example(name);
        if !path.exists() {
            // Built only by `cargo test` without a test filter on targets.
            eprintln!("skipping {name}: {} not built", path.display());
            continue;
        }
        let out = Command::new(&path).arg(&addr).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(expect), "{name}: {stdout}");
        if name == "produce_consume" {
            assert_eq!(stdout.matches("stored at").count(), 30, "{stdout}");
            assert_eq!(stdout.matches(": message ").count(), 30, "{stdout}");
        }
    }
}
