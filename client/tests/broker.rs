//! The SDK against the real broker, started in-process on 127.0.0.1:0, and against fake
//! peers that go silent or hang up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use streambus_client::{
    BufferFull, Client, Consumer, ConsumerConfig, Error, ErrorCode, Offset, Producer,
    ProducerConfig, Record, ResetPolicy, partition_for_key,
};
use streambus_server::{Config, FsyncMode, Running, RuntimeKind};

fn config(dir: &std::path::Path, listen: SocketAddr) -> Config {
    let mut c = Config::default();
    c.listen = listen;
    c.data_dir = dir.to_owned();
    c.metrics_listen = None;
    c.runtime = RuntimeKind::Tokio;
    c.fsync = FsyncMode::Never;
    c
}

fn broker(dir: &std::path::Path) -> Running {
    streambus_server::start(config(dir, "127.0.0.1:0".parse().unwrap())).unwrap()
}

async fn connect(b: &Running) -> Client {
    Client::connect(b.addr().to_string()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_and_broker_errors() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = connect(&b).await;
    assert_eq!(c.health().await.unwrap().status, "healthy");
    assert!(c.create_topic("orders", 3).await.unwrap());
    assert!(!c.create_topic("orders", 3).await.unwrap());
    let e = c.create_topic("orders", 2).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TOPIC_EXISTS), "{e}");
    assert!(!e.is_retriable());
    assert!(c.create_topic("aaa", 1).await.unwrap());
    let names: Vec<(String, u32)> = c
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.name, t.partitions))
        .collect();
    assert_eq!(names, vec![("aaa".into(), 1), ("orders".into(), 3)]);
    let d = c.describe_topic("orders").await.unwrap();
    assert_eq!(d.len(), 3);
    assert!(
        d.iter()
            .enumerate()
            .all(|(i, p)| p.partition == i as u32 && p.start == 0 && p.end == 0)
    );
    let e = c.offsets("orders", 7).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PARTITION_NOT_FOUND), "{e}");
    assert!(
        e.to_string().starts_with(
            "get offsets on topic \"orders\" partition 7: the broker answered PartitionNotFound (5)"
        ),
        "{e}"
    );
    c.delete_topic("aaa").await.unwrap();
    let e = c.delete_topic("aaa").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TOPIC_NOT_FOUND), "{e}");
    assert!(matches!(e, Error::Broker { .. }));
    assert_eq!(c.partition_count("aaa").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_usage_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let addr = b.addr().to_string();
    // Each bad setting is refused before dialling, naming the setting.
    let bad_settings: [(&str, streambus_client::ClientBuilder); 6] = [
        (
            "request_timeout",
            Client::builder().request_timeout(Duration::ZERO),
        ),
        // Past the clock's range once added to it (the dial adds two settings).
        (
            "max_poll_wait",
            Client::builder().max_poll_wait(Duration::MAX),
        ),
        (
            "connect_timeout",
            Client::builder().connect_timeout(Duration::from_secs(366 * 86_400)),
        ),
        (
            "metadata_refresh",
            Client::builder().metadata_refresh(Duration::ZERO),
        ),
        ("pool_size", Client::builder().pool_size(0)),
        ("max_in_flight", Client::builder().max_in_flight(1000)),
    ];
    for (name, builder) in bad_settings {
        let e = builder.connect(&addr).await.unwrap_err();
        assert!(
            matches!(e, Error::Config { setting, .. } if setting == name),
            "{name}: {e}"
        );
    }
    let e = Client::builder()
        .request_timeout(Duration::MAX)
        .connect(&addr)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid setting request_timeout: 18446744073709551615.999999999s is longer than the \
         maximum of 365 days"
    );
    let e = Client::builder()
        .connect_bootstrap(Vec::<String>::new())
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid setting addr: no broker address given"
    );
    // In a bootstrap list too, each address is checked before any is dialled.
    for bad in [
        "",
        "localhost",
        "127.0.0.1:",
        ":9092",
        "127.0.0.1:99999",
        "127.0.0.1:9092,localhost",
    ] {
        let e = Client::connect(bad).await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::Config {
                    setting: "addr",
                    ..
                }
            ),
            "{bad:?}: {e}"
        );
    }
    let c = connect(&b).await;
    for bad in ["", ".", "..", "a/b", &"x".repeat(250)] {
        let e = c.create_topic(bad, 1).await.unwrap_err();
        assert!(matches!(e, Error::InvalidInput { .. }), "{bad:?}: {e}");
    }
    let e = c.create_topic("t", 0).await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    c.create_topic("t", 2).await.unwrap();
    let p = Producer::new(&c);
    let e = p
        .send(Record::new("t", "v").partition(2))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("partition 2 is out of range: the topic has 2"),
        "{e}"
    );
    let e = p.send(Record::new("", "v")).await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    let e = p
        .send(Record::new("t", vec![0u8; 11 << 20]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    let e = Producer::with_config(
        &c,
        ProducerConfig::default().delivery_timeout(Duration::ZERO),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
    for (name, config) in [
        (
            "delivery_timeout",
            ProducerConfig::default().delivery_timeout(Duration::MAX),
        ),
        ("linger", ProducerConfig::default().linger(Duration::MAX)),
        (
            "buffer_full",
            ProducerConfig::default().buffer_full(BufferFull::Block(Duration::MAX)),
        ),
    ] {
        let e = Producer::with_config(&c, config).unwrap_err();
        assert!(
            matches!(e, Error::Config { setting, .. } if setting == name),
            "{name}: {e}"
        );
    }
    // None, or more than the 5 batches the broker remembers per idempotent producer.
    for n in [0, 6] {
        let e = Producer::with_config(&c, ProducerConfig::default().max_in_flight(n)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Config {
                    setting: "max_in_flight",
                    ..
                }
            ),
            "{e}"
        );
    }
    // Without idempotence one batch is in flight whatever the setting.
    Producer::with_config(
        &c,
        ProducerConfig::default()
            .idempotence(false)
            .max_in_flight(6),
    )
    .unwrap();
    let mut consumer = Consumer::new(&c);
    let e = consumer.poll(Duration::from_millis(10)).await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    let e = consumer.assign("t", 0, Offset::At(-1)).await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    let e = consumer.seek("t", 1, Offset::Earliest).await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    let e = consumer
        .assign("missing", 0, Offset::Earliest)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TOPIC_NOT_FOUND), "{e}");
    // "Wait as long as it takes" as a `Duration::MAX` timeout: no deadline, no overflow.
    let at = p.send(Record::new("t", "last").partition(0)).await.unwrap();
    consumer
        .assign("t", 0, Offset::At(at.offset))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), consumer.poll(Duration::MAX))
        .await
        .expect("the record is there: poll returns it")
        .unwrap();
    let got: Vec<_> = got.iter().map(|r| (r.offset, r.value().to_vec())).collect();
    assert_eq!(got, [(at.offset, b"last".to_vec())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_returns_consecutive_offsets_and_auto_creates() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = connect(&b).await;
    let p = Producer::new(&c);
    for i in 0..5 {
        let m = p
            .send(Record::new("fresh", format!("v{i}")).header("h", "x"))
            .await
            .unwrap();
        assert_eq!((&*m.topic, m.partition, m.offset), ("fresh", 0, i));
    }
    let mut consumer = Consumer::new(&c);
    consumer.assign("fresh", 0, Offset::At(2)).await.unwrap();
    let got = consumer.poll(Duration::from_secs(5)).await.unwrap();
    let offsets: Vec<i64> = got.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, vec![2, 3, 4]);
    assert_eq!(got[0].value(), b"v2");
    assert_eq!(
        got[0].headers().collect::<Vec<_>>(),
        vec![(&b"h"[..], &b"x"[..])]
    );
    assert_eq!(consumer.position("fresh", 0), Some(5));
    p.close().await.unwrap();
}

/// `enqueue_many` takes records of a known topic under one lock, a topic not known yet through
/// `enqueue`'s path (its partition count read first), and stops at the first record refused:
/// the records before it were taken (their deliveries resolve to consecutive offsets), it and
/// the ones after were not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_many_takes_records_in_order_up_to_the_first_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = connect(&b).await;
    assert!(c.create_topic("two", 2).await.unwrap());
    let p = Producer::new(&c);
    p.send(Record::new("one", "first")).await.unwrap();
    let mut deliveries = Vec::new();
    // "one" known, "two" not yet (read mid-call), then "one" again.
    let records = (0..3)
        .map(|i| Record::new("one", format!("a{i}")))
        .chain((0..2).map(|i| Record::new("two", format!("b{i}")).partition(1)))
        .chain((3..5).map(|i| Record::new("one", format!("a{i}"))));
    p.enqueue_many(records, &mut deliveries).await.unwrap();
    let mut at = Vec::new();
    for d in deliveries.drain(..) {
        let m = d.await.unwrap();
        at.push((m.topic.to_string(), m.partition, m.offset));
    }
    let want: Vec<(String, u32, i64)> = vec![
        ("one".into(), 0, 1),
        ("one".into(), 0, 2),
        ("one".into(), 0, 3),
        ("two".into(), 1, 0),
        ("two".into(), 1, 1),
        ("one".into(), 0, 4),
        ("one".into(), 0, 5),
    ];
    assert_eq!(at, want);
    // Partition 2 of a two-partition topic: refused, and nothing after it is taken.
    let records = vec![
        Record::new("two", "c0").partition(0),
        Record::new("two", "bad").partition(2),
        Record::new("two", "c1").partition(0),
    ];
    let e = p.enqueue_many(records, &mut deliveries).await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    assert_eq!(deliveries.len(), 1);
    let m = deliveries.pop().unwrap().await.unwrap();
    assert_eq!((&*m.topic, m.partition, m.offset), ("two", 0, 0));
    assert_eq!(c.offsets("two", 0).await.unwrap().end, 1);
    p.close().await.unwrap();
}

