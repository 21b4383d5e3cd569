//! One segment: a `.log` file holding message records in their wire encoding, back to back,
//! and a `.idx` file holding one fixed-size [`IndexEntry`] per stored batch.
//!
//! Keeping batch metadata out of the `.log` makes any run of consecutive messages one
//! contiguous byte range that a Fetch can send as it is (one `pread`, or `sendfile` later).

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use streambus_core::checksum;

use super::durability;
use super::error::{IoContext, StorageError};
use super::producers::{PIDX_ENTRY_LEN, PidxEntry, ProducerBatch};
use super::raft::{RaftEntryKind, RaftLogId, RaftMeta};

/// The `.pidx` file is extended by this many (zero-filled) entries at a time: 64 KiB.
const PIDX_GROW_ENTRIES: u64 = 2048;

/// Bytes of one index entry.
pub(crate) const ENTRY_LEN: usize = 40;
/// Bytes of one index entry of a Raft log partition (index format 2): the 40 bytes of format 1
/// (its CRC moved to the end) plus the entry's log id, producer fields and kind.
pub(crate) const RAFT_ENTRY_LEN: usize = 80;
/// The smallest message record (offset, timestamp and three empty lengths).
const MIN_RECORD_LEN: u64 = streambus_core::MESSAGE_FIXED_LEN as u64;

/// Index entry layout (big-endian): byte ranges of each field.
mod field {
    use std::ops::Range;
    pub(super) const BASE_OFFSET: Range<usize> = 0..8;
    pub(super) const POS: Range<usize> = 8..16;
    pub(super) const APPEND_TIME: Range<usize> = 16..24;
    pub(super) const COUNT: Range<usize> = 24..28;
    pub(super) const LEN: Range<usize> = 28..32;
    pub(super) const RECORDS_CRC: Range<usize> = 32..36;
    pub(super) const ENTRY_CRC: Range<usize> = 36..40;
}

/// Index format 2 (Raft log partitions): bytes 0..36 as in format 1, then these.
mod raft_field {
    use std::ops::Range;
    pub(super) const TERM: Range<usize> = 36..44;
    pub(super) const NODE_ID: Range<usize> = 44..52;
    pub(super) const INDEX: Range<usize> = 52..60;
    pub(super) const PRODUCER_ID: Range<usize> = 60..68;
    pub(super) const BASE_SEQUENCE: Range<usize> = 68..72;
    pub(super) const EPOCH: Range<usize> = 72..74;
    pub(super) const KIND: usize = 74;
    pub(super) const ENTRY_CRC: Range<usize> = 76..80;
}

/// One stored batch: `count` records starting at `base_offset`, `len` bytes at `pos` of the
/// `.log`, whose CRC-32 is `crc`; appended at `append_time` (Unix ns, the broker's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub(crate) base_offset: i64,
    pub(crate) pos: u64,
    pub(crate) append_time: i64,
    pub(crate) count: u32,
    pub(crate) len: u32,
    pub(crate) crc: u32,
}

fn get<const N: usize, const L: usize>(b: &[u8; L], r: std::ops::Range<usize>) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(r) {
        out.copy_from_slice(src);
    }
    out
}

fn put<const L: usize>(b: &mut [u8; L], r: std::ops::Range<usize>, v: &[u8]) {
    if let Some(dst) = b.get_mut(r) {
        dst.copy_from_slice(v);
    }
}

impl IndexEntry {
    pub(crate) fn end_offset(&self) -> i64 {
        // Recovery refuses an entry whose end would overflow; saturate rather than wrap anyway.
        self.base_offset.saturating_add(i64::from(self.count))
    }

    pub(crate) fn end_pos(&self) -> u64 {
        self.pos + u64::from(self.len)
    }

