//! What reached the disk: every fsync of the storage goes through these hooks.
//!
//! In the broker they are empty and inlined away: nothing is recorded and nothing costs.
//! Under `cfg(test)` they record, for a data directory that a test registered, each file's
//! bytes as its fsync began and each directory's entries as its fsync began, in the order the
//! fsyncs completed, and when a partition's whole fsync (its segments, then its directory)
//! completed. A test then builds the disk as a power loss between any two of those events
//! leaves it: every write not covered by an fsync of its file, and every file created or
//! renamed without an fsync of its directory, is gone (the `power_loss` tests below).
//!
//! This kernel has no device-mapper (no `/dev/mapper/control`, no modules to load), so
//! `dm-flakey` or `dm-log-writes` on a loop device cannot drop unsynced writes here; this
//! model does it above the file system instead.

#[cfg(not(test))]
use std::path::Path;

/// An fsync that has begun; [`done`](Self::done) records it once it succeeded.
#[cfg(not(test))]
pub(crate) struct Fsync;

#[cfg(not(test))]
impl Fsync {
    /// The fsync succeeded.
    #[inline(always)]
    pub(crate) fn done(self) {}
}

/// An fsync of the file at `path` begins.
#[cfg(not(test))]
#[inline(always)]
pub(crate) fn file(_path: &Path) -> Fsync {
    Fsync
}

/// An fsync of the directory at `path` begins.
#[cfg(not(test))]
#[inline(always)]
pub(crate) fn dir(_path: &Path) -> Fsync {
    Fsync
}

/// A partition's fsync (its segments, then its directory when it changed) begins in `dir`.
#[cfg(not(test))]
#[inline(always)]
pub(crate) fn partition(_dir: &Path) -> Fsync {
    Fsync
}

#[cfg(test)]
pub(crate) use recorder::{dir, file, partition};