/// `enqueue_many` into one `Deliveries`: the records of two topics and of round-robin
/// partitions make several runs, and the `Delivered` it resolves to names, in the order the
/// records were taken, exactly where each landed (as each one's `Delivery` would). Repeated
/// 30 times under a fail-fast buffer: no buffer byte is lost to the chunked reservation (a
/// call of over 90 % of the buffer is taken after them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_name_where_each_record_of_an_enqueue_many_call_landed() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = connect(&b).await;
    assert!(c.create_topic("rr", 2).await.unwrap());
    assert!(c.create_topic("one", 1).await.unwrap());
    let p = Producer::with_config(
        &c,
        ProducerConfig::default()
            .buffer_max_bytes(560_000)
            .batch_max_bytes(64 << 10)
            .buffer_full(BufferFull::FailFast),
    )
    .unwrap();
    // Learn both topics first (an unknown topic's first record takes `enqueue`'s path).
    p.send(Record::new("rr", "x").partition(0)).await.unwrap();
    p.send(Record::new("one", "x")).await.unwrap();
    let mut next = HashMap::from([(("rr", 0u32), 1i64), (("rr", 1), 0), (("one", 0), 1)]);
    for round in 0..30 {
        let mut deliveries = streambus_client::Deliveries::new();
        // 990 round-robin records (alternating partitions), then 10 of "one".
        let records = (0..990)
            .map(|i| Record::new("rr", format!("{round}-{i}")))
            .chain((0..10).map(|i| Record::new("one", format!("{round}-{i}"))));
        p.enqueue_many(records, &mut deliveries).await.unwrap();
        assert_eq!(deliveries.len(), 1000);
        let landed = deliveries.await.unwrap();
        assert_eq!(landed.len(), 1000);
        let all: Vec<_> = landed.iter().collect();
        assert_eq!(all.len(), 1000);
        for (i, m) in all.iter().enumerate() {
            assert_eq!(landed.get(i).as_ref(), Some(m), "record {i}");
            let topic: &str = if i < 990 { "rr" } else { "one" };
            assert_eq!(&*m.topic, topic, "record {i}");
            let at = next.get_mut(&(topic, m.partition)).unwrap();
            assert_eq!(m.offset, *at, "record {i} of round {round}");
            *at += 1;
        }
        assert_eq!(landed.get(1000), None);
    }
    // Round robin spread each call over both partitions.
    assert_eq!(next[&("rr", 0)] + next[&("rr", 1)], 1 + 30 * 990);
    assert!(next[&("rr", 1)] > 10_000, "{next:?}");
    assert_eq!(next[&("one", 0)], 1 + 300);
    assert_eq!(c.offsets("one", 0).await.unwrap().end, 301);
    // The whole buffer is free again: 1 000 records of 500 bytes (over 90 % of it) are taken
    // at once without the fail-fast refusal.
    let big = streambus_client::Bytes::from(vec![b'v'; 500]);
    let mut deliveries = streambus_client::Deliveries::new();
    p.enqueue_many(
        (0..1000).map(|_| Record::new("one", big.clone())),
        &mut deliveries,
    )
    .await
    .expect("the buffer has room for them all");
    assert_eq!(deliveries.await.unwrap().get(999).unwrap().offset, 1300);
    p.close().await.unwrap();
}

/// Several full batches handed to one connection at once (a current-thread runtime: the
/// connection's task runs only once the caller awaits) each go out whole: the connection
/// writes what it holds before it encodes a request that does not fit behind it. Before, the
/// second batch failed with "exceeds the maximum frame" though each fits a frame alone.
#[tokio::test]
async fn full_batches_queued_on_a_connection_together_each_go_out_whole() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = Client::builder()
        .max_frame_len(64 << 10)
        .connect(b.addr().to_string())
        .await
        .unwrap();
    let p = Producer::with_config(
        &c,
        ProducerConfig::default()
            .batch_max_bytes(60 << 10)
            .linger(Duration::from_secs(10)),
    )
    .unwrap();
    p.send(Record::new("big", "first")).await.unwrap();
    // 2 250 records of 100-byte values: four full batches of 60 KiB (each fills most of a
    // frame on its own) and a fifth sent by the flush, all queued before the connection's
    // task runs.
    let value = streambus_client::Bytes::from(vec![b'v'; 100]);
    let mut deliveries = Vec::new();
    p.enqueue_many(
        (0..2250).map(|_| Record::new("big", value.clone())),
        &mut deliveries,
    )
    .await
    .unwrap();
    p.flush().await;
    for (i, d) in deliveries.into_iter().enumerate() {
        let m = d.await.unwrap_or_else(|e| panic!("record {i}: {e}"));
        assert_eq!(m.offset, 1 + i as i64, "record {i}");
    }
    assert_eq!(c.offsets("big", 0).await.unwrap().end, 2251);
    p.close().await.unwrap();
}

/// A `Deliveries` whose records fail (the broker is gone, the delivery timeout passes)
/// resolves to the error, and `close` reports each record's failure: none is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_of_records_that_failed_resolve_to_the_error_and_close_reports_each() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = Client::builder()
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .connect(b.addr().to_string())
        .await
        .unwrap();
    let p = Producer::with_config(
        &c,
        ProducerConfig::default()
            .delivery_timeout(Duration::from_millis(500))
            .retry_backoff(Duration::from_millis(20)),
    )
    .unwrap();
    p.send(Record::new("gone", "x")).await.unwrap();
    b.shutdown().unwrap();
    let mut deliveries = streambus_client::Deliveries::new();
    p.enqueue_many(
        (0..50).map(|i| Record::new("gone", format!("{i}"))),
        &mut deliveries,
    )
    .await
    .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(30), deliveries)
        .await
        .expect("the records outlived their delivery timeout")
        .unwrap_err();
    assert!(e.is_retriable(), "{e}");
    let failures = p.close().await.unwrap_err();
    assert_eq!(failures.len(), 50, "{failures:?}");
}

/// `lag` and `caught_up` follow the broker's high-water marks: unknown before the first
/// answer, the records left while reading, 0 at the end; a poll returns at once (empty) when
/// the consumer has just caught up; records produced after are read up to the end again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_knows_when_it_has_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = connect(&b).await;
    assert!(c.create_topic("lag", 2).await.unwrap());
    let p = Producer::new(&c);
    for i in 0..10u32 {
        p.send(Record::new("lag", format!("v{i}")).partition(i % 2))
            .await
            .unwrap();
    }
    // Small fetches: several answers per partition before the end.
    let mut consumer = Consumer::with_config(&c, ConsumerConfig::default().max_bytes(1)).unwrap();
    assert!(!consumer.caught_up(), "nothing assigned");
    consumer.assign("lag", 0, Offset::Earliest).await.unwrap();
    consumer.assign("lag", 1, Offset::At(3)).await.unwrap();
    assert_eq!(consumer.lag("lag", 0), None, "before any answer");
    assert_eq!(consumer.lag("nope", 0), None, "not assigned");
    let mut got: Vec<(u32, i64)> = Vec::new();
    // Each poll has a long timeout: the loop ends because the consumer catches up, and a
    // poll made when it just has returns at once (bounded here by the outer timeout).
    tokio::time::timeout(Duration::from_secs(20), async {
        while !consumer.caught_up() {
            for r in consumer.poll(Duration::from_secs(600)).await.unwrap() {
                got.push((r.partition, r.offset));
            }
        }
    })
    .await
    .expect("the consumer catches up");
    got.sort_unstable();
    assert_eq!(
        got,
        vec![(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 3), (1, 4)]
    );
    assert_eq!(consumer.lag("lag", 0), Some(0));
    assert_eq!(consumer.lag("lag", 1), Some(0));
    for i in 0..3 {
        p.send(Record::new("lag", format!("w{i}")).partition(1))
            .await
            .unwrap();
    }
    let mut more = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while more.len() < 3 {
            for r in consumer.poll(Duration::from_secs(600)).await.unwrap() {
                more.push((r.partition, r.offset));
            }
        }
    })
    .await
    .expect("the new records arrive");
    assert_eq!(more, vec![(1, 5), (1, 6), (1, 7)]);
    assert_eq!(consumer.lag("lag", 1), Some(0));
    assert!(consumer.caught_up());
    p.close().await.unwrap();
}

