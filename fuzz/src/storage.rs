//! Checks for the storage engine's recovery (`streambus_server::storage`), used by the
//! `storage_recovery` target.
//!
//! The input's first byte picks the mode (bit 0, and bit 1 in the prefix mode):
//!
//! - **raw** (`0`): arbitrary bytes as one partition's only segment (`<base>.idx`, `<base>.log`)
//!   and, optionally, its `partition.toml`. Without a `partition.toml`, `Storage::open` must
//!   succeed and keep exactly the prefix that `docs/storage.md` describes (entries with a good
//!   CRC that continue their predecessor, whose records lie inside the `.log` and match their
//!   CRC), checked against [`valid_prefix`], a model written from the document. With one, `open`
//!   may fail (never panic) and what it serves is checked as below.
//! - **prefix** (`1`): batches appended through the real `Storage` API with small segments (so
//!   the partition has several), then damage after a chosen prefix of batches, as a crash or a
//!   bad disk would leave it: files cut short, bytes flipped (in any `.idx`, in the last
//!   segment's `.log`, in a sealed segment's last batch), garbage appended to the last
//!   segment's files. After reopening, every batch of the prefix is served byte for byte, and
//!   every message served at an offset that was written is the one written there.
//! - **idempotent prefix** (`1` with bit 1 set, `0b11`): the prefix mode where batches also come
//!   from idempotent producers (`Storage::append_idempotent` with a [`ProducerBatch`]: ids 1–3,
//!   consecutive sequences, now and then a new epoch), mixed with plain ones, and the damage
//!   can also hit any segment's `.pidx` (cut short, a byte flipped, garbage written after the
//!   last entry, the file removed), the prefix's entries included. After reopening, besides
//!   the prefix checks: what recovery keeps of each `.pidx` is whole entries with good CRCs,
//!   among them every entry of the prefix that is intact along with those before it; every
//!   batch the state rebuilt from the kept entries holds (their last 5 of the current epoch,
//!   `docs/storage.md`) is answered as a duplicate at its offsets; and a retry of every
//!   idempotent batch that was appended (the safety property of §6.2) is appended anew at the
//!   end, refused with `OutOfOrderSequence`, `UnknownProducer` or `InvalidProducerEpoch`, or
//!   answered as a duplicate only with offsets that hold exactly that batch's messages. Entries
//!   the fuzzer forged from garbage (CRC and all) are told apart by comparing with what was
//!   written: their producer's retries are not checked, and a forged `.idx` entry limits the
//!   duplicate check to below the last segment, as for the served records.
//!
//! In both modes, after `open` succeeds: a fetch of everything from the log start to the
//! high-water mark always progresses, serves records whose CRC-32 is the `crc` it reports
//! (and `fetch_plan`, the broker's `sendfile` path, plans the same bytes, CRC and offsets),
//! never reports a message beyond the high-water mark; a second `open` finds nothing to
//! truncate and serves the same; and an append after recovery is served and survives a
//! reopen.
//!
//! Two storage bugs this target found are fixed and kept as corpus inputs: a persisted log
//! start past the recovered end was moved back in memory only, so a later append was hidden by
//! the next open (`DgAAAAAAAAAFAAAAAAAAAAAABw==`); an append ending at offset `i64::MAX`
//! overflowed in `append_nowait` (`An/////////+AAA=`).
//!
//! Sealed segments' middle batches are not checked at open (`docs/storage.md`, Recovery), so
//! the prefix mode never flips bytes there: a flip there is served, and only the CRC the fetch
//! reports (computed from the index) exposes it.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use arbitrary::Unstructured;
use streambus_core::checksum::checksum;
use streambus_core::{Encode, MESSAGE_FIXED_LEN, Message, MessageSet, MessageSetBuilder};
use streambus_server::storage::{
    FetchResult, FsyncPolicy, KEPT_BATCHES, ProducerBatch, Storage, StorageConfig, StorageError,
};

const TOPIC: &str = "t";
/// Bytes of one index entry.
const ENTRY_LEN: usize = 40;
/// A fetch's hard limit (the broker passes `max_frame - 43`).
const MAX_TOTAL: u32 = 1 << 24;

/// One index entry as `docs/storage.md` specifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    base_offset: i64,
    pos: u64,
    count: u32,
    len: u32,
    crc: u32,
}

impl Entry {
    /// Decodes a 40-byte entry; `None` if its own CRC (over bytes 0..36) does not match.
    fn decode(b: &[u8]) -> Option<Self> {
        let be4 = |r: std::ops::Range<usize>| -> u32 {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[r]);
            u32::from_be_bytes(a)
        };
        let be8 = |r: std::ops::Range<usize>| -> u64 {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[r]);
            u64::from_be_bytes(a)
        };
        if b.len() != ENTRY_LEN || checksum(&b[..36]) != be4(36..40) {
            return None;
        }
        Some(Self {
            base_offset: be8(0..8) as i64,
            pos: be8(8..16),
            count: be4(24..28),
            len: be4(28..32),
            crc: be4(32..36),
        })
    }

    fn end_pos(&self) -> u64 {
        self.pos + u64::from(self.len)
    }
}

