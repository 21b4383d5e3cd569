//! Idempotent appends (protocol §6.2) in the storage engine: the producer state is rebuilt
//! from the `.pidx` files at open, old data directories (no `.pidx`) open, torn producer
//! entries and entries of batches that recovery cut are dropped, retries under `Always` wait
//! for the original's fsync.

use std::fs;
use std::path::{Path, PathBuf};

use streambus_server::storage::{
    AppendResult, FsyncPolicy, ProducerBatch, Storage, StorageError, TopicConfig,
};

use super::support::*;

fn pb(id: i64, epoch: i16, seq: i32) -> Option<ProducerBatch> {
    ProducerBatch::from_wire(id, epoch, Some(seq)).unwrap()
}

fn append(
    s: &Storage,
    values: &[&[u8]],
    p: Option<ProducerBatch>,
) -> Result<AppendResult, StorageError> {
    let msgs: Vec<_> = values.iter().map(|v| (Vec::new(), v.to_vec(), 1)).collect();
    let (n, buf) = encode(&msgs);
    s.append_idempotent("t", 0, &set(n, &buf), 1, p)
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("topics/t/0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

fn values(s: &Storage) -> Vec<Vec<u8>> {
    fetch_all(s, "t", 0, 0, 1 << 20)
        .into_iter()
        .map(|m| m.value)
        .collect()
}

#[test]
fn a_directory_without_producer_indexes_opens_and_then_keeps_producer_state() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(config(dir.path())).unwrap();
    s.create_topic("t", 1, TopicConfig::default()).unwrap();
    // Plain appends only: the format every earlier version wrote.
    append_values(&s, "t", 0, &[b"old0", b"old1"], 1);
    drop(s);
    assert!(files(dir.path(), "pidx").is_empty());
    let s = Storage::open(config(dir.path())).unwrap();
    assert_eq!(values(&s), [b"old0", b"old1"]);
    assert_eq!(append(&s, &[b"a"], pb(3, 0, 0)).unwrap().base_offset, 2);
    assert_eq!(append(&s, &[b"b"], pb(3, 0, 1)).unwrap().base_offset, 3);
    assert_eq!(s.stats().producers, 1);
    drop(s);
    let pidx = files(dir.path(), "pidx");
    assert_eq!(pidx.len(), 1);
    // Grown 64 KiB at a time (zeros after the two entries), cut back at open.
    assert_eq!(fs::metadata(&pidx[0]).unwrap().len(), 64 * 1024);
    let s = Storage::open(config(dir.path())).unwrap();
    assert_eq!(fs::metadata(&pidx[0]).unwrap().len(), 2 * 32);
    assert_eq!(s.stats().producers, 1);
    let dup = append(&s, &[b"a"], pb(3, 0, 0)).unwrap();
    assert_eq!((dup.base_offset, dup.count, dup.high_water_mark), (2, 1, 4));
    let e = append(&s, &[b"c"], pb(3, 0, 5)).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::OutOfOrderSequence {
                expected: 2,
                received: 5,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(values(&s), [&b"old0"[..], b"old1", b"a", b"b"]);
}

#[test]
fn producer_state_is_rebuilt_across_rolled_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes = 100;
    let s = Storage::open(cfg.clone()).unwrap();
    s.create_topic("t", 1, TopicConfig::default()).unwrap();
    let mut acked = Vec::new();
    for i in 0..30 {
        let v = format!("value-{i:04}");
        let id = 1 + i64::from(i % 3);
        acked.push(append(&s, &[v.as_bytes()], pb(id, 0, i / 3)).unwrap());
    }
    drop(s);
    assert!(
        files(dir.path(), "pidx").len() > 5,
        "batches spread over segments"
    );
    let s = Storage::open(cfg).unwrap();
    assert_eq!(s.stats().producers, 3);
    // The last five batches of each producer are answered as duplicates.
    for i in 15..30 {
        let v = format!("value-{i:04}");
        let id = 1 + i64::from(i % 3);
        let r = append(&s, &[v.as_bytes()], pb(id, 0, i / 3)).unwrap();
        assert_eq!(r.base_offset, acked[i as usize].base_offset, "batch {i}");
    }
    // Older ones are out of order.
    assert_eq!(
        append(&s, &[b"x"], pb(1, 0, 0)).unwrap_err().error_code().0,
        13
    );
    assert_eq!(s.offsets("t", 0).unwrap(), (0, 30));
}

/// A crash can leave the producer entry of a batch whose index entry never made it (the
/// producer entry is written first): recovery cuts it with the batch, so the batch's retry is
/// appended once rather than answered with an offset that holds nothing. A torn producer entry
/// (only an OS crash before the fsync can tear it while its index entry survives: the fsync
/// writes it first) is cut too: the state is then that of the batches before it.
#[test]
fn torn_producer_entries_and_entries_of_cut_batches_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(config(dir.path())).unwrap();
    s.create_topic("t", 1, TopicConfig::default()).unwrap();
    append(&s, &[b"a"], pb(5, 0, 0)).unwrap();
    append(&s, &[b"b"], pb(5, 0, 1)).unwrap();
    drop(s);
    let pidx = files(dir.path(), "pidx").pop().unwrap();
    let idx = files(dir.path(), "idx").pop().unwrap();
    let full_pidx = fs::read(&pidx).unwrap();
    let full_idx = fs::read(&idx).unwrap();
    let log = files(dir.path(), "log").pop().unwrap();
    let full_log = fs::read(&log).unwrap();
    // Every cut of the second producer entry: the first batch stays known and the producer
    // expects sequence 1 again.
    for cut in 32..64 {
        fs::write(&pidx, &full_pidx[..cut]).unwrap();
        fs::write(&idx, &full_idx).unwrap();
        fs::write(&log, &full_log).unwrap();
        let s = Storage::open(config(dir.path())).unwrap();
        assert_eq!(
            append(&s, &[b"a"], pb(5, 0, 0)).unwrap().base_offset,
            0,
            "cut {cut}"
        );
        let r = append(&s, &[b"b"], pb(5, 0, 1)).unwrap();
        assert_eq!((r.base_offset, r.high_water_mark), (2, 3), "cut {cut}");
        drop(s);
    }
    // The index entry of the second batch torn (its producer entry whole): the batch is cut,
    // and so is its producer entry; the retry lands at offset 1.
    fs::write(&pidx, &full_pidx).unwrap();
    fs::write(&idx, &full_idx[..40 + 17]).unwrap();
    fs::write(&log, &full_log).unwrap();
    let s = Storage::open(config(dir.path())).unwrap();
    assert_eq!(s.offsets("t", 0).unwrap(), (0, 1));
    let r = append(&s, &[b"b"], pb(5, 0, 1)).unwrap();
    assert_eq!((r.base_offset, r.high_water_mark), (1, 2));
    let dup = append(&s, &[b"b"], pb(5, 0, 1)).unwrap();
    assert_eq!((dup.base_offset, dup.high_water_mark), (1, 2));
    assert_eq!(values(&s), [b"a", b"b"]);
}

