//! What waits costs no CPU, on every runtime: 1 000 long-poll fetches on 100 connections (and
//! one produce answers them all), and connections idle past the time their buffers linger (and
//! their next request is answered). The tests of this binary take a lock, so no other test's
//! work counts against them.

use std::time::{Duration, Instant};

use streambus_core::{
    FetchExtension, FetchRequest, LongPoll, Request, RequestType, Response, Topic,
};
use streambus_server::{Config, FsyncMode, RuntimeKind};
use streambus_tests::{RawClient, produce};

const RUNTIMES: [RuntimeKind; 3] = [RuntimeKind::Tokio, RuntimeKind::Smol, RuntimeKind::Blocking];

/// Serializes the tests of this binary: they measure the whole process's CPU time.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn start(rt: RuntimeKind, dir: &std::path::Path) -> streambus_server::Running {
    let mut config = Config::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.data_dir = dir.to_owned();
    config.metrics_listen = None;
    config.runtime = rt;
    config.fsync = FsyncMode::Never;
    streambus_server::start(config).expect("broker starts")
}

/// CPU ticks the process uses over half a second of waiting.
fn ticks_over_half_a_second() -> u64 {
    let before = cpu_ticks();
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(50));
    }
    cpu_ticks() - before
}

#[test]
fn connections_idle_past_the_buffer_linger_use_no_cpu_and_answer_their_next_request() {
    let _alone = ALONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(rt, dir.path());
        let ping = |c: &mut RawClient| {
            let r = c.call(&Request::HealthCheck).unwrap();
            assert!(matches!(
                r.parse(RequestType::HealthCheck).unwrap(),
                Response::HealthCheck(_)
            ));
        };
        let mut conns: Vec<RawClient> = (0..50)
            .map(|_| {
                let mut c = RawClient::connect(broker.addr()).unwrap();
                ping(&mut c);
                c
            })
            .collect();
        // Far past the 2 ms linger: every connection has given its buffers back.
        let used = ticks_over_half_a_second();
        assert!(
            used <= 10,
            "{rt:?}: {used} ticks while 50 connections idled"
        );
        for c in &mut conns {
            ping(c);
        }
        // Half-closed by the peer after a request: answered, then closed, without spinning.
        for c in &mut conns {
            c.send(&Request::HealthCheck).unwrap();
            c.shutdown_write();
        }
        for c in &mut conns {
            let r = c.recv().unwrap();
            assert!(r.parse(RequestType::HealthCheck).is_ok(), "{rt:?}");
            assert!(c.is_closed_by_peer(), "{rt:?}");
        }
        let used = ticks_over_half_a_second();
        assert!(
            used <= 10,
            "{rt:?}: {used} ticks after 50 connections closed"
        );
    }
}

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
    let _alone = ALONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(rt, dir.path());
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
        let used = ticks_over_half_a_second();
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