/// What recovery keeps of one segment: `(entries, log bytes, end offset)`.
///
/// The model of `docs/storage.md` (Recovery, step 2, for the last segment): entries are kept
/// while each has a good CRC, continues its predecessor (offset and position), holds at least
/// one message of at least the fixed record size each, doesn't overflow the offsets, lies
/// inside the `.log` and its records match their CRC.
fn valid_prefix(base: i64, idx: &[u8], log: &[u8]) -> (u64, u64, i64) {
    let (mut entries, mut log_len, mut end) = (0u64, 0u64, base);
    for chunk in idx.chunks_exact(ENTRY_LEN) {
        let Some(e) = Entry::decode(chunk) else { break };
        let ok = e.base_offset == end
            && e.pos == log_len
            && e.count > 0
            && e.base_offset.checked_add(i64::from(e.count)).is_some()
            && u64::from(e.len) >= u64::from(e.count) * MESSAGE_FIXED_LEN as u64
            && e.end_pos() <= log.len() as u64
            && checksum(&log[e.pos as usize..e.end_pos() as usize]) == e.crc;
        if !ok {
            break;
        }
        entries += 1;
        log_len = e.end_pos();
        end = e.base_offset + i64::from(e.count);
    }
    (entries, log_len, end)
}

/// This process's scratch data directory (on tmpfs when there is one: recovery fsyncs).
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let root = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        root.join(format!("streambus-fuzz-storage-{}", std::process::id()))
    })
}

/// An empty data directory holding one topic `t` with one partition; returns the data
/// directory and the partition directory.
fn fresh_dir() -> (PathBuf, PathBuf) {
    let data = scratch().to_path_buf();
    let _ = fs::remove_dir_all(&data);
    let part = data.join("topics").join(TOPIC).join("0");
    fs::create_dir_all(&part).expect("create the scratch directory");
    fs::write(
        data.join("topics").join(TOPIC).join("topic.toml"),
        "format = 1\npartitions = 1\nfsync = \"never\"\n",
    )
    .expect("write topic.toml");
    (data, part)
}

fn config(data: &Path, segment_bytes: u64) -> StorageConfig {
    let mut c = StorageConfig::new(data);
    c.segment_bytes = segment_bytes;
    c.fsync = FsyncPolicy::Never;
    c.retention_bytes = None;
    c.retention_age = None;
    c.retention_check_interval = Duration::ZERO;
    c
}

fn open(data: &Path, segment_bytes: u64) -> Result<Storage, StorageError> {
    Storage::open(config(data, segment_bytes))
}

fn segment_name(base: i64, ext: &str) -> String {
    format!("{base:020}.{ext}")
}

/// Builds a message set of `values` (each also as the key when `keyed`).
fn build_set(values: &[Vec<u8>], keyed: bool) -> (u32, Vec<u8>) {
    let msgs: Vec<Message<'_>> = values
        .iter()
        .map(|v| Message::new(if keyed { v.as_slice() } else { &[] }, v))
        .collect();
    let total = msgs.iter().map(Message::encoded_len).sum();
    let mut buf = vec![0u8; total];
    let mut b = MessageSetBuilder::new(&mut buf);
    for m in &msgs {
        b.push(m).expect("exact-size buffer");
    }
    let set = b.finish();
    (set.count(), set.as_bytes().to_vec())
}

/// The record bytes of each message of a set.
fn split_records(count: u32, bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    let set = MessageSet::new_checked(count, bytes).ok()?;
    Some(set.records().map(<[u8]>::to_vec).collect())
}

/// One fetch's result as the checks see it.
struct Served {
    /// The first offset served (`next - count`; a fetch that starts in a gap serves from
    /// the next segment's base).
    first: i64,
    count: u32,
    records: Vec<u8>,
}

/// Fetches everything from the log start to the high-water mark, with byte limits taken from
/// `limits` in turn, and checks what every fetch promises. Returns the fetches and the end.
fn fetch_all(s: &Storage, limits: &[u32]) -> (Vec<Served>, i64, i64) {
    let (start, end) = s.offsets(TOPIC, 0).expect("offsets");
    assert!(start <= end, "log start {start} > high-water mark {end}");
    let mut out = Vec::new();
    let mut offset = start;
    let mut i = 0usize;
    while offset < end {
        let max_bytes = limits
            .get(i % limits.len().max(1))
            .copied()
            .unwrap_or(1 << 20);
        i += 1;
        let f = match s.fetch(TOPIC, 0, offset, max_bytes, MAX_TOTAL) {
            Ok(f) => f,
            // A batch whose records match their stored CRC but are not records (forged by
            // the fuzzer, index CRC and all) fails when a fetch has to split it.
            Err(StorageError::Corrupt { .. }) => break,
            Err(e) => panic!("fetch at {offset} (log start {start}, end {end}) failed: {e}"),
        };
        assert_eq!(
            f.high_water_mark, end,
            "high-water mark changed during fetches"
        );
        assert_eq!(f.log_start, start, "log start changed during fetches");
        assert!(
            f.next_offset > offset && f.next_offset <= end,
            "fetch at {offset} made no progress or went past the end {end}: next {}",
            f.next_offset
        );
        let first = f.next_offset - i64::from(f.count);
        assert!(
            first >= offset,
            "fetch at {offset} served {} messages ending at {}",
            f.count,
            f.next_offset
        );
        assert_eq!(
            checksum(&f.records),
            f.crc,
            "fetch at {offset}: the records' CRC is not the CRC reported ({} messages, {} bytes)",
            f.count,
            f.records.len()
        );
        assert_eq!(f.count == 0, f.records.is_empty(), "fetch at {offset}");
        check_plan(s, offset, max_bytes, &f);
        out.push(Served {
            first,
            count: f.count,
            records: f.records,
        });
        offset = f.next_offset;
    }
    (out, start, end)
}

