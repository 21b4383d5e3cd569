//! One partition: an ordered list of segments with one writer at a time and any number of
//! concurrent readers.
//!
//! Concurrency: appenders serialize on `writer` and write with `pwrite` while holding no other
//! lock; the new end becomes visible to readers only afterwards, in a short `state` write
//! section, so a reader never sees a half-written batch. Readers copy what they need from
//! `state` under its read lock and do their `pread`s with no lock held. Fsyncs run under no
//! partition lock either: `sync` only tracks who is fsyncing (group commit).

use std::fs;
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use streambus_core::MessageSet;
use streambus_core::broker::stamp_record;
use streambus_core::checksum::{self, combine};

use super::config::FsyncPolicy;
use super::durability;
use super::error::{IoContext, StorageError};
use super::producers::{Decision, PidxEntry, ProducerBatch, Producers};
use super::raft::{RaftAppend, RaftEntry, RaftEntryKind, RaftLogId, RaftLogState, RaftMeta};
use super::segment::{self, ENTRY_LEN, IndexEntry, RAFT_ENTRY_LEN, SAMPLE_EVERY, Segment};
use super::{AppendResult, Counters, FetchPlan, FetchResult, LogRange, lock, meta, read, write};

/// A partition's effective settings (the topic's overrides applied over the broker's).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) fsync: FsyncPolicy,
    pub(crate) segment_bytes: u64,
    pub(crate) retention_bytes: Option<u64>,
    pub(crate) retention_age: Option<Duration>,
    pub(crate) max_producers: NonZeroUsize,
    /// The partition is a Raft log (index format 2, a replicated topic).
    pub(crate) raft: bool,
}

#[derive(Debug)]
struct SegState {
    seg: Arc<Segment>,
    /// Committed index entries (batches).
    entries: u64,
    /// Committed producer index entries (idempotent batches).
    pidx_entries: u64,
    /// Committed `.log` bytes.
    log_len: u64,
    /// The offset after the last committed message.
    end: i64,
    /// Append time of the newest batch (Unix ns).
    last_append: Option<i64>,
    /// Base offset of entries 0, SAMPLE_EVERY, 2·SAMPLE_EVERY, …
    samples: Vec<i64>,
    /// A Raft log partition: the Raft index of entry 0 (the next index when empty).
    first_index: u64,
}

impl SegState {
    fn empty(seg: Arc<Segment>, first_index: u64) -> Self {
        Self {
            end: seg.base,
            seg,
            entries: 0,
            pidx_entries: 0,
            log_len: 0,
            last_append: None,
            samples: Vec::new(),
            first_index,
        }
    }

    /// The committed entries among which the batch holding `offset` is (by the samples).
    fn search_range(&self, offset: i64) -> (u64, u64) {
        let k = self
            .samples
            .partition_point(|&b| b <= offset)
            .saturating_sub(1) as u64;
        let lo = k * SAMPLE_EVERY;
        (lo, (lo + SAMPLE_EVERY).min(self.entries))
    }
}

#[derive(Debug)]
struct State {
    log_start: i64,
    sealed: Vec<SegState>,
    active: SegState,
    /// Sealed segments not yet fsynced since they were rolled.
    unsynced: Vec<Arc<Segment>>,
    /// The directory has entries (new segment files) not yet fsynced.
    dir_dirty: bool,
    /// A Raft log partition's Raft state; `None` for a single broker's partition.
    raft: Option<RaftState>,
}

#[derive(Debug)]
struct RaftState {
    /// The high-water mark: readers never see an offset at or past it.
    commit: i64,
    /// The last entry stored (or purged, when none is stored after it).
    last: Option<RaftLogId>,
    last_purged: Option<RaftLogId>,
}

impl State {
    /// The end readers see: the high-water mark of a Raft log, the log's end otherwise.
    fn visible_end(&self) -> i64 {
        match &self.raft {
            None => self.active.end,
            Some(r) => r.commit,
        }
    }

    /// The Raft index the next entry gets.
    fn next_index(&self) -> u64 {
        self.active.first_index + self.active.entries
    }

    /// The segments in order, the active one last.
    fn segments(&self) -> impl Iterator<Item = &SegState> {
        self.sealed.iter().chain(std::iter::once(&self.active))
    }
}

#[derive(Debug)]
struct SyncState {
    /// Every offset below this is on disk.
    durable_end: i64,
    /// A thread is fsyncing; the others wait on `synced`.
    syncing: bool,
    last_sync: Instant,
    /// Offsets `from..to` that a failed fsync covered, and why it failed: every wait for them
    /// fails, even once a later fsync succeeds (merged over failures).
    failed: Option<(i64, i64, String)>,
}

/// The largest append buffer a partition keeps between appends.
const SCRATCH_KEEP: usize = 1 << 20;

#[derive(Debug)]
struct Writer {
    scratch: Vec<u8>,
    /// Idempotent producers' state: checked and updated with the append it decides.
    producers: Producers,
}

/// One partition of a topic.
#[derive(Debug)]
pub(crate) struct Partition {
    dir: PathBuf,
    settings: Settings,
    writer: Mutex<Writer>,
    /// Set (under the writer lock) when the topic is deleted: from then on nothing writes to,
    /// rolls in or trims this directory, which a re-created topic of the same name may reuse.
    removed: AtomicBool,
    state: RwLock<State>,
    sync: Mutex<SyncState>,
    synced: Condvar,
    counters: Arc<Counters>,
}

struct Snap {
    seg: Arc<Segment>,
    entries: u64,
    end: i64,
    range: (u64, u64),
}