    pub(crate) fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        put(&mut b, field::BASE_OFFSET, &self.base_offset.to_be_bytes());
        put(&mut b, field::POS, &self.pos.to_be_bytes());
        put(&mut b, field::APPEND_TIME, &self.append_time.to_be_bytes());
        put(&mut b, field::COUNT, &self.count.to_be_bytes());
        put(&mut b, field::LEN, &self.len.to_be_bytes());
        put(&mut b, field::RECORDS_CRC, &self.crc.to_be_bytes());
        let crc = checksum::checksum(b.get(..field::ENTRY_CRC.start).unwrap_or_default());
        put(&mut b, field::ENTRY_CRC, &crc.to_be_bytes());
        b
    }

    /// Decodes an entry; `None` if its own checksum doesn't match.
    pub(crate) fn decode(b: &[u8; ENTRY_LEN]) -> Option<Self> {
        let crc = checksum::checksum(b.get(..field::ENTRY_CRC.start)?);
        if crc != u32::from_be_bytes(get(b, field::ENTRY_CRC)) {
            return None;
        }
        Some(Self {
            base_offset: i64::from_be_bytes(get(b, field::BASE_OFFSET)),
            pos: u64::from_be_bytes(get(b, field::POS)),
            append_time: i64::from_be_bytes(get(b, field::APPEND_TIME)),
            count: u32::from_be_bytes(get(b, field::COUNT)),
            len: u32::from_be_bytes(get(b, field::LEN)),
            crc: u32::from_be_bytes(get(b, field::RECORDS_CRC)),
        })
    }

    /// Encodes an entry of index format 2 with its Raft fields.
    pub(crate) fn encode_raft(&self, m: &RaftMeta) -> [u8; RAFT_ENTRY_LEN] {
        let mut b = [0u8; RAFT_ENTRY_LEN];
        put(&mut b, field::BASE_OFFSET, &self.base_offset.to_be_bytes());
        put(&mut b, field::POS, &self.pos.to_be_bytes());
        put(&mut b, field::APPEND_TIME, &self.append_time.to_be_bytes());
        put(&mut b, field::COUNT, &self.count.to_be_bytes());
        put(&mut b, field::LEN, &self.len.to_be_bytes());
        put(&mut b, field::RECORDS_CRC, &self.crc.to_be_bytes());
        put(&mut b, raft_field::TERM, &m.log_id.term.to_be_bytes());
        put(&mut b, raft_field::NODE_ID, &m.log_id.node_id.to_be_bytes());
        put(&mut b, raft_field::INDEX, &m.log_id.index.to_be_bytes());
        let p = m.producer.unwrap_or(ProducerBatch {
            producer_id: 0,
            epoch: 0,
            base_sequence: 0,
        });
        put(
            &mut b,
            raft_field::PRODUCER_ID,
            &p.producer_id.to_be_bytes(),
        );
        put(
            &mut b,
            raft_field::BASE_SEQUENCE,
            &p.base_sequence.to_be_bytes(),
        );
        put(&mut b, raft_field::EPOCH, &p.epoch.to_be_bytes());
        if let Some(k) = b.get_mut(raft_field::KIND) {
            *k = m.kind.code();
        }
        let crc = checksum::checksum(b.get(..raft_field::ENTRY_CRC.start).unwrap_or_default());
        put(&mut b, raft_field::ENTRY_CRC, &crc.to_be_bytes());
        b
    }

    /// Decodes an entry of index format 2; `None` if its checksum doesn't match or its kind
    /// or producer fields are invalid.
    pub(crate) fn decode_raft(b: &[u8; RAFT_ENTRY_LEN]) -> Option<(Self, RaftMeta)> {
        let crc = checksum::checksum(b.get(..raft_field::ENTRY_CRC.start)?);
        if crc != u32::from_be_bytes(get(b, raft_field::ENTRY_CRC)) {
            return None;
        }
        let kind = RaftEntryKind::from_code(*b.get(raft_field::KIND)?)?;
        let producer_id = i64::from_be_bytes(get(b, raft_field::PRODUCER_ID));
        let producer = match producer_id {
            0 => None,
            id if id > 0 => Some(ProducerBatch {
                producer_id: id,
                epoch: i16::from_be_bytes(get(b, raft_field::EPOCH)),
                base_sequence: i32::from_be_bytes(get(b, raft_field::BASE_SEQUENCE)),
            }),
            _ => return None,
        };
        let e = Self {
            base_offset: i64::from_be_bytes(get(b, field::BASE_OFFSET)),
            pos: u64::from_be_bytes(get(b, field::POS)),
            append_time: i64::from_be_bytes(get(b, field::APPEND_TIME)),
            count: u32::from_be_bytes(get(b, field::COUNT)),
            len: u32::from_be_bytes(get(b, field::LEN)),
            crc: u32::from_be_bytes(get(b, field::RECORDS_CRC)),
        };
        let log_id = RaftLogId {
            term: u64::from_be_bytes(get(b, raft_field::TERM)),
            node_id: u64::from_be_bytes(get(b, raft_field::NODE_ID)),
            index: u64::from_be_bytes(get(b, raft_field::INDEX)),
        };
        Some((
            e,
            RaftMeta {
                log_id,
                kind,
                producer,
            },
        ))
    }
}