/// The same fetch as file ranges (what the broker sends with `sendfile`) reads the same
/// bytes, with the same CRC and offsets.
fn check_plan(s: &Storage, offset: i64, max_bytes: u32, f: &FetchResult) {
    let p = match s.fetch_plan(TOPIC, 0, offset, max_bytes, MAX_TOTAL) {
        Ok(p) => p,
        Err(e) => panic!("fetch_plan at {offset} failed where fetch did not: {e}"),
    };
    assert_eq!(
        (
            p.count,
            p.next_offset,
            p.crc,
            p.high_water_mark,
            p.log_start
        ),
        (
            f.count,
            f.next_offset,
            f.crc,
            f.high_water_mark,
            f.log_start
        ),
        "fetch_plan at {offset} differs from fetch"
    );
    let mut bytes = Vec::with_capacity(f.records.len());
    for r in &p.ranges {
        let at = bytes.len();
        bytes.resize(at + usize::try_from(r.len).expect("range length"), 0);
        r.file
            .read_exact_at(&mut bytes[at..], r.offset)
            .expect("read a planned range");
    }
    assert_eq!(p.len, bytes.len() as u64, "fetch_plan at {offset}: len");
    assert!(
        bytes == f.records,
        "fetch_plan at {offset} reads other bytes than fetch"
    );
}

/// After a successful open: the state survives a second open untouched, and an append is
/// served and survives a reopen. `served` and `range` are what the first open served.
fn check_reopen_and_append(data: &Path, segment_bytes: u64, first: Storage, limits: &[u32]) {
    let (served, start, end) = fetch_all(&first, limits);
    drop(first);
    let s = open(data, segment_bytes).expect("a second open fails after a successful one");
    assert_eq!(
        s.stats().recovery_truncations,
        0,
        "the second open truncated again"
    );
    let (again, start2, end2) = fetch_all(&s, limits);
    assert_eq!((start2, end2), (start, end), "offsets changed on reopen");
    let flat = |v: &[Served]| -> Vec<u8> { v.iter().flat_map(|f| f.records.clone()).collect() };
    assert_eq!(flat(&again), flat(&served), "reopen serves other records");

    // An append after recovery goes at the end, is served and survives a reopen.
    let (count, bytes) = build_set(&[b"after-recovery".to_vec()], true);
    let set = MessageSet::new_checked(count, &bytes).expect("built set");
    match s.append(TOPIC, 0, &set, 1) {
        Ok(r) => {
            assert_eq!((r.base_offset, r.high_water_mark), (end, end + 1));
        }
        Err(StorageError::OffsetOverflow { .. }) => return,
        Err(e) => panic!("append after recovery failed: {e}"),
    }
    let check = |s: &Storage| {
        let f = s
            .fetch(TOPIC, 0, end, 1 << 20, MAX_TOTAL)
            .expect("fetch of the appended message");
        assert_eq!((f.count, f.next_offset), (1, end + 1));
        let msg = MessageSet::new_checked(1, &f.records)
            .expect("the appended message parses")
            .iter()
            .next()
            .expect("one message");
        assert_eq!((msg.offset, msg.value), (end, &b"after-recovery"[..]));
    };
    check(&s);
    drop(s);
    let s = open(data, segment_bytes).expect("open after an append");
    let (start3, end3) = s.offsets(TOPIC, 0).expect("offsets");
    assert_eq!(
        end3,
        end + 1,
        "the append after recovery did not survive a reopen"
    );
    assert_eq!(
        start3, start,
        "the log start moved on reopen after an append"
    );
    check(&s);
}

/// Takes a length-prefixed (u16, big-endian) slice off the front of `data`.
fn take_u16_prefixed<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let n = match data {
        [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
        _ => 0,
    };
    let rest = data.get(2..).unwrap_or_default();
    let (head, tail) = rest.split_at(n.min(rest.len()));
    *data = tail;
    head
}

