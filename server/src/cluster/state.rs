//! The metadata state machine: brokers, topics and the replica placement of every partition,
//! changed only by applying [`Command`]s committed in the metadata Raft group.
//!
//! Placement rule (deterministic, computed when a CreateTopic is applied, so every broker
//! computes the same): the voters of the group, sorted by id, are `b[0..n]`; the cluster counts
//! the partitions it has placed so far, `placed`. Partition `p` of a new topic starts at
//! `s = (placed + p) mod n` and its replicas are `b[s], b[s+1], …, b[s+rf-1]` (mod n); the
//! first is its preferred leader. Successive partitions, and successive topics, so rotate their
//! leader over every broker, and each broker holds `rf/n` of all replicas.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use streambus_core::ErrorCode;

use super::TypeConfig;
use super::replica::{self, CommitHook, PartitionId, Replicas, StepDownHook};
use super::store::{read_json, write_json_atomically};
use crate::storage::{Storage, StorageError as LogError, TopicConfig};
use openraft::BasicNode;

/// The largest replication factor the group places when a CreateTopic asks for the default (0).
pub const DEFAULT_MAX_REPLICATION_FACTOR: u32 = 3;

/// A change to the metadata, proposed through the group and applied by every broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Command {
    /// A broker says where clients reach it.
    RegisterBroker {
        /// Its node id.
        node_id: u32,
        /// Its advertised client host.
        host: String,
        /// Its advertised client port.
        port: u16,
    },
    /// Creates a topic, placing its partitions' replicas.
    CreateTopic {
        /// The name.
        name: String,
        /// Its partition count, 1 to [`crate::broker::MAX_PARTITIONS`].
        partitions: u32,
        /// Replicas per partition; 0 is the default, min(3, brokers).
        replication_factor: u32,
    },
    /// Deletes a topic.
    DeleteTopic {
        /// The name.
        name: String,
    },
    /// A partition's group elected `leader` in `term` (published by the leader): ignored if
    /// the metadata already names a leader of a later term, or the partition is gone.
    LeaderChanged {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The new leader's node id.
        leader: u32,
        /// Its Raft term in the partition's group.
        term: u64,
    },
}

/// What applying a [`Command`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Applied {
    /// Done (RegisterBroker, DeleteTopic).
    Done,
    /// CreateTopic: `true` if created, `false` if it existed with that partition count.
    Created(bool),
    /// Refused, as the wire error the request answers with.
    Refused {
        /// The protocol's error code.
        code: u16,
        /// The message.
        message: String,
    },
}

/// A broker's advertised client address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerAddress {
    /// Host name or IP address.
    pub host: String,
    /// Port.
    pub port: u16,
}

/// Where a partition's replicas are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionPlacement {
    /// The brokers holding a replica; the first is the preferred leader.
    pub replicas: Vec<u32>,
    /// The last leader its group published ([`Command::LeaderChanged`]), if any. (Absent in
    /// the metadata written before it existed.)
    #[serde(default)]
    pub elected: Option<Elected>,
}

/// A partition leader as its group elected it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Elected {
    /// Its node id.
    pub leader: u32,
    /// The Raft term it leads in.
    pub term: u64,
}

impl PartitionPlacement {
    /// The preferred leader (the first replica).
    pub fn preferred_leader(&self) -> Option<u32> {
        self.replicas.first().copied()
    }

    /// The broker that serves the partition as the metadata knows it (`None`: none), for a
    /// broker without a replica of it (one with a replica asks its group): the leader its group
    /// last published, else the preferred leader. Metadata replies and the NotLeader check
    /// both ask this one function.
    pub fn leader(&self) -> Option<u32> {
        self.elected
            .map(|e| e.leader)
            .or_else(|| self.preferred_leader())
    }

    /// The term of [`leader`](Self::leader) (0 for the preferred leader: none elected known).
    pub fn leader_term(&self) -> u64 {
        self.elected.map_or(0, |e| e.term)
    }
}

/// A topic in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicPlacement {
    /// Replicas per partition.
    pub replication_factor: u32,
    /// The partitions, by id.
    pub partitions: Vec<PartitionPlacement>,
}

/// The cluster's metadata: what the group has applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Registered brokers by node id.
    pub brokers: BTreeMap<u32, BrokerAddress>,
    /// Topics by name.
    pub topics: BTreeMap<String, TopicPlacement>,
    /// Partitions placed so far (rotates the first replica of new topics).
    pub placed: u64,
}

