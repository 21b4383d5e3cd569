//! Crash consistency: damage the last batch of the last segment in every way a crash (torn
//! write) or bit rot can, reopen, and find exactly the batches before it.

use std::fs;
use std::path::PathBuf;

use streambus_server::storage::{Storage, TopicConfig};

use super::support::*;

const ENTRY_LEN: usize = 40;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    log_path: PathBuf,
    idx_path: PathBuf,
    log: Vec<u8>,
    idx: Vec<u8>,
    /// Everything in the partition, and the messages before the last batch.
    all: Vec<Msg>,
    kept: Vec<Msg>,
    last_batch_pos: usize,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut cfg = config(&root);
    cfg.segment_bytes = 400;
    let s = Storage::open(cfg).unwrap();
    s.create_topic("t", 1, TopicConfig::default()).unwrap();
    // Batches of 1-3 messages with keys, values and explicit timestamps; records 30-60 B.
    let part = root.join("topics/t/0");
    let segments = || {
        let mut logs: Vec<PathBuf> = fs::read_dir(&part)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        logs
    };
    let mut last_base = 0;
    for i in 0..100u8 {
        let msgs: Vec<_> = (0..1 + i % 3)
            .map(|j| {
                (
                    vec![i; usize::from(j)],
                    vec![i ^ 0x5a; usize::from(2 + i % 7 * 3)],
                    i64::from(i) + 1,
                )
            })
            .collect();
        let (n, buf) = encode(&msgs);
        last_base = s.append("t", 0, &set(n, &buf), 1).unwrap().base_offset;
        let segs = segments();
        let idx_len = fs::metadata(segs.last().unwrap().with_extension("idx"))
            .unwrap()
            .len();
        if segs.len() >= 2 && idx_len >= 3 * ENTRY_LEN as u64 {
            break;
        }
    }
    let all = fetch_all(&s, "t", 0, 0, 1 << 20);
    drop(s);
    let kept: Vec<Msg> = all
        .iter()
        .filter(|m| m.offset < last_base)
        .cloned()
        .collect();
    let mut logs = segments();
    assert!(
        logs.len() >= 2,
        "the fixture spans several segments: {logs:?}"
    );
    let log_path = logs.pop().unwrap();
    let idx_path = log_path.with_extension("idx");
    let log = fs::read(&log_path).unwrap();
    let idx = fs::read(&idx_path).unwrap();
    assert!(
        idx.len() >= 2 * ENTRY_LEN,
        "the last segment holds several batches"
    );
    let last_len: usize = all
        .iter()
        .filter(|m| m.offset >= last_base)
        .map(|m| 28 + m.key.len() + m.value.len())
        .sum();
    Fixture {
        last_batch_pos: log.len() - last_len,
        _dir: dir,
        root,
        log_path,
        idx_path,
        log,
        idx,
        all,
        kept,
    }
}

impl Fixture {
    /// Writes the damaged files, reopens and checks that exactly the earlier batches remain.
    fn check(&self, log: &[u8], idx: &[u8], what: &str) {
        fs::write(&self.log_path, log).unwrap();
        fs::write(&self.idx_path, idx).unwrap();
        let s = Storage::open(config(&self.root)).unwrap_or_else(|e| panic!("{what}: {e}"));
        let end = self.kept.last().map_or(0, |m| m.offset + 1);
        assert_eq!(s.offsets("t", 0).unwrap(), (0, end), "{what}");
        assert_eq!(fetch_all(&s, "t", 0, 0, 1 << 20), self.kept, "{what}");
        assert_eq!(s.stats().recovery_truncations, 1, "{what}");
        // The log goes on at the cut.
        assert_eq!(append_values(&s, "t", 0, &[b"after"], 5), end, "{what}");
        drop(s);
        // A second open finds nothing more to cut.
        let s = Storage::open(config(&self.root)).unwrap();
        assert_eq!(s.stats().recovery_truncations, 0, "{what}");
        assert_eq!(s.offsets("t", 0).unwrap(), (0, end + 1), "{what}");
    }
}

fn undamaged_reopens_whole(f: &Fixture) {
    let s = Storage::open(config(&f.root)).unwrap();
    assert_eq!(fetch_all(&s, "t", 0, 0, 1 << 20), f.all);
    assert_eq!(s.stats().recovery_truncations, 0);
}

#[test]
fn log_cut_at_every_byte_of_the_last_batch() {
    let f = fixture();
    undamaged_reopens_whole(&f);
    for cut in f.last_batch_pos..f.log.len() {
        f.check(&f.log[..cut], &f.idx, &format!("log cut at {cut}"));
    }
}

#[test]
fn index_cut_at_every_byte_of_the_last_entry() {
    let f = fixture();
    let last = f.idx.len() - ENTRY_LEN;
    for cut in last..f.idx.len() {
        f.check(&f.log, &f.idx[..cut], &format!("index cut at {cut}"));
    }
}

#[test]
fn flipped_bytes_in_the_last_batch_and_its_entry() {
    let f = fixture();
    for at in f.last_batch_pos..f.log.len() {
        for mask in [0x01, 0xff] {
            let mut log = f.log.clone();
            log[at] ^= mask;
            f.check(&log, &f.idx, &format!("log byte {at} ^ {mask:#x}"));
        }
    }
    let last = f.idx.len() - ENTRY_LEN;
    for at in last..f.idx.len() {
        let mut idx = f.idx.clone();
        idx[at] ^= 0x80;
        f.check(&f.log, &idx, &format!("index byte {at} flipped"));
    }
}