fn take_u64(data: &mut &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = data.len().min(8);
    a[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    u64::from_be_bytes(a)
}

/// Raw mode: `[mode][base: u64 if mode bit 1][idx: u16 len + bytes]` then, with mode bit 2,
/// `partition.toml` (bit 3: `log_start = <i64 from 8 bytes>`, else `u16 len + bytes` as is),
/// then the `.log` (the rest).
fn check_raw(mode: u8, mut data: &[u8]) {
    let base = if mode & 0b10 != 0 {
        // The name must be 20 digits of an i64 to count as a segment.
        (take_u64(&mut data) & (i64::MAX as u64)) as i64
    } else {
        0
    };
    let idx = take_u16_prefixed(&mut data);
    let toml: Option<Vec<u8>> = (mode & 0b100 != 0).then(|| {
        if mode & 0b1000 != 0 {
            let start = take_u64(&mut data) as i64;
            format!("format = 1\nlog_start = {start}\n").into_bytes()
        } else {
            take_u16_prefixed(&mut data).to_vec()
        }
    });
    let log = data;
    let limits = [1u32, 100, 1 << 20, 64, 0];

    let (root, part) = fresh_dir();
    fs::write(part.join(segment_name(base, "idx")), idx).expect("write .idx");
    fs::write(part.join(segment_name(base, "log")), log).expect("write .log");
    if let Some(t) = &toml {
        fs::write(part.join("partition.toml"), t).expect("write partition.toml");
    }
    let s = match open(&root, 1 << 30) {
        Ok(s) => s,
        Err(e) => {
            assert!(
                toml.is_some(),
                "open failed on a torn or corrupt segment (only metadata may make it fail): {e}"
            );
            return;
        }
    };
    if toml.is_none() {
        // Exactly the documented prefix is kept, and served byte for byte.
        let (entries, log_len, end) = valid_prefix(base, idx, log);
        assert_eq!(
            s.offsets(TOPIC, 0).expect("offsets"),
            (base, end),
            "recovery kept other batches than the documented prefix ({entries} entries)"
        );
        let (served, _, _) = fetch_all(&s, &limits);
        let bytes: Vec<u8> = served.iter().flat_map(|f| f.records.clone()).collect();
        assert_eq!(
            bytes.as_slice(),
            &log[..log_len as usize],
            "the served records are not the valid prefix of the .log"
        );
        let on_disk = |ext| {
            fs::metadata(part.join(segment_name(base, ext)))
                .map(|m| m.len())
                .unwrap_or(u64::MAX)
        };
        assert_eq!(
            (on_disk("idx"), on_disk("log")),
            (entries * ENTRY_LEN as u64, log_len),
            "recovery left bytes after the last good batch"
        );
    }
    check_reopen_and_append(&root, 1 << 30, s, &limits);
}

/// One segment file on disk, as the prefix mode sees it before damaging it.
#[derive(Debug)]
struct SegFiles {
    base: i64,
    entries: Vec<Entry>,
    /// The `.pidx` file as written (`None`: the segment has no idempotent batch).
    pidx: Option<Vec<u8>>,
}

/// Bytes of one `.pidx` entry.
const PIDX_ENTRY_LEN: usize = 32;

/// One `.pidx` entry as `docs/storage.md` specifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PidxEntry {
    base_offset: i64,
    producer_id: i64,
    base_sequence: i32,
    count: u32,
    epoch: i16,
}

impl PidxEntry {
    /// Decodes a 32-byte entry; `None` if its CRC (over bytes 0..28) does not match.
    fn decode(b: &[u8]) -> Option<Self> {
        let arr = |r: std::ops::Range<usize>| -> [u8; 8] {
            let mut a = [0u8; 8];
            a[8 - r.len()..].copy_from_slice(&b[r]);
            a
        };
        let be = |r: std::ops::Range<usize>| u64::from_be_bytes(arr(r));
        if b.len() != PIDX_ENTRY_LEN || u64::from(checksum(&b[..28])) != be(28..32) {
            return None;
        }
        Some(Self {
            base_offset: be(0..8) as i64,
            producer_id: be(8..16) as i64,
            base_sequence: be(16..20) as u32 as i32,
            count: be(20..24) as u32,
            epoch: be(24..26) as u16 as i16,
        })
    }
}

/// One batch the prefix mode appended.
#[derive(Debug)]
struct Written {
    /// Its idempotence fields (`None`: a plain append).
    producer: Option<ProducerBatch>,
    count: u32,
    bytes: Vec<u8>,
    base_offset: i64,
}

/// Whether offsets `base..base + count` of the partition hold exactly the messages (keys and
/// values, in order, at those offsets) of the set `count`/`bytes`.
fn holds_batch(s: &Storage, base: i64, count: u32, bytes: &[u8]) -> bool {
    let Ok(f) = s.fetch(TOPIC, 0, base, 1 << 20, MAX_TOTAL) else {
        return false;
    };
    let Ok(got) = MessageSet::new_checked(f.count, &f.records) else {
        return false;
    };
    let want = MessageSet::new_checked(count, bytes).expect("a built set");
    let first = f.next_offset - i64::from(f.count);
    let got: Vec<_> = got
        .iter()
        .zip(first..)
        .map(|(m, o)| (o, m.offset, m.key, m.value))
        .take(count as usize)
        .collect();
    let want: Vec<_> = want
        .iter()
        .zip(base..)
        .map(|(m, o)| (o, o, m.key, m.value))
        .collect();
    got == want
}

