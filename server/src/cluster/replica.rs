//! Partition replication: one openraft group per partition, whose log *is* the partition's
//! log in the storage engine (a replicated topic's partitions are Raft logs, index format 2:
//! see `docs/storage.md`).
//!
//! - [`PartitionLog`] is the group's `RaftLogStorage`: a Normal entry is one stored batch
//!   (records byte for byte as the leader stamped them), blank and membership entries are
//!   batches of zero messages; the vote and the membership entries' configurations are in
//!   `raft.json` in the partition's directory, replaced atomically.
//! - [`PartitionStateMachine`] applies committed entries: it moves the partition's high-water
//!   mark (what Fetch and GetOffset see) and updates the idempotent producer table. It copies
//!   no data. Its snapshot is (high-water mark, log start, producer table, membership), a few
//!   KB, in `raft-snapshot.json`; a replica behind the leader's purged log installs it and its
//!   log restarts at the snapshot's high-water mark.
//! - The groups talk over the cluster link ([`Rpc::Partition`]).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, Raft, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use streambus_core::MessageSet;
use streambus_core::broker::stamp_record;

use super::network::{Rpc, RpcReply, Transport, TransportError};
use super::store::{read_json, write_json_atomically};
use crate::storage::{ProducerBatch, ProducerTable, RaftAppend, RaftEntryKind, RaftLogId, Storage};

openraft::declare_raft_types!(
    /// A partition group's openraft types: a Normal entry is one [`Batch`]; node ids are the
    /// brokers' `--node-id`s and a node's address its cluster listener, as in the metadata
    /// group.
    pub PartitionConfig:
        D = Batch,
        R = BatchApplied,
        NodeId = u64,
        Node = BasicNode,
        SnapshotData = Vec<u8>,
);

/// A partition group's Raft handle.
pub type PartitionRaft = Raft<PartitionConfig>;

/// Which partition a group replicates.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PartitionId {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
}

/// The idempotence fields of a batch (protocol §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Producer {
    /// ProducerID.
    pub id: i64,
    /// ProducerEpoch.
    pub epoch: i16,
    /// BaseSequence.
    pub base_sequence: i32,
}

impl From<ProducerBatch> for Producer {
    fn from(p: ProducerBatch) -> Self {
        Self {
            id: p.producer_id,
            epoch: p.epoch,
            base_sequence: p.base_sequence,
        }
    }
}

impl From<Producer> for ProducerBatch {
    fn from(p: Producer) -> Self {
        Self {
            producer_id: p.id,
            epoch: p.epoch,
            base_sequence: p.base_sequence,
        }
    }
}

/// One Produce batch as a Raft entry. Proposed unstamped ([`Batch::new`]); the leader stamps
/// it as it appends it to its own log (offsets from the log's end, zero timestamps replaced by
/// `append_time`), and openraft reads entries back from the log to replicate and apply them,
/// so every replica stores the same bytes at the same offsets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The offset of its first message; [`Batch::UNSTAMPED`] until the leader appends it.
    pub base_offset: i64,
    /// Its messages (≥ 1).
    pub count: u32,
    /// The leader's clock when the batch was proposed (Unix ns).
    pub append_time: i64,
    /// The idempotent producer fields, if any.
    pub producer: Option<Producer>,
    /// The records in wire encoding (stamped once appended).
    pub records: Vec<u8>,
}

impl Batch {
    /// The base offset of a batch not yet appended.
    pub const UNSTAMPED: i64 = -1;

    /// A batch to propose: `messages` as the client sent them, to be stamped at append.
    pub fn new(messages: &MessageSet<'_>, now: i64, producer: Option<ProducerBatch>) -> Self {
        Self {
            base_offset: Self::UNSTAMPED,
            count: messages.count(),
            append_time: now,
            producer: producer.map(Producer::from),
            records: messages.as_bytes().to_vec(),
        }
    }

    /// Stamps the records as the batch at `base`: each record's Offset, and its Timestamp when
    /// 0, exactly as a single broker's append does.
    fn stamp_at(&mut self, base: i64) -> Result<(), String> {
        let lens: Vec<usize> = MessageSet::new_checked(self.count, &self.records)
            .map_err(|e| e.to_string())?
            .records()
            .map(<[u8]>::len)
            .collect();
        let mut at = 0;
        for (offset, len) in (base..).zip(lens) {
            if let Some(r) = self.records.get_mut(at..at + len) {
                stamp_record(r, offset, self.append_time);
            }
            at += len;
        }
        self.base_offset = base;
        Ok(())
    }

    /// The offset after its last message.
    pub fn end_offset(&self) -> i64 {
        self.base_offset.saturating_add(i64::from(self.count))
    }
}

/// What applying an entry did: for a batch, its offsets; for every entry, the high-water mark
/// after it. For an idempotent batch the leader found to be a retry (protocol §6.2), the
/// offsets of the batch it repeats; for one it refused, why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchApplied {
    /// The batch's first offset (the high-water mark for an entry without messages).
    pub base_offset: i64,
    /// Its messages (0 for an entry without).
    pub count: u32,
    /// The partition's high-water mark once applied.
    pub high_water_mark: i64,
    /// Set when the leader refused the batch (nothing of it stored): the error a single
    /// broker answers.
    pub refused: Option<Refused>,
}

/// An idempotent batch the leader refused by protocol §6.2 (UnknownProducer,
/// InvalidProducerEpoch, OutOfOrderSequence): the error code and message a single broker
/// answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// The protocol error code.
    pub code: u16,
    /// The message, naming the producer and the sequences.
    pub message: String,
}

/// What the leader decided on an idempotent proposal it stored as an entry without messages.
#[derive(Debug, Clone)]
enum Decided {
    /// A retry of the batch stored at these offsets.
    Duplicate { base_offset: i64, count: u32 },
    /// Refused.
    Refused(Refused),
}

fn log_id(id: RaftLogId) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(id.term, id.node_id), id.index)
}

fn raft_log_id(id: &LogId<u64>) -> RaftLogId {
    RaftLogId {
        term: id.leader_id.term,
        node_id: id.leader_id.node_id,
        index: id.index,
    }
}

fn read_err<E: std::error::Error + 'static>(e: E) -> StorageError<u64> {
    StorageIOError::read_logs(&e).into()
}