/// A segment's two open files. Reads and writes are positional (`pread`/`pwrite`), so a
/// `Segment` is shared between the writer and any number of readers.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base: i64,
    /// Shared so a planned zero-copy fetch can keep it open past retention.
    pub(crate) log: Arc<File>,
    pub(crate) idx: File,
    pub(crate) log_path: PathBuf,
    pub(crate) idx_path: PathBuf,
    /// The producer index (idempotent batches only), opened or created on first use: a
    /// segment without idempotent batches has no `.pidx` file.
    pidx: OnceLock<File>,
    pub(crate) pidx_path: PathBuf,
    /// Index format 2: a Raft log partition's segment ([`RAFT_ENTRY_LEN`]-byte entries).
    pub(crate) raft: bool,
}

/// What recovery found in a segment.
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    pub(crate) entries: u64,
    pub(crate) log_len: u64,
    pub(crate) end_offset: i64,
    pub(crate) last_append: Option<i64>,
    /// The last good entry.
    pub(crate) last: Option<IndexEntry>,
    /// The base offset of every [`SAMPLE_EVERY`]-th entry.
    pub(crate) samples: Vec<i64>,
    /// Bytes cut from the `.log` and `.idx` tails.
    pub(crate) truncated_bytes: u64,
    /// Index format 2: the Raft fields of the first and last good entries.
    pub(crate) first_raft: Option<RaftMeta>,
    pub(crate) last_raft: Option<RaftMeta>,
}

/// One in-memory sample per this many index entries: a lookup reads at most this many
/// entries (2.5 KiB) from the `.idx`.
pub(crate) const SAMPLE_EVERY: u64 = 64;

pub(crate) fn file_name(base: i64, ext: &str) -> String {
    format!("{base:020}.{ext}")
}