impl Metadata {
    /// Applies `command` with the group's `voters` (node ids) as the brokers to place on.
    pub fn apply(&mut self, command: &Command, voters: &[u32]) -> Applied {
        match command {
            Command::RegisterBroker {
                node_id,
                host,
                port,
            } => {
                self.brokers.insert(
                    *node_id,
                    BrokerAddress {
                        host: host.clone(),
                        port: *port,
                    },
                );
                Applied::Done
            }
            Command::CreateTopic {
                name,
                partitions,
                replication_factor,
            } => self.create_topic(name, *partitions, *replication_factor, voters),
            Command::DeleteTopic { name } => match self.topics.remove(name) {
                Some(_) => Applied::Done,
                None => refused(&LogError::TopicNotFound {
                    topic: name.clone(),
                }),
            },
            Command::LeaderChanged {
                topic,
                partition,
                leader,
                term,
            } => {
                let placed = self
                    .topics
                    .get_mut(topic)
                    .and_then(|t| t.partitions.get_mut(usize::try_from(*partition).ok()?));
                // One leader per term: a term at least as late as the known one wins.
                if let Some(p) = placed
                    && p.elected.is_none_or(|e| *term >= e.term)
                {
                    p.elected = Some(Elected {
                        leader: *leader,
                        term: *term,
                    });
                }
                Applied::Done
            }
        }
    }

    fn create_topic(&mut self, name: &str, partitions: u32, rf: u32, voters: &[u32]) -> Applied {
        if let Err(e) = crate::storage::validate(name) {
            return refused(&e);
        }
        let max = crate::broker::MAX_PARTITIONS;
        if !(1..=max).contains(&partitions) {
            return refused(&LogError::InvalidPartitionCount {
                count: partitions,
                max,
            });
        }
        let n = u32::try_from(voters.len()).unwrap_or(u32::MAX);
        let rf = match rf {
            0 => n.min(DEFAULT_MAX_REPLICATION_FACTOR),
            rf if rf > n => {
                return Applied::Refused {
                    code: ErrorCode::INVALID_REQUEST.0,
                    message: format!(
                        "replication factor {rf} is more than the {n} brokers of the cluster: want 1 to {n}, or 0 for the default"
                    ),
                };
            }
            rf => rf,
        };
        if let Some(t) = self.topics.get(name) {
            let existing = u32::try_from(t.partitions.len()).unwrap_or(u32::MAX);
            return if existing == partitions {
                Applied::Created(false)
            } else {
                refused(&LogError::TopicExists {
                    topic: name.to_owned(),
                    partitions: existing,
                })
            };
        }
        let placement = place(voters, self.placed, partitions, rf);
        self.placed = self.placed.wrapping_add(u64::from(partitions));
        self.topics.insert(
            name.to_owned(),
            TopicPlacement {
                replication_factor: rf,
                partitions: placement,
            },
        );
        Applied::Created(true)
    }
}

/// The placement rule (see the module docs): `partitions` partitions of `rf` replicas over
/// `voters`, the first starting at `placed`.
pub fn place(voters: &[u32], placed: u64, partitions: u32, rf: u32) -> Vec<PartitionPlacement> {
    let mut sorted = voters.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let n = sorted.len() as u64;
    (0..u64::from(partitions))
        .map(|p| PartitionPlacement {
            elected: None,
            replicas: (0..u64::from(rf))
                .filter_map(|i| {
                    let at = placed.wrapping_add(p).wrapping_add(i).checked_rem(n)?;
                    sorted.get(usize::try_from(at).ok()?).copied()
                })
                .collect(),
        })
        .collect()
}

fn refused(e: &LogError) -> Applied {
    Applied::Refused {
        code: e.error_code().0,
        message: e.to_string(),
    }
}

/// What the state machine has applied, shared with the broker that reads it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppliedState {
    /// The last log entry applied.
    pub last_applied: Option<LogId<u64>>,
    /// The last membership applied.
    pub membership: StoredMembership<u64, openraft::BasicNode>,
    /// The metadata.
    pub metadata: Metadata,
}

impl AppliedState {
    /// The brokers' cluster addresses, by node id.
    fn nodes(&self) -> BTreeMap<u64, BasicNode> {
        self.membership
            .nodes()
            .map(|(id, n)| (*id, n.clone()))
            .collect()
    }

    fn voters(&self) -> Vec<u32> {
        self.membership
            .voter_ids()
            .filter_map(|id| u32::try_from(id).ok())
            .collect()
    }
}