fn write_err<E: std::error::Error + 'static>(e: E) -> StorageError<u64> {
    StorageIOError::write_logs(&e).into()
}

fn sm_err<E: std::error::Error + 'static>(e: E) -> StorageError<u64> {
    StorageIOError::write_state_machine(&e).into()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `raft.json`: the vote and the membership entries' configurations (by index).
#[derive(Debug, Default, Serialize, Deserialize)]
struct RaftFile {
    vote: Option<Vote<u64>>,
    memberships: BTreeMap<u64, Membership<u64, BasicNode>>,
}

const RAFT_FILE: &str = "raft.json";
const SNAPSHOT_FILE: &str = "raft-snapshot.json";

/// Called with a partition and its new high-water mark once committed entries are applied
/// (the broker answers the long-poll fetches that now have data).
pub type CommitHook = Arc<dyn Fn(&str, u32, i64) + Send + Sync>;

/// Called with a partition and its new leader (if known) when this broker stops leading it
/// (the broker answers the long-poll fetches waiting on it NotLeader).
pub type StepDownHook = Arc<dyn Fn(&str, u32, Option<u64>) + Send + Sync>;

/// Watches `raft`'s leadership until the group stops: each time `node` stops leading it,
/// calls `hook` with the partition and the new leader.
pub async fn watch_leadership(raft: PartitionRaft, node: u64, id: PartitionId, hook: StepDownHook) {
    let mut metrics = raft.metrics();
    drop(raft);
    let mut led = false;
    loop {
        let leader = metrics.borrow_and_update().current_leader;
        let leads = leader == Some(node);
        if led && !leads {
            hook(&id.topic, id.partition, leader);
        }
        led = leads;
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Sends `publish` a [`Command::LeaderChanged`](super::Command::LeaderChanged) each time
/// `node` becomes the leader of `raft`'s group (once per term) until the group stops, so that
/// brokers without a replica of the partition learn its leader from the metadata.
pub async fn publish_leadership(
    raft: PartitionRaft,
    node: u64,
    id: PartitionId,
    publish: tokio::sync::mpsc::UnboundedSender<(PartitionId, super::state::Elected)>,
) {
    let mut metrics = raft.metrics();
    drop(raft);
    let mut published = None;
    loop {
        let (leader, term, state) = {
            let m = metrics.borrow_and_update();
            (m.current_leader, m.current_term, m.state)
        };
        if leader == Some(node)
            && state == openraft::ServerState::Leader
            && published != Some(term)
            && let Ok(leader) = u32::try_from(node)
        {
            published = Some(term);
            let elected = super::state::Elected { leader, term };
            if publish.send((id.clone(), elected)).is_err() {
                return;
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Counts in `replicas` each time `raft`'s known leader becomes another broker (the first
/// leader it learns counts as one) until the group stops: `/metrics` reports the count.
pub async fn count_leader_changes(raft: PartitionRaft, id: PartitionId, replicas: Arc<Replicas>) {
    let mut metrics = raft.metrics();
    drop(raft);
    let mut last = None;
    let mut seen = None;
    loop {
        let (leader, now) = {
            let m = metrics.borrow_and_update();
            (
                m.current_leader,
                (m.state, m.current_term, m.current_leader),
            )
        };
        if seen != Some(now) {
            // Each step of an election, timestamped by the log: where a failover's time goes.
            let (state, term, leader) = now;
            tracing::debug!(topic = %id.topic, partition = id.partition, ?state, term, ?leader, "partition group");
            seen = Some(now);
        }
        if leader.is_some() && leader != last {
            *lock(&replicas.leader_changes)
                .entry(id.clone())
                .or_default() += 1;
            last = leader;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// What the log store and the state machine of one partition share.
struct Shared {
    storage: Arc<Storage>,
    id: PartitionId,
    dir: PathBuf,
    file: Mutex<RaftFile>,
    on_commit: Option<CommitHook>,
    /// The state machine's state.
    sm: Arc<Mutex<SmState>>,
    /// The producer table of the whole log: the applied table plus every batch appended after
    /// it, in log order. The leader checks each idempotent proposal against it as it stamps
    /// it. `None` until needed (rebuilt from the applied table and the log's tail), and again
    /// after a truncation or a snapshot install.
    log_producers: Mutex<Option<ProducerTable>>,
    /// The leader's decisions on the idempotent proposals it stored without messages
    /// (retries, refusals), by log index, until applying them answers them.
    decided: Mutex<BTreeMap<u64, Decided>>,
    /// Held while a snapshot is built or installed: one at a time reads and replaces
    /// `raft-snapshot.json` (a build runs beside the state machine's installs).
    snapshot_file: Mutex<()>,
}

impl Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn save(&self, file: &RaftFile) -> io::Result<()> {
        write_json_atomically(&self.dir.join(RAFT_FILE), file)
    }

    fn state(&self) -> Result<crate::storage::RaftLogState, crate::storage::StorageError> {
        self.storage
            .raft_log_state(&self.id.topic, self.id.partition)
    }

    /// The whole log's producer table ([`Shared::log_producers`]), rebuilt if it must be.
    fn log_producers(
        &self,
    ) -> Result<MutexGuard<'_, Option<ProducerTable>>, crate::storage::StorageError> {
        let mut guard = lock(&self.log_producers);
        if guard.is_none() {
            let mut table = self.storage.uncounted_producer_table();
            // The applied table and the first entry it does not cover, read together.
            let after = {
                let sm = lock(&self.sm);
                table.import(&sm.producers.export());
                sm.last_applied.map_or(0, |l| l.index.saturating_add(1))
            };
            let st = self.state()?;
            let from = after.max(st.last_purged.map_or(0, |p| p.index.saturating_add(1)));
            if from < st.next_index {
                let tail = self.storage.raft_entries(
                    &self.id.topic,
                    self.id.partition,
                    from,
                    st.next_index,
                )?;
                for e in tail {
                    if let (RaftEntryKind::Records, Some(p)) = (e.kind, e.producer) {
                        table.record(&p, e.count, e.base_offset);
                    }
                }
            }
            *guard = Some(table);
        }
        Ok(guard)
    }
}

/// A partition's Raft log: the partition log itself. Clones share it.
#[derive(Debug, Clone)]
pub struct PartitionLog {
    shared: Arc<Shared>,
}

/// Why a partition group could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The partition is not a Raft log (or does not exist).
    #[error("partition {partition} of topic {topic:?}: {source}")]
    Storage {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The storage's error.
        source: crate::storage::StorageError,
    },
    /// `raft.json` or `raft-snapshot.json` could not be read.
    #[error("partition {partition} of topic {topic:?}: reading its Raft state: {source}")]
    Io {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The I/O error.
        source: io::Error,
    },
    /// openraft refused to start.
    #[error("partition {partition} of topic {topic:?}: {reason}")]
    Raft {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// Why.
        reason: String,
    },
}

impl RaftLogReader<PartitionConfig> for PartitionLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + openraft::OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<PartitionConfig>>, StorageError<u64>> {
        let s = &*self.shared;
        let st = s.state().map_err(read_err)?;
        let first = st.last_purged.map_or(0, |p| p.index.saturating_add(1));
        let from = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .max(first);
        let to = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        }
        .min(st.next_index);
        if from >= to {
            return Ok(Vec::new());
        }
        let stored = s
            .storage
            .raft_entries(&s.id.topic, s.id.partition, from, to)
            .map_err(read_err)?;
        let file = lock(&s.file);
        let mut out = Vec::with_capacity(stored.len());
        for e in stored {
            let payload = match e.kind {
                RaftEntryKind::Records => EntryPayload::Normal(Batch {
                    base_offset: e.base_offset,
                    count: e.count,
                    append_time: e.append_time,
                    producer: e.producer.map(Producer::from),
                    records: e.records,
                }),
                RaftEntryKind::Membership => match file.memberships.get(&e.log_id.index) {
                    Some(m) => EntryPayload::Membership(m.clone()),
                    None => {
                        return Err(read_err(io::Error::other(format!(
                            "membership entry {} has no configuration in {RAFT_FILE}",
                            e.log_id.index
                        ))));
                    }
                },
                _ => EntryPayload::Blank,
            };
            out.push(Entry {
                log_id: log_id(e.log_id),
                payload,
            });
        }
        Ok(out)
    }
}

impl RaftLogStorage<PartitionConfig> for PartitionLog {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<PartitionConfig>, StorageError<u64>> {
        let st = self.shared.state().map_err(read_err)?;
        Ok(LogState {
            last_purged_log_id: st.last_purged.map(log_id),
            last_log_id: st.last.map(log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        let mut file = lock(&self.shared.file);
        file.vote = Some(*vote);
        self.shared
            .save(&file)
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        Ok(lock(&self.shared.file).vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<PartitionConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<PartitionConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let s = &*self.shared;
        let mut pending = None;
        for mut entry in entries {
            let id = raft_log_id(&entry.log_id);
            if let EntryPayload::Normal(b) = &mut entry.payload
                && b.base_offset == Batch::UNSTAMPED
            {
                // The leader appends a proposal. An idempotent one is checked against every
                // batch before it in the log (§6.2): a retry or a refusal is stored without
                // its messages, and applying it answers what was decided.
                let decided = match b.producer {
                    Some(p) => {
                        let mut table = s.log_producers().map_err(write_err)?;
                        match table
                            .as_mut()
                            .map(|t| t.check(&ProducerBatch::from(p), b.count))
                        {
                            Some(Ok(Some((base_offset, count)))) => {
                                Some(Decided::Duplicate { base_offset, count })
                            }
                            Some(Err(e)) => Some(Decided::Refused(Refused {
                                code: e.error_code().0,
                                message: e.to_string(),
                            })),
                            Some(Ok(None)) | None => None,
                        }
                    }
                    None => None,
                };
                if let Some(d) = decided {
                    lock(&s.decided).insert(id.index, d);
                    entry.payload = EntryPayload::Blank;
                } else {
                    // It gets the log's end.
                    let end = s.state().map_err(write_err)?.end;
                    b.stamp_at(end).map_err(|e| {
                        write_err(io::Error::other(format!(
                            "entry {} holds no valid message set: {e}",
                            id.index
                        )))
                    })?;
                }
            }
            let (kind, batch) = match &entry.payload {
                EntryPayload::Normal(b) => (RaftEntryKind::Records, Some(b)),
                EntryPayload::Blank => (RaftEntryKind::Blank, None),
                EntryPayload::Membership(m) => {
                    // The configuration is durable before the entry that refers to it.
                    let mut file = lock(&s.file);
                    file.memberships.insert(id.index, m.clone());
                    s.save(&file).map_err(write_err)?;
                    (RaftEntryKind::Membership, None)
                }
            };
            let (base_offset, append_time, producer, count, records) = match batch {
                Some(b) => (
                    b.base_offset,
                    b.append_time,
                    b.producer.map(ProducerBatch::from),
                    b.count,
                    b.records.as_slice(),
                ),
                None => {
                    let end = s.state().map_err(write_err)?.end;
                    (end, 0, None, 0, &[][..])
                }
            };
            let messages = MessageSet::new_checked(count, records).map_err(|e| {
                write_err(io::Error::other(format!(
                    "entry {} holds no valid message set: {e}",
                    id.index
                )))
            })?;
            let (_, p) = s
                .storage
                .raft_append(
                    &s.id.topic,
                    s.id.partition,
                    &RaftAppend {
                        log_id: id,
                        kind,
                        base_offset,
                        messages,
                        append_time,
                        producer,
                    },
                )
                .map_err(write_err)?;
            if let Some(p) = producer
                && let Some(t) = lock(&s.log_producers).as_mut()
            {
                t.record(&p, count, base_offset);
            }
            // The last one covers the earlier ones.
            pending = p.or(pending);
        }
        match pending {
            // `interval`/`never`: in the page cache is stored, as for a single broker.
            None => callback.log_io_completed(Ok(())),
            // `always`: stored once the group commit's fsync covers it.
            Some(p) => {
                tokio::task::spawn_blocking(move || {
                    callback.log_io_completed(p.wait().map_err(io::Error::other));
                });
            }
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let s = &*self.shared;
        s.storage
            .raft_truncate(&s.id.topic, s.id.partition, log_id.index)
            .map_err(write_err)?;
        // The removed batches leave the table; the decisions on them are void.
        *lock(&s.log_producers) = None;
        drop(lock(&s.decided).split_off(&log_id.index));
        let mut file = lock(&s.file);
        if file.memberships.split_off(&log_id.index).is_empty() {
            return Ok(());
        }
        s.save(&file)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let s = &*self.shared;
        let st = s.state().map_err(write_err)?;
        // Past the log: a snapshot covers more than it holds, and installing it resets the
        // log (the state machine knows where the log restarts).
        if log_id.index < st.next_index {
            s.storage
                .raft_purge(&s.id.topic, s.id.partition, raft_log_id(&log_id))
                .map_err(write_err)?;
        }
        let mut file = lock(&s.file);
        let kept = file.memberships.split_off(&log_id.index.saturating_add(1));
        if kept.len() == file.memberships.len() {
            return Ok(());
        }
        file.memberships = kept;
        s.save(&file)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

/// What a partition's state machine holds: the applied position, the membership, the
/// high-water mark and the producer table.
#[derive(Debug)]
struct SmState {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    high_water_mark: i64,
    producers: ProducerTable,
}

/// A snapshot's data.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotData {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    high_water_mark: i64,
    log_start: i64,
    /// The producer table: (producer, count, base offset) per kept batch, least recently used
    /// producer first.
    producers: Vec<(Producer, u32, i64)>,
}

/// `raft-snapshot.json`.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, BasicNode>,
    data: SnapshotData,
}

/// A partition's state machine: see the module documentation.
#[derive(Debug)]
pub struct PartitionStateMachine {
    shared: Arc<Shared>,
    state: Arc<Mutex<SmState>>,
    snapshot_idx: u64,
}

/// Builds a partition's snapshots: only at a retention point (the last entry of the last
/// sealed segment retention drops, among the applied ones), with the state as of that entry,
/// never of the whole applied state: the group purges its log up to each snapshot, and the
/// log is the data.
#[derive(Debug)]
pub struct PartitionSnapshotBuilder {
    sm: PartitionStateMachine,
}

impl PartitionSnapshotBuilder {
    /// The state machine as of the partition's retention point, if that is past `stored`
    /// (the current snapshot): the last entry of the last sealed segment retention no longer
    /// keeps, among the applied entries ([`Storage::raft_retention_point`]). It is the stored
    /// snapshot's state with the entries after it up to the point applied again, exactly as
    /// [`RaftStateMachine::apply`] applies them: the high-water mark is the point's end
    /// offset, the producer table records the idempotent batches, and the membership is the
    /// last membership entry up to the point. Only the index entries are read (no records).
    fn state_at_retention_point(
        &self,
        stored: Option<&StoredSnapshot>,
        now: i64,
    ) -> Result<Option<SnapshotData>, String> {
        let sh = &*self.sm.shared;
        let (topic, partition) = (&sh.id.topic, sh.id.partition);
        let Some(applied) = lock(&self.sm.state).last_applied else {
            return Ok(None);
        };
        let point = sh
            .storage
            .raft_retention_point(topic, partition, now, applied.index)
            .map_err(|e| e.to_string())?;
        let Some(point) = point else {
            return Ok(None);
        };
        let prev = stored.and_then(|s| s.data.last_applied);
        if prev.is_some_and(|p| p.index >= point.index) {
            return Ok(None);
        }
        let from = prev.map_or(0, |p| p.index.saturating_add(1));
        let entries = sh
            .storage
            .raft_entry_headers(topic, partition, from, point.index.saturating_add(1))
            .map_err(|e| e.to_string())?;
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Err(format!("the log holds no entries {from}..={}", point.index));
        };
        if first.log_id.index != from || last.log_id != point {
            return Err(format!(
                "the log holds entries {:?}..={:?}, not {from}..={point:?}",
                first.log_id, last.log_id
            ));
        }
        let mut producers = sh.storage.uncounted_producer_table();
        let mut membership = StoredMembership::default();
        if let Some(s) = stored {
            let list: Vec<_> = s
                .data
                .producers
                .iter()
                .map(|(p, n, o)| (ProducerBatch::from(*p), *n, *o))
                .collect();
            producers.import(&list);
            membership = s.data.membership.clone();
        }
        {
            let file = lock(&sh.file);
            for e in &entries {
                match e.kind {
                    RaftEntryKind::Records => {
                        if let Some(p) = &e.producer {
                            producers.record(p, e.count, e.base_offset);
                        }
                    }
                    RaftEntryKind::Membership => {
                        let Some(m) = file.memberships.get(&e.log_id.index) else {
                            return Err(format!(
                                "membership entry {} has no configuration in {RAFT_FILE}",
                                e.log_id.index
                            ));
                        };
                        membership = StoredMembership::new(Some(log_id(e.log_id)), m.clone());
                    }
                    _ => {}
                }
            }
        }
        let end = last.base_offset.saturating_add(i64::from(last.count));
        let log_start = sh.state().map_err(|e| e.to_string())?.log_start.max(end);
        Ok(Some(SnapshotData {
            last_applied: Some(log_id(point)),
            membership,
            high_water_mark: end,
            log_start,
            producers: producers
                .export()
                .into_iter()
                .map(|(p, n, o)| (Producer::from(p), n, o))
                .collect(),
        }))
    }
}

impl RaftSnapshotBuilder<PartitionConfig> for PartitionSnapshotBuilder {
    /// A snapshot at the partition's retention point (openraft then purges the log up to
    /// it: `max_in_snapshot_log_to_keep` is 0); when retention keeps everything past the
    /// current snapshot, that snapshot again (openraft keeps the newest it has, so nothing
    /// changes).
    async fn build_snapshot(&mut self) -> Result<Snapshot<PartitionConfig>, StorageError<u64>> {
        let sh = Arc::clone(&self.sm.shared);
        let _file = lock(&sh.snapshot_file);
        let path = sh.dir.join(SNAPSHOT_FILE);
        let stored: Option<StoredSnapshot> =
            read_json(&path).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let now = crate::storage::unix_now_ns();
        let data = match self.state_at_retention_point(stored.as_ref(), now) {
            Ok(d) => d,
            Err(reason) => {
                // Not a storage failure of the group (openraft would stop it): no snapshot
                // this time, the next retention run tries again.
                tracing::warn!(
                    topic = %sh.id.topic,
                    partition = sh.id.partition,
                    "no snapshot at the retention point: {reason}"
                );
                None
            }
        };
        let Some(data) = data else {
            return Ok(match stored {
                Some(s) => {
                    let bytes = serde_json::to_vec(&s.data)
                        .map_err(|e| StorageIOError::read_snapshot(Some(s.meta.signature()), &e))?;
                    Snapshot {
                        meta: s.meta,
                        snapshot: Box::new(bytes),
                    }
                }
                None => Snapshot {
                    meta: SnapshotMeta::default(),
                    snapshot: Box::default(),
                },
            });
        };
        let snapshot_id = match data.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.sm.snapshot_idx),
            None => format!("none-{}", self.sm.snapshot_idx),
        };
        let meta = SnapshotMeta {
            last_log_id: data.last_applied,
            last_membership: data.membership.clone(),
            snapshot_id,
        };
        let bytes =
            serde_json::to_vec(&data).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        write_json_atomically(&path, &stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(bytes),
        })
    }
}

impl RaftStateMachine<PartitionConfig> for PartitionStateMachine {
    type SnapshotBuilder = PartitionSnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        let s = lock(&self.state);
        Ok((s.last_applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchApplied>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<PartitionConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut results = Vec::new();
        let hwm = {
            let mut s = lock(&self.state);
            for entry in entries {
                s.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Normal(b) => {
                        s.high_water_mark = s.high_water_mark.max(b.end_offset());
                        if let Some(p) = b.producer {
                            s.producers
                                .record(&ProducerBatch::from(p), b.count, b.base_offset);
                        }
                        results.push(BatchApplied {
                            base_offset: b.base_offset,
                            count: b.count,
                            high_water_mark: s.high_water_mark,
                            refused: None,
                        });
                        continue;
                    }
                    EntryPayload::Membership(m) => {
                        s.membership = StoredMembership::new(Some(entry.log_id), m);
                    }
                    EntryPayload::Blank => {
                        let decided = lock(&self.shared.decided).remove(&entry.log_id.index);
                        match decided {
                            Some(Decided::Duplicate { base_offset, count }) => {
                                results.push(BatchApplied {
                                    base_offset,
                                    count,
                                    high_water_mark: s.high_water_mark,
                                    refused: None,
                                });
                                continue;
                            }
                            Some(Decided::Refused(r)) => {
                                results.push(BatchApplied {
                                    base_offset: -1,
                                    count: 0,
                                    high_water_mark: s.high_water_mark,
                                    refused: Some(r),
                                });
                                continue;
                            }
                            None => {}
                        }
                    }
                }
                results.push(BatchApplied {
                    base_offset: s.high_water_mark,
                    count: 0,
                    high_water_mark: s.high_water_mark,
                    refused: None,
                });
            }
            s.high_water_mark
        };
        let sh = &*self.shared;
        let current = sh.state().map_err(sm_err)?.high_water_mark;
        if hwm > current {
            sh.storage
                .set_high_water_mark(&sh.id.topic, sh.id.partition, hwm)
                .map_err(sm_err)?;
            if let Some(hook) = &sh.on_commit {
                hook(&sh.id.topic, sh.id.partition, hwm);
            }
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> PartitionSnapshotBuilder {
        self.snapshot_idx += 1;
        PartitionSnapshotBuilder {
            sm: PartitionStateMachine {
                shared: Arc::clone(&self.shared),
                state: Arc::clone(&self.state),
                snapshot_idx: self.snapshot_idx,
            },
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Vec<u8>>, StorageError<u64>> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Vec<u8>>,
    ) -> Result<(), StorageError<u64>> {
        let sig = || Some(meta.signature());
        let data: SnapshotData = serde_json::from_slice(&snapshot)
            .map_err(|e| StorageIOError::read_snapshot(sig(), &e))?;
        let sh = Arc::clone(&self.shared);
        let _file = lock(&sh.snapshot_file);
        if let Some(last) = meta.last_log_id {
            let id = raft_log_id(&last);
            // Does the log hold the snapshot's last entry? Then it keeps its entries (the
            // purge that follows trims them); otherwise it restarts after the snapshot.
            let held = sh
                .storage
                .raft_entries(&sh.id.topic, sh.id.partition, id.index, id.index + 1)
                .ok()
                .and_then(|e| e.first().map(|e| e.log_id))
                == Some(id);
            if held {
                let current = sh
                    .state()
                    .map_err(|e| StorageIOError::write_snapshot(sig(), &e))?
                    .high_water_mark;
                if data.high_water_mark > current {
                    sh.storage
                        .set_high_water_mark(&sh.id.topic, sh.id.partition, data.high_water_mark)
                        .map_err(|e| StorageIOError::write_snapshot(sig(), &e))?;
                }
            } else {
                sh.storage
                    .raft_reset(&sh.id.topic, sh.id.partition, id, data.high_water_mark)
                    .map_err(|e| StorageIOError::write_snapshot(sig(), &e))?;
                let mut file = lock(&sh.file);
                file.memberships.clear();
                sh.save(&file)
                    .map_err(|e| StorageIOError::write_snapshot(sig(), &e))?;
            }
        }
        {
            let mut s = lock(&self.state);
            s.last_applied = data.last_applied;
            s.membership = data.membership.clone();
            s.high_water_mark = data.high_water_mark;
            let producers: Vec<_> = data
                .producers
                .iter()
                .map(|(p, n, o)| (ProducerBatch::from(*p), *n, *o))
                .collect();
            s.producers.import(&producers);
        }
        // The log restarts, or keeps entries the snapshot covers: rebuilt when next needed.
        *lock(&sh.log_producers) = None;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        write_json_atomically(&sh.dir.join(SNAPSHOT_FILE), &stored)
            .map_err(|e| StorageIOError::write_snapshot(sig(), &e))?;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<PartitionConfig>>, StorageError<u64>> {
        let stored: Option<StoredSnapshot> = read_json(&self.shared.dir.join(SNAPSHOT_FILE))
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        let bytes = serde_json::to_vec(&stored.data)
            .map_err(|e| StorageIOError::read_snapshot(Some(stored.meta.signature()), &e))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(bytes),
        }))
    }
}

/// openraft settings for partition groups: as the metadata group's (heartbeat 100 ms,
/// elections after 400–800 ms), and no snapshot on openraft's own schedule. The log is the
/// partition's data: purging it after openraft's default snapshot (every 5 000 entries, the log
/// purged 1 000 behind) deleted sealed segments that the topic's retention still kept. A
/// replicated partition's log is only ever cut by retention ([`retain_through_groups`]): a
/// snapshot at the retention point, then a purge of the whole log up to it
/// (`max_in_snapshot_log_to_keep` 0), which deletes exactly the segments retention dropped.
pub fn partition_raft_config() -> Arc<openraft::Config> {
    let config = openraft::Config {
        cluster_name: "streambus-partition".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 0,
        ..Default::default()
    };
    // validate() only checks the timeouts' order, fixed above; should it ever refuse, these
    // settings stay (openraft's defaults would snapshot and purge on their own schedule).
    let settings = config.clone();
    Arc::new(config.validate().unwrap_or(settings))
}

/// Applies `storage`'s retention to its replicated partitions through their groups in
/// `replicas`: each retention run (the storage's background thread, every
/// `retention_check_interval`) reports the partitions with sealed segments to drop
/// ([`RaftRetentionHook`](crate::storage::RaftRetentionHook)); a task on the current tokio
/// runtime asks each such group whose snapshot is behind that point for a snapshot. The group builds it at the retention point
/// ([`PartitionSnapshotBuilder`]) and openraft then purges the log up to it, deleting those
/// segments (on a leader once no replication to a follower reads them). Each replica does
/// this for its own log; a follower that needs purged entries gets the snapshot. Must run
/// inside a tokio runtime; the task ends with the storage or the registry.
pub fn retain_through_groups(storage: &Storage, replicas: std::sync::Weak<Replicas>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(PartitionId, RaftLogId)>();
    storage.set_raft_retention_hook(Arc::new(move |topic, partition, point| {
        let id = PartitionId {
            topic: topic.to_owned(),
            partition,
        };
        let _ = tx.send((id, point));
    }));
    tokio::spawn(async move {
        while let Some((id, point)) = rx.recv().await {
            // The broker's groups are gone: so is the work.
            let Some(groups) = replicas.upgrade() else {
                return;
            };
            let Some(raft) = groups.get(&id.topic, id.partition) else {
                continue;
            };
            drop(groups);
            let (snapshot, purged, applied) = {
                let m = raft.metrics();
                let m = m.borrow();
                (m.snapshot, m.purged, m.last_applied)
            };
            let triggered = match snapshot {
                // Snapshotted up to there already; a purge a crash (or a restart) left
                // undone is asked for again.
                Some(s) if s.index >= point.index => {
                    if purged >= Some(s) {
                        continue;
                    }
                    raft.trigger().purge_log(s.index).await
                }
                _ if applied.is_none() => continue,
                _ => raft.trigger().snapshot().await,
            };
            if let Err(e) = triggered {
                tracing::warn!(
                    topic = %id.topic,
                    partition = id.partition,
                    "retention: the partition group is stopped: {e}"
                );
            }
        }
    });
}

/// Opens node `node_id`'s member of partition `id`'s group: its log is the partition's in
/// `storage` (a replicated topic's), its vote and snapshot in the partition's directory; it
/// talks to the other replicas through `transport`; `on_commit` hears of each move of the
/// high-water mark. Must run inside a tokio runtime.
pub async fn open_group(
    node_id: u64,
    storage: Arc<Storage>,
    id: PartitionId,
    config: Arc<openraft::Config>,
    transport: Arc<dyn Transport>,
    on_commit: Option<CommitHook>,
) -> Result<PartitionRaft, ReplicaError> {
    let storage_err = |source| ReplicaError::Storage {
        topic: id.topic.clone(),
        partition: id.partition,
        source,
    };
    let io_err = |source| ReplicaError::Io {
        topic: id.topic.clone(),
        partition: id.partition,
        source,
    };
    let dir = storage
        .partition_dir(&id.topic, id.partition)
        .map_err(storage_err)?;
    let log_state = storage
        .raft_log_state(&id.topic, id.partition)
        .map_err(storage_err)?;
    let file: RaftFile = read_json(&dir.join(RAFT_FILE))
        .map_err(io_err)?
        .unwrap_or_default();
    let stored: Option<StoredSnapshot> = read_json(&dir.join(SNAPSHOT_FILE)).map_err(io_err)?;
    let mut producers = storage.producer_table();
    let state = match stored {
        Some(s) => {
            let list: Vec<_> = s
                .data
                .producers
                .iter()
                .map(|(p, n, o)| (ProducerBatch::from(*p), *n, *o))
                .collect();
            producers.import(&list);
            // The snapshot's entries are committed: readable at once (up to what the log
            // holds: under `never` an OS crash may have cut its tail).
            let hwm = s.data.high_water_mark.min(log_state.end);
            if hwm > log_state.high_water_mark {
                storage
                    .set_high_water_mark(&id.topic, id.partition, hwm)
                    .map_err(storage_err)?;
            }
            SmState {
                last_applied: s.data.last_applied,
                membership: s.data.membership,
                high_water_mark: hwm,
                producers,
            }
        }
        None => SmState {
            last_applied: None,
            membership: StoredMembership::default(),
            high_water_mark: log_state.log_start,
            producers,
        },
    };
    let state = Arc::new(Mutex::new(state));
    let shared = Arc::new(Shared {
        storage,
        id: id.clone(),
        dir,
        file: Mutex::new(file),
        on_commit,
        sm: Arc::clone(&state),
        log_producers: Mutex::new(None),
        decided: Mutex::new(BTreeMap::new()),
        snapshot_file: Mutex::new(()),
    });
    let log = PartitionLog {
        shared: Arc::clone(&shared),
    };
    let sm = PartitionStateMachine {
        shared,
        state,
        snapshot_idx: 0,
    };
    let network = PartitionNetworkFactory {
        transport,
        id: id.clone(),
    };
    Raft::new(node_id, config, network, log, sm)
        .await
        .map_err(|e| ReplicaError::Raft {
            topic: id.topic.clone(),
            partition: id.partition,
            reason: e.to_string(),
        })
}

/// A partition group's message on the cluster link, inside [`Rpc::Partition`].
#[derive(Debug, Serialize, Deserialize)]
#[non_exhaustive]
#[allow(clippy::large_enum_variant)]
pub enum PartitionRpc {
    /// Raft log replication and heartbeats.
    AppendEntries(AppendEntriesRequest<PartitionConfig>),
    /// A Raft election.
    Vote(VoteRequest<u64>),
    /// A whole snapshot (a few KB: no data), to a replica behind the leader's purged log.
    Snapshot {
        /// The leader's vote.
        vote: Vote<u64>,
        /// What the snapshot covers.
        meta: SnapshotMeta<u64, BasicNode>,
        /// The state machine, serialised.
        data: Vec<u8>,
    },
}

/// The answer to a [`PartitionRpc`] of the same name, or that the broker has no such group.
#[derive(Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum PartitionReply {
    /// To [`PartitionRpc::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// To [`PartitionRpc::Vote`].
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// To [`PartitionRpc::Snapshot`].
    Snapshot(Result<SnapshotResponse<u64>, Fatal<u64>>),
    /// The receiving broker runs no group for that partition (not a replica, or not yet
    /// started: the topic's creation is not applied there yet).
    NoGroup(String),
}

impl PartitionReply {
    fn kind(&self) -> &'static str {
        match self {
            Self::AppendEntries(_) => "AppendEntries",
            Self::Vote(_) => "Vote",
            Self::Snapshot(_) => "Snapshot",
            Self::NoGroup(_) => "NoGroup",
        }
    }
}

/// Answers a [`PartitionRpc`] with a partition group (the receiving side).
pub async fn answer(raft: &PartitionRaft, rpc: PartitionRpc) -> PartitionReply {
    match rpc {
        PartitionRpc::AppendEntries(r) => {
            PartitionReply::AppendEntries(raft.append_entries(r).await)
        }
        PartitionRpc::Vote(r) => PartitionReply::Vote(raft.vote(r).await),
        PartitionRpc::Snapshot { vote, meta, data } => PartitionReply::Snapshot(
            raft.install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: Box::new(data),
                },
            )
            .await,
        ),
    }
}

/// The partition groups a broker runs, by topic and partition: the receiving side of
/// [`Rpc::Partition`], and what the broker asks who leads a partition.
#[derive(Default)]
pub struct Replicas {
    groups: RwLock<BTreeMap<String, BTreeMap<u32, Slot>>>,
    /// How many times each local group's leader changed ([`count_leader_changes`]).
    leader_changes: Mutex<BTreeMap<PartitionId, u64>>,
    /// The replicas that opened blank and have not caught up with a leader yet
    /// ([`answer`](Self::answer)).
    catching_up: Mutex<BTreeMap<PartitionId, CatchUp>>,
}

/// Where a replica that opened blank stands. Its log and vote may have been lost (a wiped
/// data directory): it may have voted in a term the group is still in, and it no longer holds
/// entries it helped commit. Voting again could elect two leaders in one term, or elect a
/// candidate that lacks a committed entry; so it votes again only once it holds everything the
/// group had committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CatchUp {
    /// No leader has reached it yet.
    AwaitingLeader,
    /// A leader whose commit index covered an entry of its own term (so every entry committed
    /// before it) told it this commit index: it votes again once it has applied it.
    Until(u64),
}

/// A group being opened, or running.
#[derive(Clone)]
enum Slot {
    Starting,
    Running(PartitionRaft),
}

impl Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups = self.groups.read().unwrap_or_else(PoisonError::into_inner);
        let ids: Vec<(&String, Vec<&u32>)> = groups
            .iter()
            .map(|(t, ps)| (t, ps.keys().collect()))
            .collect();
        f.debug_struct("Replicas").field("groups", &ids).finish()
    }
}