#[test]
fn a_retry_under_always_waits_for_the_fsync_covering_its_original() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.fsync = FsyncPolicy::Always;
    let s = Storage::open(cfg).unwrap();
    s.create_topic("t", 1, TopicConfig::default()).unwrap();
    let msgs = [(Vec::new(), b"a".to_vec(), 1)];
    let (n, buf) = encode(&msgs);
    let (first, pending) = s
        .append_unsynced_idempotent("t", 0, &set(n, &buf), 1, pb(8, 0, 0))
        .unwrap();
    let pending = pending.expect("an append under always waits for its fsync");
    assert_eq!(pending.upto(), 1);
    // Appended after the original, before any fsync: the retry is not acknowledged on its own.
    append_values(&s, "t", 0, &[b"later"], 1);
    let (dup, dup_pending) = s
        .append_unsynced_idempotent("t", 0, &set(n, &buf), 1, pb(8, 0, 0))
        .unwrap();
    assert_eq!((dup.base_offset, dup.count, dup.high_water_mark), (0, 1, 2));
    assert_eq!(first.base_offset, dup.base_offset);
    let dup_pending = dup_pending.expect("a retry under always waits for its original's fsync");
    assert_eq!(dup_pending.upto(), 1);
    dup_pending.wait().unwrap();
    pending.wait().unwrap();
}

#[test]
fn retention_that_deletes_a_producers_batches_forgets_it_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes = 100;
    cfg.retention_bytes = Some(150);
    let s = Storage::open(cfg.clone()).unwrap();
    s.create_topic("t", 1, TopicConfig::default()).unwrap();
    append(&s, &[&[1; 60]], pb(1, 0, 0)).unwrap();
    append(&s, &[&[1; 60]], pb(1, 0, 1)).unwrap();
    for _ in 0..4 {
        append_values(&s, "t", 0, &[&[2; 60]], 1);
    }
    assert!(s.enforce_retention(1).unwrap() > 0);
    assert!(s.offsets("t", 0).unwrap().0 >= 2);
    drop(s);
    assert!(files(dir.path(), "pidx").is_empty());
    let s = Storage::open(cfg).unwrap();
    assert_eq!(s.stats().producers, 0);
    let e = append(&s, &[b"x"], pb(1, 0, 2)).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::UnknownProducer {
                producer_id: 1,
                sequence: 2
            }
        ),
        "{e:?}"
    );
}

/// However many producers come, a partition keeps the most recent `max_producers_per_partition`
/// (the memory bound), in memory and after a restart.
#[test]
fn many_producers_keep_only_the_most_recent_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_producers_per_partition = std::num::NonZeroUsize::new(100).unwrap();
    let s = Storage::open(cfg.clone()).unwrap();
    s.create_topic("t", 1, TopicConfig::default()).unwrap();
    for id in 1..=20_000 {
        append(&s, &[b"v"], pb(id, 0, 0)).unwrap();
    }
    assert_eq!(s.stats().producers, 100);
    assert_eq!(s.stats().producer_state_bytes, 100 * 147);
    drop(s);
    let s = Storage::open(cfg).unwrap();
    assert_eq!(s.stats().producers, 100);
    // The newest are known (a retry is a duplicate), the older forgotten.
    let dup = append(&s, &[b"v"], pb(20_000, 0, 0)).unwrap();
    assert_eq!((dup.base_offset, dup.high_water_mark), (19_999, 20_000));
    let dup = append(&s, &[b"v"], pb(19_901, 0, 0)).unwrap();
    assert_eq!(dup.base_offset, 19_900);
    let e = append(&s, &[b"v"], pb(19_900, 0, 1)).unwrap_err();
    assert!(matches!(e, StorageError::UnknownProducer { .. }), "{e:?}");
}