/// Many records, batched, over 4 partitions: every record acknowledged, on its key's
/// partition, and consumed back in order per partition, no gap, no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_produce_then_consume_everything_in_order() {
    const N: usize = 100_000;
    const PARTS: u32 = 4;
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = connect(&b).await;
    c.create_topic("bulk", PARTS).await.unwrap();
    let p = Producer::new(&c);
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(N);
    for i in 0..N {
        let key = format!("key-{}", i % 1000);
        let r = Record::new("bulk", format!("{i:0100}")).key(key);
        deliveries.push((i, p.enqueue(r).await.unwrap()));
    }
    let mut by_partition: HashMap<u32, Vec<(i64, usize)>> = HashMap::new();
    for (i, d) in deliveries {
        let m = d.await.unwrap();
        let key = format!("key-{}", i % 1000);
        assert_eq!(m.partition, partition_for_key(key.as_bytes(), PARTS));
        by_partition
            .entry(m.partition)
            .or_default()
            .push((m.offset, i));
    }
    let produced = started.elapsed();
    p.close().await.unwrap();
    for (part, v) in &by_partition {
        let offsets: Vec<i64> = v.iter().map(|x| x.0).collect();
        assert_eq!(
            offsets,
            (0..v.len() as i64).collect::<Vec<_>>(),
            "partition {part}"
        );
    }
    let started = Instant::now();
    let mut consumer = Consumer::new(&c);
    for part in 0..PARTS {
        consumer
            .assign("bulk", part, Offset::Earliest)
            .await
            .unwrap();
    }
    let mut seen: HashMap<u32, Vec<(i64, usize)>> = HashMap::new();
    let mut total = 0;
    while total < N {
        let batch = consumer.poll(Duration::from_secs(10)).await.unwrap();
        assert!(!batch.is_empty(), "stalled at {total}");
        for r in batch {
            let i: usize = std::str::from_utf8(r.value()).unwrap().parse().unwrap();
            assert_eq!(r.key(), format!("key-{}", i % 1000).into_bytes());
            seen.entry(r.partition).or_default().push((r.offset, i));
            total += 1;
        }
    }
    assert_eq!(total, N);
    assert_eq!(seen, by_partition);
    eprintln!(
        "{N} records: produced in {produced:?}, consumed in {:?}",
        started.elapsed()
    );
}

/// A peer that reads requests and never answers: each call fails with TimedOut within its
/// timeout; one that hangs up: each pending call fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_calls_fail_within_their_timeout_when_the_peer_dies() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (hang_up_tx, hang_up_rx) = tokio::sync::oneshot::channel::<()>();
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        tokio::select! {
            _ = async {
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 { break; }
                    total += n;
                    let _ = got_tx.send(total);
                }
            } => {}
            _ = hang_up_rx => {}
        }
        drop(s);
    });
    let timeout = Duration::from_millis(800);
    let c = Client::builder()
        .pool_size(1)
        .request_timeout(timeout)
        .connect(addr.to_string())
        .await
        .unwrap();
    // Silent: every call times out, within its timeout (plus scheduling slack).
    let started = Instant::now();
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.health().await })
        })
        .collect();
    for call in calls {
        let e = call.await.unwrap().unwrap_err();
        assert!(matches!(e, Error::TimedOut { .. }), "{e}");
        assert!(e.is_retriable());
    }
    let took = started.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(1000),
        "{took:?}"
    );
    // Hang up while 8 more calls wait: each fails at once with an I/O error.
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.list_topics().await })
        })
        .collect();
    // 8 HealthChecks (20 bytes each) then 8 ListTopics.
    while got_rx.recv().await.unwrap() < 16 * 20 {}
    let started = Instant::now();
    hang_up_tx.send(()).unwrap();
    for call in calls {
        let e = call.await.unwrap().unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }
    assert!(started.elapsed() < timeout, "{:?}", started.elapsed());
    // Nobody listens any more: the next call fails (connection refused), not hangs.
    let e = c.health().await.unwrap_err();
    assert!(e.is_retriable(), "{e}");
}

/// The broker stops while records are in flight: every delivery resolves (acknowledged or
/// an error) within the delivery timeout, `close()` reports each failure, and after a
/// restart on the same address the same client carries on.
/// A peer that reads requests and never answers, on a pool of one connection with room for
/// one call: a call that timed out keeps its slot until the core frees it (the late answer
/// or the core's own timeout), so the next call times out waiting for a slot rather than
/// being written behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_call_keeps_its_slot_until_the_core_frees_it() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let peer = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            total += n;
            let _ = got_tx.send(total);
        }
    });
    let timeout = Duration::from_millis(300);
    let c = Client::builder()
        .pool_size(1)
        .max_in_flight(1)
        .request_timeout(timeout)
        .connect(addr.to_string())
        .await
        .unwrap();
    let e = c.health().await.unwrap_err();
    assert!(
        matches!(e, Error::TimedOut { waiting, .. } if waiting == "waiting for the broker's answer"),
        "{e}"
    );
    let started = Instant::now();
    let e = c.health().await.unwrap_err();
    assert!(
        matches!(e, Error::TimedOut { waiting, .. } if waiting == "waiting for a free connection slot"),
        "{e}"
    );
    let took = started.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(1000),
        "{took:?}"
    );
    // Only the first HealthCheck (20 bytes) was written.
    assert_eq!(got_rx.try_recv(), Ok(20));
    assert!(got_rx.try_recv().is_err());
    drop(c);
    peer.abort();
}

/// A call whose future is dropped after its request went out leaves the connection usable:
/// the next calls on the same single connection each get their own answer, none the dropped
/// call's. (Guards any path where a caller drives the connection itself.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_dropped_in_flight_leaves_its_connection_usable() {
    use std::future::Future;
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = Client::builder()
        .pool_size(1)
        .connect(b.addr().to_string())
        .await
        .unwrap();
    assert!(c.create_topic("kept", 2).await.unwrap());
    for _ in 0..3 {
        // Polled once: the request is written and its answer awaited; then dropped. (The
        // answer may come within that one poll: then try again.)
        let dropped_in_flight = 'found: {
            for _ in 0..100 {
                let mut call = Box::pin(c.list_topics());
                let first =
                    std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx))).await;
                if first.is_pending() {
                    break 'found true;
                }
            }
            false
        };
        assert!(dropped_in_flight);
        assert_eq!(c.health().await.unwrap().status, "healthy");
        assert_eq!(c.offsets("kept", 1).await.unwrap().partition, 1);
    }
    let topics: Vec<(String, u32)> = c
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.name, t.partitions))
        .collect();
    assert_eq!(topics, vec![("kept".into(), 2)]);
}

/// The broker restarts while the client's only connection is idle: a call that is not
/// retried (CreateTopic) finds the old connection closed before writing to it and goes out
/// on a fresh one, rather than failing with a connection error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_while_idle_is_replaced_before_a_call_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let addr = b.addr();
    let c = Client::builder()
        .pool_size(1)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .connect(addr.to_string())
        .await
        .unwrap();
    assert!(c.create_topic("before", 1).await.unwrap());
    b.shutdown().unwrap();
    let b = streambus_server::start(config(dir.path(), addr)).unwrap();
    assert!(c.create_topic("after", 1).await.unwrap());
    assert_eq!(c.list_topics().await.unwrap().len(), 2);
    drop(b);
}

/// A peer that takes each connection and closes it at once (a broker at its connection limit,
/// a proxy without a backend): such a connection counts as a failed dial, so `connect` or
/// each call after it fails with the connection's error after one dial (two when a
/// connection closes between being picked and taking the call), and the next dial waits for
/// the reconnect backoff: far from the 60 s request timeout, and never a dial loop at full
/// speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_closing_every_connection_at_once_fails_each_call_as_a_refused_dial() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let peer = tokio::spawn({
        let accepted = accepted.clone();
        async move {
            while let Ok((conn, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                drop(conn);
            }
        }
    });
    let client = tokio::time::timeout(
        Duration::from_secs(30),
        Client::builder()
            .pool_size(1)
            .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(5))
            .request_timeout(Duration::from_secs(60))
            .connect(addr.to_string()),
    )
    .await
    .expect("connect dialled until its timeout");
    let mut errors = Vec::new();
    let calls = match client {
        Err(e) => {
            errors.push(e);
            1
        }
        Ok(c) => {
            // CreateTopic is never sent twice: each call is its own picks of a connection.
            for _ in 0..10 {
                let e = tokio::time::timeout(Duration::from_secs(30), c.create_topic("t", 1))
                    .await
                    .expect("the call dialled until its timeout")
                    .unwrap_err();
                errors.push(e);
            }
            11
        }
    };
    // Each is the refusal, or (when the connection took the call before it saw the close)
    // the request unsent or lost with the connection (closed, reset).
    for e in &errors {
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.is_retriable(), "{e}");
    }
    let dials = accepted.load(Ordering::SeqCst);
    assert!(dials <= 2 * calls, "{dials} connections for {calls} calls");
    peer.abort();
}

