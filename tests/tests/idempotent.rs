//! Idempotent produce (protocol §6.2) over real sockets, on every runtime: retried batches are
//! appended once and answered with their original offsets, also after a clean restart and
//! after SIGKILL under `--fsync always`; out-of-order batches get 13, 14 or 30; invalid
//! fields 2.

use std::io::Write;
use std::time::{Duration, Instant};

use streambus_core::{ProducerInfo, RequestType, Response};
use streambus_server::{Config, FsyncMode, Running, RuntimeKind};
use streambus_tests::{RawClient, Reply, fetch_all, idempotent_produce, producer};

const RUNTIMES: [RuntimeKind; 3] = [RuntimeKind::Tokio, RuntimeKind::Smol, RuntimeKind::Blocking];
const TOPIC: &str = "idem";

fn config(dir: &std::path::Path, runtime: RuntimeKind, fsync: FsyncMode) -> Config {
    let mut c = streambus_tests::broker_config(dir, runtime);
    c.fsync = fsync;
    c
}

/// Sends an idempotent Produce to partition 0 and reads its reply.
fn call(c: &mut RawClient, values: &[&[u8]], p: ProducerInfo) -> Reply {
    let (id, bytes) = idempotent_produce(c, TOPIC, 0, values, p);
    c.send_raw(&bytes).unwrap();
    let r = c.recv().unwrap();
    assert_eq!(r.request_id(), id);
    r
}

/// (BaseOffset, NumMessages, HighWaterMark) of a successful Produce reply.
fn offsets(r: &Reply) -> (i64, u32, i64) {
    match r.parse(RequestType::Produce).unwrap() {
        Response::Produce(p) => (p.base_offset, p.num_messages, p.high_water_mark),
        Response::Error(e) => panic!("produce failed: {} {:?}", e.code, e.message),
        other => panic!("not a produce reply: {other:?}"),
    }
}

/// The code and message of an error reply.
fn error(r: &Reply) -> (u16, String) {
    match r.parse(RequestType::Produce).unwrap() {
        Response::Error(e) => (e.code.0, String::from_utf8_lossy(e.message.0).into_owned()),
        other => panic!("not an error reply: {other:?}"),
    }
}

fn values(broker: &Running) -> Vec<(i64, Vec<u8>)> {
    let mut c = RawClient::connect(broker.addr()).unwrap();
    fetch_all(&mut c, TOPIC, 0, 0).unwrap()
}

/// Waits until the broker has appended `n` batches since it started.
fn wait_appends(broker: &Running, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.storage_stats().appends < n {
        assert!(Instant::now() < deadline, "no append within 10 s");
        std::thread::yield_now();
    }
}

/// Sends a batch and closes the connection without reading the reply; returns once the broker
/// has appended it.
fn send_and_drop_reply(broker: &Running, values: &[&[u8]], p: ProducerInfo, appends: u64) {
    let mut c = RawClient::connect(broker.addr()).unwrap();
    let (_, bytes) = idempotent_produce(&mut c, TOPIC, 0, values, p);
    c.send_raw(&bytes).unwrap();
    drop(c);
    wait_appends(broker, appends);
}

#[test]
fn a_batch_whose_reply_was_lost_is_appended_once_and_its_retry_gets_the_same_offsets() {
    for rt in RUNTIMES {
        for fsync in [FsyncMode::Never, FsyncMode::Always] {
            let dir = tempfile::tempdir().unwrap();
            let broker = streambus_server::start(config(dir.path(), rt, fsync)).unwrap();
            let mut c = RawClient::connect(broker.addr()).unwrap();
            // Another producer first, so offsets and sequences differ.
            assert_eq!(
                offsets(&call(&mut c, &[b"x"], producer(9, 0, 0))),
                (0, 1, 1)
            );
            send_and_drop_reply(&broker, &[b"a", b"b"], producer(1, 0, 0), 2);
            let first = offsets(&call(&mut c, &[b"a", b"b"], producer(1, 0, 0)));
            let mut other = RawClient::connect(broker.addr()).unwrap();
            let second = offsets(&call(&mut other, &[b"a", b"b"], producer(1, 0, 0)));
            assert_eq!(first, (1, 2, 3), "{rt:?} {fsync:?}");
            assert_eq!(second, first, "{rt:?} {fsync:?}");
            assert_eq!(broker.storage_stats().appends, 2, "{rt:?} {fsync:?}");
            // The next batch continues the sequence.
            assert_eq!(
                offsets(&call(&mut c, &[b"c"], producer(1, 0, 2))),
                (3, 1, 4)
            );
            let stored: Vec<Vec<u8>> = values(&broker).into_iter().map(|(_, v)| v).collect();
            assert_eq!(stored, [&b"x"[..], b"a", b"b", b"c"], "{rt:?} {fsync:?}");
        }
    }
}