impl Partition {
    /// Opens a partition directory, recovering its segments: the last one is checked batch by
    /// batch, the others by their index; torn tails are cut.
    pub(crate) fn open(
        dir: PathBuf,
        settings: Settings,
        counters: Arc<Counters>,
    ) -> Result<Self, StorageError> {
        if !dir.is_dir() {
            return Err(StorageError::Corrupt {
                path: dir,
                reason: "partition directory is missing".into(),
            });
        }
        let (persisted_start, last_purged) = match meta::read_partition_raft(&dir)? {
            // A single broker's partition has no Raft entries: purged ids there mean nothing.
            Some((start, purged)) => (Some(start), purged.filter(|_| settings.raft)),
            None => (None, None),
        };
        let mut bases = segment::list(&dir)?;
        let start_hint = persisted_start.unwrap_or(0);
        // Segments wholly below the persisted log start are left over from an interrupted
        // retention run. (A Raft log's are found by index below: an entry without messages
        // may sit at the next segment's base offset.)
        while !settings.raft && bases.len() >= 2 && bases.get(1).is_some_and(|&b| b <= start_hint) {
            let base = bases.remove(0);
            Segment::open(&dir, base, false, false)?.remove_files();
        }
        // A new partition (or one whose files vanished) starts with an empty segment, whose
        // directory entry the first fsync makes durable.
        let created = bases.is_empty();
        if created {
            bases.push(start_hint);
        }
        let last = bases.len() - 1;
        let mut segs: Vec<SegState> = Vec::with_capacity(bases.len());
        let mut producers = Producers::new(settings.max_producers, Arc::clone(&counters));
        // A Raft log: the last entry so far, and the index the next one must have.
        let mut last_raft = last_purged;
        let mut next_index = last_purged.map_or(0, |p| p.index.saturating_add(1));
        for (i, &base) in bases.iter().enumerate() {
            let mut seg = Segment::open(&dir, base, false, settings.raft)?;
            if let Some(prev) = segs.last()
                && base < prev.end
            {
                return Err(StorageError::Corrupt {
                    path: seg.log_path.clone(),
                    reason: format!(
                        "segment starts at {base}, inside the previous one (ending at {})",
                        prev.end
                    ),
                });
            }
            let mut rec = seg.recover(i == last)?;
            // A sealed segment's index is checked entry by entry; of its data only the last
            // batch (where a crash under `never` would tear it), and all of it if that fails.
            if let Some(e) = rec.last.filter(|_| i != last)
                && !seg.batch_intact(&e)?
            {
                rec = seg.recover(true)?;
            }
            if rec.truncated_bytes > 0 {
                counters.inc(&counters.recovery_truncations, 1);
                counters.inc(&counters.recovery_truncated_bytes, rec.truncated_bytes);
            }
            let first_index = match rec.first_raft {
                // The first segment may start before the last purged entry (a purge keeps
                // the segment holding it); the others continue their predecessor.
                Some(m) if segs.is_empty() && m.log_id.index <= next_index => m.log_id.index,
                Some(m) if m.log_id.index == next_index => m.log_id.index,
                Some(m) => {
                    return Err(StorageError::Corrupt {
                        path: seg.idx_path.clone(),
                        reason: format!(
                            "the segment's first Raft index is {}, the log's next is {next_index}",
                            m.log_id.index
                        ),
                    });
                }
                None => next_index,
            };
            if let Some(m) = rec.last_raft {
                next_index = m.log_id.index.saturating_add(1);
                last_raft = last_raft.max(Some(m.log_id));
            }
            // Replayed in append order: the most recent producers are the ones kept.
            let pidx = seg.recover_pidx(rec.end_offset, i == last)?;
            for e in &pidx {
                producers.record(&e.producer, e.count, e.base_offset);
            }
            segs.push(SegState {
                seg: Arc::new(seg),
                entries: rec.entries,
                pidx_entries: pidx.len() as u64,
                log_len: rec.log_len,
                end: rec.end_offset,
                last_append: rec.last_append,
                samples: rec.samples,
                first_index,
            });
        }
        // A Raft log's segments whose every entry was purged (a purge interrupted between
        // persisting and unlinking).
        if let Some(p) = last_purged {
            while segs.len() >= 2
                && segs
                    .first()
                    .is_some_and(|s| s.first_index + s.entries <= p.index.saturating_add(1))
            {
                let s = segs.remove(0);
                s.seg.remove_files();
            }
        }
        let active = segs.pop().ok_or_else(|| StorageError::Corrupt {
            path: dir.clone(),
            reason: "no segment".into(),
        })?;
        let first_base = segs.first().map_or(active.seg.base, |s| s.seg.base);
        let mut log_start = start_hint.max(first_base);
        if log_start > active.end {
            tracing::warn!(
                partition = %dir.display(),
                log_start,
                end = active.end,
                "persisted log start is past the recovered end; moving it back"
            );
            log_start = active.end;
            // On disk too: otherwise appends acknowledged from here would sit below the old
            // start after the next open and be hidden (found by the storage_recovery fuzz target).
            meta::write_partition_raft(&dir, log_start, last_purged)?;
        }
        // A Raft log's high-water mark starts at its log start: the replication layer moves
        // it as it applies committed entries.
        let raft = settings.raft.then_some(RaftState {
            commit: log_start,
            last: last_raft,
            last_purged,
        });
        let end = active.end;
        Ok(Self {
            dir,
            settings,
            writer: Mutex::new(Writer {
                scratch: Vec::new(),
                producers,
            }),
            removed: AtomicBool::new(false),
            state: RwLock::new(State {
                log_start,
                sealed: segs,
                active,
                unsynced: Vec::new(),
                dir_dirty: created,
                raft,
            }),
            // What recovery found counts as on disk: fsyncing every partition at open would
            // cost a device flush each, whether or not anything is dirty.
            sync: Mutex::new(SyncState {
                durable_end: end,
                failed: None,
                syncing: false,
                last_sync: Instant::now(),
            }),
            synced: Condvar::new(),
            counters,
        })
    }

    /// `(log start, end)`; the end is the high-water mark.
    pub(crate) fn offsets(&self) -> (i64, i64) {
        let st = read(&self.state);
        (st.log_start, st.visible_end())
    }

    /// Appends the messages as one batch, stamping offsets (and zero timestamps) in place;
    /// under `Always`, returns once the batch is on disk.
    pub(crate) fn append(
        &self,
        set: &MessageSet<'_>,
        now: i64,
    ) -> Result<AppendResult, StorageError> {
        let appended = self.append_nowait(set, now, None)?;
        if self.fsync_always() && appended.count > 0 {
            self.make_durable(appended.high_water_mark)?;
        }
        Ok(appended)
    }

    /// Whether acknowledging an append must wait for its fsync.
    pub(crate) fn fsync_always(&self) -> bool {
        self.settings.fsync == FsyncPolicy::Always
    }

