//! SDK benchmarks against a running broker, to compare with `streambus bench`'s raw modes (the
//! protocol without the SDK) in the same run:
//!
//! ```text
//! streambus-server --fsync never --listen 127.0.0.1:9092 &
//! cargo run --release -p streambus-client --example bench -- 127.0.0.1:9092 sync 5
//! cargo run --release -p streambus-client --example bench -- 127.0.0.1:9092 produce 5
//! cargo run --release -p streambus-client --example bench -- 127.0.0.1:9092 consume 5
//! ```
//!
//! The producer modes' producer is idempotent unless `BENCH_IDEMPOTENCE=false`, with up to
//! `BENCH_MAX_IN_FLIGHT` (default 5) batches in flight per partition, of up to
//! `BENCH_BATCH_BYTES` (default 1 MiB) each.
//!
//! - `sync`: one 100-byte record at a time through `Producer::send` (compare with
//!   `streambus bench pipeline --batch 1 --in-flight 1` and `streambus bench pingpong`);
//! - `produce`: the batching producer on one connection, 100-byte values (compare with
//!   `streambus bench pipeline --batch 100`); `produce-many` the same through
//!   `Producer::enqueue_many`, 1 000 records a call, each record's `Delivery` awaited;
//!   `produce-all` the same into one `Deliveries` a call, awaited once;
//! - `consume`: the consumer with 1 MiB fetches over 64 MiB of 1 KiB values (compare with
//!   `streambus bench fetch --size 1024`);
//! - `health`: 3 200 tasks calling `Client::health` on one client with `pool_size(50)` and
//!   `max_in_flight(64)` (compare with `streambus bench requests --connections 50
//!   --in-flight 64`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use streambus_client::{
    Bytes, Client, Consumer, ConsumerConfig, Deliveries, Error, Offset, Producer, ProducerConfig,
    Record,
};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn main() -> Result<(), Error> {
    // BENCH_RT=current runs everything on one thread (no cross-thread wake-ups).
    let current = std::env::var("BENCH_RT").is_ok_and(|v| v == "current");
    let rt = if current {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    };
    let rt = rt.map_err(|e| Error::Config {
        setting: "runtime",
        reason: e.to_string(),
    })?;
    // The benchmark runs in a spawned task, as application code usually does (block_on's
    // thread is not a worker: every wake-up to it crosses threads).
    rt.block_on(async {
        tokio::spawn(run()).await.unwrap_or_else(|e| {
            Err(Error::Config {
                setting: "task",
                reason: e.to_string(),
            })
        })
    })
}

/// This process's CPU time so far (user and system), from `/proc/self/stat` (Linux; `None`
/// elsewhere), in its 10 ms clock ticks: a fraction of a percent over a run of seconds.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // utime and stime are the 14th and 15th fields: the 12th and 13th after the command name
    // (in parentheses, and it may hold spaces).
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// The client's CPU time per record since `cpu0`, in ns, for a producer mode's line: a cost
/// that two builds can be compared by in one run whatever the broker's speed.
fn cpu_per_record(cpu0: Option<Duration>, records: u64) -> String {
    match (cpu0, cpu_time()) {
        (Some(a), Some(b)) if records > 0 => format!(
            "; client CPU {:.0} ns/msg",
            b.saturating_sub(a).as_nanos() as f64 / records as f64
        ),
        _ => String::new(),
    }
}

/// The count in environment variable `name`, or `default` when it is not set; a value that is
/// not a count is an error naming the variable.
fn env_count(name: &'static str, default: usize) -> Result<usize, Error> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v.parse().map_err(|e| Error::Config {
            setting: name,
            reason: format!("{v:?} is not a count: {e}"),
        }),
    }
}