#[test]
fn out_of_order_batches_get_13_14_and_30_and_append_nothing() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = streambus_server::start(config(dir.path(), rt, FsyncMode::Never)).unwrap();
        let mut c = RawClient::connect(broker.addr()).unwrap();
        // Unknown producer, sequence ≠ 0.
        let (code, msg) = error(&call(&mut c, &[b"a"], producer(1, 0, 3)));
        assert_eq!(code, 14, "{rt:?}: {msg}");
        assert!(msg.contains("producer 1") && msg.contains("not 3"), "{msg}");
        assert_eq!(
            offsets(&call(&mut c, &[b"a", b"b"], producer(1, 0, 0))),
            (0, 2, 2)
        );
        // A gap: 2 is expected.
        let (code, msg) = error(&call(&mut c, &[b"c"], producer(1, 0, 5)));
        assert_eq!(code, 13, "{rt:?}: {msg}");
        assert!(
            msg.contains("expected base sequence 2, received 5"),
            "{msg}"
        );
        // A retry of a known sequence with another count is not a duplicate.
        let (code, _) = error(&call(&mut c, &[b"a"], producer(1, 0, 0)));
        assert_eq!(code, 13, "{rt:?}");
        // A new epoch must start at 0 ...
        let (code, msg) = error(&call(&mut c, &[b"c"], producer(1, 1, 2)));
        assert_eq!(code, 13, "{rt:?}: {msg}");
        assert!(
            msg.contains("expected base sequence 0, received 2"),
            "{msg}"
        );
        // ... and then fences the old one.
        assert_eq!(
            offsets(&call(&mut c, &[b"c"], producer(1, 1, 0))),
            (2, 1, 3)
        );
        let (code, msg) = error(&call(&mut c, &[b"d"], producer(1, 0, 2)));
        assert_eq!(code, 30, "{rt:?}: {msg}");
        assert!(
            msg.contains("epoch 0") && msg.contains("current epoch is 1"),
            "{msg}"
        );
        let stored: Vec<Vec<u8>> = values(&broker).into_iter().map(|(_, v)| v).collect();
        assert_eq!(stored, [&b"a"[..], b"b", b"c"], "{rt:?}");
    }
}

#[test]
fn negative_producer_fields_are_invalid_request_and_zero_id_or_no_sequence_is_plain() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = streambus_server::start(config(dir.path(), rt, FsyncMode::Never)).unwrap();
        let mut c = RawClient::connect(broker.addr()).unwrap();
        for (p, field) in [
            (producer(-1, 0, 0), "producer id -1"),
            (producer(1, -1, 0), "producer epoch -1"),
            (producer(1, 0, -1), "base sequence -1"),
        ] {
            let (code, msg) = error(&call(&mut c, &[b"a"], p));
            assert_eq!(code, 2, "{rt:?} {p:?}: {msg}");
            assert!(msg.contains(field), "{msg}");
        }
        // Plain produces, appended each time they are sent.
        let plain = [
            producer(0, -1, 7),
            ProducerInfo {
                producer_id: 5,
                producer_epoch: 0,
                base_sequence: None,
            },
        ];
        for p in plain {
            offsets(&call(&mut c, &[b"p"], p));
            offsets(&call(&mut c, &[b"p"], p));
        }
        // Zero messages: plain, whatever the fields hold.
        assert_eq!(offsets(&call(&mut c, &[], producer(-1, -1, -1))), (4, 0, 4));
        assert_eq!(values(&broker).len(), 4, "{rt:?}");
    }
}