/// Per producer id: its epoch and its batches held, as `(sequence, count, base offset)`.
type ProducerStates = HashMap<i64, (i16, Vec<(i32, u32, i64)>)>;

/// What the producer state rebuilt from `.pidx` entries holds, per producer: its epoch and
/// its last [`KEPT_BATCHES`] batches as `(sequence, count, base offset)` (the rules of
/// `docs/storage.md`: entries replayed in order, a newer epoch restarts a producer, an older
/// one is ignored).
fn replay(entries: &[PidxEntry]) -> ProducerStates {
    let mut state = ProducerStates::new();
    for e in entries {
        let p = state
            .entry(e.producer_id)
            .or_insert_with(|| (e.epoch, Vec::new()));
        if e.epoch < p.0 {
            continue;
        }
        if e.epoch > p.0 {
            *p = (e.epoch, Vec::new());
        }
        p.1.push((e.base_sequence, e.count, e.base_offset));
        if p.1.len() > KEPT_BATCHES {
            p.1.remove(0);
        }
    }
    state
}

/// Prefix mode: see the module documentation. With `idempotent`, some batches come from
/// idempotent producers and the damage can also hit the `.pidx` files.
fn check_prefix(data: &[u8], idempotent: bool) -> arbitrary::Result<()> {
    let mut u = Unstructured::new(data);
    let segment_bytes = u64::from(u.int_in_range(1u16..=2048)?);
    let n_batches = u.int_in_range(1usize..=12)?;
    let keyed = u.arbitrary::<bool>()?;
    // Per producer (ids 1..=3): its epoch and next sequence, once it has sent a batch.
    let mut producers: HashMap<i64, (i16, i32)> = HashMap::new();
    let mut batches: Vec<Written> = Vec::with_capacity(n_batches);
    for i in 0..n_batches {
        let n = u.int_in_range(1usize..=4)?;
        let mut values = Vec::with_capacity(n);
        for j in 0..n {
            let len = u.int_in_range(0usize..=48)?;
            let mut v = u.bytes(len)?.to_vec();
            if idempotent {
                // Each message differs from every other: a duplicate answer pointing at
                // another batch's offsets can't pass for the right one.
                v.extend_from_slice(&[i as u8, j as u8]);
            }
            values.push(v);
        }
        let (count, bytes) = build_set(&values, keyed);
        let producer = if idempotent {
            match u.int_in_range(0i64..=3)? {
                0 => None,
                id => {
                    let bump = u.ratio(1u8, 5)?;
                    let (epoch, seq) = match producers.get(&id) {
                        Some(&(e, _)) if bump => (e + 1, 0),
                        Some(&(e, s)) => (e, s),
                        None => (0, 0),
                    };
                    producers.insert(id, (epoch, seq + count as i32));
                    Some(ProducerBatch {
                        producer_id: id,
                        epoch,
                        base_sequence: seq,
                    })
                }
            }
        } else {
            None
        };
        batches.push(Written {
            producer,
            count,
            bytes,
            base_offset: 0,
        });
    }

    // Write them through the storage API.
    let (root, part) = fresh_dir();
    let s = open(&root, segment_bytes).expect("open an empty partition");
    let mut end = 0i64;
    for (i, b) in batches.iter_mut().enumerate() {
        let set = MessageSet::new_checked(b.count, &b.bytes).expect("built set");
        let r = s
            .append_idempotent(TOPIC, 0, &set, 1_000 + i as i64, b.producer)
            .expect("append to a fresh partition");
        assert_eq!(
            (r.base_offset, r.count),
            (end, b.count),
            "batch {i} ({:?}) was not appended at the end",
            b.producer
        );
        b.base_offset = end;
        end += i64::from(b.count);
    }
    let (_, orig_end) = s.offsets(TOPIC, 0).expect("offsets");
    let all = s
        .fetch(TOPIC, 0, 0, u32::MAX, u32::MAX)
        .expect("fetch everything written");
    assert_eq!(all.count as i64, orig_end);
    let original = split_records(all.count, &all.records).expect("stored records parse");
    drop(s);

    // The layout, read from the index files (documented format).
    let mut segs: Vec<SegFiles> = Vec::new();
    let mut names: Vec<i64> = fs::read_dir(&part)
        .expect("list partition")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".idx")?.parse().ok()
        })
        .collect();
    names.sort_unstable();
    for base in names {
        let idx = fs::read(part.join(segment_name(base, "idx"))).expect("read .idx");
        let entries: Vec<Entry> = idx
            .chunks(ENTRY_LEN)
            .map(|c| Entry::decode(c).expect("an index entry the storage wrote"))
            .collect();
        let pidx = fs::read(part.join(segment_name(base, "pidx"))).ok();
        // The producer entries are the segment's idempotent batches, in order, then zeros.
        let seg_end = entries
            .last()
            .map_or(base, |e| e.base_offset + i64::from(e.count));
        let want: Vec<PidxEntry> = batches
            .iter()
            .filter(|b| b.base_offset >= base && b.base_offset < seg_end)
            .filter_map(|b| {
                b.producer.map(|p| PidxEntry {
                    base_offset: b.base_offset,
                    producer_id: p.producer_id,
                    base_sequence: p.base_sequence,
                    count: b.count,
                    epoch: p.epoch,
                })
            })
            .collect();
        let got: Vec<PidxEntry> = pidx
            .as_deref()
            .unwrap_or_default()
            .chunks(PIDX_ENTRY_LEN)
            .map_while(PidxEntry::decode)
            .collect();
        assert_eq!(got, want, "the .pidx of segment {base} as written");
        assert_eq!(pidx.is_some(), !want.is_empty(), ".pidx of segment {base}");
        segs.push(SegFiles {
            base,
            entries,
            pidx,
        });
    }
    let batch_count: usize = segs.iter().map(|s| s.entries.len()).sum();
    assert_eq!(batch_count, n_batches, "one index entry per append");

    // Keep `prefix` batches intact; damage only what comes after them.
    let prefix = u.int_in_range(0..=n_batches)?;
    let prefix_end: i64 = batches
        .iter()
        .take(prefix)
        .map(|b| i64::from(b.count))
        .sum();
    // Per segment: the protected lengths of the .idx and .log.
    let protected: Vec<(u64, u64)> = segs
        .iter()
        .map(|s| {
            let kept: Vec<&Entry> = s
                .entries
                .iter()
                .filter(|e| e.base_offset < prefix_end)
                .collect();
            (
                (kept.len() * ENTRY_LEN) as u64,
                kept.last().map_or(0, |e| e.end_pos()),
            )
        })
        .collect();
    let last = segs.len() - 1;
    let n_damage = u.int_in_range(1usize..=4)?;
    for _ in 0..n_damage {
        let si = u.choose_index(segs.len())?;
        let seg = &segs[si];
        // 0: .idx, 1: .log, 2: .pidx
        let file = if idempotent {
            u.int_in_range(0u8..=2)?
        } else {
            u8::from(u.arbitrary::<bool>()?)
        };
        if file == 2 {
            damage_pidx(&mut u, &part, seg)?;
            continue;
        }
        let is_log = file == 1;
        let ext = if is_log { "log" } else { "idx" };
        let path = part.join(segment_name(seg.base, ext));
        let mut bytes = fs::read(&path).unwrap_or_default();
        let (idx_guard, log_guard) = protected[si];
        let guard =
            usize::try_from(if is_log { log_guard } else { idx_guard }).unwrap_or(usize::MAX);
        match u.int_in_range(0u8..=2)? {
            // Cut short (a torn write): anywhere after the protected bytes.
            0 if bytes.len() > guard => {
                let at = u.int_in_range(guard..=bytes.len() - 1)?;
                bytes.truncate(at);
            }
            // Flip bytes after the protected ones: in any .idx; in a .log only where
            // recovery reads the records (the last segment, a sealed one's last batch).
            1 => {
                let lo = if is_log && si != last {
                    match seg.entries.last() {
                        Some(e) if e.pos as usize >= guard => e.pos as usize,
                        _ => continue,
                    }
                } else {
                    guard
                };
                if bytes.len() <= lo {
                    continue;
                }
                let at = u.int_in_range(lo..=bytes.len() - 1)?;
                let mask = u.int_in_range(1u8..=255)?;
                bytes[at] ^= mask;
            }
            // Garbage after the end of the last segment's files.
            2 if si == last => {
                let n = u.int_in_range(1usize..=96)?;
                bytes.extend_from_slice(u.bytes(n)?);
            }
            _ => continue,
        }
        fs::write(&path, &bytes).expect("write the damaged file");
    }
    // Per segment: how many of its first producer entries are still as written.
    let pidx_intact: Vec<usize> = segs
        .iter()
        .map(|seg| {
            let now = fs::read(part.join(segment_name(seg.base, "pidx"))).unwrap_or_default();
            let was = seg.pidx.as_deref().unwrap_or_default();
            now.chunks_exact(PIDX_ENTRY_LEN)
                .zip(was.chunks_exact(PIDX_ENTRY_LEN))
                .take_while(|(a, b)| a == b && PidxEntry::decode(b).is_some())
                .count()
        })
        .collect();

    // Reopen: the prefix is there, intact; whatever else is served at a written offset is
    // what was written there.
    let s = open(&root, segment_bytes).expect("open after damage after the valid prefix");
    let limits: Vec<u32> = (0..4)
        .map(|_| u.int_in_range(0u32..=512))
        .collect::<arbitrary::Result<_>>()
        .unwrap_or_else(|_| vec![1 << 20]);
    let (start, end) = s.offsets(TOPIC, 0).expect("offsets");
    assert_eq!(start, 0, "the log start moved");
    assert!(
        end >= prefix_end,
        "the valid prefix (offsets 0..{prefix_end}) was lost: high-water mark {end}"
    );
    let (served, _, _) = fetch_all(&s, &limits);
    // Sealed segments get no garbage, so only the last segment (past the prefix) can hold
    // batches forged from it, CRCs and all.
    let strict_end = prefix_end.max(segs[last].base);
    let mut next_expected = 0i64;
    for f in &served {
        if f.first < prefix_end {
            assert_eq!(
                f.first, next_expected,
                "offsets {next_expected}..{} of the valid prefix were skipped",
                f.first
            );
        }
        let mut at = 0usize;
        for o in (f.first..f.first + i64::from(f.count)).take_while(|&o| o < strict_end) {
            let Some(orig) = usize::try_from(o).ok().and_then(|i| original.get(i)) else {
                break;
            };
            let got = f.records.get(at..at + orig.len());
            assert_eq!(
                got,
                Some(orig.as_slice()),
                "offset {o} is served with other bytes than were written (prefix ends at {prefix_end})"
            );
            at += orig.len();
        }
        next_expected = f.first + i64::from(f.count);
    }
    assert!(
        next_expected >= prefix_end,
        "only offsets up to {next_expected} of the valid prefix 0..{prefix_end} were served"
    );
    let producer_state = idempotent.then(|| {
        check_producer_state(&s, &part, &segs, &batches, &pidx_intact, prefix, strict_end)
    });
    check_reopen_and_append(&root, segment_bytes, s, &limits);
    // The state survives a clean reopen exactly: what recovery kept and the retries appended
    // since are replayed.
    if let Some((entries, forged)) = producer_state {
        let s = open(&root, segment_bytes).expect("open after the checks");
        check_held_are_duplicates(&s, &replay(&entries), &batches, &forged);
    }
    Ok(())
}