#[test]
fn garbage_after_the_last_batch_is_cut() {
    let f = fixture();
    let mut log = f.log.clone();
    log.extend_from_slice(&[0xab; 77]);
    let mut idx = f.idx.clone();
    idx.extend_from_slice(&[0; 13]);
    fs::write(&f.log_path, &log).unwrap();
    fs::write(&f.idx_path, &idx).unwrap();
    let s = Storage::open(config(&f.root)).unwrap();
    assert_eq!(fetch_all(&s, "t", 0, 0, 1 << 20), f.all);
    assert_eq!(s.stats().recovery_truncations, 1);
    assert_eq!(s.stats().recovery_truncated_bytes, 90);
    drop(s);
    assert_eq!(
        fs::metadata(&f.log_path).unwrap().len() as usize,
        f.log.len()
    );
}

/// The first (sealed) segment's files and its last batch.
struct Sealed {
    log_path: PathBuf,
    idx_path: PathBuf,
    log: Vec<u8>,
    idx: Vec<u8>,
    base: i64,
    count: i64,
    pos: usize,
}

fn sealed(f: &Fixture) -> Sealed {
    let log_path = f.log_path.with_file_name(format!("{:020}.log", 0));
    let idx_path = log_path.with_extension("idx");
    let (log, idx) = (fs::read(&log_path).unwrap(), fs::read(&idx_path).unwrap());
    let e = &idx[idx.len() - ENTRY_LEN..];
    let base = i64::from_be_bytes(e[0..8].try_into().unwrap());
    let pos = u64::from_be_bytes(e[8..16].try_into().unwrap()) as usize;
    let count = i64::from(u32::from_be_bytes(e[24..28].try_into().unwrap()));
    Sealed {
        log_path,
        idx_path,
        log,
        idx,
        base,
        count,
        pos,
    }
}

#[test]
fn torn_sealed_segment_loses_only_its_last_batch() {
    let f = fixture();
    let Sealed {
        log_path,
        idx_path,
        log,
        idx,
        base,
        count,
        pos,
    } = sealed(&f);
    assert_ne!(log_path, f.log_path);
    let want: Vec<Msg> = f
        .all
        .iter()
        .filter(|m| m.offset < base || m.offset >= base + count)
        .cloned()
        .collect();
    let end = f.all.last().unwrap().offset + 1;
    let mut cases: Vec<(String, Vec<u8>)> = (pos..log.len())
        .map(|cut| (format!("sealed log cut at {cut}"), log[..cut].to_vec()))
        .collect();
    cases.extend((pos..log.len()).step_by(3).map(|at| {
        let mut l = log.clone();
        l[at] ^= 0x10;
        (format!("sealed log byte {at} flipped"), l)
    }));
    for (what, damaged) in cases {
        fs::write(&log_path, &damaged).unwrap();
        let s = Storage::open(config(&f.root)).unwrap();
        assert_eq!(s.stats().recovery_truncations, 1, "{what}");
        assert_eq!(s.offsets("t", 0).unwrap(), (0, end), "{what}");
        // The fetch skips the lost offsets and goes on with the next segment.
        assert_eq!(fetch_all(&s, "t", 0, 0, 1 << 20), want, "{what}");
        let r = s.fetch("t", 0, base, 1, u32::MAX).unwrap();
        assert_eq!(
            decode(r.count, &r.records)[0].offset,
            base + count,
            "{what}"
        );
        drop(s);
        fs::write(&log_path, &log).unwrap();
        fs::write(&idx_path, &idx).unwrap();
    }
}

/// An index entry (with valid checksums) whose end offset would overflow i64: the batch is
/// cut like any other inconsistent tail, with no panic and no wrapped offsets.
#[test]
fn an_index_entry_whose_end_overflows_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Storage::open(config(dir.path())).unwrap();
        s.create_topic("t", 1, TopicConfig::default()).unwrap();
    }
    let part = dir.path().join("topics/t/0");
    for e in fs::read_dir(&part).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "log" || x == "idx") {
            fs::remove_file(p).unwrap();
        }
    }
    let base = i64::MAX - 1;
    let records = [0u8; 5 * 28];
    let mut entry = [0u8; 40];
    entry[0..8].copy_from_slice(&base.to_be_bytes());
    entry[24..28].copy_from_slice(&5u32.to_be_bytes());
    entry[28..32].copy_from_slice(&(records.len() as u32).to_be_bytes());
    entry[32..36].copy_from_slice(&streambus_core::checksum::checksum(&records).to_be_bytes());
    let crc = streambus_core::checksum::checksum(&entry[..36]);
    entry[36..40].copy_from_slice(&crc.to_be_bytes());
    fs::write(part.join(format!("{base:020}.log")), records).unwrap();
    fs::write(part.join(format!("{base:020}.idx")), entry).unwrap();
    let s = Storage::open(config(dir.path())).unwrap();
    assert_eq!(s.offsets("t", 0).unwrap(), (base, base));
    assert_eq!(s.stats().recovery_truncations, 1);
}
