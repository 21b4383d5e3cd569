//! The idempotent producer (protocol §6.2) against a broker that is killed (SIGKILL) and
//! restarted on the same address while records are in flight: every record lands exactly
//! once, in order per partition.
//!
//! The broker runs in a child process: this test binary started again in `child_broker`.

use std::io::Write;
use std::net::SocketAddr;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use streambus_client::{Client, Consumer, Offset, Producer, ProducerConfig, Record};
use streambus_server::{Config, FsyncMode, RuntimeKind};

const RECORDS: usize = 100_000;
const PARTITIONS: u32 = 3;
const TOPIC: &str = "numbered";
const KILLS: usize = 4;

/// The broker process, started by `spawn_broker` with its settings in the environment.
#[test]
#[ignore = "runs only as the child process of each_record_lands_once_in_order_across_broker_kills"]
fn child_broker() {
    let mut c = Config::default();
    c.listen = std::env::var("IDEM_LISTEN").unwrap().parse().unwrap();
    c.data_dir = std::env::var("IDEM_DIR").unwrap().into();
    c.metrics_listen = None;
    c.runtime = RuntimeKind::Tokio;
    c.fsync = FsyncMode::Never;
    let broker = streambus_server::start(c).unwrap();
    println!("READY {}", broker.addr());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    std::process::abort();
}