    /// [`append`](Self::append) without waiting for the fsync, whatever the policy.
    ///
    /// With `producer`, the batch is first checked against that producer's state (protocol
    /// §6.2) under the writer lock: a retry of one of its last batches returns that batch's
    /// offsets and count (and the current end) without appending; an out-of-order one is an
    /// error. The offsets up to `base_offset + count` must be durable before either answer.
    pub(crate) fn append_nowait(
        &self,
        set: &MessageSet<'_>,
        now: i64,
        producer: Option<&ProducerBatch>,
    ) -> Result<AppendResult, StorageError> {
        let count = set.count();
        if count == 0 {
            let end = read(&self.state).active.end;
            return Ok(AppendResult {
                base_offset: end,
                count: 0,
                high_water_mark: end,
            });
        }
        let bytes = set.as_bytes();
        let len = u32::try_from(bytes.len()).map_err(|_| StorageError::BatchTooLarge {
            len: bytes.len(),
            max: u32::MAX as usize,
        })?;
        let mut w = lock(&self.writer);
        if self.removed.load(Ordering::Relaxed) {
            return Err(self.gone());
        }
        if self.settings.raft {
            return Err(self.raft_error(
                "a replicated partition takes entries through its Raft group only".into(),
            ));
        }
        let Writer { scratch, producers } = &mut *w;
        if let Some(pb) = producer
            && let Decision::Duplicate { base_offset, count } = producers.check(pb, count)?
        {
            return Ok(AppendResult {
                base_offset,
                count,
                high_water_mark: read(&self.state).active.end,
            });
        }
        let (mut seg, mut pos, mut entries, mut pidx_entries, base) = {
            let st = read(&self.state);
            let a = &st.active;
            (
                Arc::clone(&a.seg),
                a.log_len,
                a.entries,
                a.pidx_entries,
                a.end,
            )
        };
        let end = base
            .checked_add(i64::from(count))
            .ok_or(StorageError::OffsetOverflow { end: base, count })?;
        if pos > 0 && pos + u64::from(len) > self.settings.segment_bytes {
            seg = self.roll(base)?;
            pos = 0;
            entries = 0;
            pidx_entries = 0;
        }
        let buf = scratch;
        buf.clear();
        buf.extend_from_slice(bytes);
        let mut at = 0;
        // `base..end`, not `base..`: an open range steps past its last value, which overflows
        // when a batch ends at i64::MAX (found by the storage_recovery fuzz target).
        for (offset, rec) in (base..end).zip(set.records()) {
            let next = at + rec.len();
            if let Some(r) = buf.get_mut(at..next) {
                stamp_record(r, offset, now);
            }
            at = next;
        }
        let entry = IndexEntry {
            base_offset: base,
            pos,
            append_time: now,
            count,
            len,
            crc: checksum::checksum(buf),
        };
        seg.log.write_all_at(buf, pos).ctx("write", &seg.log_path)?;
        // The producer entry before the index entry: see `PidxEntry`.
        let mut pidx_created = false;
        if let Some(pb) = producer {
            let e = PidxEntry {
                base_offset: base,
                count,
                producer: *pb,
            };
            pidx_created = seg.write_pidx(pidx_entries, &e)?;
        }
        seg.idx
            .write_all_at(&entry.encode(), entries * ENTRY_LEN as u64)
            .ctx("write", &seg.idx_path)?;
        {
            let mut st = write(&self.state);
            let a = &mut st.active;
            if a.entries.is_multiple_of(SAMPLE_EVERY) {
                a.samples.push(base);
            }
            a.entries += 1;
            if producer.is_some() {
                a.pidx_entries += 1;
            }
            a.log_len = entry.end_pos();
            a.end = end;
            a.last_append = Some(now);
            st.dir_dirty |= pidx_created;
        }
        if let Some(pb) = producer {
            producers.record(pb, count, base);
        }
        if w.scratch.capacity() > SCRATCH_KEEP {
            // Don't keep a rare large batch's buffer for every partition.
            w.scratch = Vec::new();
        }
        drop(w);
        let c = &self.counters;
        c.inc(&c.appends, 1);
        c.inc(&c.messages_appended, u64::from(count));
        c.inc(&c.bytes_appended, u64::from(len));
        Ok(AppendResult {
            base_offset: base,
            count,
            high_water_mark: end,
        })
    }

    /// Marks the partition as deleted, once any append or retention run in progress is done;
    /// later ones fail ([`StorageError::TopicNotFound`]) or do nothing.
    pub(crate) fn mark_removed(&self) {
        let _w = lock(&self.writer);
        self.removed.store(true, Ordering::Relaxed);
    }

    pub(crate) fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    fn raft_error(&self, reason: String) -> StorageError {
        StorageError::RaftLog {
            dir: self.dir.clone(),
            reason,
        }
    }

    fn not_raft(&self) -> StorageError {
        self.raft_error(
            "not a Raft log: its topic was created by a single broker (index format 1)".into(),
        )
    }

    /// The log as Raft sees it.
    pub(crate) fn raft_state(&self) -> Result<RaftLogState, StorageError> {
        let st = read(&self.state);
        let Some(r) = &st.raft else {
            return Err(self.not_raft());
        };
        Ok(RaftLogState {
            last_purged: r.last_purged,
            last: r.last,
            next_index: st.next_index(),
            log_start: st.log_start,
            end: st.active.end,
            high_water_mark: r.commit,
        })
    }

    /// Moves the high-water mark to `hwm`, the end offset of the last committed entry: up
    /// only, and never past the log's end.
    pub(crate) fn set_high_water_mark(&self, hwm: i64) -> Result<(), StorageError> {
        let mut st = write(&self.state);
        let end = st.active.end;
        let Some(r) = &mut st.raft else {
            drop(st);
            return Err(self.not_raft());
        };
        if hwm < r.commit || hwm > end {
            let commit = r.commit;
            drop(st);
            return Err(self.raft_error(format!(
                "high-water mark {hwm} is outside {commit}..={end} (it only moves up, to at most the log's end)"
            )));
        }
        r.commit = hwm;
        Ok(())
    }