/// The base offset of a segment file name (`00000000000000000042.log`), if it is one.
pub(crate) fn parse_name(name: &str) -> Option<(i64, &str)> {
    let (stem, ext) = name.split_once('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((stem.parse().ok()?, ext))
}

impl Segment {
    /// Opens (creating if missing) the segment of `base` in `dir`. With `truncate`, existing
    /// files are emptied (a new segment).
    pub(crate) fn open(
        dir: &Path,
        base: i64,
        truncate: bool,
        raft: bool,
    ) -> Result<Self, StorageError> {
        let log_path = dir.join(file_name(base, "log"));
        let idx_path = dir.join(file_name(base, "idx"));
        let pidx_path = dir.join(file_name(base, "pidx"));
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(truncate)
                .open(p)
                .ctx("open segment", p)
        };
        let pidx = OnceLock::new();
        if truncate {
            // A new segment: a producer index left by an earlier one of the same base (cut
            // by recovery, say) must not describe it.
            match fs::remove_file(&pidx_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).ctx("remove", &pidx_path);
                }
                _ => {}
            }
        } else if pidx_path.exists() {
            let _ = pidx.set(open(&pidx_path)?);
        }
        Ok(Self {
            base,
            log: Arc::new(open(&log_path)?),
            idx: open(&idx_path)?,
            log_path,
            idx_path,
            pidx,
            pidx_path,
            raft,
        })
    }

    /// Bytes of one of this segment's index entries.
    pub(crate) fn entry_len(&self) -> u64 {
        if self.raft {
            RAFT_ENTRY_LEN as u64
        } else {
            ENTRY_LEN as u64
        }
    }

    /// Flushes the files' data to disk: the producer index before the index, so an index
    /// entry on disk has its producer entry there too.
    pub(crate) fn sync(&self) -> Result<(), StorageError> {
        let f = durability::file(&self.log_path);
        self.log.sync_data().ctx("fsync", &self.log_path)?;
        f.done();
        if let Some(p) = self.pidx.get() {
            let f = durability::file(&self.pidx_path);
            p.sync_data().ctx("fsync", &self.pidx_path)?;
            f.done();
        }
        let f = durability::file(&self.idx_path);
        self.idx.sync_data().ctx("fsync", &self.idx_path)?;
        f.done();
        Ok(())
    }

    /// Removes the files (readers holding the segment keep reading the unlinked files).
    pub(crate) fn remove_files(&self) {
        for p in [&self.log_path, &self.idx_path] {
            if let Err(e) = fs::remove_file(p) {
                tracing::warn!(path = %p.display(), error = %e, "could not remove segment file");
            }
        }
        if let Err(e) = fs::remove_file(&self.pidx_path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.pidx_path.display(), error = %e, "could not remove segment file");
        }
    }

    /// Writes producer entry number `n` of this segment. Returns whether the `.pidx` file was
    /// created (its directory entry then needs an fsync). Called with the writer lock held.
    pub(crate) fn write_pidx(&self, n: u64, e: &PidxEntry) -> Result<bool, StorageError> {
        let (file, created) = match self.pidx.get() {
            Some(f) => (f, false),
            None => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&self.pidx_path)
                    .ctx("open segment", &self.pidx_path)?;
                let _ = self.pidx.set(f);
                let f = self.pidx.get().ok_or_else(|| StorageError::Corrupt {
                    path: self.pidx_path.clone(),
                    reason: "producer index not open".into(),
                })?;
                (f, true)
            }
        };
        // The file grows by a zero-filled chunk at a time: a write that extends a file costs
        // about as much again as one inside it (measured: +0.7 µs per one-message append).
        // Recovery cuts the zeros.
        if n.is_multiple_of(PIDX_GROW_ENTRIES) {
            file.set_len((n + PIDX_GROW_ENTRIES) * PIDX_ENTRY_LEN as u64)
                .ctx("extend", &self.pidx_path)?;
        }
        file.write_all_at(&e.encode(), n * PIDX_ENTRY_LEN as u64)
            .ctx("write", &self.pidx_path)?;
        Ok(created)
    }

    /// Reads the producer index: the entries of batches below `end` (the recovered end of the
    /// segment), in order; cuts the file after them (a torn entry, or one of a batch that
    /// recovery cut). No `.pidx` file: none. With `keep_open` false the file is closed after
    /// (a sealed segment's is never written again). Called before the segment is shared.
    pub(crate) fn recover_pidx(
        &mut self,
        end: i64,
        keep_open: bool,
    ) -> Result<Vec<PidxEntry>, StorageError> {
        let Some(file) = self.pidx.take() else {
            return Ok(Vec::new());
        };
        let len = file.metadata().ctx("stat", &self.pidx_path)?.len();
        (&file).rewind().ctx("seek", &self.pidx_path)?;
        let mut reader = BufReader::with_capacity(64 * 1024, &file);
        let mut out: Vec<PidxEntry> = Vec::new();
        let mut next = self.base;
        let mut entry = [0u8; PIDX_ENTRY_LEN];
        let mut stopped = false;
        for _ in 0..len / PIDX_ENTRY_LEN as u64 {
            reader
                .read_exact(&mut entry)
                .ctx("read producer index", &self.pidx_path)?;
            let e = PidxEntry::decode(&entry).filter(|e| {
                e.base_offset
                    .checked_add(i64::from(e.count))
                    .is_some_and(|e_end| e.base_offset >= next && e_end <= end)
            });
            let Some(e) = e else {
                stopped = true;
                break;
            };
            next = e.base_offset.saturating_add(i64::from(e.count));
            out.push(e);
        }
        // After the entries: the zeros of the last growth step (nothing to report), or what a
        // crash left.
        let mut rest = Vec::new();
        reader
            .read_to_end(&mut rest)
            .ctx("read producer index", &self.pidx_path)?;
        drop(reader);
        let zeros = (!stopped || entry.iter().all(|&b| b == 0)) && rest.iter().all(|&b| b == 0);
        let good = (out.len() * PIDX_ENTRY_LEN) as u64;
        if good != len && !zeros {
            tracing::warn!(
                segment = %self.pidx_path.display(),
                kept_entries = out.len(),
                bytes_cut = len - good,
                "truncating a producer index after its last entry of a kept batch"
            );
        }
        if good != len {
            file.set_len(good).ctx("truncate", &self.pidx_path)?;
            let f = durability::file(&self.pidx_path);
            file.sync_data().ctx("fsync", &self.pidx_path)?;
            f.done();
        }
        if keep_open {
            let _ = self.pidx.set(file);
        }
        Ok(out)
    }

    /// Reads `n` committed index entries starting at entry `first`.
    pub(crate) fn read_entries(
        &self,
        first: u64,
        n: u64,
        out: &mut Vec<IndexEntry>,
    ) -> Result<(), StorageError> {
        if self.raft {
            let mut raft = Vec::new();
            self.read_raft_entries(first, n, &mut raft)?;
            out.clear();
            out.extend(raft.into_iter().map(|(e, _)| e));
            return Ok(());
        }
        self.read_index(first, n, IndexEntry::decode, out)
    }

    /// Reads `n` committed index entries of `L` bytes from entry `first` on, each decoded by
    /// `decode` (`None`: its checksum fails).
    fn read_index<const L: usize, T>(
        &self,
        first: u64,
        n: u64,
        decode: fn(&[u8; L]) -> Option<T>,
        out: &mut Vec<T>,
    ) -> Result<(), StorageError> {
        out.clear();
        let len = usize::try_from(n).unwrap_or(0) * L;
        let mut buf = vec![0u8; len];
        self.idx
            .read_exact_at(&mut buf, first * L as u64)
            .ctx("read index", &self.idx_path)?;
        for (i, chunk) in buf.chunks_exact(L).enumerate() {
            let arr: &[u8; L] = chunk.try_into().unwrap_or(&[0; L]);
            let e = decode(arr).ok_or_else(|| StorageError::Corrupt {
                path: self.idx_path.clone(),
                reason: format!("index entry {} fails its checksum", first + i as u64),
            })?;
            out.push(e);
        }
        Ok(())
    }

    /// Reads `n` committed index entries of format 2 with their Raft fields, from entry
    /// `first` on.
    pub(crate) fn read_raft_entries(
        &self,
        first: u64,
        n: u64,
        out: &mut Vec<(IndexEntry, RaftMeta)>,
    ) -> Result<(), StorageError> {
        self.read_index(first, n, IndexEntry::decode_raft, out)
    }

    /// Cuts the segment after its first `entries` entries, whose records end at `log_len`,
    /// and fsyncs it (a Raft log truncation). Called with the writer lock held.
    pub(crate) fn cut(&self, entries: u64, log_len: u64) -> Result<(), StorageError> {
        self.idx
            .set_len(entries * self.entry_len())
            .ctx("truncate", &self.idx_path)?;
        self.log.set_len(log_len).ctx("truncate", &self.log_path)?;
        self.sync()
    }

    /// Whether the batch of `e` matches its checksum.
    pub(crate) fn batch_intact(&self, e: &IndexEntry) -> Result<bool, StorageError> {
        let mut records = vec![0u8; e.len as usize];
        self.log
            .read_exact_at(&mut records, e.pos)
            .ctx("read log", &self.log_path)?;
        Ok(checksum::checksum(&records) == e.crc)
    }

    /// Scans the index (and with `verify_records`, the records' checksums) and truncates both
    /// files after the last good batch.
    pub(crate) fn recover(&self, verify_records: bool) -> Result<Recovered, StorageError> {
        let idx_len = self.idx.metadata().ctx("stat", &self.idx_path)?.len();
        let log_len = self.log.metadata().ctx("stat", &self.log_path)?.len();
        let mut r = Recovered {
            end_offset: self.base,
            ..Recovered::default()
        };
        // Sequential reads through the files' cursors: recovery runs before the segment is
        // shared.
        (&self.idx).rewind().ctx("seek", &self.idx_path)?;
        (&*self.log).rewind().ctx("seek", &self.log_path)?;
        let mut idx = BufReader::with_capacity(64 * 1024, &self.idx);
        let mut log = BufReader::with_capacity(1024 * 1024, &*self.log);
        let mut entry = [0u8; ENTRY_LEN];
        let mut raft_entry = [0u8; RAFT_ENTRY_LEN];
        let entry_len = self.entry_len();
        let mut records = Vec::new();
        let mut stop = None;
        for i in 0..idx_len / entry_len {
            let (e, meta) = if self.raft {
                idx.read_exact(&mut raft_entry)
                    .ctx("read index", &self.idx_path)?;
                match IndexEntry::decode_raft(&raft_entry) {
                    Some((e, m)) => (e, Some(m)),
                    None => {
                        stop = Some(format!("index entry {i} fails its checksum"));
                        break;
                    }
                }
            } else {
                idx.read_exact(&mut entry)
                    .ctx("read index", &self.idx_path)?;
                match IndexEntry::decode(&entry) {
                    Some(e) => (e, None),
                    None => {
                        stop = Some(format!("index entry {i} fails its checksum"));
                        break;
                    }
                }
            };
            // Format 2: a Records entry holds messages, the others none; log indexes are
            // consecutive.
            let shape_ok = match meta {
                None => e.count > 0,
                Some(m) => {
                    (m.kind == RaftEntryKind::Records) == (e.count > 0)
                        && (e.count > 0 || e.len == 0)
                        && r.last_raft
                            .is_none_or(|p| p.log_id.index.checked_add(1) == Some(m.log_id.index))
                }
            };
            if e.base_offset != r.end_offset
                || e.pos != r.log_len
                || !shape_ok
                || e.base_offset.checked_add(i64::from(e.count)).is_none()
                || u64::from(e.len) < u64::from(e.count) * MIN_RECORD_LEN
            {
                stop = Some(format!("index entry {i} does not follow its predecessor"));
                break;
            }
            if e.end_pos() > log_len {
                stop = Some(format!("batch at offset {} is cut short", e.base_offset));
                break;
            }
            if verify_records {
                records.resize(e.len as usize, 0);
                log.read_exact(&mut records)
                    .ctx("read log", &self.log_path)?;
                if checksum::checksum(&records) != e.crc {
                    stop = Some(format!(
                        "batch at offset {} fails its checksum",
                        e.base_offset
                    ));
                    break;
                }
            }
            if r.entries.is_multiple_of(SAMPLE_EVERY) {
                r.samples.push(e.base_offset);
            }
            r.entries += 1;
            r.log_len = e.end_pos();
            r.end_offset = e.end_offset();
            // An entry without messages (a Raft blank or membership entry, time 0) does not
            // date its segment for age retention.
            if e.count > 0 {
                r.last_append = Some(e.append_time);
            }
            r.last = Some(e);
            if meta.is_some() {
                r.first_raft = r.first_raft.or(meta);
                r.last_raft = meta;
            }
        }
        let good_idx = r.entries * entry_len;
        if idx_len != good_idx || log_len != r.log_len {
            r.truncated_bytes = (idx_len - good_idx) + log_len.saturating_sub(r.log_len);
            tracing::warn!(
                segment = %self.log_path.display(),
                reason = stop.as_deref().unwrap_or("bytes after the last indexed batch"),
                kept_batches = r.entries,
                end_offset = r.end_offset,
                log_bytes_cut = log_len.saturating_sub(r.log_len),
                index_bytes_cut = idx_len - good_idx,
                "truncating a torn or corrupt segment tail"
            );
            self.idx.set_len(good_idx).ctx("truncate", &self.idx_path)?;
            self.log
                .set_len(r.log_len)
                .ctx("truncate", &self.log_path)?;
            self.sync()?;
        }
        Ok(r)
    }
}