/// A snapshot as stored in `snapshot.json`.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, openraft::BasicNode>,
    state: AppliedState,
}

/// Makes the local partition directories of the replicas this broker holds and runs their
/// partition groups, and tells the broker of deleted topics.
#[derive(Debug, Clone)]
pub struct LocalReplicas {
    /// This broker.
    pub node_id: u32,
    /// Its storage.
    pub storage: Arc<Storage>,
    /// Called with a topic's name once its deletion is applied (set when the broker exists).
    pub on_deleted: Arc<std::sync::OnceLock<DeletedHook>>,
    /// Called when a local partition's high-water mark moves (set when the broker exists).
    pub on_committed: Arc<std::sync::OnceLock<CommittedHook>>,
    /// Called when this broker stops leading a local partition (set when the broker exists).
    pub on_step_down: Arc<std::sync::OnceLock<SteppedDownHook>>,
    /// Where partition groups run and how they talk (set by [`Cluster::open`](super::Cluster::open)).
    pub groups: Arc<std::sync::OnceLock<Groups>>,
}

/// What [`LocalReplicas::on_committed`] calls: the broker answers the fetches waiting on the
/// partition.
#[derive(Clone)]
pub struct CommittedHook(pub CommitHook);

impl std::fmt::Debug for CommittedHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommittedHook")
    }
}

/// What [`LocalReplicas::on_step_down`] calls: the broker answers the fetches waiting on the
/// partition NotLeader.
#[derive(Clone)]
pub struct SteppedDownHook(pub StepDownHook);

impl std::fmt::Debug for SteppedDownHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SteppedDownHook")
    }
}

/// What starting a partition group needs besides the storage.
#[derive(Debug, Clone)]
pub struct Groups {
    /// The registry the cluster link delivers partition RPCs to.
    pub replicas: Arc<Replicas>,
    /// The cluster link.
    pub transport: Arc<dyn super::Transport>,
    /// Where a group's leader sends its [`Command::LeaderChanged`] (the broker writes it
    /// through the metadata group).
    pub publish: tokio::sync::mpsc::UnboundedSender<(PartitionId, Elected)>,
}

/// How long deleting a topic waits for each of its partition groups to stop.
const GROUP_STOP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// What [`LocalReplicas::on_deleted`] calls: the broker answers the fetches waiting on the topic.
pub struct DeletedHook(pub Box<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for DeletedHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeletedHook")
    }
}

impl LocalReplicas {
    /// For broker `node_id` over `storage`, with no deletion hook yet.
    pub fn new(node_id: u32, storage: Arc<Storage>) -> Self {
        Self {
            node_id,
            storage,
            on_deleted: Arc::default(),
            on_committed: Arc::default(),
            on_step_down: Arc::default(),
            groups: Arc::default(),
        }
    }
}

impl LocalReplicas {
    /// Creates `name` locally if this broker holds a replica of one of its partitions, as a
    /// replicated topic, and starts the groups of its replicas; `nodes` are the brokers'
    /// cluster addresses.
    fn create(&self, name: &str, topic: &TopicPlacement, nodes: &BTreeMap<u64, BasicNode>) {
        if !topic
            .partitions
            .iter()
            .any(|p| p.replicas.contains(&self.node_id))
        {
            return;
        }
        let count = u32::try_from(topic.partitions.len()).unwrap_or(u32::MAX);
        match self
            .storage
            .create_raft_topic(name, count, TopicConfig::default())
        {
            Ok(true) => tracing::info!(topic = name, partitions = count, "created local replicas"),
            Ok(false) => {}
            Err(LogError::TopicExists { .. }) => {
                return tracing::error!(
                    topic = name,
                    "the local topic was created before partition replication (index format 1, not a Raft log): it is not replicated and its partitions are not served; delete and re-create it"
                );
            }
            Err(e) => return tracing::error!(topic = name, "creating the local replicas: {e}"),
        }
        self.start_groups(name, topic, nodes);
    }

