//! The `smol` API on smol's executor, against the real broker.
#![cfg(feature = "smol")]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use streambus_client::smol::{Client, Consumer, Producer};
use streambus_client::{Error, ErrorCode, Offset, Record, partition_for_key};
use streambus_server::{Config, FsyncMode, RuntimeKind};

fn broker(dir: &std::path::Path) -> streambus_server::Running {
    let mut c = Config::default();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.data_dir = dir.to_owned();
    c.metrics_listen = None;
    c.runtime = RuntimeKind::Smol;
    c.fsync = FsyncMode::Never;
    streambus_server::start(c).unwrap()
}

#[test]
fn smol_produce_consume_in_order_with_keys() {
    const N: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    smol::block_on(async {
        let c = Client::connect(b.addr().to_string()).await.unwrap();
        assert!(c.create_topic("s", 3).await.unwrap());
        let p = Producer::new(&c);
        let mut deliveries = Vec::new();
        let record = |i: usize| Record::new("s", format!("{i}")).key(format!("k{}", i % 97));
        // Half one by one, half through `enqueue_many` (1 000 a call).
        for i in 0..N / 2 {
            deliveries.push((i, p.enqueue(record(i)).await.unwrap()));
        }
        let mut many = Vec::new();
        for start in (N / 2..N).step_by(1000) {
            p.enqueue_many((start..start + 1000).map(record), &mut many)
                .await
                .unwrap();
        }
        deliveries.extend((N / 2..N).zip(many));
        let mut expected: HashMap<u32, Vec<(i64, usize)>> = HashMap::new();
        for (i, d) in deliveries {
            let m = d.await.unwrap();
            let key = format!("k{}", i % 97);
            assert_eq!(m.partition, partition_for_key(key.as_bytes(), 3));
            expected.entry(m.partition).or_default().push((m.offset, i));
        }
        p.close().await.unwrap();
        let mut consumer = Consumer::new(&c);
        for part in 0..3 {
            consumer.assign("s", part, Offset::Earliest).await.unwrap();
        }
        let mut seen: HashMap<u32, Vec<(i64, usize)>> = HashMap::new();
        let mut total = 0;
        while total < N {
            for r in consumer.poll(Duration::from_secs(5)).await.unwrap() {
                let i: usize = std::str::from_utf8(r.value()).unwrap().parse().unwrap();
                seen.entry(r.partition).or_default().push((r.offset, i));
                total += 1;
            }
        }
        assert_eq!(seen, expected);
        assert_eq!(
            consumer.position("s", 0).await,
            Some(expected[&0].len() as i64)
        );
        let e = c.delete_topic("missing").await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::TOPIC_NOT_FOUND));
    });
}

#[test]
fn smol_calls_to_a_silent_peer_time_out() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        drop(s);
    });
    smol::block_on(async {
        let builder =
            streambus_client::Client::builder().request_timeout(Duration::from_millis(300));
        let c = Client::connect_with(builder, addr.to_string())
            .await
            .unwrap();
        let started = Instant::now();
        let e = c.health().await.unwrap_err();
        assert!(matches!(e, Error::TimedOut { .. }), "{e}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(1300),
            "{took:?}"
        );
    });
    t.join().unwrap();
}

/// Dropping a smol call's future cancels the call on the client's runtime, as on tokio: a
/// `recv` given up on (a timer raced against it, on an idle partition) no longer holds the
/// consumer, and the record produced after it is the next `poll`'s rather than the abandoned
/// call's. Before, the call ran on unobserved: the `poll` waited on the consumer's lock with no
/// bound, and the record went to nobody.
#[test]
fn a_recv_given_up_on_leaves_the_consumer_free_and_loses_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    smol::block_on(async {
        let c = Client::connect(b.addr().to_string()).await.unwrap();
        assert!(c.create_topic("idle", 1).await.unwrap());
        let mut consumer = Consumer::new(&c);
        consumer.assign("idle", 0, Offset::Earliest).await.unwrap();
        let gave_up = smol::future::or(async { Some(consumer.recv().await) }, async {
            smol::Timer::after(Duration::from_millis(200)).await;
            None
        })
        .await;
        assert!(gave_up.is_none(), "nothing was produced: {gave_up:?}");
        let p = Producer::new(&c);
        let at = p.send(Record::new("idle", "after")).await.unwrap();
        assert_eq!((at.partition, at.offset), (0, 0));
        // Bounded here, not by `poll`'s own timeout (which did not cover the lock).
        let got = smol::future::or(
            async { Some(consumer.poll(Duration::from_secs(10)).await) },
            async {
                smol::Timer::after(Duration::from_secs(20)).await;
                None
            },
        )
        .await
        .expect("poll returned within its timeout")
        .unwrap();
        let got: Vec<_> = got.iter().map(|r| (r.offset, r.value().to_vec())).collect();
        assert_eq!(got, [(0, b"after".to_vec())]);
    });
}