    /// Appends one Raft entry: its index must be the log's next and its base offset the
    /// log's end; records are stored byte for byte as given (the leader stamped them).
    pub(crate) fn raft_append(&self, a: &RaftAppend<'_>) -> Result<AppendResult, StorageError> {
        let count = a.messages.count();
        let index = a.log_id.index;
        if (a.kind == RaftEntryKind::Records) != (count > 0) {
            return Err(self.raft_error(format!(
                "entry {index} ({:?}) has {count} messages: a Records entry holds one or more, the others none",
                a.kind
            )));
        }
        let bytes = a.messages.as_bytes();
        let len = u32::try_from(bytes.len()).map_err(|_| StorageError::BatchTooLarge {
            len: bytes.len(),
            max: u32::MAX as usize,
        })?;
        let _w = lock(&self.writer);
        if self.removed.load(Ordering::Relaxed) {
            return Err(self.gone());
        }
        let (mut seg, mut pos, mut entries, base, next_index) = {
            let st = read(&self.state);
            if st.raft.is_none() {
                drop(st);
                return Err(self.not_raft());
            }
            let a = &st.active;
            (
                Arc::clone(&a.seg),
                a.log_len,
                a.entries,
                a.end,
                st.next_index(),
            )
        };
        if index != next_index {
            return Err(self.raft_error(format!(
                "entry {index} does not follow the log: the next index is {next_index}"
            )));
        }
        if a.base_offset != base {
            return Err(self.raft_error(format!(
                "entry {index} starts at offset {}, but the log ends at {base}",
                a.base_offset
            )));
        }
        let end = base
            .checked_add(i64::from(count))
            .ok_or(StorageError::OffsetOverflow { end: base, count })?;
        if len > 0 && pos > 0 && pos + u64::from(len) > self.settings.segment_bytes {
            seg = self.roll(base)?;
            pos = 0;
            entries = 0;
        }
        let entry = IndexEntry {
            base_offset: base,
            pos,
            append_time: a.append_time,
            count,
            len,
            crc: checksum::checksum(bytes),
        };
        let meta = RaftMeta {
            log_id: a.log_id,
            kind: a.kind,
            producer: a.producer,
        };
        if len > 0 {
            seg.log
                .write_all_at(bytes, pos)
                .ctx("write", &seg.log_path)?;
        }
        seg.idx
            .write_all_at(&entry.encode_raft(&meta), entries * RAFT_ENTRY_LEN as u64)
            .ctx("write", &seg.idx_path)?;
        {
            let mut st = write(&self.state);
            let act = &mut st.active;
            if act.entries.is_multiple_of(SAMPLE_EVERY) {
                act.samples.push(base);
            }
            act.entries += 1;
            act.log_len = entry.end_pos();
            act.end = end;
            // Age retention goes by the newest record: an entry without messages (stamped
            // with time 0) does not make its segment old.
            if count > 0 {
                act.last_append = Some(a.append_time);
            }
            if let Some(r) = &mut st.raft {
                r.last = Some(a.log_id);
            }
        }
        if count > 0 {
            let c = &self.counters;
            c.inc(&c.appends, 1);
            c.inc(&c.messages_appended, u64::from(count));
            c.inc(&c.bytes_appended, u64::from(len));
        }
        Ok(AppendResult {
            base_offset: base,
            count,
            high_water_mark: end,
        })
    }

    /// The segment holding Raft index `index` (the last whose first index is at or below
    /// it, among those holding entries), as a position in `segments()`.
    fn raft_segment(st: &State, index: u64) -> Option<usize> {
        st.segments()
            .enumerate()
            .filter(|(_, s)| s.entries > 0 && s.first_index <= index)
            .last()
            .map(|(k, _)| k)
    }

    /// The first index a read may ask for: after the last purged entry, and stored.
    fn raft_first_readable(st: &State) -> u64 {
        let first_stored = st
            .segments()
            .find(|s| s.entries > 0)
            .map_or(st.next_index(), |s| s.first_index);
        let after_purged = st
            .raft
            .as_ref()
            .and_then(|r| r.last_purged)
            .map_or(0, |p| p.index.saturating_add(1));
        first_stored.max(after_purged)
    }

    /// The entries with indexes `from..to` (fewer if the log ends before `to`), records
    /// included. `from` below the first entry kept is an error.
    pub(crate) fn raft_entries(&self, from: u64, to: u64) -> Result<Vec<RaftEntry>, StorageError> {
        self.collect_raft_entries(from, to, true)
    }