fn spawn_broker(dir: &std::path::Path, listen: SocketAddr) -> (Child, SocketAddr) {
    let listen = listen.to_string();
    let (child, ready) = streambus_tests::spawn_child_broker(
        "child_broker",
        [
            ("IDEM_DIR", dir.as_os_str()),
            ("IDEM_LISTEN", listen.as_ref()),
        ],
    );
    (child, ready.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_record_lands_once_in_order_across_broker_kills() {
    let dir = tempfile::tempdir().unwrap();
    let (child, addr) = spawn_broker(dir.path(), "127.0.0.1:0".parse().unwrap());
    let c = Client::builder()
        .request_timeout(Duration::from_millis(500))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .connect(addr.to_string())
        .await
        .unwrap();
    c.create_topic(TOPIC, PARTITIONS).await.unwrap();
    let p = Producer::with_config(
        &c,
        ProducerConfig::default()
            .batch_max_records(100)
            .retries(1000)
            .retry_backoff(Duration::from_millis(10))
            .delivery_timeout(Duration::from_secs(60)),
    )
    .unwrap();
    // Kill the broker (SIGKILL) four times while records are in flight, restarting it on the same
    // address and data directory each time.
    let enqueued = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (enqueued, dir) = (enqueued.clone(), dir.path().to_owned());
        std::thread::spawn(move || {
            let mut child = child;
            for at in (1..=KILLS).map(|k| k * RECORDS / (KILLS + 1)) {
                let deadline = Instant::now() + Duration::from_secs(60);
                while enqueued.load(Ordering::SeqCst) < at {
                    assert!(Instant::now() < deadline, "the producer never got going");
                    std::thread::yield_now();
                }
                child.kill().unwrap();
                child.wait().unwrap();
                child = spawn_broker(&dir, addr).0;
            }
            child
        })
    };
    let mut deliveries = Vec::with_capacity(RECORDS);
    for i in 0..RECORDS {
        let r = Record::new(TOPIC, i.to_string()).partition(i as u32 % PARTITIONS);
        deliveries.push(p.enqueue(r).await.unwrap());
        enqueued.fetch_add(1, Ordering::SeqCst);
        if i % 1000 == 0 {
            // Give the sender room: kills land with batches in flight, not all buffered.
            tokio::task::yield_now().await;
        }
    }
    let mut child = tokio::task::spawn_blocking(move || killer.join().unwrap())
        .await
        .unwrap();
    for (i, d) in deliveries.into_iter().enumerate() {
        let m = d.await.unwrap_or_else(|e| panic!("record {i}: {e}"));
        assert_eq!(m.partition, i as u32 % PARTITIONS);
    }
    p.close().await.unwrap();
    // Each partition holds its records once each, in the order sent, and nothing else.
    let stored: i64 = c
        .describe_topic(TOPIC)
        .await
        .unwrap()
        .iter()
        .map(|o| o.end - o.start)
        .sum();
    assert_eq!(stored, RECORDS as i64);
    let mut consumer = Consumer::new(&c);
    for part in 0..PARTITIONS {
        consumer
            .assign(TOPIC, part, Offset::Earliest)
            .await
            .unwrap();
    }
    let mut got: Vec<Vec<usize>> = vec![Vec::new(); PARTITIONS as usize];
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.iter().map(Vec::len).sum::<usize>() < RECORDS {
        assert!(Instant::now() < deadline, "reading back timed out");
        for r in consumer.poll(Duration::from_secs(1)).await.unwrap() {
            let v: usize = std::str::from_utf8(r.value()).unwrap().parse().unwrap();
            got[r.partition as usize].push(v);
        }
    }
    for part in 0..PARTITIONS {
        let want: Vec<usize> = (0..RECORDS)
            .filter(|i| *i as u32 % PARTITIONS == part)
            .collect();
        let have = &got[part as usize];
        assert_eq!(have.len(), want.len(), "partition {part}: count");
        assert!(
            *have == want,
            "partition {part}: records missing, duplicated or out of order"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

fn in_process_broker(dir: &std::path::Path, max_producers: usize) -> streambus_server::Running {
    let mut c = Config::default();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.data_dir = dir.to_owned();
    c.metrics_listen = None;
    c.fsync = FsyncMode::Never;
    c.max_producers_per_partition = std::num::NonZeroUsize::new(max_producers).unwrap();
    streambus_server::start(c).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotence_is_on_by_default_and_can_be_switched_off() {
    let dir = tempfile::tempdir().unwrap();
    let b = in_process_broker(dir.path(), 100);
    let c = Client::connect(b.addr().to_string()).await.unwrap();
    let plain = Producer::with_config(&c, ProducerConfig::default().idempotence(false)).unwrap();
    plain.send(Record::new("t", "plain")).await.unwrap();
    assert_eq!(b.storage_stats().producers, 0);
    let idem = Producer::new(&c);
    for i in 0..3 {
        let m = idem.send(Record::new("t", "idem")).await.unwrap();
        assert_eq!(m.offset, 1 + i);
    }
    assert_eq!(b.storage_stats().producers, 1);
    Producer::new(&c)
        .send(Record::new("t", "other"))
        .await
        .unwrap();
    assert_eq!(
        b.storage_stats().producers,
        2,
        "each producer has its own id"
    );
}

/// A producer the broker forgot (evicted past `--max-producers-per-partition`) gets
/// UnknownProducer for its next batch: those records fail with it (never silently), and the
/// producer carries on in a new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_producer_reports_unknown_producer_then_starts_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let b = in_process_broker(dir.path(), 1);
    let c = Client::connect(b.addr().to_string()).await.unwrap();
    let first = Producer::new(&c);
    assert_eq!(first.send(Record::new("t", "a0")).await.unwrap().offset, 0);
    let second = Producer::new(&c);
    assert_eq!(second.send(Record::new("t", "b0")).await.unwrap().offset, 1);
    let e = first.send(Record::new("t", "a1")).await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(streambus_client::ErrorCode::UNKNOWN_PRODUCER),
        "{e}"
    );
    assert!(!e.is_retriable());
    assert_eq!(first.send(Record::new("t", "a2")).await.unwrap().offset, 2);
    let reported = first.close().await.unwrap_err();
    assert_eq!(reported.len(), 1);
    assert_eq!(
        reported[0].code(),
        Some(streambus_client::ErrorCode::UNKNOWN_PRODUCER)
    );
}
