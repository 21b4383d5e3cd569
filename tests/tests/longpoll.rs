//! Long-poll Fetch (protocol §6.1) against the broker on every runtime: a waiting fetch is
//! answered by the append that satisfies it, by its deadline, by shutdown or by the deletion of
//! its topic; many waiting fetches cost no CPU; a fetch without the extension is unchanged.

use std::time::{Duration, Instant};

use streambus_core::{
    DeleteTopicRequest, ErrorCode, FetchExtension, FetchRequest, LongPoll, Request, RequestType,
    Response, Topic,
};
use streambus_server::{Config, FsyncMode, Running, RuntimeKind};
use streambus_tests::{RawClient, produce};

const RUNTIMES: [RuntimeKind; 3] = [RuntimeKind::Tokio, RuntimeKind::Smol, RuntimeKind::Blocking];

fn start(dir: &std::path::Path, runtime: RuntimeKind) -> Running {
    let mut c = Config::default();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.data_dir = dir.to_owned();
    c.metrics_listen = None;
    c.runtime = runtime;
    c.fsync = FsyncMode::Never;
    streambus_server::start(c).expect("broker starts")
}

fn long_poll(
    topic: &str,
    offset: i64,
    max_bytes: u32,
    wait_ms: u32,
    min_bytes: u32,
) -> Request<'_> {
    Request::Fetch(FetchRequest {
        topic: Topic::new(topic).unwrap(),
        partition: 0,
        offset,
        max_bytes,
        extension: Some(FetchExtension {
            isolation_level: 0,
            long_poll: Some(LongPoll {
                max_wait_ms: wait_ms,
                min_bytes,
            }),
        }),
    })
}

/// The end offset after producing `values` to `topic`/0.
fn produced(c: &mut RawClient, topic: &str, values: &[&[u8]]) -> i64 {
    let r = produce(c, topic, 0, values).unwrap();
    let Response::Produce(p) = r.parse(RequestType::Produce).unwrap() else {
        panic!("produce failed with code {}", r.error_code());
    };
    p.high_water_mark
}

/// A fetch's values and high-water mark, or its error code.
type Fetched = Result<(Vec<Vec<u8>>, i64), u16>;

/// A fetch reply's id and outcome.
fn fetched(c: &mut RawClient) -> (u64, Fetched) {
    let r = c.recv().unwrap();
    let id = r.request_id();
    match r.parse(RequestType::Fetch) {
        Ok(Response::Fetch(f)) => (
            id,
            Ok((
                f.messages.iter().map(|m| m.value.to_vec()).collect(),
                f.high_water_mark,
            )),
        ),
        _ => (id, Err(r.error_code())),
    }
}

/// Sends a HealthCheck behind what was sent and waits for its reply, which must come before
/// the replies of fetches still waiting: proves the connection read (and the broker registered)
/// everything sent before it.
fn barrier(c: &mut RawClient) {
    let id = c.send(&Request::HealthCheck).unwrap();
    let r = c.recv().unwrap();
    assert_eq!(r.request_id(), id, "a waiting fetch was answered early");
}

#[test]
fn a_waiting_fetch_is_answered_by_the_produce_to_its_partition() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path(), rt);
        let mut producer = RawClient::connect(broker.addr()).unwrap();
        let end = produced(&mut producer, "events", &[b"old"]);
        let mut consumer = RawClient::connect(broker.addr()).unwrap();
        let id = consumer
            .send(&long_poll("events", end, 1 << 20, 20_000, 1))
            .unwrap();
        barrier(&mut consumer);
        // A produce to another topic wakes nothing.
        produced(&mut producer, "other", &[b"x"]);
        barrier(&mut consumer);
        let sent = Instant::now();
        produced(&mut producer, "events", &[b"new"]);
        let (got, result) = fetched(&mut consumer);
        let took = sent.elapsed();
        assert_eq!(got, id, "{rt:?}");
        assert_eq!(result, Ok((vec![b"new".to_vec()], end + 1)), "{rt:?}");
        // Woken by the append, not by the 20 s deadline.
        assert!(took < Duration::from_secs(5), "{rt:?}: took {took:?}");
    }
}

#[test]
fn with_no_produce_the_fetch_returns_empty_after_max_wait() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path(), rt);
        let mut c = RawClient::connect(broker.addr()).unwrap();
        let end = produced(&mut c, "quiet", &[b"a", b"b"]);
        let sent = Instant::now();
        let id = c.send(&long_poll("quiet", end, 1 << 20, 300, 1)).unwrap();
        let (got, result) = fetched(&mut c);
        let took = sent.elapsed();
        assert_eq!(got, id);
        assert_eq!(result, Ok((vec![], end)), "{rt:?}");
        assert!(
            took >= Duration::from_millis(295) && took < Duration::from_secs(3),
            "{rt:?}: answered after {took:?}, MaxWaitMs was 300"
        );
    }
}

