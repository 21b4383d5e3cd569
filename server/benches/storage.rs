//! Storage engine benchmarks.
//!
//! ```text
//! cargo bench -p streambus-server --bench storage -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! - `append/100x100B`: one partition, batches of 100 messages with 100-byte values, fsync
//!   `never` (target ≥ 5 M messages/s); `append/100x100B-idempotent` the same from one
//!   idempotent producer (protocol §6.2), and `append/1x100B(-idempotent)` with one message a
//!   batch, where the producer check and its `.pidx` write weigh the most;
//! - `fetch/1MiB`: 1 MiB fetches of such data from the page cache (target ≥ 3 GB/s).
//!
//! Group commit under `always` with 16 appenders is measured by
//! `cargo run --release -p streambus-server --example group_commit`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use streambus_core::{Encode, Message, MessageSet, MessageSetBuilder};
use streambus_server::storage::{FsyncPolicy, ProducerBatch, Storage, StorageConfig, TopicConfig};

const BATCH: usize = 100;
const VALUE: [u8; 100] = [0x42; 100];

fn batch_bytes() -> Vec<u8> {
    batch_of(BATCH)
}

fn batch_of(n: usize) -> Vec<u8> {
    let m = Message::new(b"", &VALUE);
    let mut buf = vec![0u8; m.encoded_len() * n];
    let mut b = MessageSetBuilder::new(&mut buf);
    for _ in 0..n {
        b.push(&m).unwrap();
    }
    buf
}

fn open(dir: &std::path::Path) -> Storage {
    let mut cfg = StorageConfig::new(dir);
    cfg.fsync = FsyncPolicy::Never;
    cfg.retention_age = None;
    cfg.retention_check_interval = Duration::ZERO;
    cfg.segment_bytes = 64 * 1024 * 1024;
    Storage::open(cfg).unwrap()
}

fn append(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut g = c.benchmark_group("append");
    for n in [BATCH, 1] {
        let bytes = batch_of(n);
        let set = MessageSet::new_checked(n as u32, &bytes).unwrap();
        g.throughput(Throughput::Elements(n as u64));
        for idempotent in [false, true] {
            let name = format!("{n}x100B{}", if idempotent { "-idempotent" } else { "" });
            // A fresh topic (so a fresh producer) per benchmark.
            let _ = s.delete_topic("bench");
            s.create_topic("bench", 1, TopicConfig::default()).unwrap();
            let mut written = 0usize;
            let mut sequence = 0i32;
            g.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    // Keep the data set (and dirty page cache) bounded: start over every
                    // 256 MiB, outside the timed part (a new topic: the producer starts again).
                    if written > 256 << 20 {
                        s.delete_topic("bench").unwrap();
                        s.create_topic("bench", 1, TopicConfig::default()).unwrap();
                        written = 0;
                        sequence = 0;
                    }
                    let t = Instant::now();
                    for _ in 0..iters {
                        let producer = idempotent.then(|| {
                            let seq = sequence;
                            sequence = (seq + n as i32) & i32::MAX;
                            ProducerBatch {
                                producer_id: 1,
                                epoch: 0,
                                base_sequence: seq,
                            }
                        });
                        black_box(s.append_idempotent("bench", 0, &set, 1, producer).unwrap());
                    }
                    written += bytes.len() * iters as usize;
                    t.elapsed()
                });
            });
        }
    }
    g.finish();
}

fn fetch(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.create_topic("bench", 1, TopicConfig::default()).unwrap();
    let bytes = batch_bytes();
    let set = MessageSet::new_checked(BATCH as u32, &bytes).unwrap();
    // 32 MiB of data, read back so it is in the page cache.
    while s.offsets("bench", 0).unwrap().1 < (32 << 20) / 128 {
        s.append("bench", 0, &set, 1).unwrap();
    }
    let end = s.offsets("bench", 0).unwrap().1;
    let mib: u32 = 1 << 20;
    let mut g = c.benchmark_group("fetch");
    g.throughput(Throughput::Bytes(u64::from(mib)));
    let mut at = 0;
    g.bench_function("1MiB", |b| {
        b.iter(|| {
            let r = s.fetch("bench", 0, at, mib, u32::MAX).unwrap();
            at = if r.next_offset + 10_000 > end {
                0
            } else {
                r.next_offset
            };
            black_box(r)
        });
    });
    g.finish();
}

criterion_group!(benches, append, fetch);
criterion_main!(benches);