/// Damages one segment's `.pidx` (if it has one) as a crash or a bad disk would: cut short
/// (anywhere up to just past its entries), a byte flipped (in an entry or the slot after the
/// last), garbage written after the last entry, or the file removed.
fn damage_pidx(u: &mut Unstructured<'_>, part: &Path, seg: &SegFiles) -> arbitrary::Result<()> {
    let path = part.join(segment_name(seg.base, "pidx"));
    let Ok(mut bytes) = fs::read(&path) else {
        return Ok(());
    };
    let n = seg
        .pidx
        .as_deref()
        .unwrap_or_default()
        .chunks_exact(PIDX_ENTRY_LEN)
        .take_while(|c| PidxEntry::decode(c).is_some())
        .count();
    let used = (n + 1) * PIDX_ENTRY_LEN;
    match u.int_in_range(0u8..=3)? {
        0 => {
            let at = u.int_in_range(0..=used.min(bytes.len()))?;
            bytes.truncate(at);
        }
        1 if !bytes.is_empty() => {
            let at = u.int_in_range(0..=used.min(bytes.len()) - 1)?;
            bytes[at] ^= u.int_in_range(1u8..=255)?;
        }
        2 => {
            let len = u.int_in_range(1usize..=96)?;
            let garbage = u.bytes(len)?;
            let at = (n * PIDX_ENTRY_LEN).min(bytes.len());
            let end = at + garbage.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[at..end].copy_from_slice(garbage);
        }
        3 => {
            fs::remove_file(&path).expect("remove the .pidx");
            return Ok(());
        }
        _ => return Ok(()),
    }
    fs::write(&path, &bytes).expect("write the damaged .pidx");
    Ok(())
}

