//! The blocking API against the real broker.

use std::time::Duration;

use streambus_client::blocking::{Client, Consumer, Producer};
use streambus_client::{ErrorCode, Offset, Record};
use streambus_server::{Config, FsyncMode, RuntimeKind};

#[test]
fn blocking_produce_consume_admin() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.data_dir = dir.path().to_owned();
    cfg.metrics_listen = None;
    cfg.runtime = RuntimeKind::Blocking;
    cfg.fsync = FsyncMode::Never;
    let b = streambus_server::start(cfg).unwrap();
    let c = Client::connect(b.addr().to_string()).unwrap();
    assert!(c.create_topic("sync", 2).unwrap());
    let meta = c.metadata(["sync"]).unwrap();
    let leaders: Vec<Option<u32>> = meta.topics[0].partitions.iter().map(|p| p.leader).collect();
    assert_eq!(leaders, [Some(0), Some(0)]);
    let p = Producer::new(&c);
    let m = p.send(Record::new("sync", "one").partition(1)).unwrap();
    assert_eq!((m.partition, m.offset), (1, 0));
    // Half one by one, half through `enqueue_many`.
    let mut pending: Vec<_> = (0..500)
        .map(|i| {
            p.enqueue(Record::new("sync", format!("{i}")).partition(1))
                .unwrap()
        })
        .collect();
    let rest = (500..1000).map(|i| Record::new("sync", format!("{i}")).partition(1));
    p.enqueue_many(rest, &mut pending).unwrap();
    let offsets: Vec<i64> = pending
        .into_iter()
        .map(|d| d.wait().unwrap().offset)
        .collect();
    assert_eq!(offsets, (1..=1000).collect::<Vec<_>>());
    // Into one `Deliveries`, waited for at once.
    let mut all = streambus_client::Deliveries::new();
    let more = (1000..1100).map(|i| Record::new("sync", format!("{i}")).partition(1));
    p.enqueue_many(more, &mut all).unwrap();
    let landed = all.wait().unwrap();
    let offsets: Vec<i64> = landed.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (1001..=1100).collect::<Vec<_>>());
    p.close().unwrap();
    assert_eq!(c.offsets("sync", 1).unwrap().end, 1101);
    let mut consumer = Consumer::new(&c);
    consumer.assign("sync", 1, Offset::Earliest).unwrap();
    let mut n = 0;
    while n < 1101 {
        for r in consumer.poll(Duration::from_secs(5)).unwrap() {
            assert_eq!(r.offset, n);
            n += 1;
        }
    }
    assert_eq!(consumer.position("sync", 1), Some(1101));
    let e = c.delete_topic("nope").unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TOPIC_NOT_FOUND));
}

/// 100 000 keyed records through the blocking producer over 4 partitions, then consumed
/// back: in order per partition, no gap, no duplicate, each on its key's partition.
#[test]
fn blocking_hundred_thousand_keyed_records() {
    use std::collections::HashMap;
    use streambus_client::partition_for_key;
    const N: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.data_dir = dir.path().to_owned();
    cfg.metrics_listen = None;
    cfg.runtime = RuntimeKind::Blocking;
    cfg.fsync = FsyncMode::Never;
    let b = streambus_server::start(cfg).unwrap();
    let c = Client::connect(b.addr().to_string()).unwrap();
    c.create_topic("bulk", 4).unwrap();
    let p = Producer::new(&c);
    let deliveries: Vec<_> = (0..N)
        .map(|i| {
            let r = Record::new("bulk", format!("{i}")).key(format!("key-{}", i % 777));
            p.enqueue(r).unwrap()
        })
        .collect();
    let mut expected: HashMap<u32, Vec<(i64, usize)>> = HashMap::new();
    for (i, d) in deliveries.into_iter().enumerate() {
        let m = d.wait().unwrap();
        let key = format!("key-{}", i % 777);
        assert_eq!(m.partition, partition_for_key(key.as_bytes(), 4));
        expected.entry(m.partition).or_default().push((m.offset, i));
    }
    p.close().unwrap();
    let mut consumer = Consumer::new(&c);
    for part in 0..4 {
        consumer.assign("bulk", part, Offset::Earliest).unwrap();
    }
    let mut seen: HashMap<u32, Vec<(i64, usize)>> = HashMap::new();
    let mut total = 0;
    while total < N {
        for r in consumer.poll(Duration::from_secs(5)).unwrap() {
            let i: usize = std::str::from_utf8(r.value()).unwrap().parse().unwrap();
            seen.entry(r.partition).or_default().push((r.offset, i));
            total += 1;
        }
    }
    assert_eq!(seen, expected);
    for v in expected.values() {
        let offsets: Vec<i64> = v.iter().map(|x| x.0).collect();
        assert_eq!(offsets, (0..v.len() as i64).collect::<Vec<_>>());
    }
}

/// Blocking calls from inside an async runtime are refused with a clear error (not a panic),
/// and dropping the blocking client there does not panic either.
#[test]
fn blocking_calls_inside_an_async_runtime_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.data_dir = dir.path().to_owned();
    cfg.metrics_listen = None;
    cfg.runtime = RuntimeKind::Blocking;
    cfg.fsync = FsyncMode::Never;
    let b = streambus_server::start(cfg).unwrap();
    let c = Client::connect(b.addr().to_string()).unwrap();
    let p = Producer::new(&c);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let e = c.health().unwrap_err();
        assert!(
            matches!(
                e,
                streambus_client::Error::Config {
                    setting: "blocking",
                    ..
                }
            ),
            "{e}"
        );
        let e = p.send(Record::new("t", "v")).unwrap_err();
        assert!(matches!(e, streambus_client::Error::Config { .. }), "{e}");
        drop(p);
        drop(c);
    });
}