#[cfg(test)]
pub(crate) mod recorder {
    use std::collections::HashMap;
    use std::ffi::OsString;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, MutexGuard, PoisonError};

    /// One durable step, in the order they completed.
    #[derive(Debug, Clone)]
    pub(crate) enum Event {
        /// A file (by inode) held these bytes when its fsync began.
        File { ino: u64, bytes: Vec<u8> },
        /// A directory (relative to the root) held these entries when its fsync began.
        Dir { rel: PathBuf, entries: Vec<Entry> },
        /// A partition's fsync completed; it covers every batch acknowledged before it began.
        Partition { acked_before: usize },
        /// The test's count of acknowledged batches is now this.
        Acked(usize),
    }

    /// A directory entry: a name and what it points at.
    #[derive(Debug, Clone)]
    pub(crate) struct Entry {
        pub(crate) name: OsString,
        pub(crate) ino: u64,
        pub(crate) is_dir: bool,
    }

    struct Recording {
        root: PathBuf,
        events: Vec<Event>,
        acked: usize,
    }

    static RECORDINGS: Mutex<Vec<Recording>> = Mutex::new(Vec::new());

    fn recordings() -> MutexGuard<'static, Vec<Recording>> {
        RECORDINGS.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An fsync that has begun, with what it will have made durable.
    pub(crate) struct Fsync(Option<(PathBuf, Event)>);

    impl Fsync {
        /// The fsync succeeded: record what it made durable.
        pub(crate) fn done(self) {
            if let Some((root, event)) = self.0 {
                let mut all = recordings();
                if let Some(r) = all.iter_mut().find(|r| r.root == root) {
                    r.events.push(event);
                }
            }
        }
    }

    /// The registered root `path` lies under, with the path relative to it.
    fn recorded(path: &Path) -> Option<(PathBuf, PathBuf, usize)> {
        let all = recordings();
        let r = all.iter().find(|r| path.starts_with(&r.root))?;
        let rel = path.strip_prefix(&r.root).ok()?.to_path_buf();
        Some((r.root.clone(), rel, r.acked))
    }

    pub(crate) fn file(path: &Path) -> Fsync {
        Fsync(recorded(path).and_then(|(root, _, _)| {
            let ino = std::fs::metadata(path).ok()?.ino();
            let bytes = std::fs::read(path).ok()?;
            Some((root, Event::File { ino, bytes }))
        }))
    }

    pub(crate) fn dir(path: &Path) -> Fsync {
        Fsync(recorded(path).and_then(|(root, rel, _)| {
            let entries = list(path).ok()?;
            Some((root, Event::Dir { rel, entries }))
        }))
    }

    pub(crate) fn partition(dir: &Path) -> Fsync {
        Fsync(recorded(dir).map(|(root, _, acked)| {
            (
                root,
                Event::Partition {
                    acked_before: acked,
                },
            )
        }))
    }

    fn list(dir: &Path) -> std::io::Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let meta = e.metadata()?;
            entries.push(Entry {
                name: e.file_name(),
                ino: meta.ino(),
                is_dir: meta.is_dir(),
            });
        }
        Ok(entries)
    }

    /// What the disk holds durably under a root: each directory's entries and each file's
    /// bytes (by inode).
    #[derive(Debug, Clone, Default)]
    pub(crate) struct Disk {
        dirs: HashMap<PathBuf, Vec<Entry>>,
        files: HashMap<u64, Vec<u8>>,
    }

    impl Disk {
        /// Everything under `root` as it is now, taken as durable (after a fully fsynced step,
        /// like a topic's creation).
        pub(crate) fn scan(root: &Path) -> Self {
            let mut disk = Self::default();
            disk.scan_dir(root, PathBuf::new());
            disk
        }

        fn scan_dir(&mut self, root: &Path, rel: PathBuf) {
            let entries = list(&root.join(&rel)).expect("a test directory lists");
            for e in &entries {
                let path = rel.join(&e.name);
                if e.is_dir {
                    self.scan_dir(root, path);
                } else {
                    let bytes = std::fs::read(root.join(&path)).expect("a test file reads");
                    self.files.insert(e.ino, bytes);
                }
            }
            self.dirs.insert(rel, entries);
        }

        /// Applies one durable step.
        pub(crate) fn apply(&mut self, event: &Event) {
            match event {
                Event::File { ino, bytes } => {
                    self.files.insert(*ino, bytes.clone());
                }
                Event::Dir { rel, entries } => {
                    self.dirs.insert(rel.clone(), entries.clone());
                }
                Event::Partition { .. } | Event::Acked(_) => {}
            }
        }

        /// Writes this disk out under `to` (an empty directory). A file whose entry is durable
        /// but whose bytes never were is empty.
        pub(crate) fn write(&self, to: &Path) {
            self.write_dir(to, PathBuf::new());
        }

        fn write_dir(&self, to: &Path, rel: PathBuf) {
            std::fs::create_dir_all(to.join(&rel)).expect("a test directory is created");
            for e in self.dirs.get(&rel).map_or(&[][..], Vec::as_slice) {
                let path = rel.join(&e.name);
                if e.is_dir {
                    self.write_dir(to, path);
                } else {
                    let bytes = self.files.get(&e.ino).map_or(&[][..], Vec::as_slice);
                    std::fs::write(to.join(&path), bytes).expect("a test file is written");
                }
            }
        }
    }

    /// Starts recording the fsyncs under `root`.
    pub(crate) fn start(root: &Path) {
        recordings().push(Recording {
            root: root.to_path_buf(),
            events: Vec::new(),
            acked: 0,
        });
    }

    /// The test's count of acknowledged batches under `root` is now `n`.
    pub(crate) fn acked(root: &Path, n: usize) {
        let mut all = recordings();
        if let Some(r) = all.iter_mut().find(|r| r.root == root) {
            r.acked = n;
            r.events.push(Event::Acked(n));
        }
    }

    /// Stops recording under `root` and returns what was recorded.
    pub(crate) fn stop(root: &Path) -> Vec<Event> {
        let mut all = recordings();
        let i = all
            .iter()
            .position(|r| r.root == root)
            .expect("the root was recorded");
        all.remove(i).events
    }
}

/// Power loss at every point of a run of appends, per fsync policy: the disk is built as the
/// recorded fsyncs left it, the storage opens on it, and what it serves must match the table
/// in `docs/storage.md`.
#[cfg(test)]
mod power_loss {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use streambus_core::{Encode, Message, MessageSet, MessageSetBuilder};

    use super::recorder::{self, Disk, Event};
    use crate::storage::{FsyncPolicy, Storage, StorageConfig, TopicConfig};

    /// Batches appended per run (one message each, 20–147 bytes, so ~1 KiB segments roll
    /// about every seven).
    const BATCHES: usize = 120;

    fn value(i: usize) -> Vec<u8> {
        let len = 20 + (i * 37) % 128;
        (0..len).map(|k| (i + k) as u8).collect()
    }

    fn config(root: &Path, fsync: FsyncPolicy) -> StorageConfig {
        let mut c = StorageConfig::new(root);
        c.fsync = fsync;
        c.segment_bytes = 1024;
        c.retention_age = None;
        c.retention_check_interval = Duration::ZERO;
        c
    }