/// Lists the segment base offsets in a partition directory, sorted. Either file of a pair
/// counts (a crash can leave one of a new segment's two files).
pub(crate) fn list(dir: &Path) -> Result<Vec<i64>, StorageError> {
    let mut bases = Vec::new();
    for ent in fs::read_dir(dir).ctx("list", dir)? {
        let ent = ent.ctx("list", dir)?;
        let name = ent.file_name();
        if let Some((base, "log" | "idx")) = name.to_str().and_then(parse_name) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    bases.dedup();
    Ok(bases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips_and_detects_any_flipped_bit() {
        let e = IndexEntry {
            base_offset: 0x0102_0304_0506_0708,
            pos: 4096,
            append_time: -7,
            count: 100,
            len: 12_800,
            crc: 0xdead_beef,
        };
        let b = e.encode();
        assert_eq!(IndexEntry::decode(&b), Some(e));
        for bit in 0..ENTRY_LEN * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(IndexEntry::decode(&c), None, "bit {bit}");
        }
    }

    #[test]
    fn raft_entry_round_trips_and_detects_any_flipped_bit() {
        let e = IndexEntry {
            base_offset: 77,
            pos: 4096,
            append_time: 5,
            count: 3,
            len: 120,
            crc: 0xdead_beef,
        };
        let m = RaftMeta {
            log_id: RaftLogId {
                term: 7,
                node_id: 2,
                index: 1 << 40,
            },
            kind: RaftEntryKind::Records,
            producer: Some(ProducerBatch {
                producer_id: 12,
                epoch: 3,
                base_sequence: 99,
            }),
        };
        let b = e.encode_raft(&m);
        assert_eq!(IndexEntry::decode_raft(&b), Some((e, m)));
        for bit in 0..RAFT_ENTRY_LEN * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(IndexEntry::decode_raft(&c), None, "bit {bit}");
        }
        let blank = RaftMeta {
            kind: RaftEntryKind::Blank,
            producer: None,
            ..m
        };
        let b = e.encode_raft(&blank);
        assert_eq!(IndexEntry::decode_raft(&b), Some((e, blank)));
    }

    #[test]
    fn segment_names() {
        assert_eq!(file_name(42, "log"), "00000000000000000042.log");
        assert_eq!(parse_name("00000000000000000042.idx"), Some((42, "idx")));
        assert_eq!(parse_name("42.log"), None);
        assert_eq!(parse_name("partition.toml"), None);
        assert_eq!(parse_name("0000000000000000004x.log"), None);
    }
}
