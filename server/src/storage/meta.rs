//! Metadata files: `topic.toml` (partition count and the topic's overrides) and
//! `partition.toml` (the log start offset). Both are small TOML documents replaced atomically
//! (write a temporary file, fsync, rename, fsync the directory), so they are never torn.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::config::{FsyncPolicy, TopicConfig};
use super::durability;
use super::error::{IoContext, StorageError};
use super::raft::RaftLogId;

/// The format version written in every metadata file (a topic of single-broker mode).
const FORMAT: u32 = 1;
/// The format of a replicated topic's `topic.toml`: its partitions are Raft logs (index
/// format 2, see `docs/storage.md`). A broker that predates it refuses it ("unknown format 2").
const FORMAT_RAFT: u32 = 2;

pub(crate) const TOPIC_META: &str = "topic.toml";
pub(crate) const PARTITION_META: &str = "partition.toml";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicMeta {
    format: u32,
    partitions: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fsync: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fsync_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retention_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retention_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartitionMeta {
    format: u32,
    log_start: i64,
    /// A Raft log partition: the last purged entry's log id (absent for format 1 topics, so
    /// their files are unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    purged_term: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    purged_node_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    purged_index: Option<u64>,
}

/// TOML integers are i64: larger settings are stored as `i64::MAX` (effectively unlimited).
fn toml_u64(v: u64) -> u64 {
    v.min(i64::MAX as u64)
}

fn duration_ms(d: Duration) -> u64 {
    toml_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn write_topic(
    dir: &Path,
    partitions: u32,
    cfg: &TopicConfig,
    raft: bool,
) -> Result<(), StorageError> {
    let (fsync, fsync_interval_ms) = match cfg.fsync {
        None => (None, None),
        Some(FsyncPolicy::Always) => (Some("always"), None),
        Some(FsyncPolicy::Never) => (Some("never"), None),
        Some(FsyncPolicy::Interval(d)) => (Some("interval"), Some(duration_ms(d))),
    };
    let meta = TopicMeta {
        format: if raft { FORMAT_RAFT } else { FORMAT },
        partitions,
        fsync: fsync.map(str::to_owned),
        fsync_interval_ms,
        retention_bytes: cfg.retention_bytes.map(toml_u64),
        retention_ms: cfg.retention_age.map(duration_ms),
    };
    write_atomic(&dir.join(TOPIC_META), &meta)
}

/// The partition count, the overrides and whether the partitions are Raft logs.
pub(crate) fn read_topic(dir: &Path) -> Result<(u32, TopicConfig, bool), StorageError> {
    let path = dir.join(TOPIC_META);
    let meta: TopicMeta = read_toml(&path)?;
    let corrupt = |reason: String| StorageError::Corrupt {
        path: path.clone(),
        reason,
    };
    if meta.format != FORMAT && meta.format != FORMAT_RAFT {
        return Err(corrupt(format!("unknown format {}", meta.format)));
    }
    let fsync = match (meta.fsync.as_deref(), meta.fsync_interval_ms) {
        (None, _) => None,
        (Some("always"), _) => Some(FsyncPolicy::Always),
        (Some("never"), _) => Some(FsyncPolicy::Never),
        (Some("interval"), Some(ms)) => Some(FsyncPolicy::Interval(Duration::from_millis(ms))),
        (Some(other), _) => return Err(corrupt(format!("invalid fsync policy {other:?}"))),
    };
    Ok((
        meta.partitions,
        TopicConfig {
            fsync,
            retention_bytes: meta.retention_bytes,
            retention_age: meta.retention_ms.map(Duration::from_millis),
        },
        meta.format == FORMAT_RAFT,
    ))
}

pub(crate) fn write_partition(dir: &Path, log_start: i64) -> Result<(), StorageError> {
    write_partition_raft(dir, log_start, None)
}

/// `partition.toml` with, for a Raft log partition, the last purged entry.
pub(crate) fn write_partition_raft(
    dir: &Path,
    log_start: i64,
    purged: Option<RaftLogId>,
) -> Result<(), StorageError> {
    let meta = PartitionMeta {
        format: FORMAT,
        log_start,
        purged_term: purged.map(|p| toml_u64(p.term)),
        purged_node_id: purged.map(|p| toml_u64(p.node_id)),
        purged_index: purged.map(|p| toml_u64(p.index)),
    };
    write_atomic(&dir.join(PARTITION_META), &meta)
}

/// The persisted log start (`None` when the partition has never deleted a segment) and, for
/// a Raft log partition, the last purged entry.
pub(crate) fn read_partition_raft(
    dir: &Path,
) -> Result<Option<(i64, Option<RaftLogId>)>, StorageError> {
    let path = dir.join(PARTITION_META);
    if !path.exists() {
        return Ok(None);
    }
    let meta: PartitionMeta = read_toml(&path)?;
    if meta.format != FORMAT {
        return Err(StorageError::Corrupt {
            path,
            reason: format!("unknown format {}", meta.format),
        });
    }
    let purged = match (meta.purged_term, meta.purged_node_id, meta.purged_index) {
        (None, None, None) => None,
        (Some(term), Some(node_id), Some(index)) => Some(RaftLogId {
            term,
            node_id,
            index,
        }),
        _ => {
            return Err(StorageError::Corrupt {
                path,
                reason: "purged_term, purged_node_id and purged_index go together".into(),
            });
        }
    };
    Ok(Some((meta.log_start, purged)))
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StorageError> {
    let text = fs::read_to_string(path).ctx("read", path)?;
    toml::from_str(&text).map_err(|e| StorageError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn write_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), StorageError> {
    let text = toml::to_string(value).map_err(|e| StorageError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let tmp = path.with_extension("toml.tmp");
    {
        let mut f = File::create(&tmp).ctx("create", &tmp)?;
        f.write_all(text.as_bytes()).ctx("write", &tmp)?;
        let synced = durability::file(&tmp);
        f.sync_all().ctx("fsync", &tmp)?;
        synced.done();
    }
    fs::rename(&tmp, path).ctx("rename", path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Makes a directory's entries (created, renamed, removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    let synced = durability::dir(dir);
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)?;
    synced.done();
    Ok(())
}