    /// Every message partition 0 of topic `t` serves, as `(offset, value)`.
    fn stored(s: &Storage) -> Vec<(i64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let f = s.fetch("t", 0, offset, 1 << 20, 1 << 20).unwrap();
            if f.count == 0 {
                return out;
            }
            let set = MessageSet::new_checked(f.count, &f.records).unwrap();
            for m in set.iter() {
                out.push((m.offset, m.value.to_vec()));
            }
            offset = f.next_offset;
        }
    }

    /// Appends [`BATCHES`] batches under `fsync` while recording; returns the values, the disk
    /// when recording began (the topic's creation is fsynced) and the recorded events.
    fn run(root: &Path, fsync: FsyncPolicy) -> (Vec<Vec<u8>>, Disk, Vec<Event>) {
        let s = Storage::open(config(root, fsync)).unwrap();
        s.create_topic("t", 1, TopicConfig::default()).unwrap();
        let disk = Disk::scan(root);
        recorder::start(root);
        let mut values = Vec::new();
        for i in 0..BATCHES {
            let v = value(i);
            let m = Message::new(b"", &v);
            let mut set = vec![0u8; m.encoded_len()];
            MessageSetBuilder::new(&mut set).push(&m).unwrap();
            let r = s
                .append("t", 0, &MessageSet::new_checked(1, &set).unwrap(), 1)
                .unwrap();
            assert_eq!(r.base_offset, i as i64);
            values.push(v);
            recorder::acked(root, values.len());
            if matches!(fsync, FsyncPolicy::Interval(_)) && i % 8 == 7 {
                // Let the background fsync run now and then: wait for its counter.
                let before = s.stats().fsyncs;
                let deadline = Instant::now() + Duration::from_secs(10);
                while s.stats().fsyncs == before {
                    assert!(Instant::now() < deadline, "no interval fsync within 10 s");
                    std::thread::yield_now();
                }
            }
        }
        let events = recorder::stop(root);
        let segments = std::fs::read_dir(root.join("topics/t/0"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log"))
            })
            .count();
        eprintln!(
            "{fsync:?}: {} events recorded, {segments} segments",
            events.len()
        );
        (values, disk, events)
    }

    /// Loses power after each recorded event in turn; returns the cuts checked and the most
    /// acknowledged batches lost at one of them.
    fn check(fsync: FsyncPolicy) -> (usize, usize) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        let (values, mut disk, events) = run(&root, fsync);
        let (mut acked, mut covered, mut most_lost) = (0, 0, 0);
        for j in 0..=events.len() {
            if let Some(e) = j.checked_sub(1).and_then(|k| events.get(k)) {
                match e {
                    Event::Acked(n) => acked = *n,
                    Event::Partition { acked_before } => covered = covered.max(*acked_before),
                    e => disk.apply(e),
                }
            }
            let image = tempfile::tempdir().unwrap();
            disk.write(image.path());
            let s = Storage::open(config(image.path(), FsyncPolicy::Never))
                .unwrap_or_else(|e| panic!("{fsync:?}, cut {j}: recovery failed: {e}"));
            let got = stored(&s);
            // A prefix of what was appended, every byte as sent: nothing corrupt, nothing
            // never sent, no gap.
            for (k, (offset, v)) in got.iter().enumerate() {
                assert_eq!(*offset, k as i64, "{fsync:?}, cut {j}: a gap");
                assert_eq!(
                    Some(v),
                    values.get(k),
                    "{fsync:?}, cut {j}: offset {k} differs"
                );
            }
            // Every batch acknowledged before a completed partition fsync began is kept.
            assert!(
                got.len() >= covered,
                "{fsync:?}, cut {j}: {} kept, {covered} were fsynced",
                got.len()
            );
            if fsync == FsyncPolicy::Always {
                assert!(
                    got.len() >= acked,
                    "always, cut {j}: {} kept, {acked} acknowledged",
                    got.len()
                );
            }
            most_lost = most_lost.max(acked.saturating_sub(got.len()));
        }
        eprintln!(
            "{fsync:?}: {} power-loss points, at most {most_lost} acknowledged batches lost",
            events.len() + 1
        );
        (events.len() + 1, most_lost)
    }

    /// `always`: nothing acknowledged is lost at any point.
    #[test]
    fn under_always_power_loss_at_any_point_keeps_every_acknowledged_batch() {
        let (cuts, lost) = check(FsyncPolicy::Always);
        assert!(cuts > 2 * BATCHES, "{cuts} points");
        assert_eq!(lost, 0);
    }

    /// `interval`: what is lost is what was acknowledged since the last completed fsync
    /// began, never more (and some is lost at some point: the check sees the window).
    #[test]
    fn under_interval_power_loss_loses_only_what_the_last_fsync_did_not_cover() {
        let (cuts, lost) = check(FsyncPolicy::Interval(Duration::from_millis(1)));
        assert!(cuts > BATCHES, "{cuts} points");
        assert!(lost > 0, "no point lost anything acknowledged");
    }

    /// `never`: the storage fsyncs nothing of its own, so power loss may take everything
    /// appended since the topic was created; what remains is still a clean prefix.
    #[test]
    fn under_never_power_loss_leaves_a_clean_prefix() {
        let (_, lost) = check(FsyncPolicy::Never);
        assert_eq!(lost, BATCHES);
    }
}