/// Five batches of one producer in flight on one connection; all five retried together on
/// another after their replies were lost.
#[test]
fn five_pipelined_batches_retried_together_land_once_each_in_order() {
    for rt in RUNTIMES {
        for fsync in [FsyncMode::Never, FsyncMode::Always] {
            let dir = tempfile::tempdir().unwrap();
            let broker = streambus_server::start(config(dir.path(), rt, fsync)).unwrap();
            let batches: Vec<[Vec<u8>; 2]> = (0..5)
                .map(|i| {
                    [
                        format!("m{}", 2 * i).into_bytes(),
                        format!("m{}", 2 * i + 1).into_bytes(),
                    ]
                })
                .collect();
            let send_all = |c: &mut RawClient| {
                let mut ids = Vec::new();
                let mut wire = Vec::new();
                for (i, b) in batches.iter().enumerate() {
                    let vals: Vec<&[u8]> = b.iter().map(Vec::as_slice).collect();
                    let (id, bytes) =
                        idempotent_produce(c, TOPIC, 0, &vals, producer(7, 3, 2 * i as i32));
                    ids.push(id);
                    wire.extend_from_slice(&bytes);
                }
                c.send_raw(&wire).unwrap();
                ids
            };
            let mut lost = RawClient::connect(broker.addr()).unwrap();
            send_all(&mut lost);
            drop(lost);
            wait_appends(&broker, 5);
            let mut c = RawClient::connect(broker.addr()).unwrap();
            let ids = send_all(&mut c);
            let mut replies = std::collections::HashMap::new();
            for _ in 0..5 {
                let r = c.recv().unwrap();
                replies.insert(r.request_id(), offsets(&r).0);
            }
            let bases: Vec<i64> = ids.iter().map(|id| replies[id]).collect();
            assert_eq!(bases, [0, 2, 4, 6, 8], "{rt:?} {fsync:?}");
            let stored = values(&broker);
            let want: Vec<(i64, Vec<u8>)> =
                (0..10).map(|i| (i, format!("m{i}").into_bytes())).collect();
            assert_eq!(stored, want, "{rt:?} {fsync:?}");
            assert_eq!(broker.storage_stats().appends, 5, "{rt:?} {fsync:?}");
        }
    }
}

#[test]
fn producer_state_survives_a_clean_restart() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = streambus_server::start(config(dir.path(), rt, FsyncMode::Never)).unwrap();
        let mut c = RawClient::connect(broker.addr()).unwrap();
        assert_eq!(
            offsets(&call(&mut c, &[b"a"], producer(1, 0, 0))),
            (0, 1, 1)
        );
        assert_eq!(
            offsets(&call(&mut c, &[b"b", b"c"], producer(1, 0, 1))),
            (1, 2, 3)
        );
        // A plain batch between: not in the producer index.
        offsets(&streambus_tests::produce(&mut c, TOPIC, 0, &[b"plain"]).unwrap());
        drop(c);
        broker.shutdown().unwrap();
        let broker = streambus_server::start(config(dir.path(), rt, FsyncMode::Never)).unwrap();
        let mut c = RawClient::connect(broker.addr()).unwrap();
        assert_eq!(
            offsets(&call(&mut c, &[b"b", b"c"], producer(1, 0, 1))),
            (1, 2, 4)
        );
        assert_eq!(
            offsets(&call(&mut c, &[b"a"], producer(1, 0, 0))),
            (0, 1, 4)
        );
        assert_eq!(error(&call(&mut c, &[b"d"], producer(1, 0, 4))).0, 13);
        assert_eq!(
            offsets(&call(&mut c, &[b"d"], producer(1, 0, 3))),
            (4, 1, 5)
        );
        assert_eq!(broker.storage_stats().appends, 1, "{rt:?}");
        assert_eq!(values(&broker).len(), 5, "{rt:?}");
    }
}

/// The broker process of `producer_state_survives_sigkill_under_fsync_always`.
#[test]
#[ignore = "runs only as the child process of producer_state_survives_sigkill_under_fsync_always"]
fn child_broker() {
    let dir = std::env::var("IDEM_DIR").unwrap();
    let rt = match std::env::var("IDEM_RUNTIME").unwrap().as_str() {
        "tokio" => RuntimeKind::Tokio,
        "smol" => RuntimeKind::Smol,
        _ => RuntimeKind::Blocking,
    };
    let broker = streambus_server::start(config(dir.as_ref(), rt, FsyncMode::Always)).unwrap();
    println!("READY {}", broker.addr());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    std::process::abort();
}

#[test]
fn producer_state_survives_sigkill_under_fsync_always() {
    for (rt, name) in RUNTIMES.into_iter().zip(["tokio", "smol", "blocking"]) {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, ready) = streambus_tests::spawn_child_broker(
            "child_broker",
            [
                ("IDEM_DIR", dir.path().as_os_str()),
                ("IDEM_RUNTIME", name.as_ref()),
            ],
        );
        let addr: std::net::SocketAddr = ready.parse().unwrap();
        let mut c = RawClient::connect(addr).unwrap();
        let mut acked = Vec::new();
        for i in 0..20 {
            let v = format!("v{i}");
            acked.push(offsets(&call(&mut c, &[v.as_bytes()], producer(42, 0, i))));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let broker = streambus_server::start(config(dir.path(), rt, FsyncMode::Always)).unwrap();
        let mut c = RawClient::connect(broker.addr()).unwrap();
        // The last five are retried: each is answered with its original offsets.
        for i in 15..20 {
            let v = format!("v{i}");
            let got = offsets(&call(&mut c, &[v.as_bytes()], producer(42, 0, i)));
            assert_eq!(
                (got.0, got.1),
                (acked[i as usize].0, 1),
                "{name}: batch {i}"
            );
        }
        assert_eq!(offsets(&call(&mut c, &[b"v20"], producer(42, 0, 20))).0, 20);
        let stored: Vec<Vec<u8>> = values(&broker).into_iter().map(|(_, v)| v).collect();
        let want: Vec<Vec<u8>> = (0..21).map(|i| format!("v{i}").into_bytes()).collect();
        assert_eq!(stored, want, "{name}");
    }
}

