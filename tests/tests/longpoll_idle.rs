//! 1 000 long-poll fetches waiting on 100 connections cost no CPU, and one produce answers them
//! all, on every runtime. Alone in its test binary, so no other test's work counts against it.

use std::time::{Duration, Instant};

use streambus_core::{
    FetchExtension, FetchRequest, LongPoll, Request, RequestType, Response, Topic,
};
use streambus_server::{Config, FsyncMode, RuntimeKind};
use streambus_tests::{RawClient, produce};

const RUNTIMES: [RuntimeKind; 3] = [RuntimeKind::Tokio, RuntimeKind::Smol, RuntimeKind::Blocking];

fn long_poll(offset: i64) -> Request<'static> {
    Request::Fetch(FetchRequest {
        topic: Topic::new("fan").unwrap(),
        partition: 0,
        offset,
        max_bytes: 1024,
        extension: Some(FetchExtension {
            isolation_level: 0,
            long_poll: Some(LongPoll {
                max_wait_ms: 30_000,
                min_bytes: 1,
            }),
        }),
    })
}

fn produced(c: &mut RawClient, value: &[u8]) -> i64 {
    let r = produce(c, "fan", 0, &[value]).unwrap();
    let Response::Produce(p) = r.parse(RequestType::Produce).unwrap() else {
        panic!("produce failed with code {}", r.error_code());
    };
    p.high_water_mark
}

fn fetched(c: &mut RawClient) -> (u64, Vec<Vec<u8>>) {
    let r = c.recv().unwrap();
    let Response::Fetch(f) = r.parse(RequestType::Fetch).unwrap() else {
        panic!("fetch failed with code {}", r.error_code());
    };
    (
        r.request_id(),
        f.messages.iter().map(|m| m.value.to_vec()).collect(),
    )
}

/// CPU time (user + system) of this whole process, broker included, in clock ticks.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn a_thousand_waiting_fetches_on_a_hundred_connections_use_no_cpu_and_all_return() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.data_dir = dir.path().to_owned();
        config.metrics_listen = None;
        config.runtime = rt;
        config.fsync = FsyncMode::Never;
        let broker = streambus_server::start(config).expect("broker starts");
        let mut producer = RawClient::connect(broker.addr()).unwrap();
        let end = produced(&mut producer, b"seed");
        let mut consumers: Vec<(RawClient, Vec<u64>)> = (0..100)
            .map(|_| {
                let mut c = RawClient::connect(broker.addr()).unwrap();
                let ids = (0..10).map(|_| c.send(&long_poll(end)).unwrap()).collect();
                // A HealthCheck behind them, answered first: all ten are registered.
                let id = c.send(&Request::HealthCheck).unwrap();
                assert_eq!(c.recv().unwrap().request_id(), id);
                (c, ids)
            })
            .collect();
        // All 1000 wait. Over the next half second the process (broker included) may use a
        // few ticks for stray work, never a spinning core (50 ticks).
        let before = cpu_ticks();
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(500) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let used = cpu_ticks() - before;
        assert!(
            used <= 10,
            "{rt:?}: {used} ticks of CPU while 1000 fetches waited"
        );
        produced(&mut producer, b"go");
        for (c, ids) in &mut consumers {
            let mut got: Vec<u64> = (0..10)
                .map(|_| {
                    let (id, values) = fetched(c);
                    assert_eq!(values, vec![b"go".to_vec()], "{rt:?}");
                    id
                })
                .collect();
            got.sort_unstable();
            assert_eq!(&got, ids, "{rt:?}");
        }
    }
}