impl Replicas {
    /// Claims a partition for a group about to be opened: `false` if one is already running
    /// or being opened (so one partition never gets two groups).
    pub fn claim(&self, id: &PartitionId) -> bool {
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        let topic = groups.entry(id.topic.clone()).or_default();
        if topic.contains_key(&id.partition) {
            return false;
        }
        topic.insert(id.partition, Slot::Starting);
        true
    }

    /// Gives up a claim whose group did not open.
    pub fn unclaim(&self, id: &PartitionId) {
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = groups.get_mut(&id.topic) {
            t.remove(&id.partition);
        }
    }

    /// Adds (or replaces) a partition's running group. A group that opened blank (no vote, no
    /// log, no snapshot) starts out catching up (see [`answer`](Self::answer)).
    pub fn insert(&self, id: PartitionId, raft: PartitionRaft) {
        let blank = {
            let m = raft.metrics();
            let m = m.borrow();
            m.vote.leader_id.term == 0 && m.last_log_index.is_none() && m.snapshot.is_none()
        };
        if blank {
            lock(&self.catching_up).insert(id.clone(), CatchUp::AwaitingLeader);
        } else {
            lock(&self.catching_up).remove(&id);
        }
        self.groups
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.topic)
            .or_default()
            .insert(id.partition, Slot::Running(raft));
    }

    /// How many times `id`'s leader changed as this broker's replica saw it.
    pub fn leader_changes(&self, id: &PartitionId) -> u64 {
        lock(&self.leader_changes).get(id).copied().unwrap_or(0)
    }

    /// Removes every group of a topic (deleted); returns the running ones, to stop.
    pub fn remove_topic(&self, topic: &str) -> Vec<PartitionRaft> {
        lock(&self.leader_changes).retain(|id, _| id.topic != topic);
        lock(&self.catching_up).retain(|id, _| id.topic != topic);
        let removed = self
            .groups
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(topic);
        removed
            .into_iter()
            .flat_map(BTreeMap::into_values)
            .filter_map(|s| match s {
                Slot::Running(r) => Some(r),
                Slot::Starting => None,
            })
            .collect()
    }

    /// A partition's running group.
    pub fn get(&self, topic: &str, partition: u32) -> Option<PartitionRaft> {
        match self
            .groups
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)?
            .get(&partition)?
        {
            Slot::Running(r) => Some(r.clone()),
            Slot::Starting => None,
        }
    }

    /// Every running group.
    pub fn all(&self) -> Vec<(PartitionId, PartitionRaft)> {
        let groups = self.groups.read().unwrap_or_else(PoisonError::into_inner);
        groups
            .iter()
            .flat_map(|(t, ps)| {
                ps.iter().filter_map(move |(p, s)| match s {
                    Slot::Running(r) => Some((
                        PartitionId {
                            topic: t.clone(),
                            partition: *p,
                        },
                        r.clone(),
                    )),
                    Slot::Starting => None,
                })
            })
            .collect()
    }

    /// Answers a partition group's RPC.
    ///
    /// A replica that opened blank refuses every vote while `had_leader()` says the group had
    /// a leader before it opened (so this replica may have been a member that lost its log),
    /// until it has applied the commit index of a leader that had committed an entry of its
    /// own term. A blank replica of a partition that never had a leader (a topic being created)
    /// votes at once: the group cannot be started otherwise.
    pub async fn answer(
        &self,
        id: &PartitionId,
        rpc: PartitionRpc,
        had_leader: impl FnOnce() -> bool,
    ) -> PartitionReply {
        let Some(raft) = self.get(&id.topic, id.partition) else {
            return PartitionReply::NoGroup(format!(
                "no group for partition {} of topic {:?} here",
                id.partition, id.topic
            ));
        };
        match rpc {
            PartitionRpc::Vote(r) if self.is_catching_up(id, &raft) && had_leader() => {
                tracing::info!(
                    topic = %id.topic,
                    partition = id.partition,
                    candidate = r.vote.leader_id.node_id,
                    term = r.vote.leader_id.term,
                    "vote refused: this replica opened blank and has not caught up with a leader"
                );
                PartitionReply::Vote(Ok(VoteResponse::new(r.vote, None, false)))
            }
            PartitionRpc::AppendEntries(r) if lock(&self.catching_up).contains_key(id) => {
                let term = r.vote.leader_id.term;
                let commit = r.leader_commit.filter(|c| c.leader_id.term == term);
                let reply = raft.append_entries(r).await;
                let accepted = matches!(
                    reply,
                    Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_))
                );
                if let (true, Some(c)) = (accepted, commit) {
                    let mut guards = lock(&self.catching_up);
                    if let Some(g) = guards.get_mut(id) {
                        *g = match *g {
                            CatchUp::Until(t) => CatchUp::Until(t.max(c.index)),
                            CatchUp::AwaitingLeader => CatchUp::Until(c.index),
                        };
                    }
                }
                PartitionReply::AppendEntries(reply)
            }
            rpc => answer(&raft, rpc).await,
        }
    }

    /// Whether `id`'s replica opened blank and has not caught up with a leader yet (see
    /// [`answer`](Self::answer)); forgets it once it has.
    pub fn is_catching_up(&self, id: &PartitionId, raft: &PartitionRaft) -> bool {
        let mut guards = lock(&self.catching_up);
        match guards.get(id) {
            None => false,
            Some(CatchUp::AwaitingLeader) => true,
            Some(CatchUp::Until(t)) => {
                let applied = raft.metrics().borrow().last_applied.map(|l| l.index);
                if applied.is_some_and(|a| a >= *t) {
                    guards.remove(id);
                    tracing::info!(
                        topic = %id.topic,
                        partition = id.partition,
                        "this replica, opened blank, has caught up with its leader: it votes again"
                    );
                    false
                } else {
                    true
                }
            }
        }
    }
}