    /// Starts the groups of this broker's replicas of `name` that are not running yet; the
    /// preferred leader of a partition initialises its group with the partition's replicas
    /// (refused, and ignored, on a group that already has a membership).
    fn start_groups(&self, name: &str, topic: &TopicPlacement, nodes: &BTreeMap<u64, BasicNode>) {
        let Some(groups) = self.groups.get() else {
            return;
        };
        for (p, placed) in topic.partitions.iter().enumerate() {
            let Ok(partition) = u32::try_from(p) else {
                continue;
            };
            if !placed.replicas.contains(&self.node_id) {
                continue;
            }
            let id = PartitionId {
                topic: name.to_owned(),
                partition,
            };
            if !groups.replicas.claim(&id) {
                continue;
            }
            let members: BTreeMap<u64, BasicNode> = placed
                .replicas
                .iter()
                .filter_map(|r| {
                    let r = u64::from(*r);
                    nodes.get(&r).map(|n| (r, n.clone()))
                })
                .collect();
            // Not once the group has had a leader: a preferred leader that lost its data must
            // not start a second group.
            let initialize =
                placed.replicas.first() == Some(&self.node_id) && placed.elected.is_none();
            let node = u64::from(self.node_id);
            let storage = Arc::clone(&self.storage);
            let groups = groups.clone();
            // Looked up at each call: the broker sets it after the groups of the topics known
            // at start are opened.
            let step_down = Arc::clone(&self.on_step_down);
            let cell = Arc::clone(&self.on_committed);
            let hook: CommitHook = Arc::new(move |topic, partition, end| {
                if let Some(h) = cell.get() {
                    (h.0)(topic, partition, end);
                }
            });
            tokio::spawn(async move {
                let opened = replica::open_group(
                    node,
                    storage,
                    id.clone(),
                    replica::partition_raft_config(),
                    Arc::clone(&groups.transport),
                    Some(hook),
                )
                .await;
                let raft = match opened {
                    Ok(r) => r,
                    Err(e) => {
                        groups.replicas.unclaim(&id);
                        return tracing::error!("starting a partition group: {e}");
                    }
                };
                groups.replicas.insert(id.clone(), raft.clone());
                let cell = Arc::clone(&step_down);
                let on_step_down: StepDownHook = Arc::new(move |topic, partition, leader| {
                    if let Some(h) = cell.get() {
                        (h.0)(topic, partition, leader);
                    }
                });
                tokio::spawn(replica::watch_leadership(
                    raft.clone(),
                    node,
                    id.clone(),
                    on_step_down,
                ));
                tokio::spawn(replica::publish_leadership(
                    raft.clone(),
                    node,
                    id.clone(),
                    groups.publish.clone(),
                ));
                tokio::spawn(replica::count_leader_changes(
                    raft.clone(),
                    id.clone(),
                    Arc::clone(&groups.replicas),
                ));
                if initialize {
                    match raft.initialize(members).await {
                        Ok(()) => tracing::info!(
                            topic = %id.topic,
                            partition = id.partition,
                            "initialised the partition group"
                        ),
                        Err(openraft::error::RaftError::APIError(
                            openraft::error::InitializeError::NotAllowed(_),
                        )) => {}
                        Err(e) => tracing::warn!(
                            topic = %id.topic,
                            partition = id.partition,
                            "initialising the partition group: {e}"
                        ),
                    }
                }
            });
        }
    }

    /// Stops the topic's groups, waiting for each (at most [`GROUP_STOP_PATIENCE`]), then
    /// deletes its local replicas: a group still stopping reaches its partition by name, and
    /// must not touch the log of a topic re-created under the same name right after.
    async fn delete(&self, name: &str) {
        if let Some(groups) = self.groups.get() {
            for raft in groups.replicas.remove_topic(name) {
                match tokio::time::timeout(GROUP_STOP_PATIENCE, raft.shutdown()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(topic = name, "stopping a partition group: {e}"),
                    Err(_) => tracing::warn!(
                        topic = name,
                        "a partition group did not stop within {GROUP_STOP_PATIENCE:?}; deleting its replica anyway"
                    ),
                }
            }
        }
        match self.storage.delete_topic(name) {
            Ok(()) => tracing::info!(topic = name, "deleted local replicas"),
            Err(LogError::TopicNotFound { .. }) => {}
            Err(e) => tracing::error!(topic = name, "deleting the local replicas: {e}"),
        }
        if let Some(hook) = self.on_deleted.get() {
            (hook.0)(name);
        }
    }

    fn reconcile(&self, state: &AppliedState) {
        let nodes = state.nodes();
        for (name, topic) in &state.metadata.topics {
            self.create(name, topic, &nodes);
        }
    }
}

/// The metadata group's state machine: in memory, rebuilt at start from `snapshot.json` and
/// the log entries after it.
#[derive(Debug)]
pub struct StateMachine {
    state: Arc<RwLock<AppliedState>>,
    dir: PathBuf,
    local: Option<LocalReplicas>,
    snapshot_idx: u64,
}