/// A fake broker on 127.0.0.1 with a 4 KiB receive buffer: it answers the first request (the
/// producer's Metadata) naming itself the leader of topic "big", partition 0, then reads
/// nothing more until released (its socket fills up: the client's writes block).
fn metadata_then_silent_peer() -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    use streambus_core::broker::peek_request_id;
    use streambus_core::{
        BrokerInfo, BrokerList, ErrorCode as CoreCode, FrameDecoder, MetadataResponse,
        PartitionList, PartitionMetadata, ReplicaList, Response, Status, Text, Topic,
        TopicMetadata, TopicMetadataList, encode_response, response_encoded_len,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let listener = socket.listen(1).unwrap();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let peer = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let len = loop {
            if let Ok(Status::Complete(len)) = FrameDecoder::default().next_frame(&buf) {
                break len;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the client hung up before its Metadata request");
            buf.extend_from_slice(&chunk[..n]);
        };
        let id = peek_request_id(&buf).unwrap();
        buf.drain(..len);
        let replicas = [0];
        let partitions = [PartitionMetadata {
            partition: 0,
            leader: 0,
            leader_epoch: 0,
            replicas: ReplicaList::from_slice(&replicas),
        }];
        let topics = [TopicMetadata {
            name: Topic::new("big").unwrap(),
            error_code: CoreCode::NONE,
            partitions: PartitionList::from_slice(&partitions),
        }];
        let brokers = [BrokerInfo {
            node_id: 0,
            host: Text(b"127.0.0.1"),
            port: addr.port(),
        }];
        let r = Response::Metadata(MetadataResponse {
            brokers: BrokerList::from_slice(&brokers),
            topics: TopicMetadataList::from_slice(&topics),
        });
        let mut out = vec![0; response_encoded_len(&r)];
        let n = encode_response(id, &r, &mut out).unwrap();
        s.write_all(&out[..n]).await.unwrap();
        // Reads nothing more.
        let _ = release_rx.await;
        drop(s);
    });
    (addr, release_tx, peer)
}

/// A producer with `config` on a client of one connection (requests time out after `timeout`,
/// frames up to `max_frame_len`) to [`metadata_then_silent_peer`], with the peer's release and
/// task.
async fn silent_peer_producer(
    timeout: Duration,
    max_frame_len: u32,
    config: ProducerConfig,
) -> (
    Producer,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (addr, release_tx, peer) = metadata_then_silent_peer();
    let c = Client::builder()
        .pool_size(1)
        .request_timeout(timeout)
        .max_frame_len(max_frame_len)
        .connect(addr.to_string())
        .await
        .unwrap();
    (Producer::with_config(&c, config).unwrap(), release_tx, peer)
}

/// A peer that answers the producer's Metadata request (one partition of `big`, encoded by
/// the core) and then stops reading: a Produce larger than the socket buffers blocks its
/// write, and the call still fails with TimedOut at its deadline (the connection's deadline
/// races its writes, not only its reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_blocked_writing_to_a_peer_that_stops_reading_times_out() {
    let timeout = Duration::from_millis(500);
    let (producer, release_tx, peer) = silent_peer_producer(
        timeout,
        streambus_core::DEFAULT_MAX_FRAME_LEN,
        ProducerConfig::default()
            .batch_max_bytes(9 << 20)
            .buffer_max_bytes(9 << 20)
            .retries(0)
            .idempotence(false),
    )
    .await;
    let started = Instant::now();
    // Bounded here too: a regression fails the test instead of hanging it.
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        producer.send(Record::new("big", vec![b'v'; 8 << 20])),
    )
    .await
    .expect("the call hangs past its timeout")
    .unwrap_err();
    assert!(matches!(e, Error::TimedOut { .. }), "{e}");
    let took = started.elapsed();
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(1000),
        "{took:?}"
    );
    let _ = release_tx.send(());
    peer.await.unwrap();
}