async fn run() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut args = args.into_iter();
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9092".into());
    let mode = args.next().unwrap_or_else(|| "sync".into());
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let duration = Duration::from_secs(secs);
    let client = if mode == "health" {
        Client::builder()
            .pool_size(50)
            .max_in_flight(64)
            .connect(addr)
            .await?
    } else {
        Client::builder().pool_size(1).connect(addr).await?
    };
    // BENCH_IDEMPOTENCE=false turns the producer's idempotence off (on by default, as in
    // `ProducerConfig`): compare with the raw modes' `--idempotence` of the same value, so the
    // broker does the same work for both.
    let idempotence = std::env::var("BENCH_IDEMPOTENCE").map_or(true, |v| v != "false");
    // BENCH_MAX_IN_FLIGHT=n: batches in flight per partition (default 5).
    let max_in_flight = env_count(
        "BENCH_MAX_IN_FLIGHT",
        ProducerConfig::default().max_in_flight,
    )?;
    // BENCH_BATCH_BYTES=n: the producer's batch size in bytes (default 1 MiB).
    let batch_bytes = env_count(
        "BENCH_BATCH_BYTES",
        ProducerConfig::default().batch_max_bytes,
    )?;
    let producer_config = ProducerConfig::default()
        .idempotence(idempotence)
        .max_in_flight(max_in_flight)
        .batch_max_bytes(batch_bytes);
    // Shared by every record: a record costs no allocation or copy before the producer's.
    let value = Bytes::from(vec![b'v'; 100]);
    match mode.as_str() {
        "sync" => {
            let topic_sync: Arc<str> = Arc::from("bench-sdk-sync");
            let producer = Producer::with_config(&client, producer_config)?;
            for _ in 0..100 {
                producer
                    .send(Record::new(topic_sync.clone(), value.clone()))
                    .await?;
            }
            let mut lat = Vec::new();
            let end = Instant::now() + duration;
            while Instant::now() < end {
                let t = Instant::now();
                producer
                    .send(Record::new(topic_sync.clone(), value.clone()))
                    .await?;
                lat.push(t.elapsed());
            }
            lat.sort();
            println!(
                "sdk sync produce (1 x 100 B): {} sends, p50 {:?} p99 {:?} p99.9 {:?} max {:?}",
                lat.len(),
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                percentile(&lat, 0.999),
                lat.last().copied().unwrap_or_default()
            );
        }
        "produce-all" => {
            let topic_pipe: Arc<str> = Arc::from("bench-sdk-pipe");
            let producer = Producer::with_config(&client, producer_config)?;
            producer
                .send(Record::new(topic_pipe.clone(), value.clone()))
                .await?;
            // Up to 200 calls (200 000 records) unacknowledged, as the other modes.
            let mut pending: VecDeque<Deliveries> = VecDeque::new();
            let mut acked = 0u64;
            let cpu0 = cpu_time();
            let start = Instant::now();
            let end = start + duration;
            while Instant::now() < end {
                let mut call = Deliveries::new();
                let records = (0..1000).map(|_| Record::new(topic_pipe.clone(), value.clone()));
                producer.enqueue_many(records, &mut call).await?;
                pending.push_back(call);
                while pending.len() > 200 {
                    if let Some(d) = pending.pop_front() {
                        acked += d.await?.len() as u64;
                    }
                }
            }
            for d in pending {
                acked += d.await?.len() as u64;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "sdk batching produce: {acked} messages acknowledged in {secs:.2}s = {:.2} M msg/s{}",
                acked as f64 / secs / 1e6,
                cpu_per_record(cpu0, acked)
            );
        }
        "produce" | "produce-many" => {
            let many = mode == "produce-many";
            let topic_pipe: Arc<str> = Arc::from("bench-sdk-pipe");
            let producer = Producer::with_config(&client, producer_config)?;
            producer
                .send(Record::new(topic_pipe.clone(), value.clone()))
                .await?;
            let mut pending = VecDeque::new();
            let mut chunk = Vec::with_capacity(1000);
            let mut acked = 0u64;
            let cpu0 = cpu_time();
            let start = Instant::now();
            let end = start + duration;
            while Instant::now() < end {
                if many {
                    let records = (0..1000).map(|_| Record::new(topic_pipe.clone(), value.clone()));
                    producer.enqueue_many(records, &mut chunk).await?;
                    pending.extend(chunk.drain(..));
                } else {
                    for _ in 0..1000 {
                        pending.push_back(
                            producer
                                .enqueue(Record::new(topic_pipe.clone(), value.clone()))
                                .await?,
                        );
                    }
                }
                while pending.len() > 200_000 {
                    if let Some(d) = pending.pop_front() {
                        d.await?;
                        acked += 1;
                    }
                }
            }
            for d in pending {
                d.await?;
                acked += 1;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "sdk batching produce: {acked} messages acknowledged in {secs:.2}s = {:.2} M msg/s{}",
                acked as f64 / secs / 1e6,
                cpu_per_record(cpu0, acked)
            );
        }
        "consume" => {
            let topic = "bench-sdk-fetch";
            let _ = client.create_topic(topic, 1).await;
            let kib = Bytes::from(vec![b'v'; 1024]);
            // Batches of about 256 KiB, as `streambus bench fetch` fills its topic: both
            // sides read the same log layout (a fetch that ends inside a batch costs the
            // broker a read of that batch to checksum its part).
            let producer = Producer::with_config(
                &client,
                ProducerConfig::default().batch_max_bytes(256 << 10),
            )?;
            let have = client.offsets(topic, 0).await?.end;
            let mut pending = Vec::new();
            for _ in have..64 * 1024 {
                pending.push(producer.enqueue(Record::new(topic, kib.clone())).await?);
            }
            for d in pending {
                d.await?;
            }
            let end_offset = client.offsets(topic, 0).await?.end;
            let config = ConsumerConfig::default().max_bytes(1 << 20);
            let mut consumer = Consumer::with_config(&client, config)?;
            consumer.assign(topic, 0, Offset::Earliest).await?;
            let (mut bytes, mut records) = (0u64, 0u64);
            let start = Instant::now();
            let end = start + duration;
            while Instant::now() < end {
                for r in consumer.poll(Duration::from_secs(1)).await? {
                    bytes += (28 + r.key().len() + r.value().len()) as u64;
                    records += 1;
                    if r.offset + 1 == end_offset {
                        consumer.seek(topic, 0, Offset::Earliest).await?;
                    }
                }
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "sdk consume: {:.2} GB/s of records ({records} records in {secs:.2}s)",
                bytes as f64 / secs / 1e9
            );
        }
        "health" => {
            client.health().await?;
            let start = Instant::now();
            let end = start + duration;
            let tasks: Vec<_> = (0..3200)
                .map(|_| {
                    let client = client.clone();
                    tokio::spawn(async move {
                        let mut n = 0u64;
                        while Instant::now() < end {
                            client.health().await?;
                            n += 1;
                        }
                        Ok::<u64, Error>(n)
                    })
                })
                .collect();
            let mut total = 0u64;
            for t in tasks {
                total += t.await.map_err(|e| Error::Config {
                    setting: "task",
                    reason: e.to_string(),
                })??;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "sdk health: {total} requests in {secs:.2}s = {:.3} M req/s (3200 tasks, 50 connections x 64)",
                total as f64 / secs / 1e6
            );
        }
        other => eprintln!("unknown mode {other}: sync, produce, consume or health"),
    }
    Ok(())
}