    /// [`raft_entries`](Self::raft_entries) without the records (`records` left empty): the
    /// index entries only, no `.log` read.
    pub(crate) fn raft_entry_headers(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Vec<RaftEntry>, StorageError> {
        self.collect_raft_entries(from, to, false)
    }

    fn collect_raft_entries(
        &self,
        from: u64,
        to: u64,
        with_records: bool,
    ) -> Result<Vec<RaftEntry>, StorageError> {
        let segs: Vec<(Arc<Segment>, u64, u64)> = {
            let st = read(&self.state);
            if st.raft.is_none() {
                drop(st);
                return Err(self.not_raft());
            }
            let first = Self::raft_first_readable(&st);
            if from < first && from < to {
                drop(st);
                return Err(self.raft_error(format!(
                    "entries from {from} are asked for, but the log keeps them from {first} on"
                )));
            }
            st.segments()
                .filter(|s| s.entries > 0 && s.first_index < to && s.first_index + s.entries > from)
                .map(|s| (Arc::clone(&s.seg), s.first_index, s.entries))
                .collect()
        };
        let mut out = Vec::new();
        let mut idx = Vec::new();
        for (seg, first, entries) in segs {
            let lo = from.max(first) - first;
            let hi = to.min(first + entries) - first;
            if lo >= hi {
                continue;
            }
            seg.read_raft_entries(lo, hi - lo, &mut idx)?;
            // An entry from its index entries, with `records`.
            let entry = |e: &IndexEntry, m: &RaftMeta, records| RaftEntry {
                log_id: m.log_id,
                kind: m.kind,
                base_offset: e.base_offset,
                count: e.count,
                append_time: e.append_time,
                producer: m.producer,
                records,
            };
            if !with_records {
                out.extend(idx.iter().map(|(e, m)| entry(e, m, Vec::new())));
                continue;
            }
            let (Some((a, _)), Some((b, _))) = (idx.first(), idx.last()) else {
                continue;
            };
            let start = a.pos;
            let mut data = vec![0u8; usize::try_from(b.end_pos() - start).unwrap_or(0)];
            seg.log
                .read_exact_at(&mut data, start)
                .ctx("read log", &seg.log_path)?;
            for (e, m) in &idx {
                let at = usize::try_from(e.pos - start).unwrap_or(0);
                let records = data
                    .get(at..at + e.len as usize)
                    .unwrap_or_default()
                    .to_vec();
                out.push(entry(e, m, records));
            }
        }
        Ok(out)
    }

    /// Removes the entries from index `from` on (a follower's divergent tail), durably.
    /// Entries below the high-water mark (committed) or purged are refused.
    pub(crate) fn raft_truncate(&self, from: u64) -> Result<(), StorageError> {
        let _w = lock(&self.writer);
        if self.removed.load(Ordering::Relaxed) {
            return Err(self.gone());
        }
        let st = read(&self.state);
        let Some(r) = &st.raft else {
            drop(st);
            return Err(self.not_raft());
        };
        if from >= st.next_index() {
            return Ok(());
        }
        let first = Self::raft_first_readable(&st);
        let commit = r.commit;
        let purged = r.last_purged;
        let Some(k) = Self::raft_segment(&st, from).filter(|_| from >= first) else {
            drop(st);
            return Err(self.raft_error(format!(
                "cannot truncate from entry {from}: the log keeps entries from {first} on"
            )));
        };
        let Some(target) = st.segments().nth(k) else {
            return Ok(());
        };
        let seg = Arc::clone(&target.seg);
        let keep = from - target.first_index;
        let first_index = target.first_index;
        let samples_kept = keep.div_ceil(SAMPLE_EVERY) as usize;
        let samples: Vec<i64> = target.samples.iter().take(samples_kept).copied().collect();
        // The new last entry: in this segment, in the one before, or the last purged.
        let prev_seg = k.checked_sub(1).and_then(|j| st.segments().nth(j));
        let prev = prev_seg.map(|s| (Arc::clone(&s.seg), s.entries));
        drop(st);
        let mut buf = Vec::new();
        seg.read_raft_entries(keep, 1, &mut buf)?;
        let Some(&(cut, _)) = buf.first() else {
            return Ok(());
        };
        if cut.base_offset < commit {
            return Err(self.raft_error(format!(
                "cannot truncate from entry {from} at offset {}: the high-water mark is {commit} (committed entries are never removed)",
                cut.base_offset
            )));
        }
        let (new_last, last_append) = if keep > 0 {
            seg.read_raft_entries(keep - 1, 1, &mut buf)?;
            let l = buf.first().copied();
            (l.map(|(_, m)| m.log_id), l.map(|(e, _)| e.append_time))
        } else if let Some((pseg, n)) = prev.filter(|(_, n)| *n > 0) {
            pseg.read_raft_entries(n - 1, 1, &mut buf)?;
            let l = buf.first().copied();
            (l.map(|(_, m)| m.log_id), None)
        } else {
            (purged, None)
        };
        // A segment left empty goes too (unless it is the first): the previous one is active
        // again, exactly as before the entry that rolled it. So the segment files are a
        // function of the entries appended (and the segment size), and replicas that append
        // the same entries hold the same files whatever they truncated on the way.
        let drop_target = keep == 0 && k > 0;
        // Readers stop seeing the cut entries first (they are past the high-water mark, so
        // no fetch reads them anyway); then the files are cut.
        let removed: Vec<SegState> = {
            let mut st = write(&self.state);
            let mut all: Vec<SegState> = std::mem::take(&mut st.sealed);
            let old_active = std::mem::replace(
                &mut st.active,
                SegState::empty(Arc::clone(&seg), first_index),
            );
            all.push(old_active);
            let removed = all.split_off(if drop_target { k } else { k + 1 });
            let mut kept = all;
            if let Some(mut t) = kept.pop() {
                if !drop_target {
                    t.entries = keep;
                    t.pidx_entries = 0;
                    t.log_len = cut.pos;
                    t.end = cut.base_offset;
                    t.samples = samples;
                    t.last_append = last_append;
                }
                st.active = t;
            }
            st.sealed = kept;
            st.unsynced
                .retain(|u| !removed.iter().any(|r| Arc::ptr_eq(&r.seg, u)));
            if let Some(r) = &mut st.raft {
                r.last = new_last;
            }
            removed
        };
        {
            let mut s = lock(&self.sync);
            s.durable_end = s.durable_end.min(cut.base_offset);
        }
        for r in &removed {
            r.seg.remove_files();
        }
        if !drop_target {
            seg.cut(keep, cut.pos)?;
        }
        if !removed.is_empty() {
            meta::sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Purges the entries up to `upto` (committed and in a snapshot): the log start (and the
    /// high-water mark, if below) moves to the offset after it, and the sealed segments holding
    /// only purged entries are deleted.
    pub(crate) fn raft_purge(&self, upto: RaftLogId) -> Result<(), StorageError> {
        let _w = lock(&self.writer);
        if self.removed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let (seg, pos, new_start_min, n) = {
            let st = read(&self.state);
            let Some(r) = &st.raft else {
                drop(st);
                return Err(self.not_raft());
            };
            if r.last_purged.is_some_and(|p| p.index >= upto.index) {
                return Ok(());
            }
            let next = st.next_index();
            let Some(k) = Self::raft_segment(&st, upto.index).filter(|_| upto.index < next) else {
                drop(st);
                return Err(self.raft_error(format!(
                    "cannot purge up to entry {}: the log's next index is {next} (install a snapshot past the log with a reset)",
                    upto.index
                )));
            };
            let Some(s) = st.segments().nth(k) else {
                return Ok(());
            };
            // Sealed segments whose last entry is purged.
            let n = st
                .sealed
                .iter()
                .take_while(|s| s.first_index + s.entries <= upto.index.saturating_add(1))
                .count();
            (
                Arc::clone(&s.seg),
                upto.index - s.first_index,
                st.log_start,
                n,
            )
        };
        let mut buf = Vec::new();
        seg.read_raft_entries(pos, 1, &mut buf)?;
        let Some(&(e, m)) = buf.first() else {
            return Ok(());
        };
        if m.log_id != upto {
            return Err(self.raft_error(format!(
                "cannot purge up to {upto:?}: the log holds {:?} at that index",
                m.log_id
            )));
        }
        let new_start = new_start_min.max(e.end_offset());
        // Persist first: a crash before the files are gone leaves segments the next open
        // removes.
        meta::write_partition_raft(&self.dir, new_start, Some(upto))?;
        let victims: Vec<SegState> = {
            let mut st = write(&self.state);
            st.log_start = new_start;
            if let Some(r) = &mut st.raft {
                r.last_purged = Some(upto);
                // A purged entry is committed (it is in a snapshot): the high-water mark
                // covers it, even if the purge comes before the apply that moves it.
                r.commit = r.commit.max(new_start);
            }
            st.sealed.drain(..n).collect()
        };
        for v in &victims {
            v.seg.remove_files();
        }
        self.counters
            .inc(&self.counters.segments_deleted, victims.len() as u64);
        Ok(())
    }

    /// Empties the log for a snapshot that covers more than it holds: every entry up to
    /// `last_purged` is in the snapshot, the next entry goes at offset `next_offset`, which
    /// is also the high-water mark.
    pub(crate) fn raft_reset(
        &self,
        last_purged: RaftLogId,
        next_offset: i64,
    ) -> Result<(), StorageError> {
        let _w = lock(&self.writer);
        if self.removed.load(Ordering::Relaxed) {
            return Err(self.gone());
        }
        if read(&self.state).raft.is_none() {
            return Err(self.not_raft());
        }
        let old: Vec<Arc<Segment>> = read(&self.state)
            .segments()
            .map(|s| Arc::clone(&s.seg))
            .collect();
        // Unlink the old log, then record the purge, then start the new segment: a crash in
        // between leaves an empty log (the group sends the snapshot again), never a mix.
        for s in &old {
            s.remove_files();
        }
        meta::sync_dir(&self.dir)?;
        meta::write_partition_raft(&self.dir, next_offset, Some(last_purged))?;
        let seg = Arc::new(Segment::open(&self.dir, next_offset, true, true)?);
        meta::sync_dir(&self.dir)?;
        {
            let mut st = write(&self.state);
            st.sealed.clear();
            st.unsynced.clear();
            st.active = SegState::empty(seg, last_purged.index.saturating_add(1));
            st.log_start = next_offset;
            st.raft = Some(RaftState {
                commit: next_offset,
                last: Some(last_purged),
                last_purged: Some(last_purged),
            });
        }
        let mut s = lock(&self.sync);
        s.durable_end = next_offset;
        Ok(())
    }

    fn gone(&self) -> StorageError {
        let topic = self
            .dir
            .parent()
            .and_then(|t| t.file_name())
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default();
        StorageError::TopicNotFound { topic }
    }

    /// Starts a new active segment at `base` (called with the writer lock held).
    fn roll(&self, base: i64) -> Result<Arc<Segment>, StorageError> {
        let seg = Arc::new(Segment::open(&self.dir, base, true, self.settings.raft)?);
        let mut st = write(&self.state);
        let first_index = st.next_index();
        let old = std::mem::replace(
            &mut st.active,
            SegState::empty(Arc::clone(&seg), first_index),
        );
        st.unsynced.push(Arc::clone(&old.seg));
        st.sealed.push(old);
        st.dir_dirty = true;
        Ok(seg)
    }

    /// Reads whole messages from `offset` on while their record bytes stay within `max_bytes`
    /// (at least one, if one exists at `offset`), never more than `max_total` bytes.
    pub(crate) fn fetch(
        &self,
        offset: i64,
        max_bytes: u32,
        max_total: u32,
    ) -> Result<FetchResult, StorageError> {
        let (log_start, hwm, out) = self.run_fetch(offset, max_bytes, max_total, false)?;
        Ok(FetchResult {
            high_water_mark: hwm,
            log_start,
            count: out.count,
            next_offset: out.next,
            crc: out.crc,
            records: out.out,
        })
    }

    /// Like [`fetch`](Self::fetch), but returns the file ranges holding the records instead
    /// of reading them (for `sendfile`).
    pub(crate) fn fetch_plan(
        &self,
        offset: i64,
        max_bytes: u32,
        max_total: u32,
    ) -> Result<FetchPlan, StorageError> {
        let (log_start, hwm, out) = self.run_fetch(offset, max_bytes, max_total, true)?;
        let ranges = out.ranges.unwrap_or_default();
        Ok(FetchPlan {
            high_water_mark: hwm,
            log_start,
            count: out.count,
            next_offset: out.next,
            crc: out.crc,
            len: ranges.iter().map(|r| r.len).sum(),
            ranges,
        })
    }

    fn run_fetch(
        &self,
        offset: i64,
        max_bytes: u32,
        max_total: u32,
        plan: bool,
    ) -> Result<(i64, i64, FetchState), StorageError> {
        let (log_start, hwm, snaps) = {
            let st = read(&self.state);
            let end = st.visible_end();
            if offset < st.log_start || offset > end {
                return Err(StorageError::OffsetOutOfRange {
                    offset,
                    start: st.log_start,
                    end,
                });
            }
            // The segment holding `offset`, then as many after it as the limit can need.
            let first = st
                .sealed
                .partition_point(|s| s.seg.base <= offset)
                .saturating_sub(1);
            let limit = u64::from(max_bytes.min(max_total));
            let mut snaps: Vec<Snap> = Vec::new();
            let mut ahead = 0u64;
            let candidates = st
                .sealed
                .iter()
                .skip(first)
                .chain(std::iter::once(&st.active));
            for s in candidates.filter(|s| s.end > offset) {
                if offset == end || (!snaps.is_empty() && ahead >= limit) {
                    break;
                }
                snaps.push(Snap {
                    seg: Arc::clone(&s.seg),
                    entries: s.entries,
                    end: s.end,
                    range: if s.seg.base <= offset {
                        s.search_range(offset)
                    } else {
                        (0, s.entries.min(SAMPLE_EVERY))
                    },
                });
                if snaps.len() > 1 {
                    ahead += s.log_len;
                }
            }
            (st.log_start, end, snaps)
        };
        let mut out = FetchState {
            stop: hwm,
            limit: max_bytes.min(max_total) as usize,
            max_total,
            out: Vec::new(),
            crc: 0,
            taken: 0,
            count: 0,
            next: offset,
            run: None,
            entries: Vec::new(),
            ranges: plan.then(Vec::new),
        };
        for snap in &snaps {
            if out.read_segment(snap)? {
                break;
            }
        }
        Ok((log_start, hwm, out))
    }

    /// Fsyncs everything appended so far.
    pub(crate) fn sync(&self) -> Result<(), StorageError> {
        if self.removed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let end = read(&self.state).active.end;
        self.make_durable(end)
    }

    /// Under `Interval`, fsyncs if there is unsynced data and the interval has passed.
    pub(crate) fn flush_if_due(&self, now: Instant) -> Result<(), StorageError> {
        let FsyncPolicy::Interval(every) = self.settings.fsync else {
            return Ok(());
        };
        if self.removed.load(Ordering::Relaxed) {
            return Ok(());
        };
        let end = read(&self.state).active.end;
        {
            let s = lock(&self.sync);
            if s.durable_end >= end || s.syncing || now.duration_since(s.last_sync) < every {
                return Ok(());
            }
        }
        self.make_durable(end)
    }

    pub(crate) fn fsync_interval(&self) -> Option<Duration> {
        match self.settings.fsync {
            FsyncPolicy::Interval(d) => Some(d),
            _ => None,
        }
    }

    /// Returns once every offset below `upto` is on disk. Group commit: one thread fsyncs at a
    /// time and its fsync covers every batch written before it started; threads that arrive
    /// meanwhile wait and are usually covered by the next one.
    pub(crate) fn make_durable(&self, upto: i64) -> Result<(), StorageError> {
        let mut s = lock(&self.sync);
        loop {
            if let Some((from, to, reason)) = &s.failed
                && upto > *from
                && upto <= *to
            {
                return Err(StorageError::SyncFailed {
                    dir: self.dir.clone(),
                    from: *from,
                    to: *to,
                    reason: reason.clone(),
                });
            }
            if s.durable_end >= upto {
                return Ok(());
            }
            if s.syncing {
                s = self
                    .synced
                    .wait(s)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            s.syncing = true;
            drop(s);
            let r = self.sync_now();
            s = lock(&self.sync);
            s.syncing = false;
            s.last_sync = Instant::now();
            self.synced.notify_all();
            match r {
                Ok(synced_end) if synced_end < upto => {
                    s.durable_end = s.durable_end.max(synced_end);
                    // Everything stored is on disk and the batch is not among it: a Raft log
                    // truncation removed it (a plain log never shrinks).
                    return Err(self.raft_error(format!(
                        "offsets below {upto} were truncated from the log (it ends at {synced_end}) before they were on disk"
                    )));
                }
                Ok(synced_end) => s.durable_end = s.durable_end.max(synced_end),
                Err((end, e)) => {
                    // Everything this fsync covered is in doubt: every waiter for it fails (the
                    // loop above), this one included.
                    let from = s.durable_end;
                    s.failed = Some(match s.failed.take() {
                        Some((f, t, _)) => (f.min(from), t.max(end), e.to_string()),
                        None => (from, end, e.to_string()),
                    });
                    tracing::error!(dir = %self.dir.display(), from, end, error = %e, "fsync failed");
                }
            }
        }
    }

    /// Fsyncs the sealed segments not yet synced, the active segment and, when it changed,
    /// the directory. Returns the end offset the fsync covers (with the error, when it fails).
    fn sync_now(&self) -> Result<i64, (i64, StorageError)> {
        let synced = durability::partition(&self.dir);
        let (unsynced, active, end, dir_dirty) = {
            let mut st = write(&self.state);
            (
                std::mem::take(&mut st.unsynced),
                Arc::clone(&st.active.seg),
                st.active.end,
                std::mem::take(&mut st.dir_dirty),
            )
        };
        let r = (|| {
            for seg in &unsynced {
                seg.sync()?;
            }
            active.sync()?;
            if dir_dirty {
                meta::sync_dir(&self.dir)?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            let mut st = write(&self.state);
            st.unsynced.extend(unsynced);
            st.dir_dirty |= dir_dirty;
            return Err((end, e));
        }
        synced.done();
        self.counters.inc(&self.counters.fsyncs, 1);
        Ok(end)
    }

    /// Whether the topic has a retention setting (by size or by age).
    pub(crate) fn has_retention(&self) -> bool {
        self.settings.retention_bytes.is_some() || self.settings.retention_age.is_some()
    }

    /// A Raft log's retention point: the last entry of the last sealed segment that retention
    /// no longer keeps (by the rules of [`enforce_retention`](Self::enforce_retention): the
    /// oldest segments while the log is over `retention_bytes`, or while their newest record
    /// is older than `retention_age`), among the segments whose entries all have indexes up
    /// to `applied`. `None` when retention keeps every such segment. Nothing is deleted: the
    /// partition's group snapshots at this entry and purges up to it.
    pub(crate) fn raft_retention_point(
        &self,
        now: i64,
        applied: u64,
    ) -> Result<Option<RaftLogId>, StorageError> {
        let Settings {
            retention_bytes,
            retention_age,
            ..
        } = self.settings;
        let cutoff = retention_age
            .map(|a| now.saturating_sub(i64::try_from(a.as_nanos()).unwrap_or(i64::MAX)));
        let last = {
            let st = read(&self.state);
            if st.raft.is_none() {
                drop(st);
                return Err(self.not_raft());
            }
            let mut total: u64 =
                st.sealed.iter().map(|s| s.log_len).sum::<u64>() + st.active.log_len;
            let mut last = None;
            for s in &st.sealed {
                let by_size = retention_bytes.is_some_and(|limit| total > limit);
                let by_age = cutoff.is_some_and(|c| s.last_append.is_none_or(|t| t <= c));
                let Some(k) = s.entries.checked_sub(1) else {
                    break;
                };
                if !(by_size || by_age) || s.first_index.saturating_add(k) > applied {
                    break;
                }
                total -= s.log_len;
                last = Some((Arc::clone(&s.seg), k));
            }
            last
        };
        let Some((seg, k)) = last else {
            return Ok(None);
        };
        let mut buf = Vec::new();
        seg.read_raft_entries(k, 1, &mut buf)?;
        Ok(buf.first().map(|(_, m)| m.log_id))
    }

    /// Deletes the oldest sealed segments that retention no longer keeps and advances (and
    /// persists) the log start. Returns the number of segments deleted.
    pub(crate) fn enforce_retention(&self, now: i64) -> Result<u64, StorageError> {
        let Settings {
            retention_bytes,
            retention_age,
            ..
        } = self.settings;
        // A Raft log is trimmed by its group (snapshot, then purge), never under it.
        if self.settings.raft || (retention_bytes.is_none() && retention_age.is_none()) {
            return Ok(0);
        }
        let cutoff = retention_age
            .map(|a| now.saturating_sub(i64::try_from(a.as_nanos()).unwrap_or(i64::MAX)));
        // Serialize with appends (which may roll segments) and with topic deletion.
        let _w = lock(&self.writer);
        if self.removed.load(Ordering::Relaxed) {
            return Ok(0);
        }
        let (n, new_start) = {
            let st = read(&self.state);
            let mut total: u64 =
                st.sealed.iter().map(|s| s.log_len).sum::<u64>() + st.active.log_len;
            let mut n = 0;
            for s in &st.sealed {
                let by_size = retention_bytes.is_some_and(|limit| total > limit);
                let by_age = cutoff.is_some_and(|c| s.last_append.is_none_or(|t| t <= c));
                if !(by_size || by_age) {
                    break;
                }
                total -= s.log_len;
                n += 1;
            }
            let next_base = st.sealed.get(n).map_or(st.active.seg.base, |s| s.seg.base);
            (n, st.log_start.max(next_base))
        };
        if n == 0 {
            return Ok(0);
        }
        // Persist the new start first: a crash before the files are gone leaves segments that
        // the next open removes.
        meta::write_partition(&self.dir, new_start)?;
        let victims: Vec<SegState> = {
            let mut st = write(&self.state);
            st.log_start = new_start;
            st.sealed.drain(..n).collect()
        };
        for v in &victims {
            v.seg.remove_files();
        }
        tracing::debug!(partition = %self.dir.display(), segments = n, log_start = new_start, "retention");
        self.counters.inc(&self.counters.segments_deleted, n as u64);
        Ok(n as u64)
    }
}

/// The state of one fetch.
struct FetchState {
    /// The high-water mark: no batch at or past it is read (a Raft log's uncommitted tail).
    stop: i64,
    limit: usize,
    max_total: u32,
    out: Vec<u8>,
    crc: u32,
    /// Record bytes taken, including a pending `run` not yet read.
    taken: usize,
    count: u32,
    next: i64,
    /// Whole batches to read with one `pread`: (position, length, CRC).
    run: Option<(u64, u64, u32)>,
    entries: Vec<IndexEntry>,
    /// Planning a zero-copy fetch: collect file ranges instead of reading them.
    ranges: Option<Vec<LogRange>>,
}

impl FetchState {
    /// Reads from one segment; returns `true` when the fetch is complete.
    fn read_segment(&mut self, snap: &Snap) -> Result<bool, StorageError> {
        if self.next < snap.seg.base {
            // A gap left by a truncated sealed segment: continue at the next segment.
            if self.count > 0 {
                return Ok(true);
            }
            self.next = snap.seg.base;
        }
        if self.next >= snap.end {
            return Ok(false);
        }
        let seg = &*snap.seg;
        // The entry holding `next`: within the sampled range.
        let (lo, hi) = snap.range;
        seg.read_entries(lo, hi - lo, &mut self.entries)?;
        let k = self
            .entries
            .partition_point(|e| e.base_offset <= self.next)
            .saturating_sub(1);
        let mut i = lo + k as u64;
        let mut chunk_start = lo;
        let mut done = false;
        while i < snap.entries {
            if i >= chunk_start + self.entries.len() as u64 {
                let n = (snap.entries - i).min(SAMPLE_EVERY);
                seg.read_entries(i, n, &mut self.entries)?;
                chunk_start = i;
            }
            let Some(&e) = self.entries.get((i - chunk_start) as usize) else {
                break;
            };
            if e.base_offset >= self.stop {
                done = true;
                break;
            }
            if self.count > 0 && self.taken >= self.limit {
                done = true;
                break;
            }
            let skip = self.next - e.base_offset;
            if skip == 0 && self.taken + e.len as usize <= self.limit {
                let (pos, len, crc) = self.run.get_or_insert((e.pos, 0, 0));
                debug_assert_eq!(*pos + *len, e.pos);
                *crc = combine(*crc, e.crc, u64::from(e.len));
                *len += u64::from(e.len);
                self.taken += e.len as usize;
                self.count += e.count;
                self.next = e.end_offset();
                i += 1;
                continue;
            }
            // Part of a batch: read it straight into the output, find its record
            // boundaries, keep the piece asked for.
            self.flush_run(seg)?;
            let base = self.out.len();
            self.out.resize(base + e.len as usize, 0);
            let dst = self.out.get_mut(base..).unwrap_or_default();
            seg.log
                .read_exact_at(dst, e.pos)
                .ctx("read log", &seg.log_path)?;
            let batch = self.out.get(base..).unwrap_or_default();
            let set =
                MessageSet::new_checked(e.count, batch).map_err(|err| StorageError::Corrupt {
                    path: seg.log_path.clone(),
                    reason: format!("batch at offset {}: {err}", e.base_offset),
                })?;
            let (mut at, mut from) = (0usize, None);
            for (k, rec) in (0..).zip(set.records()) {
                if k < skip {
                    at += rec.len();
                    continue;
                }
                if self.taken + rec.len() > self.limit {
                    if self.count > 0 {
                        break;
                    }
                    if rec.len() > self.max_total as usize {
                        // The whole fetch fails; its output is dropped.
                        return Err(StorageError::MessageTooLarge {
                            offset: self.next,
                            len: rec.len(),
                            limit: self.max_total,
                        });
                    }
                }
                from.get_or_insert(at);
                at += rec.len();
                self.taken += rec.len();
                self.count += 1;
                self.next += 1;
            }
            let from = from.unwrap_or(at);
            let piece_len = at - from;
            let piece_crc = if from == 0 && at == e.len as usize {
                e.crc
            } else {
                checksum::checksum(batch.get(from..at).unwrap_or_default())
            };
            if let Some(ranges) = &mut self.ranges {
                self.out.truncate(base);
                push_range(ranges, &seg.log, e.pos + from as u64, piece_len as u64);
            } else {
                self.out.copy_within(base + from..base + at, base);
                self.out.truncate(base + piece_len);
            }
            self.crc = combine(self.crc, piece_crc, piece_len as u64);
            if self.next < e.end_offset() {
                done = true;
                break;
            }
            i += 1;
        }
        self.flush_run(seg)?;
        Ok(done)
    }

    /// Reads the pending run of whole batches into the output.
    fn flush_run(&mut self, seg: &Segment) -> Result<(), StorageError> {
        if let Some((pos, len, crc)) = self.run.take() {
            if let Some(ranges) = &mut self.ranges {
                push_range(ranges, &seg.log, pos, len);
                self.crc = combine(self.crc, crc, len);
                return Ok(());
            }
            let at = self.out.len();
            self.out.resize(at + len as usize, 0);
            let dst = self.out.get_mut(at..).unwrap_or_default();
            seg.log
                .read_exact_at(dst, pos)
                .ctx("read log", &seg.log_path)?;
            self.crc = combine(self.crc, crc, len);
        }
        Ok(())
    }
}

/// Appends a file range, merging it into the previous one when contiguous in the same file.
fn push_range(ranges: &mut Vec<LogRange>, file: &Arc<std::fs::File>, offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    if let Some(last) = ranges.last_mut()
        && Arc::ptr_eq(&last.file, file)
        && last.offset + last.len == offset
    {
        last.len += len;
        return;
    }
    ranges.push(LogRange {
        file: Arc::clone(file),
        offset,
        len,
    });
}

/// Removes a directory tree, logging (not failing) on error.
pub(crate) fn remove_tree(dir: &std::path::Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        tracing::warn!(path = %dir.display(), error = %e, "could not remove directory");
    }
}