/// A request held until the one before it is written (it did not fit behind it in the
/// connection's transmit buffer) fails at its deadline as never sent, saying so, while the
/// one before it is blocked writing to a peer that stopped reading.
#[tokio::test]
async fn a_batch_held_behind_one_blocked_writing_times_out_as_never_sent() {
    let (producer, release_tx, peer) = silent_peer_producer(
        Duration::from_millis(500),
        13 << 20,
        ProducerConfig::default()
            .batch_max_bytes(12 << 20)
            .buffer_max_bytes(64 << 20)
            .linger(Duration::from_secs(10))
            .retries(0),
    )
    .await;
    // Two batches of two 5 MiB records (the fifth record opens a third): both handed to the
    // connection at once (this runtime has one thread); the second can't follow the first
    // into the transmit buffer until the first is written, which never finishes (10 MiB,
    // more than twice what a socket's send buffer holds at most by default, 4 MiB).
    let value = streambus_client::Bytes::from(vec![b'v'; 5 << 20]);
    let mut deliveries = Vec::new();
    producer
        .enqueue_many(
            (0..5).map(|_| Record::new("big", value.clone())),
            &mut deliveries,
        )
        .await
        .unwrap();
    let mut errors = Vec::new();
    for d in deliveries.into_iter().take(4) {
        let e = tokio::time::timeout(Duration::from_secs(10), d)
            .await
            .expect("a delivery hangs past its timeout")
            .unwrap_err();
        errors.push(e.to_string());
    }
    for e in &errors[..2] {
        assert!(e.contains("waiting for the broker's answer"), "{errors:?}");
    }
    for e in &errors[2..] {
        assert!(
            e.contains("waiting for the connection to write the requests queued before it"),
            "{errors:?}"
        );
    }
    let _ = release_tx.send(());
    peer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stop_and_restart_mid_flight() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let addr = b.addr();
    let c = Client::builder()
        .request_timeout(Duration::from_millis(500))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect(addr.to_string())
        .await
        .unwrap();
    let delivery = Duration::from_secs(2);
    let p = Producer::with_config(
        &c,
        ProducerConfig::default()
            .delivery_timeout(delivery)
            .retry_backoff(Duration::from_millis(50)),
    )
    .unwrap();
    c.create_topic("live", 1).await.unwrap();
    p.send(Record::new("live", "first")).await.unwrap();
    let mut deliveries = Vec::new();
    let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The broker stops once the producer is well under way (20 records enqueued).
    let enqueued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stopper = {
        let (stopped, enqueued) = (stopped.clone(), enqueued.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while enqueued.load(std::sync::atomic::Ordering::SeqCst) < 20 {
                assert!(Instant::now() < deadline, "the producer never got going");
                std::thread::yield_now();
            }
            b.shutdown().unwrap();
            stopped.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    // Records before, during and for 50 ms after the shutdown.
    let mut after = None;
    while after.is_none_or(|t: Instant| t.elapsed() < Duration::from_millis(50)) {
        match p.enqueue(Record::new("live", "x")).await {
            Ok(d) => {
                deliveries.push((Instant::now(), d));
                enqueued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Err(e) => panic!("enqueue: {e}"),
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
        if after.is_none() && stopped.load(std::sync::atomic::Ordering::SeqCst) {
            after = Some(Instant::now());
        }
    }
    stopper.join().unwrap();
    let (mut ok, mut failed) = (1usize, 0usize);
    for (at, d) in deliveries {
        match d.await {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(e.is_retriable(), "{e}");
                failed += 1;
            }
        }
        assert!(
            at.elapsed() < delivery + Duration::from_secs(1),
            "{:?}",
            at.elapsed()
        );
    }
    assert!(ok > 0 && failed > 0, "ok {ok} failed {failed}");
    let reported = p.close().await.unwrap_err();
    assert_eq!(reported.len(), failed);
    // Restart on the same address: the client reconnects.
    let b = streambus_server::start(config(dir.path(), addr)).unwrap();
    let p = Producer::new(&c);
    let m = p.send(Record::new("live", "after")).await.unwrap();
    assert_eq!(m.offset, ok as i64);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_waits_rather_than_fails() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = Client::builder()
        .pool_size(1)
        .max_in_flight(1)
        .connect(b.addr().to_string())
        .await
        .unwrap();
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.health().await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status, "healthy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_fails_fast_or_blocks_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = connect(&b).await;
    let small = ProducerConfig::default()
        .linger(Duration::from_secs(2))
        .batch_max_bytes(1000)
        .buffer_max_bytes(1000);
    let p = Producer::with_config(&c, small.clone().buffer_full(BufferFull::FailFast)).unwrap();
    let value = vec![7u8; 300];
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(p.enqueue(Record::new("buf", value.clone())).await.unwrap());
    }
    let e = p
        .enqueue(Record::new("buf", value.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidInput { .. }) && e.to_string().contains("buffer is full"),
        "{e}"
    );
    p.flush().await;
    for (i, d) in held.drain(..).enumerate() {
        assert_eq!(d.await.unwrap().offset, i as i64);
    }
    let p = Producer::with_config(
        &c,
        small.buffer_full(BufferFull::Block(Duration::from_millis(100))),
    )
    .unwrap();
    for _ in 0..3 {
        held.push(p.enqueue(Record::new("buf", value.clone())).await.unwrap());
    }
    let started = Instant::now();
    let e = p
        .enqueue(Record::new("buf", value.clone()))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::TimedOut { .. }), "{e}");
    assert!(started.elapsed() >= Duration::from_millis(100));
    // Room frees up once the batch is delivered: a blocked send then goes through.
    let p2 = p.clone();
    let blocked = tokio::spawn(async move { p2.send(Record::new("buf", vec![1u8; 300])).await });
    p.flush().await;
    assert_eq!(blocked.await.unwrap().unwrap().offset, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_out_of_range_follows_the_reset_policy() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = connect(&b).await;
    let p = Producer::new(&c);
    for i in 0..3 {
        p.send(Record::new("r", format!("{i}"))).await.unwrap();
    }
    let mut earliest = Consumer::new(&c);
    earliest.assign("r", 0, Offset::At(1000)).await.unwrap();
    let got = earliest.poll(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        got.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );

    let cfg = ConsumerConfig::default().reset(ResetPolicy::Error);
    let mut strict = Consumer::with_config(&c, cfg).unwrap();
    strict.assign("r", 0, Offset::At(1000)).await.unwrap();
    let e = strict.poll(Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::OFFSET_OUT_OF_RANGE), "{e}");
    assert_eq!(strict.position("r", 0), Some(1000));

    let cfg = ConsumerConfig::default().reset(ResetPolicy::Latest);
    let mut latest = Consumer::with_config(&c, cfg).unwrap();
    latest.assign("r", 0, Offset::At(1000)).await.unwrap();
    assert!(
        latest
            .poll(Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(latest.position("r", 0), Some(3));
    p.send(Record::new("r", "3")).await.unwrap();
    let got = latest.poll(Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![3]);
}

/// A consumer long-polling an idle partition gets a new record on its append, not at the end of
/// its 30 s wait: the broker holds the fetch and answers it on the append (the time itself is a
/// benchmark's: `streambus bench longpoll`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_consumer_wakes_soon_after_a_produce() {
    let dir = tempfile::tempdir().unwrap();
    let b = std::sync::Arc::new(broker(dir.path()));
    let c = connect(&b).await;
    c.create_topic("idle", 1).await.unwrap();
    let mut consumer = Consumer::with_config(
        &c,
        ConsumerConfig::default().max_wait(Duration::from_secs(30)),
    )
    .unwrap();
    consumer.assign("idle", 0, Offset::Latest).await.unwrap();
    let (c2, b2) = (c.clone(), b.clone());
    let produced = tokio::spawn(async move {
        let p = Producer::new(&c2);
        // Produce once the consumer's fetch waits at the broker (it is idle, long-polling).
        let deadline = Instant::now() + Duration::from_secs(10);
        while b2.waiting_fetches() == 0 {
            assert!(Instant::now() < deadline, "the consumer never long-polled");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let sent = Instant::now();
        p.send(Record::new("idle", "wake")).await.unwrap();
        (sent, Instant::now())
    });
    let mut got = Vec::new();
    while got.is_empty() {
        got = consumer.poll(Duration::from_secs(5)).await.unwrap();
    }
    let woke = Instant::now();
    let (sent, acked) = produced.await.unwrap();
    let lag = woke.saturating_duration_since(sent);
    eprintln!(
        "consumer woke {lag:?} after the produce was sent ({:?} after its ack)",
        woke.saturating_duration_since(acked)
    );
    assert_eq!(got[0].value(), b"wake");
    // The broker holds the fetch (long poll) and answers on the append, not at its 30 s
    // MaxWait: the bound is far from both, so a loaded machine does not make it flaky.
    assert!(lag < Duration::from_secs(10), "{lag:?}");
}

/// Records sent while the broker is down are retried with backoff and delivered once it is
/// back within the delivery timeout; a consumer polling meanwhile gets errors (never a hang)
/// and then resumes where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_sent_while_the_broker_is_down_arrive_after_it_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let addr = b.addr();
    let c = Client::builder()
        .request_timeout(Duration::from_millis(500))
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .connect(addr.to_string())
        .await
        .unwrap();
    let p = Producer::with_config(
        &c,
        ProducerConfig::default()
            .delivery_timeout(Duration::from_secs(10))
            .retry_backoff(Duration::from_millis(20)),
    )
    .unwrap();
    for i in 0..3 {
        assert_eq!(
            p.send(Record::new("back", format!("{i}")))
                .await
                .unwrap()
                .offset,
            i
        );
    }
    let mut consumer = Consumer::new(&c);
    consumer.assign("back", 0, Offset::Earliest).await.unwrap();
    let got = consumer.poll(Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 3);
    b.shutdown().unwrap();
    let deliveries: Vec<_> = futures_join(&p, 3..13).await;
    let started = Instant::now();
    let e = consumer.poll(Duration::from_secs(5)).await.unwrap_err();
    assert!(e.is_retriable(), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let b = streambus_server::start(config(dir.path(), addr)).unwrap();
    for (i, d) in deliveries {
        assert_eq!(d.await.unwrap().offset, i);
    }
    let mut offsets = Vec::new();
    while offsets.len() < 10 {
        match consumer.poll(Duration::from_secs(5)).await {
            Ok(records) => offsets.extend(records.iter().map(|r| r.offset)),
            Err(e) => assert!(e.is_retriable(), "{e}"),
        }
    }
    assert_eq!(offsets, (3..13).collect::<Vec<i64>>());
    p.close().await.unwrap();
    drop(b);
}

async fn futures_join(
    p: &Producer,
    range: std::ops::Range<i64>,
) -> Vec<(i64, streambus_client::Delivery)> {
    let mut out = Vec::new();
    for i in range {
        out.push((
            i,
            p.enqueue(Record::new("back", format!("{i}")))
                .await
                .unwrap(),
        ));
    }
    out
}

/// The public futures can be spawned on a multi-threaded runtime.
#[test]
fn public_futures_are_send() {
    fn send<T: Send>(_: T) {}
    fn check(c: Client, p: Producer, mut consumer: Consumer) {
        send(c.health());
        send(c.create_topic("t", 1));
        send(c.list_topics());
        send(c.describe_topic("t"));
        send(p.send(Record::new("t", "v")));
        send(p.enqueue(Record::new("t", "v")));
        send(p.flush());
        send(p.close());
        send(consumer.poll(Duration::from_secs(1)));
        send(consumer.assign("t", 0, Offset::Earliest));
        send(consumer.recv());
    }
    let _ = check;
}

/// With auto-create off, a record for a missing topic fails with TopicNotFound; once the
/// topic exists with 3 partitions, keyed records land on their hashed partitions (the
/// producer read the partition count again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_counts_are_read_again_after_topic_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "127.0.0.1:0".parse().unwrap());
    cfg.auto_create_topics = false;
    let b = streambus_server::start(cfg).unwrap();
    let c = connect(&b).await;
    let p = Producer::new(&c);
    let e = p
        .send(Record::new("later", "x").key("k"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TOPIC_NOT_FOUND), "{e}");
    assert!(e.to_string().contains("topic \"later\" partition 0"), "{e}");
    c.create_topic("later", 3).await.unwrap();
    for k in ["a", "b", "c", "customer-42"] {
        let m = p.send(Record::new("later", "x").key(k)).await.unwrap();
        assert_eq!(m.partition, partition_for_key(k.as_bytes(), 3), "{k}");
    }
    assert_eq!(p.close().await.unwrap_err().len(), 1);
}

/// Eight tasks share one producer (round robin over 2 partitions) while another flushes:
/// every record is acknowledged once, offsets per partition are contiguous, and the consumer
/// reads exactly those records. Dropping the producer without `close` still sends what it
/// had batched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_share_one_producer() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = connect(&b).await;
    c.create_topic("shared", 2).await.unwrap();
    let p = Producer::with_config(
        &c,
        ProducerConfig::default().linger(Duration::from_millis(2)),
    )
    .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let p = p.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..5000 {
                    let d = p
                        .enqueue(Record::new("shared", format!("{t}-{i}")))
                        .await
                        .unwrap();
                    out.push(d);
                }
                let mut acked = Vec::new();
                for d in out {
                    let m = d.await.unwrap();
                    acked.push((m.partition, m.offset));
                }
                acked
            })
        })
        .collect();
    let flusher = {
        let p = p.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                p.flush().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    flusher.await.unwrap();
    all.sort();
    for part in 0..2 {
        let offsets: Vec<i64> = all.iter().filter(|a| a.0 == part).map(|a| a.1).collect();
        assert_eq!(
            offsets,
            (0..offsets.len() as i64).collect::<Vec<_>>(),
            "partition {part}"
        );
        assert_eq!(offsets.len(), 20_000, "round robin splits evenly");
    }
    // Dropped without close: the last handle sends the batch.
    let last = p
        .enqueue(Record::new("shared", "last").partition(0))
        .await
        .unwrap();
    drop(p);
    assert_eq!(last.await.unwrap().offset, 20_000);
    let mut consumer = Consumer::new(&c);
    consumer
        .assign("shared", 0, Offset::Earliest)
        .await
        .unwrap();
    consumer
        .assign("shared", 1, Offset::Earliest)
        .await
        .unwrap();
    let mut n = 0;
    while n < 40_001 {
        n += consumer.poll(Duration::from_secs(5)).await.unwrap().len();
    }
    assert_eq!(n, 40_001);
    assert!(
        consumer
            .poll(Duration::from_millis(100))
            .await
            .unwrap()
            .is_empty()
    );
}