/// After the reopen in the idempotent prefix mode: the producer state is rebuilt from what
/// recovery kept of the `.pidx` files, and a retry of any batch that was appended is appended
/// anew, refused with a §6.2 error, or answered as a duplicate only with offsets that hold
/// exactly that batch's messages.
fn check_producer_state(
    s: &Storage,
    part: &Path,
    segs: &[SegFiles],
    batches: &[Written],
    pidx_intact: &[usize],
    prefix: usize,
    strict_end: i64,
) -> (Vec<PidxEntry>, Vec<i64>) {
    // What recovery kept: each `.pidx` is cut after its last kept entry. An entry that is not
    // the one written at its place was forged by the fuzzer (CRC and all): its producer's
    // answers are not checked. Same for `.idx` entries: a forged one may describe other
    // records, so answers past `strict_end` are only checked when there is none.
    let mut kept: Vec<PidxEntry> = Vec::new();
    let mut forged_producers: Vec<i64> = Vec::new();
    let mut forged_idx = false;
    for (si, seg) in segs.iter().enumerate() {
        let idx = fs::read(part.join(segment_name(seg.base, "idx"))).unwrap_or_default();
        forged_idx |= idx
            .chunks(ENTRY_LEN)
            .enumerate()
            .any(|(k, c)| Entry::decode(c).is_none_or(|e| seg.entries.get(k) != Some(&e)));
        let Ok(now) = fs::read(part.join(segment_name(seg.base, "pidx"))) else {
            continue;
        };
        assert_eq!(
            now.len() % PIDX_ENTRY_LEN,
            0,
            "recovery left a torn entry or zeros in the .pidx of segment {}",
            seg.base
        );
        let was = seg.pidx.as_deref().unwrap_or_default();
        let mut n = 0;
        for (k, c) in now.chunks_exact(PIDX_ENTRY_LEN).enumerate() {
            let e = PidxEntry::decode(c).unwrap_or_else(|| {
                panic!(
                    "recovery kept a producer entry that fails its CRC (segment {}, entry {k})",
                    seg.base
                )
            });
            if was.get(k * PIDX_ENTRY_LEN..(k + 1) * PIDX_ENTRY_LEN) != Some(c) {
                forged_producers.push(e.producer_id);
            }
            kept.push(e);
            n += 1;
        }
        // A batch of the kept prefix whose producer entry (and every one before it in its
        // file) is intact keeps its entry.
        let in_prefix = batches
            .iter()
            .take(prefix)
            .filter(|b| {
                b.producer.is_some()
                    && b.base_offset >= seg.base
                    && segs
                        .get(si + 1)
                        .is_none_or(|next| b.base_offset < next.base)
            })
            .count();
        assert!(
            n >= pidx_intact[si].min(in_prefix),
            "recovery dropped intact producer entries of the kept prefix: segment {} keeps {n} of {} intact",
            seg.base,
            pidx_intact[si].min(in_prefix)
        );
    }
    let state = replay(&kept);
    let trusted = |id: i64| !forged_producers.contains(&id);

    // Every batch the rebuilt state holds is recognised as a duplicate, at its offsets.
    check_held_are_duplicates(s, &state, batches, &forged_producers);
    let mut entries = kept;

    // The safety property, for a retry of every idempotent batch in append order.
    for b in batches {
        let Some(p) = b.producer.filter(|p| trusted(p.producer_id)) else {
            continue;
        };
        let (_, before) = s.offsets(TOPIC, 0).expect("offsets");
        let set = MessageSet::new_checked(b.count, &b.bytes).expect("built set");
        match s.append_idempotent(TOPIC, 0, &set, 6_000, Some(p)) {
            Ok(r) if r.high_water_mark > before => {
                assert_eq!(
                    (r.base_offset, r.count, r.high_water_mark),
                    (before, b.count, before + i64::from(b.count)),
                    "a retry of {p:?} appended anew: offsets"
                );
                assert!(
                    holds_batch(s, r.base_offset, b.count, &b.bytes),
                    "a retry of {p:?} appended anew at {before} is not served"
                );
                entries.push(PidxEntry {
                    base_offset: before,
                    producer_id: p.producer_id,
                    base_sequence: p.base_sequence,
                    count: b.count,
                    epoch: p.epoch,
                });
            }
            Ok(r) => {
                assert_eq!(
                    (r.count, r.high_water_mark),
                    (b.count, before),
                    "a duplicate answer to a retry of {p:?}"
                );
                let r_end = r.base_offset + i64::from(r.count);
                if !forged_idx || r_end <= strict_end {
                    assert!(
                        holds_batch(s, r.base_offset, b.count, &b.bytes),
                        "a retry of {p:?} (written at {}) is answered as a duplicate at {}..{r_end}, \
                         which does not hold its messages",
                        b.base_offset,
                        r.base_offset
                    );
                }
            }
            Err(
                StorageError::OutOfOrderSequence { .. }
                | StorageError::UnknownProducer { .. }
                | StorageError::InvalidProducerEpoch { .. },
            ) => {}
            Err(e) => panic!("a retry of {p:?} failed with an error outside §6.2: {e}"),
        }
    }
    (entries, forged_producers)
}