fn read_lock(s: &RwLock<AppliedState>) -> std::sync::RwLockReadGuard<'_, AppliedState> {
    s.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock(s: &RwLock<AppliedState>) -> std::sync::RwLockWriteGuard<'_, AppliedState> {
    s.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

const SNAPSHOT_FILE: &str = "snapshot.json";

impl StateMachine {
    /// Opens the state machine in `dir`, from its last snapshot if any; `local` (when set)
    /// makes the partition directories of this broker's replicas.
    pub fn open(dir: &Path, local: Option<LocalReplicas>) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let stored: Option<StoredSnapshot> = read_json(&dir.join(SNAPSHOT_FILE))?;
        let state = stored.map(|s| s.state).unwrap_or_default();
        if let Some(local) = &local {
            local.reconcile(&state);
        }
        Ok(Self {
            state: Arc::new(RwLock::new(state)),
            dir: dir.to_owned(),
            local,
            snapshot_idx: 0,
        })
    }

    /// The applied state, shared: read it for Metadata and ListTopics.
    pub fn shared(&self) -> Arc<RwLock<AppliedState>> {
        Arc::clone(&self.state)
    }

    fn current(&self) -> std::io::Result<Option<StoredSnapshot>> {
        read_json(&self.dir.join(SNAPSHOT_FILE))
    }
}

/// Builds snapshots of the applied state.
#[derive(Debug)]
pub struct SnapshotBuilder {
    state: Arc<RwLock<AppliedState>>,
    dir: PathBuf,
    idx: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let state = read_lock(&self.state).clone();
        let snapshot_id = match state.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.idx),
            None => format!("none-{}", self.idx),
        };
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.membership.clone(),
            snapshot_id,
        };
        let data =
            serde_json::to_vec(&state).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            state,
        };
        write_json_atomically(&self.dir.join(SNAPSHOT_FILE), &stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(data),
        })
    }
}

