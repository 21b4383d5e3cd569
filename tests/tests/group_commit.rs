//! `--fsync always` with 64 produces in flight on one connection, on every runtime: every
//! acknowledged message survives SIGKILL of the broker's process, and the produces share
//! fsyncs (the count, read from `/metrics`, is far below the produce count).
//!
//! The broker runs in a child process: this test binary started again in `child_broker`, which
//! serves until it is killed.

use std::io::Write;

use streambus_core::{RequestType, Response};
use streambus_server::{Config, FsyncMode, RuntimeKind};
use streambus_tests::RawClient;

const RUNTIMES: [RuntimeKind; 3] = [RuntimeKind::Tokio, RuntimeKind::Smol, RuntimeKind::Blocking];
const PRODUCES: usize = 640;
const WINDOW: usize = 64;

fn config(dir: &str, runtime: RuntimeKind) -> Config {
    let mut c = streambus_tests::broker_config(dir.as_ref(), runtime);
    c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    c.fsync = FsyncMode::Always;
    c
}

/// The broker process: started by the test below with its settings in the environment.
#[test]
#[ignore = "runs only as the child process of fsync_always_pipelined_produces_share_fsyncs_and_survive_sigkill"]
fn child_broker() {
    let dir = std::env::var("GROUP_COMMIT_DIR").unwrap();
    let rt = match std::env::var("GROUP_COMMIT_RUNTIME").unwrap().as_str() {
        "tokio" => RuntimeKind::Tokio,
        "smol" => RuntimeKind::Smol,
        _ => RuntimeKind::Blocking,
    };
    let broker = streambus_server::start(config(&dir, rt)).unwrap();
    println!("READY {} {}", broker.addr(), broker.metrics_addr().unwrap());
    std::io::stdout().flush().unwrap();
    // Serve until killed.
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    std::process::abort();
}

fn fsyncs(metrics: &str) -> u64 {
    streambus_tests::metric(metrics, "streambus_storage_fsyncs_total")
        .expect("the fsync counter in /metrics")
        .parse()
        .unwrap()
}

#[test]
fn fsync_always_pipelined_produces_share_fsyncs_and_survive_sigkill() {
    for (rt, name) in RUNTIMES.into_iter().zip(["tokio", "smol", "blocking"]) {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, ready) = streambus_tests::spawn_child_broker(
            "child_broker",
            [
                ("GROUP_COMMIT_DIR", dir.path().as_os_str()),
                ("GROUP_COMMIT_RUNTIME", name.as_ref()),
            ],
        );
        let (addr, metrics): (std::net::SocketAddr, String) = match ready.split_once(' ') {
            Some((a, m)) => (a.parse().unwrap(), m.to_owned()),
            None => panic!("READY line without the metrics address: {ready}"),
        };
        let mut c = RawClient::connect(addr).unwrap();
        // Create the topic first: its fsyncs don't count.
        let topic = "gc";
        streambus_tests::produce(&mut c, topic, 0, &[b"first"]).unwrap();
        let before = fsyncs(&metrics);
        let mut acked = Vec::new();
        let mut sent = 0;
        let send = |c: &mut RawClient, i: usize| {
            let value = format!("m{i}");
            let (count, bytes) = streambus_tests::message_set(&[value.as_bytes()]);
            let req = streambus_core::Request::Produce(streambus_core::ProduceRequest {
                topic: streambus_core::Topic::new(topic).unwrap(),
                partition: 0,
                messages: streambus_core::MessageSet::new_checked(count, &bytes).unwrap(),
                producer: None,
            });
            (c.send(&req).unwrap(), value)
        };
        let mut waiting = std::collections::HashMap::new();
        while sent < WINDOW {
            let (id, v) = send(&mut c, sent);
            waiting.insert(id, v);
            sent += 1;
        }
        while !waiting.is_empty() {
            let r = c.recv().unwrap();
            let value = waiting
                .remove(&r.request_id())
                .expect("a reply to a request sent");
            let Response::Produce(p) = r.parse(RequestType::Produce).unwrap() else {
                panic!("{name}: produce failed with code {}", r.error_code());
            };
            acked.push((p.base_offset, value.into_bytes()));
            if sent < PRODUCES {
                let (id, v) = send(&mut c, sent);
                waiting.insert(id, v);
                sent += 1;
            }
        }
        let used = fsyncs(&metrics) - before;
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(acked.len(), PRODUCES);
        assert!(
            used * 4 <= PRODUCES as u64,
            "{name}: {used} fsyncs for {PRODUCES} produces with {WINDOW} in flight"
        );
        eprintln!("{name}: {used} fsyncs for {PRODUCES} produces");
        // Everything acknowledged is there after the kill.
        let mut config = config(dir.path().to_str().unwrap(), rt);
        config.metrics_listen = None;
        let broker = streambus_server::start(config).unwrap();
        streambus_tests::assert_stored(broker.addr(), topic, 0, &acked, name);
    }
}