/// Every batch that `state` (a replay of `.pidx` entries) holds for a producer not in
/// `forged` is answered as a duplicate at the offsets it holds.
fn check_held_are_duplicates(
    s: &Storage,
    state: &ProducerStates,
    batches: &[Written],
    forged: &[i64],
) {
    for (&id, (epoch, held)) in state {
        if forged.contains(&id) {
            continue;
        }
        for &(seq, count, base) in held {
            let p = ProducerBatch {
                producer_id: id,
                epoch: *epoch,
                base_sequence: seq,
            };
            let b = batches
                .iter()
                .find(|b| b.producer == Some(p) && b.count == count)
                .unwrap_or_else(|| panic!("the producer state holds {p:?} x{count}, never sent"));
            let set = MessageSet::new_checked(b.count, &b.bytes).expect("built set");
            let (_, hwm) = s.offsets(TOPIC, 0).expect("offsets");
            match s.append_idempotent(TOPIC, 0, &set, 5_000, Some(p)) {
                Ok(r) => assert_eq!(
                    (r.base_offset, r.count, r.high_water_mark),
                    (base, count, hwm),
                    "a retry of {p:?} (held in the producer state at {base}) is not answered as its duplicate"
                ),
                Err(e) => {
                    panic!("a retry of {p:?} (held in the producer state at {base}) failed: {e}")
                }
            }
        }
    }
}

/// The `storage_recovery` target.
pub fn check_recovery(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check_raw(mode, rest);
    } else {
        let _ = check_prefix(rest, mode & 0b10 != 0);
    }
}