/// A fake broker that answers each HealthCheck 150 ms after reading it, one at a time
/// (frames found with the core's decoder, answers encoded by the core).
async fn slow_broker() -> SocketAddr {
    use streambus_core::broker::peek_request_id;
    use streambus_core::{
        FrameDecoder, HealthCheckResponse, Response, Status, Text, encode_response,
        response_encoded_len,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Ok(Status::Complete(len)) = FrameDecoder::default().next_frame(&buf) {
                        let id = peek_request_id(&buf).unwrap();
                        buf.drain(..len);
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        let r = Response::HealthCheck(HealthCheckResponse {
                            status: Text::from("healthy"),
                            uptime_secs: 1,
                        });
                        let mut out = vec![0; response_encoded_len(&r)];
                        let n = encode_response(id, &r, &mut out).unwrap();
                        if s.write_all(&out[..n]).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

/// One connection, one request at a time, a broker taking 150 ms per answer: four
/// concurrent calls wait their turn for capacity and all succeed (none fails fast).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_calls_wait_for_capacity_within_their_timeout() {
    let addr = slow_broker().await;
    let c = Client::builder()
        .pool_size(1)
        .max_in_flight(1)
        .request_timeout(Duration::from_secs(3))
        .connect(addr.to_string())
        .await
        .unwrap();
    let started = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.health().await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status, "healthy");
    }
    // Served one after another.
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    // With a 250 ms timeout, the first of three calls is answered (150 ms); the two others,
    // waiting behind it, time out within their timeout.
    let c = Client::builder()
        .pool_size(1)
        .max_in_flight(1)
        .request_timeout(Duration::from_millis(250))
        .connect(addr.to_string())
        .await
        .unwrap();
    let started = Instant::now();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { (c.health().await, Instant::now()) })
        })
        .collect();
    let mut outcomes = Vec::new();
    for call in calls {
        let (r, at) = call.await.unwrap();
        assert!(
            at - started < Duration::from_millis(750),
            "{:?}",
            at - started
        );
        outcomes.push(
            r.map(|h| h.status)
                .map_err(|e| matches!(e, Error::TimedOut { .. })),
        );
    }
    outcomes.sort();
    assert_eq!(outcomes, vec![Ok("healthy".into()), Err(true), Err(true)]);
}

/// A consumer long-polling many idle partitions keeps at most half the client's capacity:
/// an admin call on the same client is answered at once, not after the polls' wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_polling_consumer_leaves_room_for_other_calls() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = Client::builder()
        .pool_size(1)
        .max_in_flight(4)
        .connect(b.addr().to_string())
        .await
        .unwrap();
    c.create_topic("quiet", 6).await.unwrap();
    let mut consumer = Consumer::with_config(
        &c,
        ConsumerConfig::default().max_wait(Duration::from_secs(3)),
    )
    .unwrap();
    for p in 0..6 {
        consumer.assign("quiet", p, Offset::Latest).await.unwrap();
    }
    // Let the fetchers take their slots and wait in the broker.
    assert!(
        consumer
            .poll(Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty()
    );
    let started = Instant::now();
    assert_eq!(c.health().await.unwrap().status, "healthy");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// The consumer as a `Stream`: 60 records over two partitions come out in order per
/// partition, no gap, no repeat; a record produced while the stream waits is its next item;
/// with nothing assigned the item is an error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_is_a_stream_of_records_in_order_per_partition() {
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = connect(&b).await;
    c.create_topic("flow", 2).await.unwrap();
    let p = Producer::new(&c);
    let mut pending = Vec::new();
    for i in 0..60u32 {
        let r = Record::new("flow", format!("{i}")).partition(i % 2);
        pending.push(p.enqueue(r).await.unwrap());
    }
    for d in pending {
        d.await.unwrap();
    }

    let mut empty = Consumer::new(&c);
    let e = empty.next().await.unwrap().unwrap_err();
    assert!(e.to_string().contains("no partition is assigned"), "{e}");

    let mut consumer = Consumer::new(&c);
    consumer.assign("flow", 0, Offset::Earliest).await.unwrap();
    consumer.assign("flow", 1, Offset::Earliest).await.unwrap();
    let got: Vec<_> = tokio::time::timeout(
        Duration::from_secs(10),
        consumer.by_ref().take(60).collect::<Vec<_>>(),
    )
    .await
    .expect("60 records within 10 s");
    let mut seen: HashMap<u32, Vec<(i64, u32)>> = HashMap::new();
    for r in got {
        let r = r.unwrap();
        let i: u32 = std::str::from_utf8(r.value()).unwrap().parse().unwrap();
        seen.entry(r.partition).or_default().push((r.offset, i));
    }
    for part in 0..2u32 {
        let want: Vec<(i64, u32)> = (0..30).map(|n| (n as i64, n * 2 + part)).collect();
        assert_eq!(seen[&part], want, "partition {part}");
    }
    assert_eq!(consumer.position("flow", 1), Some(30));

    // Waiting at the tail: the next item is the record produced meanwhile.
    let next = tokio::spawn(async move {
        let r = consumer.next().await.unwrap().unwrap();
        (r.partition, r.offset, r.value().to_vec())
    });
    p.send(Record::new("flow", "late").partition(1))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .expect("the stream yields the new record")
        .unwrap();
    assert_eq!(got, (1, 30, b"late".to_vec()));
}

/// A broker with an auth file: `writer` may do everything on `app.*`, `reader` may only
/// consume it.
fn secured_broker(dir: &std::path::Path, listen: SocketAddr) -> Running {
    use streambus_server::auth::token_sha256_hex;
    let path = dir.join("auth.toml");
    std::fs::write(
        &path,
        format!(
            "[principals]\n\
             writer = {{ token_sha256 = \"{}\", produce = [\"app.*\"], consume = [\"app.*\"], admin = [\"app.*\"] }}\n\
             reader = {{ token_sha256 = \"{}\", consume = [\"app.*\"] }}\n",
            token_sha256_hex("writer-token"),
            token_sha256_hex("reader-token"),
        ),
    )
    .unwrap();
    let mut c = config(&dir.join("data"), listen);
    c.auth_file = Some(path);
    streambus_server::start(c).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_authenticates_every_connection_and_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = secured_broker(dir.path(), "127.0.0.1:0".parse().unwrap());
    let addr = b.addr().to_string();
    let fast = || {
        Client::builder()
            .request_timeout(Duration::from_secs(2))
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
    };

    // No token: connected (HealthCheck needs none), but every other call is 40, not retriable.
    let anonymous = fast().connect(&addr).await.unwrap();
    assert!(anonymous.health().await.is_ok());
    let e = anonymous.create_topic("app.x", 1).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AUTHENTICATION_FAILED), "{e}");
    assert!(!e.is_retriable());

    // A wrong token: the first connection is refused, 40, not retriable, and the token is in
    // no message.
    let e = fast()
        .token("not-the-token")
        .connect(&addr)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AUTHENTICATION_FAILED), "{e}");
    assert!(!e.is_retriable());
    assert!(!e.to_string().contains("not-the-token"), "{e}");
    assert!(!format!("{:?}", fast().token("not-the-token").config()).contains("not-the-token"));

    // The writer: both pooled connections authenticate.
    let writer = fast()
        .pool_size(2)
        .token("writer-token")
        .connect(&addr)
        .await
        .unwrap();
    assert!(writer.create_topic("app.x", 1).await.unwrap());
    let e = writer.create_topic("other", 1).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AUTHORIZATION_FAILED), "{e}");
    assert!(!e.is_retriable());
    let p = Producer::new(&writer);
    let mut deliveries = Vec::new();
    for i in 0..200 {
        let record = Record::new("app.x", format!("{i}"));
        deliveries.push(p.enqueue(record).await.unwrap());
    }
    for (i, d) in deliveries.into_iter().enumerate() {
        assert_eq!(d.await.unwrap().offset, i as i64);
    }
    let names: Vec<String> = writer
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["app.x"]);

    // The reader may consume but not produce: 41 at once, not retried.
    let reader = fast().token("reader-token").connect(&addr).await.unwrap();
    let e = Producer::new(&reader)
        .send(Record::new("app.x", "no"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AUTHORIZATION_FAILED), "{e}");
    assert_eq!(reader.offsets("app.x", 0).await.unwrap().end, 200);

    // A restart on the same address: the writer's new connections authenticate again.
    let listen = b.addr();
    b.shutdown().unwrap();
    let b = secured_broker(dir.path(), listen);
    let m = p.send(Record::new("app.x", "after")).await.unwrap();
    assert_eq!(m.offset, 200);
    drop(b);
}

/// `metadata_refresh`: an idle client reads the Metadata again every period on its own. The
/// peer is silent and counts what it receives on any connection: nothing is sent at connect
/// (one address is only dialled), then one request a period (each times out unanswered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_reads_the_metadata_again_every_period() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let peer = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let got_tx = got_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 || got_tx.send(n).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let c = Client::builder()
        .metadata_refresh(Duration::from_millis(100))
        .request_timeout(Duration::from_millis(300))
        .connect(addr.to_string())
        .await
        .unwrap();
    let bound = Duration::from_secs(10);
    let first = tokio::time::timeout(bound, got_rx.recv())
        .await
        .expect("the first refresh")
        .unwrap();
    // The next period's request: as many bytes again (the same Metadata of every topic).
    let mut total = first;
    while total < 2 * first {
        total += tokio::time::timeout(bound, got_rx.recv())
            .await
            .expect("the second refresh")
            .unwrap();
    }
    assert_eq!(total % first, 0, "whole requests of {first} bytes");
    drop(c);
    peer.abort();
}