/// The embedded client's idempotent produce against the real broker: a retry with the same
/// sequence (its reply lost) gets the original offsets; a forgotten producer gets
/// UnknownProducer and continues in a new epoch.
#[test]
fn embedded_client_retries_get_the_original_offsets() {
    use streambus_core::embedded::{Error, Sequence, blocking::Client};
    use streambus_core::{ClientConfig, ErrorCode, Instant, Message, MessageSetBuilder, Topic};

    let dir = tempfile::tempdir().unwrap();
    let broker =
        streambus_server::start(config(dir.path(), RuntimeKind::Blocking, FsyncMode::Never))
            .unwrap();
    let stream = std::net::TcpStream::connect(broker.addr()).unwrap();
    let started = std::time::Instant::now();
    let clock = move || Instant::from_micros(started.elapsed().as_micros() as u64);
    let (mut tx, mut rx) = ([0u8; 256], [0u8; 256]);
    let mut client = Client::new(
        embedded_io_adapters::std::FromStd::new(stream),
        clock,
        ClientConfig::default(),
        &mut tx[..],
        &mut rx[..],
    );
    let topic = Topic::new(TOPIC).unwrap();
    let mut records = [0u8; 96];
    let mut set = MessageSetBuilder::new(&mut records);
    set.push(&Message::new(b"", b"one")).unwrap();
    set.push(&Message::new(b"", b"two")).unwrap();
    let batch = set.finish();

    let mut seq = Sequence::new(77, 3);
    let before = seq;
    let ack = client
        .produce_idempotent(&mut seq, topic, 0, batch)
        .unwrap();
    assert_eq!(
        (ack.base_offset, ack.num_messages, ack.high_water_mark),
        (0, 2, 2)
    );
    assert_eq!(seq, Sequence { next: 2, ..before });
    // The reply was lost, say: the device sends the same batch with the same sequence.
    let mut retry = before;
    let ack = client
        .produce_idempotent(&mut retry, topic, 0, batch)
        .unwrap();
    assert_eq!(
        (ack.base_offset, ack.num_messages, ack.high_water_mark),
        (0, 2, 2)
    );
    assert_eq!(retry, seq);
    let ack = client
        .produce_idempotent(&mut seq, topic, 0, batch)
        .unwrap();
    assert_eq!(ack.base_offset, 2);
    assert_eq!(seq.next, 4);

    let mut unknown = Sequence {
        next: 5,
        ..Sequence::new(78, 0)
    };
    let e = client
        .produce_idempotent(&mut unknown, topic, 0, batch)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Broker {
                code: ErrorCode::UNKNOWN_PRODUCER
            }
        ),
        "{e:?}"
    );
    assert_eq!(unknown, Sequence::new(78, 1));
    let ack = client
        .produce_idempotent(&mut unknown, topic, 0, batch)
        .unwrap();
    assert_eq!(ack.base_offset, 4);
    drop(client);
    let stored: Vec<Vec<u8>> = values(&broker).into_iter().map(|(_, v)| v).collect();
    assert_eq!(
        stored,
        [&b"one"[..], b"two", b"one", b"two", b"one", b"two"]
    );
}

/// `/metrics` shows how many producers the partitions keep and their memory.
#[test]
fn metrics_count_the_producers_kept_and_their_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), RuntimeKind::Tokio, FsyncMode::Never);
    c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let broker = streambus_server::start(c).unwrap();
    let mut client = RawClient::connect(broker.addr()).unwrap();
    for id in [5, 6] {
        offsets(&call(&mut client, &[b"v"], producer(id, 0, 0)));
    }
    offsets(&call(&mut client, &[b"v"], producer(5, 0, 1)));
    let metrics = broker.metrics_addr().unwrap();
    let gauge = |name: &str| {
        streambus_tests::metric(metrics, name).unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    assert_eq!(gauge("streambus_idempotent_producers"), "2");
    assert_eq!(
        gauge("streambus_idempotent_producer_state_bytes"),
        (2 * streambus_server::storage::BYTES_PER_PRODUCER).to_string()
    );
}
