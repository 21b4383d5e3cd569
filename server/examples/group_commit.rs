//! Group commit under `FsyncPolicy::Always`: N threads append to one partition for a few
//! seconds; prints appends/s and fsyncs/s.
//!
//! ```text
//! cargo run --release -p streambus-server --example group_commit -- [threads=16] [seconds=5] [messages per append=1]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use streambus_core::{Encode, Message, MessageSet, MessageSetBuilder};
use streambus_server::storage::{FsyncPolicy, Storage, StorageConfig, TopicConfig};

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|a| a.parse::<u64>().expect("a number"));
    let threads = args.next().unwrap_or(16);
    let seconds = args.next().unwrap_or(5);
    let per_append = args.next().unwrap_or(1) as usize;

    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = StorageConfig::new(dir.path());
    cfg.fsync = FsyncPolicy::Always;
    let s = Arc::new(Storage::open(cfg).expect("open"));
    s.create_topic("gc", 1, TopicConfig::default())
        .expect("create");

    let m = Message::new(b"", &[0x42; 100]);
    let mut buf = vec![0u8; m.encoded_len() * per_append];
    let mut b = MessageSetBuilder::new(&mut buf);
    for _ in 0..per_append {
        b.push(&m).expect("fits");
    }
    let buf = Arc::new(buf);

    let stop = Arc::new(AtomicBool::new(false));
    let before = s.stats();
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (s, stop, buf) = (s.clone(), stop.clone(), buf.clone());
            std::thread::spawn(move || {
                let set = MessageSet::new_checked(per_append as u32, &buf).expect("valid");
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    s.append("gc", 0, &set, 1).expect("append");
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let appends: u64 = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    let secs = start.elapsed().as_secs_f64();
    let fsyncs = s.stats().fsyncs - before.fsyncs;
    println!(
        "threads={threads} messages/append={per_append} seconds={secs:.2}\n\
         appends/s={:.0} fsyncs/s={:.0} appends per fsync={:.1}",
        appends as f64 / secs,
        fsyncs as f64 / secs,
        appends as f64 / fsyncs.max(1) as f64
    );
}