/// openraft's network for one partition group, over the cluster link's [`Transport`].
#[derive(Debug, Clone)]
pub struct PartitionNetworkFactory {
    transport: Arc<dyn Transport>,
    id: PartitionId,
}

impl RaftNetworkFactory<PartitionConfig> for PartitionNetworkFactory {
    type Network = PartitionNetwork;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PartitionNetwork {
        PartitionNetwork {
            target,
            node: node.clone(),
            transport: Arc::clone(&self.transport),
            id: self.id.clone(),
        }
    }
}

/// The link from one partition group to one replica.
#[derive(Debug)]
pub struct PartitionNetwork {
    target: u64,
    node: BasicNode,
    transport: Arc<dyn Transport>,
    id: PartitionId,
}

type RpcErr<E> = RPCError<u64, BasicNode, E>;

impl PartitionNetwork {
    async fn call(
        &self,
        rpc: PartitionRpc,
        option: &RPCOption,
    ) -> Result<PartitionReply, TransportError> {
        let ttl = option.hard_ttl();
        let rpc = Rpc::Partition {
            topic: self.id.topic.clone(),
            partition: self.id.partition,
            rpc,
        };
        let call = self.transport.call(self.target, &self.node, rpc);
        match tokio::time::timeout(ttl, call).await {
            Ok(Ok(RpcReply::Partition(r))) => Ok(r),
            Ok(Ok(other)) => Err(TransportError::Io {
                addr: self.node.addr.clone(),
                source: io::Error::other(format!(
                    "broker {} answered a partition RPC with a {} reply",
                    self.target,
                    other.kind()
                )),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TransportError::Timeout {
                addr: self.node.addr.clone(),
                timeout: ttl,
            }),
        }
    }

    fn unexpected(&self, reply: &PartitionReply) -> NetworkError {
        let what = match reply {
            PartitionReply::NoGroup(why) => why.clone(),
            other => format!("a {} reply", other.kind()),
        };
        NetworkError::new(&io::Error::other(format!(
            "broker {} answered with {what}",
            self.target
        )))
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RemoteError<u64, BasicNode, E> {
        RemoteError::new_with_node(self.target, self.node.clone(), e)
    }
}

impl RaftNetwork<PartitionConfig> for PartitionNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<PartitionConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr<RaftError<u64>>> {
        match self.call(PartitionRpc::AppendEntries(rpc), &option).await {
            Ok(PartitionReply::AppendEntries(r)) => {
                r.map_err(|e| RPCError::RemoteError(self.remote(e)))
            }
            Ok(other) => Err(RPCError::Network(self.unexpected(&other))),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr<RaftError<u64>>> {
        match self.call(PartitionRpc::Vote(rpc), &option).await {
            Ok(PartitionReply::Vote(r)) => r.map_err(|e| RPCError::RemoteError(self.remote(e))),
            Ok(other) => Err(RPCError::Network(self.unexpected(&other))),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<PartitionConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<PartitionConfig, Fatal<u64>>> {
        let rpc = PartitionRpc::Snapshot {
            vote,
            meta: snapshot.meta,
            data: *snapshot.snapshot,
        };
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = self.call(rpc, &option) => r,
        };
        match reply {
            Ok(PartitionReply::Snapshot(r)) => {
                r.map_err(|e| StreamingError::RemoteError(self.remote(e)))
            }
            Ok(other) => Err(StreamingError::Network(self.unexpected(&other))),
            Err(e) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
        }
    }
}