/// What a [`produce_proxy`] does with a Produce it reads.
enum Verdict {
    /// Forwards it; its answer passes.
    Pass,
    /// Forwards it; holds its answer until the release.
    Hold,
    /// Answers it with this code at once, itself: not forwarded.
    Refuse(ErrorCode),
    /// Answers it with this code at the release, itself: not forwarded.
    RefuseHeld(ErrorCode),
    /// Forwards it, then releases every answer held.
    PassAndRelease,
}

/// What has to wait for a [`produce_proxy`]'s release on one connection.
#[derive(Default)]
struct Held {
    /// Request ids whose answers from the broker are held.
    ids: std::collections::HashSet<u64>,
    answers: Vec<Vec<u8>>,
}

/// The next whole frame `decoder` finds in what `from` sends (`None` once it ends).
async fn read_frame(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut Vec<u8>,
    decoder: streambus_core::FrameDecoder,
) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        if let Ok(streambus_core::Status::Complete(len)) = decoder.next_frame(buf) {
            return Some(buf.drain(..len).collect());
        }
        match from.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A proxy between the SDK and `broker` that forwards every frame, except that `policy`
/// (given the connection's number and the request) decides what happens to each Produce:
/// see [`Verdict`]. Answers held wait for the release: a `PassAndRelease` verdict, or the
/// returned sender. Frames are found with the core's decoders, answers encoded by it.
async fn produce_proxy<F>(
    broker: SocketAddr,
    policy: F,
) -> (SocketAddr, std::sync::Arc<tokio::sync::watch::Sender<bool>>)
where
    F: FnMut(usize, &streambus_core::ProduceRequest<'_>) -> Verdict + Send + 'static,
{
    use std::sync::{Arc, Mutex};
    use streambus_core::broker::{encode_error_response, peek_request_id};
    use streambus_core::{FrameDecoder, Request, RequestFrame};
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let release = Arc::new(tokio::sync::watch::channel(false).0);
    let policy = Arc::new(Mutex::new(policy));
    let answer = |id: u64, code: ErrorCode| {
        let mut a = vec![0u8; 512];
        let n = encode_error_response(
            id,
            code,
            format_args!("injected by the test's proxy"),
            &mut a,
        )
        .unwrap();
        a.truncate(n);
        a
    };
    let release2 = release.clone();
    tokio::spawn(async move {
        for conn in 0.. {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let upstream = tokio::net::TcpStream::connect(broker).await.unwrap();
            let (mut from_client, to_client) = client.into_split();
            let (mut from_broker, mut to_broker) = upstream.into_split();
            let to_client = Arc::new(tokio::sync::Mutex::new(to_client));
            let held: Arc<Mutex<Held>> = Arc::default();
            // At the release, the answers held go out.
            let (writer, held2, mut released) =
                (to_client.clone(), held.clone(), release2.subscribe());
            tokio::spawn(async move {
                if released.wait_for(|r| *r).await.is_err() {
                    return;
                }
                let answers = std::mem::take(&mut held2.lock().unwrap().answers);
                for a in answers {
                    if writer.lock().await.write_all(&a).await.is_err() {
                        return;
                    }
                }
            });
            // Broker to client, answer by answer.
            let (writer, held2, released) = (to_client.clone(), held.clone(), release2.subscribe());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(a) =
                    read_frame(&mut from_broker, &mut buf, FrameDecoder::responses()).await
                {
                    let id = peek_request_id(&a).unwrap();
                    {
                        let mut h = held2.lock().unwrap();
                        if !*released.borrow() && h.ids.contains(&id) {
                            h.answers.push(a);
                            continue;
                        }
                    }
                    if writer.lock().await.write_all(&a).await.is_err() {
                        return;
                    }
                }
            });
            // Client to broker, request by request, as the policy says.
            let (policy, release) = (policy.clone(), release2.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(bytes) =
                    read_frame(&mut from_client, &mut buf, FrameDecoder::requests()).await
                {
                    let frame = RequestFrame::new_checked(bytes.as_slice()).unwrap();
                    let id = frame.request_id();
                    let verdict = match Request::parse(&frame) {
                        Ok(Request::Produce(p)) => (policy.lock().unwrap())(conn, &p),
                        _ => Verdict::Pass,
                    };
                    let now = {
                        let mut h = held.lock().unwrap();
                        let released = *release.borrow();
                        match verdict {
                            Verdict::Hold if !released => {
                                h.ids.insert(id);
                                None
                            }
                            Verdict::RefuseHeld(code) if !released => {
                                h.answers.push(answer(id, code));
                                continue;
                            }
                            Verdict::Refuse(code) | Verdict::RefuseHeld(code) => {
                                Some(answer(id, code))
                            }
                            _ => None,
                        }
                    };
                    if let Some(a) = now {
                        if to_client.lock().await.write_all(&a).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if to_broker.write_all(&bytes).await.is_err() {
                        return;
                    }
                    if matches!(verdict, Verdict::PassAndRelease) {
                        release.send_replace(true);
                    }
                }
            });
        }
    });
    (addr, release)
}

/// Partition 0 of `topic` from its start, until `n` records came (10 s at most): (offset,
/// value) of each.
async fn read_back(c: &Client, topic: &str, n: usize) -> Vec<(i64, String)> {
    let mut consumer = Consumer::new(c);
    consumer.assign(topic, 0, Offset::Earliest).await.unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < n && Instant::now() < deadline {
        for r in consumer.poll(Duration::from_secs(1)).await.unwrap() {
            got.push((r.offset, String::from_utf8(r.value().to_vec()).unwrap()));
        }
    }
    got
}

/// A producer sending each record as a batch of its own, retrying after 10 ms.
fn one_record_batches(c: &Client) -> Producer {
    let config = ProducerConfig::default()
        .batch_max_records(1)
        .retry_backoff(Duration::from_millis(10));
    Producer::with_config(c, config).unwrap()
}

/// The Produce requests a [`gating_proxy`] read: (connection, BaseSequence) each, in order.
type Produces = std::sync::Arc<std::sync::Mutex<Vec<(usize, Option<i32>)>>>;

/// A [`produce_proxy`] that answers the `fail_at`-th Produce it reads (from 0, over all
/// connections) itself, with StorageError (7, retriable), and holds back that answer and
/// the answers to the Produce requests after it on the same connection until that
/// connection has carried two more: those three were in flight at once. Other answers pass.
async fn gating_proxy(broker: SocketAddr, fail_at: usize) -> (SocketAddr, Produces) {
    let produces: Produces = Produces::default();
    let seen = produces.clone();
    // The failed Produce's connection and the Produce requests it carried since.
    let mut since: Option<(usize, usize)> = None;
    let (addr, _release) = produce_proxy(broker, move |conn, p| {
        let index = {
            let mut seen = seen.lock().unwrap();
            seen.push((conn, p.producer.and_then(|i| i.base_sequence)));
            seen.len() - 1
        };
        if index == fail_at {
            since = Some((conn, 0));
            return Verdict::RefuseHeld(ErrorCode::STORAGE_ERROR);
        }
        match since.as_mut() {
            Some((c, k)) if *c == conn && *k < 2 => {
                *k += 1;
                if *k == 2 {
                    Verdict::PassAndRelease
                } else {
                    Verdict::Hold
                }
            }
            _ => Verdict::Pass,
        }
    })
    .await;
    (addr, produces)
}

