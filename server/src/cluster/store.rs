//! The metadata group's durable log and vote, in `<data>/cluster/`:
//!
//! - `log.jsonl`: one JSON record a line, appended and fsynced before openraft is told the
//!   entries are stored: an entry, a truncation (entries from an index on are gone) or a purge
//!   (entries up to a log id are gone, after a snapshot). Read back in order at start; a torn
//!   last line (a crash mid-append, before the fsync returned) is cut off. A purge rewrites the
//!   file (temporary file, fsync, rename), so it holds only the entries after the snapshot.
//! - `vote.json`: the vote and the committed log id, replaced atomically.
//!
//! JSON through `serde_json`: the codec openraft's own types derive `serde` for, no byte
//! order written here, and a file an operator can read; the metadata log is small (topic and
//! broker changes), so its size and speed do not matter.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::TypeConfig;

/// Reads a JSON file; `None` if it does not exist.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces `path` with `value` as JSON: a temporary file, fsynced, renamed over it, and the
/// directory fsynced, so a crash leaves the old or the new file whole.
pub(crate) fn write_json_atomically<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// One line of `log.jsonl`.
#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Entry(Entry<TypeConfig>),
    /// Entries from this index on are removed (a conflict with the leader's log).
    Truncate(u64),
    /// Entries up to this log id are removed (covered by a snapshot).
    Purge(LogId<u64>),
}

/// `vote.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct VoteFile {
    vote: Option<Vote<u64>>,
    committed: Option<LogId<u64>>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    log: File,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<u64>>,
    vote: VoteFile,
}

/// The log and vote store; clones share it (the log reader is a clone).
#[derive(Debug, Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
}

const LOG_FILE: &str = "log.jsonl";
const VOTE_FILE: &str = "vote.json";

fn io<E: std::error::Error + 'static>(e: E) -> StorageError<u64> {
    StorageIOError::write_logs(&e).into()
}

impl LogStore {
    /// Opens (creating) the store in `dir`, reading back what it holds.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LOG_FILE);
        let mut entries = BTreeMap::new();
        let mut last_purged = None;
        let mut good_len = 0u64;
        if let Ok(f) = File::open(&path) {
            let mut reader = BufReader::new(f);
            let mut line = String::new();
            loop {
                line.clear();
                let n = reader.read_line(&mut line)?;
                if n == 0 {
                    break;
                }
                let record = match serde_json::from_str::<Record>(line.trim_end()) {
                    Ok(r) if line.ends_with('\n') => r,
                    result => {
                        // Only the last line may be torn: anything after it is corruption.
                        let mut rest = String::new();
                        if reader.read_line(&mut rest)? > 0 {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!(
                                    "{}: line at byte {good_len} cannot be read ({:?}) and is not the last",
                                    path.display(),
                                    result.err().map(|e| e.to_string())
                                ),
                            ));
                        }
                        tracing::warn!(
                            file = %path.display(),
                            at = good_len,
                            "cutting a torn last record off the metadata log"
                        );
                        break;
                    }
                };
                good_len += n as u64;
                match record {
                    Record::Entry(e) => {
                        entries.insert(e.log_id.index, e);
                    }
                    Record::Truncate(index) => {
                        entries.split_off(&index);
                    }
                    Record::Purge(log_id) => {
                        entries = entries.split_off(&log_id.index.saturating_add(1));
                        last_purged = Some(log_id);
                    }
                }
            }
        }
        let log = OpenOptions::new().create(true).append(true).open(&path)?;
        log.set_len(good_len)?;
        let vote = read_json(&dir.join(VOTE_FILE))?.unwrap_or_default();
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                dir: dir.to_owned(),
                log,
                entries,
                last_purged,
                vote,
            })),
        })
    }

    /// Whether the store holds nothing: no entry, no purge, no vote (a first start, or a wiped
    /// data directory).
    pub fn is_blank(&self) -> bool {
        let inner = self.lock();
        inner.entries.is_empty() && inner.last_purged.is_none() && inner.vote.vote.is_none()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Inner {
    fn append_records(&mut self, records: &[Record]) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r).map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        self.log.write_all(&buf)?;
        self.log.sync_data()
    }

    fn save_vote_file(&self) -> std::io::Result<()> {
        write_json_atomically(&self.dir.join(VOTE_FILE), &self.vote)
    }

    /// Rewrites the log with what it holds now (after a purge).
    fn rewrite(&mut self) -> std::io::Result<()> {
        let path = self.dir.join(LOG_FILE);
        let tmp = path.with_extension("jsonl.tmp");
        let mut buf = Vec::new();
        let mut push = |r: &Record| -> std::io::Result<()> {
            serde_json::to_writer(&mut buf, r).map_err(std::io::Error::other)?;
            buf.push(b'\n');
            Ok(())
        };
        if let Some(p) = self.last_purged {
            push(&Record::Purge(p))?;
        }
        for e in self.entries.values() {
            push(&Record::Entry(e.clone()))?;
        }
        let mut f = File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(&path)?;
        self.log = OpenOptions::new().append(true).open(&path)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + openraft::OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        Ok(self
            .lock()
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let inner = self.lock();
        let last = inner
            .entries
            .last_key_value()
            .map(|(_, e)| e.log_id)
            .or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        let mut inner = self.lock();
        inner.vote.vote = Some(*vote);
        inner
            .save_vote_file()
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        Ok(self.lock().vote.vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        let mut inner = self.lock();
        inner.vote.committed = committed;
        inner.save_vote_file().map_err(io)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(self.lock().vote.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut inner = self.lock();
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let records: Vec<Record> = entries.iter().cloned().map(Record::Entry).collect();
        let written = inner.append_records(&records);
        if written.is_ok() {
            for e in entries {
                inner.entries.insert(e.log_id.index, e);
            }
        }
        let failed = written
            .as_ref()
            .err()
            .map(|e| io(std::io::Error::new(e.kind(), e.to_string())));
        callback.log_io_completed(written);
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mut inner = self.lock();
        inner
            .append_records(&[Record::Truncate(log_id.index)])
            .map_err(io)?;
        inner.entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mut inner = self.lock();
        inner.entries = inner.entries.split_off(&log_id.index.saturating_add(1));
        inner.last_purged = Some(log_id);
        inner.rewrite().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(dir: &Path) -> Vec<u64> {
        let store = LogStore::open(dir).unwrap();
        let inner = store.lock();
        inner.entries.keys().copied().collect()
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_a_torn_middle_one_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = LogStore::open(dir.path()).unwrap();
            let mut inner = store.lock();
            let records: Vec<Record> = (1..=3).map(|i| Record::Entry(entry(i))).collect();
            inner.append_records(&records).unwrap();
            inner.append_records(&[Record::Truncate(3)]).unwrap();
        }
        assert_eq!(indexes(dir.path()), [1, 2]);
        let path = dir.path().join(LOG_FILE);
        let whole = std::fs::read(&path).unwrap();
        // A crash in the middle of an append: half a line at the end.
        let mut torn = whole.clone();
        torn.extend_from_slice(b"{\"Entry\":{\"log_id\"");
        std::fs::write(&path, &torn).unwrap();
        assert_eq!(indexes(dir.path()), [1, 2]);
        assert_eq!(std::fs::read(&path).unwrap(), whole, "the torn tail is cut");
        // Damage before the last line is not a torn append: refuse to guess.
        let mut bad = b"garbage\n".to_vec();
        bad.extend_from_slice(&whole);
        std::fs::write(&path, &bad).unwrap();
        let e = LogStore::open(dir.path()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }
}
