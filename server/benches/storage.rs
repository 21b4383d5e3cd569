//! Storage engine benchmarks.
//!
//! ```text
//! cargo bench -p streambus-server --bench storage -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! - `append/100x100B`: one partition, batches of 100 messages with 100-byte values, fsync
//!   `never` (target ≥ 5 M messages/s);
//! - `fetch/1MiB`: 1 MiB fetches of such data from the page cache (target ≥ 3 GB/s).
//!
//! Group commit under `always` with 16 appenders is measured by
//! `cargo run --release -p streambus-server --example group_commit`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use streambus_core::{Encode, Message, MessageSet, MessageSetBuilder};
use streambus_server::storage::{FsyncPolicy, Storage, StorageConfig, TopicConfig};

const BATCH: usize = 100;
const VALUE: [u8; 100] = [0x42; 100];

fn batch_bytes() -> Vec<u8> {
    let m = Message::new(b"", &VALUE);
    let mut buf = vec![0u8; m.encoded_len() * BATCH];
    let mut b = MessageSetBuilder::new(&mut buf);
    for _ in 0..BATCH {
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
    s.create_topic("bench", 1, TopicConfig::default()).unwrap();
    let bytes = batch_bytes();
    let set = MessageSet::new_checked(BATCH as u32, &bytes).unwrap();
    let mut written = 0usize;
    let mut g = c.benchmark_group("append");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("100x100B", |b| {
        b.iter_custom(|iters| {
            // Keep the data set (and dirty page cache) bounded: start over every 256 MiB,
            // outside the timed part.
            if written > 256 << 20 {
                s.delete_topic("bench").unwrap();
                s.create_topic("bench", 1, TopicConfig::default()).unwrap();
                written = 0;
            }
            let t = Instant::now();
            for _ in 0..iters {
                black_box(s.append("bench", 0, &set, 1).unwrap());
            }
            written += bytes.len() * iters as usize;
            t.elapsed()
        });
    });
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