#[test]
fn min_bytes_larger_than_one_batch_waits_for_enough_data() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path(), rt);
        let mut producer = RawClient::connect(broker.addr()).unwrap();
        let end = produced(&mut producer, "big", &[b"seed"]);
        let value = [7u8; 1000];
        let mut consumer = RawClient::connect(broker.addr()).unwrap();
        // One 1000-byte value makes a record of a little over 1000 bytes: 1500 needs two.
        let id = consumer
            .send(&long_poll("big", end, 1 << 20, 20_000, 1500))
            .unwrap();
        barrier(&mut consumer);
        produced(&mut producer, "big", &[&value]);
        // The append above was judged before its reply: the fetch must still wait.
        barrier(&mut consumer);
        produced(&mut producer, "big", &[&value]);
        let (got, result) = fetched(&mut consumer);
        assert_eq!(got, id);
        assert_eq!(
            result,
            Ok((vec![value.to_vec(), value.to_vec()], end + 2)),
            "{rt:?}"
        );
    }
}

#[test]
fn errors_are_answered_at_once_never_after_a_wait() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path(), rt);
        let mut c = RawClient::connect(broker.addr()).unwrap();
        let end = produced(&mut c, "e", &[b"a"]);
        let sent = Instant::now();
        c.send(&long_poll("missing", 0, 1024, 20_000, 1)).unwrap();
        assert_eq!(
            fetched(&mut c).1,
            Err(ErrorCode::TOPIC_NOT_FOUND.0),
            "{rt:?}"
        );
        c.send(&long_poll("e", end + 1, 1024, 20_000, 1)).unwrap();
        assert_eq!(
            fetched(&mut c).1,
            Err(ErrorCode::OFFSET_OUT_OF_RANGE.0),
            "{rt:?}"
        );
        // MaxWaitMs 0 or MinBytes 0: answered at once, as a v1 fetch.
        c.send(&long_poll("e", end, 1024, 0, 1)).unwrap();
        assert_eq!(fetched(&mut c).1, Ok((vec![], end)), "{rt:?}");
        c.send(&long_poll("e", end, 1024, 20_000, 0)).unwrap();
        assert_eq!(fetched(&mut c).1, Ok((vec![], end)), "{rt:?}");
        assert!(sent.elapsed() < Duration::from_secs(5), "{rt:?}");
    }
}

#[test]
fn deleting_the_topic_answers_its_waiting_fetches_topic_not_found() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path(), rt);
        let mut admin = RawClient::connect(broker.addr()).unwrap();
        let end = produced(&mut admin, "doomed", &[b"a"]);
        let mut consumer = RawClient::connect(broker.addr()).unwrap();
        let id = consumer
            .send(&long_poll("doomed", end, 1024, 20_000, 1))
            .unwrap();
        barrier(&mut consumer);
        let r = admin
            .call(&Request::DeleteTopic(DeleteTopicRequest {
                topic: Topic::new("doomed").unwrap(),
            }))
            .unwrap();
        assert!(matches!(
            r.parse(RequestType::DeleteTopic).unwrap(),
            Response::DeleteTopic(d) if d.deleted
        ));
        let (got, result) = fetched(&mut consumer);
        assert_eq!(got, id);
        assert_eq!(result, Err(ErrorCode::TOPIC_NOT_FOUND.0), "{rt:?}");
    }
}

#[test]
fn shutdown_answers_waiting_fetches_at_once_with_what_exists() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path(), rt);
        let mut c = RawClient::connect(broker.addr()).unwrap();
        let end = produced(&mut c, "s", &[b"a"]);
        let ids: Vec<u64> = (0..3)
            .map(|_| c.send(&long_poll("s", end, 1024, 30_000, 1)).unwrap())
            .collect();
        barrier(&mut c);
        let started = Instant::now();
        let stopper = std::thread::spawn(move || broker.shutdown().unwrap());
        let mut got: Vec<u64> = (0..3)
            .map(|_| {
                let (id, result) = fetched(&mut c);
                assert_eq!(result, Ok((vec![], end)), "{rt:?}");
                id
            })
            .collect();
        got.sort_unstable();
        assert_eq!(got, ids, "{rt:?}");
        assert!(
            c.is_closed_by_peer(),
            "{rt:?}: closed cleanly after the replies"
        );
        stopper.join().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{rt:?}: shutdown took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_fetch_with_only_the_isolation_level_is_answered_at_once_and_bad_levels_refused() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path(), rt);
        let mut c = RawClient::connect(broker.addr()).unwrap();
        let end = produced(&mut c, "iso", &[b"a"]);
        let fetch = |level| {
            Request::Fetch(FetchRequest {
                topic: Topic::new("iso").unwrap(),
                partition: 0,
                offset: end,
                max_bytes: 1024,
                extension: Some(FetchExtension {
                    isolation_level: level,
                    long_poll: None,
                }),
            })
        };
        for level in [0, 1] {
            c.send(&fetch(level)).unwrap();
            assert_eq!(fetched(&mut c).1, Ok((vec![], end)), "{rt:?}");
        }
        c.send(&fetch(2)).unwrap();
        assert_eq!(
            fetched(&mut c).1,
            Err(ErrorCode::INVALID_REQUEST.0),
            "{rt:?}"
        );
    }
}