impl StateMachine {
    /// Applies one entry under the state's lock, pushing what it did onto `results`; returns
    /// the name of a topic it deleted, whose local replicas the caller deletes after the lock
    /// is released.
    fn apply_one(
        &self,
        entry: openraft::Entry<TypeConfig>,
        results: &mut Vec<Applied>,
    ) -> Option<String> {
        let mut s = write_lock(&self.state);
        s.last_applied = Some(entry.log_id);
        match entry.payload {
            EntryPayload::Blank => results.push(Applied::Done),
            EntryPayload::Membership(m) => {
                s.membership = StoredMembership::new(Some(entry.log_id), m);
                results.push(Applied::Done);
            }
            EntryPayload::Normal(command) => {
                let voters = s.voters();
                let applied = s.metadata.apply(&command, &voters);
                let mut deleted = None;
                match (&command, &applied) {
                    (Command::CreateTopic { name, .. }, Applied::Created(_)) => {
                        if let (Some(local), Some(t)) = (&self.local, s.metadata.topics.get(name)) {
                            local.create(name, t, &s.nodes());
                        }
                    }
                    (Command::DeleteTopic { name }, Applied::Done) => deleted = Some(name.clone()),
                    _ => {}
                }
                results.push(applied);
                return deleted;
            }
        }
        None
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<u64>>,
            StoredMembership<u64, openraft::BasicNode>,
        ),
        StorageError<u64>,
    > {
        let s = read_lock(&self.state);
        Ok((s.last_applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<u64>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut results = Vec::new();
        for entry in entries {
            let deleted = self.apply_one(entry, &mut results);
            // Outside the state's lock: deleting waits for the topic's groups to stop.
            if let (Some(name), Some(local)) = (deleted, &self.local) {
                local.delete(&name).await;
            }
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.snapshot_idx += 1;
        SnapshotBuilder {
            state: Arc::clone(&self.state),
            dir: self.dir.clone(),
            idx: self.snapshot_idx,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Vec<u8>>, StorageError<u64>> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Vec<u8>>,
    ) -> Result<(), StorageError<u64>> {
        let state: AppliedState = serde_json::from_slice(&snapshot)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            state: state.clone(),
        };
        write_json_atomically(&self.dir.join(SNAPSHOT_FILE), &stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        if let Some(local) = &self.local {
            // Topics the snapshot no longer has were deleted while this broker was behind.
            let gone: Vec<String> = read_lock(&self.state)
                .metadata
                .topics
                .keys()
                .filter(|t| !state.metadata.topics.contains_key(*t))
                .cloned()
                .collect();
            for name in gone {
                local.delete(&name).await;
            }
            local.reconcile(&state);
        }
        *write_lock(&self.state) = state;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let current = self
            .current()
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let Some(stored) = current else {
            return Ok(None);
        };
        let data = serde_json::to_vec(&stored.state)
            .map_err(|e| StorageIOError::read_snapshot(Some(stored.meta.signature()), &e))?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_rotates_leaders_and_replicas_over_the_brokers() {
        let p = place(&[3, 1, 2], 0, 4, 2);
        let r: Vec<Vec<u32>> = p.into_iter().map(|p| p.replicas).collect();
        assert_eq!(r, [vec![1, 2], vec![2, 3], vec![3, 1], vec![1, 2]]);
        // The next topic starts where the last one stopped.
        let r: Vec<Vec<u32>> = place(&[1, 2, 3], 4, 2, 3)
            .into_iter()
            .map(|p| p.replicas)
            .collect();
        assert_eq!(r, [vec![2, 3, 1], vec![3, 1, 2]]);
    }

    #[test]
    fn create_topic_checks_the_replication_factor_and_the_existing_count() {
        let mut m = Metadata::default();
        let create = |rf, partitions| Command::CreateTopic {
            name: "t".into(),
            partitions,
            replication_factor: rf,
        };
        assert_eq!(
            m.apply(&create(4, 2), &[1, 2, 3]),
            Applied::Refused {
                code: 2,
                message: "replication factor 4 is more than the 3 brokers of the cluster: want 1 to 3, or 0 for the default".into()
            }
        );
        assert_eq!(m.apply(&create(0, 2), &[1, 2, 3]), Applied::Created(true));
        assert_eq!(m.topics["t"].replication_factor, 3);
        assert_eq!(m.placed, 2);
        assert_eq!(m.apply(&create(0, 2), &[1, 2, 3]), Applied::Created(false));
        let Applied::Refused { code, .. } = m.apply(&create(0, 3), &[1, 2, 3]) else {
            panic!("a different partition count must be refused");
        };
        assert_eq!(code, ErrorCode::TOPIC_EXISTS.0);
        let delete = Command::DeleteTopic { name: "t".into() };
        assert_eq!(m.apply(&delete, &[1, 2, 3]), Applied::Done);
        let Applied::Refused { code, .. } = m.apply(&delete, &[1, 2, 3]) else {
            panic!("deleting a missing topic must be refused");
        };
        assert_eq!(code, ErrorCode::TOPIC_NOT_FOUND.0);
    }

    #[test]
    fn a_published_leader_replaces_the_preferred_one_unless_its_term_is_older() {
        let mut m = Metadata::default();
        let create = Command::CreateTopic {
            name: "t".into(),
            partitions: 2,
            replication_factor: 3,
        };
        assert_eq!(m.apply(&create, &[1, 2, 3]), Applied::Created(true));
        let leader = |m: &Metadata, p: usize| {
            let p = &m.topics["t"].partitions[p];
            (p.leader(), p.leader_term())
        };
        assert_eq!(leader(&m, 0), (Some(1), 0));
        let changed = |partition, leader, term| Command::LeaderChanged {
            topic: "t".into(),
            partition,
            leader,
            term,
        };
        assert_eq!(m.apply(&changed(0, 3, 4), &[1, 2, 3]), Applied::Done);
        assert_eq!(leader(&m, 0), (Some(3), 4));
        // A late publication of an older term changes nothing.
        m.apply(&changed(0, 2, 3), &[1, 2, 3]);
        assert_eq!(leader(&m, 0), (Some(3), 4));
        m.apply(&changed(0, 2, 5), &[1, 2, 3]);
        assert_eq!(leader(&m, 0), (Some(2), 5));
        // The other partition keeps its preferred leader; a missing partition or topic is
        // ignored.
        assert_eq!(leader(&m, 1), (Some(2), 0));
        assert_eq!(m.apply(&changed(7, 1, 9), &[1, 2, 3]), Applied::Done);
        let gone = Command::LeaderChanged {
            topic: "gone".into(),
            partition: 0,
            leader: 1,
            term: 9,
        };
        assert_eq!(m.apply(&gone, &[1, 2, 3]), Applied::Done);
        // Metadata written before the field existed reads as none elected.
        let old: PartitionPlacement = serde_json::from_str(r#"{"replicas":[2,3,1]}"#).unwrap();
        assert_eq!((old.leader(), old.leader_term()), (Some(2), 0));
    }
}