/// Through a [`gating_proxy`] that fails the `fail_at`-th Produce with a retriable error
/// while the two after it are in flight on the same connection: 20 records, one per batch,
/// are acknowledged at offsets 0 to 19 and stored once each in order. The batches after the
/// failed one were refused for the gap it left (UnknownProducer when it was the producer's
/// first, else OutOfOrderSequence); the producer sends the failed one again, then them, in
/// order, before any new batch.
async fn batches_in_flight_after_a_failed_one_land_once_in_order(fail_at: usize) {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let (addr, produces) = gating_proxy(b.addr(), fail_at).await;
    let c = Client::connect(addr.to_string()).await.unwrap();
    let p = one_record_batches(&c);
    let mut deliveries = Vec::new();
    for i in 0..20 {
        let r = Record::new("window", format!("{i}")).partition(0);
        deliveries.push(p.enqueue(r).await.unwrap());
    }
    let mut offsets = Vec::new();
    for d in deliveries {
        offsets.push(d.await.unwrap().offset);
    }
    assert_eq!(offsets, (0..20).collect::<Vec<i64>>());
    p.close().await.unwrap();
    // Stored once each, in order.
    let want: Vec<(i64, String)> = (0..20).map(|i| (i, i.to_string())).collect();
    assert_eq!(read_back(&connect(&b).await, "window", 20).await, want);
    // The failed Produce and the two after it went out on one connection, all three before
    // any answer; after the failed one's answer, the batches in flight from it on (three to
    // five: the window) went again, in order, then the rest, each once.
    let produces = produces.lock().unwrap().clone();
    let seqs: Vec<i32> = produces.iter().map(|(_, s)| s.unwrap()).collect();
    let conn = produces[fail_at].0;
    assert!(
        produces[fail_at..fail_at + 3]
            .iter()
            .all(|(c, _)| *c == conn),
        "{produces:?}"
    );
    let n = seqs.len() - 20;
    assert!((3..=5).contains(&n), "{seqs:?}");
    let s = fail_at as i32;
    let mut want: Vec<i32> = (0..s + n as i32).collect();
    want.extend(s..20);
    assert_eq!(seqs, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_flight_after_the_producers_failed_first_batch_land_once_in_order() {
    batches_in_flight_after_a_failed_one_land_once_in_order(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_in_flight_after_a_failed_batch_land_once_in_order() {
    batches_in_flight_after_a_failed_one_land_once_in_order(6).await;
}

/// Each Produce a proxy read: (partition, epoch, BaseSequence); `None` where the answers it
/// held were released.
type EpochLog = std::sync::Arc<std::sync::Mutex<Vec<Option<(u32, i16, i32)>>>>;

/// A batch failing for good in one partition starts the producer's new epoch; another
/// partition with batches of the old epoch still in flight sends nothing in the new one
/// until they are settled. Through a [`produce_proxy`]: partition 0's first batch fails
/// (retriable) and the answers to its batches of epoch 0 are held; partition 1's batch
/// fails for good (the new epoch); three more records go to partition 0, and one to partition 2
/// is acknowledged (on the same connection, so anything partition 0 sent before it has
/// reached the proxy). No Produce of the new epoch to partition 0 was read before the
/// answers were released; then partition 0's retries in the old epoch land, and its new
/// batches after them: its six records at offsets 0 to 5, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_starts_a_new_epoch_only_once_its_old_flights_are_settled() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let direct = connect(&b).await;
    direct.create_topic("epochs", 3).await.unwrap();
    let log: EpochLog = EpochLog::default();
    let seen = log.clone();
    let mut failed_first = false;
    let (addr, release) = produce_proxy(b.addr(), move |_, p| {
        let info = p.producer.unwrap();
        let epoch = info.producer_epoch;
        seen.lock()
            .unwrap()
            .push(Some((p.partition, epoch, info.base_sequence.unwrap())));
        match (p.partition, epoch) {
            (1, _) => Verdict::Refuse(ErrorCode::INVALID_REQUEST),
            (0, 0) if !failed_first => {
                failed_first = true;
                Verdict::RefuseHeld(ErrorCode::STORAGE_ERROR)
            }
            (0, 0) => Verdict::Hold,
            _ => Verdict::Pass,
        }
    })
    .await;
    let c = Client::builder()
        .pool_size(1)
        .connect(addr.to_string())
        .await
        .unwrap();
    let p = one_record_batches(&c);
    let record = |part: u32, i: usize| Record::new("epochs", format!("{i}")).partition(part);
    let mut on_zero = Vec::new();
    for i in 0..3 {
        on_zero.push(p.enqueue(record(0, i)).await.unwrap());
    }
    let e = p.send(record(1, 0)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::INVALID_REQUEST), "{e}");
    for i in 3..6 {
        on_zero.push(p.enqueue(record(0, i)).await.unwrap());
    }
    assert_eq!(p.send(record(2, 0)).await.unwrap().offset, 0);
    log.lock().unwrap().push(None);
    release.send_replace(true);
    let mut offsets = Vec::new();
    for d in on_zero {
        offsets.push(d.await.unwrap().offset);
    }
    assert_eq!(offsets, (0..6).collect::<Vec<i64>>());
    let _ = p.close().await;
    let log = log.lock().unwrap().clone();
    let released_at = log.iter().position(Option::is_none).unwrap();
    let early: Vec<(u32, i16, i32)> = log[..released_at].iter().flatten().copied().collect();
    assert!(
        early
            .iter()
            .all(|(part, epoch, _)| *part != 0 || *epoch == 0),
        "{log:?}"
    );
    let want: Vec<(i64, String)> = (0..6).map(|i| (i, i.to_string())).collect();
    assert_eq!(read_back(&direct, "epochs", 6).await, want);
}

/// A fake broker on 127.0.0.1 that answers the first request of its first connection (the
/// client's bootstrap Metadata) naming itself node 0 and `other` node 1, then reads every
/// request of every connection and answers none (a hung broker whose kernel still takes
/// connections). Returns its address and the count of requests it read after the first.
async fn hung_broker_beside(other: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    use streambus_core::broker::peek_request_id;
    use streambus_core::{
        BrokerInfo, BrokerList, FrameDecoder, MetadataResponse, Response, Status, Text,
        TopicMetadataList, encode_response, response_encoded_len,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let unanswered = Arc::new(AtomicUsize::new(0));
    let count = unanswered.clone();
    tokio::spawn(async move {
        let mut first = true;
        // Ends with the test's runtime.
        while let Ok((mut s, _)) = listener.accept().await {
            let (count, answer) = (count.clone(), std::mem::take(&mut first));
            tokio::spawn(async move {
                let (mut buf, mut chunk, mut answer) = (Vec::new(), [0u8; 4096], answer);
                loop {
                    while let Ok(Status::Complete(len)) = FrameDecoder::default().next_frame(&buf) {
                        if std::mem::take(&mut answer) {
                            let id = peek_request_id(&buf).unwrap();
                            let brokers = [
                                BrokerInfo {
                                    node_id: 0,
                                    host: Text(b"127.0.0.1"),
                                    port: addr.port(),
                                },
                                BrokerInfo {
                                    node_id: 1,
                                    host: Text(b"127.0.0.1"),
                                    port: other.port(),
                                },
                            ];
                            let r = Response::Metadata(MetadataResponse {
                                brokers: BrokerList::from_slice(&brokers),
                                topics: TopicMetadataList::from_slice(&[]),
                            });
                            let mut out = vec![0; response_encoded_len(&r)];
                            let n = encode_response(id, &r, &mut out).unwrap();
                            s.write_all(&out[..n]).await.unwrap();
                        } else {
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        buf.drain(..len);
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, unanswered)
}

/// In a cluster, a read-only admin call whose broker hangs (it takes the request and answers
/// nothing) goes to the next broker the Metadata lists within the call's timeout, and that
/// broker takes the admin calls from then on. Before, the first broker was given the whole
/// timeout: the call failed with TimedOut and every later one went to the hung broker again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_broker_hangs_goes_to_the_next_broker_within_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    connect(&b).await.create_topic("on-b", 3).await.unwrap();
    let (hung, unanswered) = hung_broker_beside(b.addr()).await;
    // A list of two: the client reads the Metadata from the first that answers (the hung
    // one, which answers that much), and learns it is in a cluster.
    let c = Client::builder()
        .request_timeout(Duration::from_secs(6))
        .connect_timeout(Duration::from_secs(1))
        .connect(format!("{hung},{}", b.addr()))
        .await
        .unwrap();
    // Its share of the 6 s (3 s, one other broker; at least the connect timeout) runs out at
    // the hung broker, the rest goes to `b`, which answers.
    let topics = c.list_topics().await.unwrap();
    let topics: Vec<(&str, u32)> = topics.iter().map(|t| (&*t.name, t.partitions)).collect();
    assert_eq!(topics, [("on-b", 3)]);
    assert_eq!(unanswered.load(Ordering::SeqCst), 1);
    // The next calls go to `b` first: the hung broker reads nothing more.
    c.health().await.unwrap();
    assert_eq!(c.list_topics().await.unwrap().len(), 1);
    assert_eq!(unanswered.load(Ordering::SeqCst), 1);
}

/// A flush given up on (its future dropped: a timeout raced against it) leaves the producer's
/// linger as it was. Before, the flush's count stayed behind and every batch went at once
/// from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_given_up_on_leaves_linger_on() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = connect(&b).await;
    let p = Producer::with_config(
        &c,
        ProducerConfig::default().linger(Duration::from_secs(60)),
    )
    .unwrap();
    // `send` does not linger: it learns the topic.
    assert_eq!(p.send(Record::new("lf", "warm")).await.unwrap().offset, 0);
    // Polled once, the flush sends the lingering record and waits for its answer: given up
    // then (should the answer beat that one poll, again).
    let last = loop {
        let d = p.enqueue(Record::new("lf", "a")).await.unwrap();
        let given_up = tokio::time::timeout(Duration::ZERO, p.flush())
            .await
            .is_err();
        let at = d.await.unwrap().offset;
        if given_up {
            break at;
        }
    };
    let mut lingering = p.enqueue(Record::new("lf", "b")).await.unwrap();
    // Its batch waits out the 60 s linger: no answer within 1 s (with the count left behind
    // it went at once, answered within milliseconds).
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut lingering)
            .await
            .is_err(),
        "the record did not linger"
    );
    p.flush().await;
    assert_eq!(lingering.await.unwrap().offset, last + 1);
    assert!(p.close().await.is_ok());
}
