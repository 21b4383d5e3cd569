//! A replicated partition's log as a Raft log (index format 2): the types the replication
//! layer stores and reads back through [`Storage`](super::Storage)'s `raft_*` methods.
//!
//! Every stored batch is one Raft entry, and its `.idx` entry carries the entry's log id, its
//! kind and (for an idempotent batch) its producer fields. Blank and membership entries are
//! batches of zero messages: an index entry with no `.log` bytes, at the offset of the next
//! batch. A membership entry's configuration is not stored here: the replication layer keeps
//! it with its vote (they are few and small). See `docs/storage.md`.

use super::producers::ProducerBatch;

/// A Raft log id: the term and node id of the leader that created the entry, and the entry's
/// index (dense per partition: every index from the first kept to the last is stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RaftLogId {
    /// The leader's term.
    pub term: u64,
    /// The leader's node id.
    pub node_id: u64,
    /// The entry's index.
    pub index: u64,
}

/// What a Raft entry of a partition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RaftEntryKind {
    /// A batch of one or more messages (one Produce).
    Records,
    /// A leader's blank entry: no messages.
    Blank,
    /// A membership change: no messages (the configuration is kept by the replication layer).
    Membership,
}

impl RaftEntryKind {
    pub(crate) fn code(self) -> u8 {
        match self {
            Self::Records => 0,
            Self::Blank => 1,
            Self::Membership => 2,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Self::Records),
            1 => Some(Self::Blank),
            2 => Some(Self::Membership),
            _ => None,
        }
    }
}

/// A Raft entry to append: see [`Storage::raft_append`](super::Storage::raft_append).
#[derive(Debug, Clone, Copy)]
pub struct RaftAppend<'a> {
    /// Its log id; the index must be the one after the log's last (or after the last purged,
    /// or 0, for an empty log).
    pub log_id: RaftLogId,
    /// What it holds: [`RaftEntryKind::Records`] with one or more messages, otherwise none.
    pub kind: RaftEntryKind,
    /// The offset of its first message as the leader stamped it: the log's end.
    pub base_offset: i64,
    /// The messages exactly as the leader stamped them (offsets and timestamps), stored as
    /// they are.
    pub messages: streambus_core::MessageSet<'a>,
    /// The leader's clock when it stamped the batch (Unix ns), kept for age retention.
    pub append_time: i64,
    /// The idempotent producer fields of the batch, if any.
    pub producer: Option<ProducerBatch>,
}

/// A stored Raft entry, read back by index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftEntry {
    /// Its log id.
    pub log_id: RaftLogId,
    /// What it holds.
    pub kind: RaftEntryKind,
    /// The offset of its first message (for an entry without messages, the next batch's).
    pub base_offset: i64,
    /// Its messages (0 unless [`RaftEntryKind::Records`]).
    pub count: u32,
    /// When the leader stamped it (Unix ns).
    pub append_time: i64,
    /// The idempotent producer fields, if any.
    pub producer: Option<ProducerBatch>,
    /// The records, byte for byte as stored (and as a Fetch returns them).
    pub records: Vec<u8>,
}

/// A replicated partition's log as Raft sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftLogState {
    /// The last entry removed by a purge (or a reset), if any.
    pub last_purged: Option<RaftLogId>,
    /// The last entry stored (the last purged when none is stored after it).
    pub last: Option<RaftLogId>,
    /// The index the next entry must have.
    pub next_index: u64,
    /// The first offset kept.
    pub log_start: i64,
    /// The offset after the last stored message (committed or not).
    pub end: i64,
    /// The high-water mark: Fetch and GetOffset never go past it.
    pub high_water_mark: i64,
}

/// The Raft fields of an index entry of format 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RaftMeta {
    pub(crate) log_id: RaftLogId,
    pub(crate) kind: RaftEntryKind,
    pub(crate) producer: Option<ProducerBatch>,
}
