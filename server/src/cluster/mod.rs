//! Cluster mode (`--cluster-listen` and `--peers`): the brokers agree on the cluster's
//! metadata (brokers, topics, replica placement) through one Raft group run by `openraft`.
//!
//! - [`state`]: the state machine ([`Metadata`]) and its commands; the placement rule.
//! - [`store`]: the group's durable log and vote in `<data>/cluster/`.
//! - [`network`]: the broker-to-broker link: [`Rpc`]s over a [`Transport`] (TCP on
//!   `--cluster-listen` in a broker, in memory in tests) and the openraft network over it.
//! - [`node`]: a broker's cluster side, on its own small tokio runtime whatever runtime serves
//!   the clients.
//!
//! Without `--peers` none of this runs: no thread, no listener, no cost.

pub mod network;
pub mod node;
pub mod replica;
pub mod state;
pub mod store;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft};

pub use network::{Rpc, RpcReply, Transport, TransportError};
pub use node::{ClusterHandle, ClusterNode};
use replica::PartitionId;
pub use state::BrokerAddress;
pub use state::{Applied, AppliedState, Command, Metadata};

openraft::declare_raft_types!(
    /// The metadata group's openraft types: [`Command`]s applied to [`Metadata`]; node ids are
    /// the brokers' `--node-id`s; a node's address is its cluster listener.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = BasicNode,
        SnapshotData = Vec<u8>,
);

/// The delays between attempts to publish a partition leader that did not commit: from 100 ms,
/// doubling, at most 2 s apart, with jitter; no limit on the attempts.
fn publish_retry() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
}

/// Writes each leader change received on `published` with `write` until it commits or
/// `stopped` resolves: a change that fails (no metadata leader, the leader unreachable) is
/// written again after the next of `retry`'s delays, unless a change of a later term for the
/// same partition replaced it. Brokers without a replica of a partition name its leader from
/// the metadata, so a dropped change would leave them naming a dead one until the next
/// election.
async fn publish_until_committed<W, F>(
    mut published: tokio::sync::mpsc::UnboundedReceiver<(PartitionId, state::Elected)>,
    stopped: impl std::future::Future<Output = ()>,
    write: W,
    retry: backon::ExponentialBuilder,
) where
    W: Fn(PartitionId, state::Elected) -> F,
    F: std::future::Future<Output = Result<(), ClusterError>>,
{
    use backon::BackoffBuilder as _;
    fn keep_latest(
        pending: &mut BTreeMap<PartitionId, state::Elected>,
        (id, e): (PartitionId, state::Elected),
    ) {
        let slot = pending.entry(id).or_insert(e);
        if e.term >= slot.term {
            *slot = e;
        }
    }
    tokio::pin!(stopped);
    let mut pending = BTreeMap::new();
    let mut delays = retry.build();
    loop {
        let wait = (!pending.is_empty()).then(|| delays.next().unwrap_or(Duration::from_secs(2)));
        let retry_due = async {
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut stopped => return,
            got = published.recv() => match got {
                Some(change) => keep_latest(&mut pending, change),
                None => return,
            },
            () = retry_due => {}
        }
        while let Ok(change) = published.try_recv() {
            keep_latest(&mut pending, change);
        }
        for (id, e) in std::mem::take(&mut pending) {
            if let Err(err) = write(id.clone(), e).await {
                tracing::warn!(
                    topic = %id.topic,
                    partition = id.partition,
                    leader = e.leader,
                    term = e.term,
                    "publishing a partition leader (will retry): {err}"
                );
                keep_latest(&mut pending, (id, e));
            }
        }
        if pending.is_empty() {
            delays = retry.build();
        }
    }
}

/// How long a metadata write waits for a leader before it fails with
/// [`ClusterError::NoLeader`].
pub const WRITE_PATIENCE: Duration = Duration::from_secs(5);

/// How long a write forwarded to the leader may take to be committed there.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a join may take on the leader: the new broker first catches up with the log as a
/// learner, then the membership change is committed.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The metadata group's Raft handle.
pub type MetaRaft = Raft<TypeConfig>;

/// Why a metadata write did not go through.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No broker leads the metadata group now (an election is under way, or too few brokers
    /// are up).
    #[error("the metadata group has no leader now: {0}")]
    NoLeader(String),
    /// The leader could not be reached over the cluster link.
    #[error("the metadata leader, broker {node}, cannot be reached: {source}")]
    Unreachable {
        /// The leader's node id.
        node: u64,
        /// Why.
        source: TransportError,
    },
    /// This broker's Raft stopped (shutdown, or a storage failure).
    #[error("the metadata group stopped on this broker: {0}")]
    Stopped(String),
    /// The group refused the request for good (retrying will not help), e.g. a broker joining
    /// with another cluster address than the one the group knows it by.
    #[error("refused by the metadata group: {0}")]
    Refused(String),
    /// Opening the group's files failed.
    #[error("opening the metadata log in {dir}: {source}")]
    Open {
        /// `<data>/cluster`.
        dir: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A broker's handle on the metadata group: writes (forwarded to the leader when this broker
/// is a follower) and the applied metadata.
#[derive(Clone)]
pub struct Cluster {
    node_id: u64,
    raft: MetaRaft,
    state: Arc<RwLock<AppliedState>>,
    transport: Arc<dyn Transport>,
    /// The store held nothing when opened (a first start, or a wiped data directory).
    started_blank: bool,
    /// Between [`Cluster::start_joining`] and the group's answer: votes are refused.
    joining: Arc<AtomicBool>,
    replicas: Arc<replica::Replicas>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.node_id)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

/// openraft settings for the metadata group: heartbeats every 100 ms, elections after 400 to
/// 800 ms without one (several heartbeats lost, yet a failover well under two seconds).
pub fn raft_config() -> Arc<openraft::Config> {
    let config = openraft::Config {
        cluster_name: "streambus-metadata".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        ..Default::default()
    };
    // validate() only checks the timeouts' order, fixed above.
    Arc::new(config.validate().unwrap_or_default())
}

impl Cluster {
    /// Opens broker `node_id`'s member of the group with its files in `dir`, talking to the
    /// others through `transport`; `local` makes the partition directories of this broker's
    /// replicas. Must run inside a tokio runtime.
    pub async fn open(
        node_id: u64,
        dir: &Path,
        config: Arc<openraft::Config>,
        transport: Arc<dyn Transport>,
        local: Option<state::LocalReplicas>,
    ) -> Result<Self, ClusterError> {
        let open_err = |source| ClusterError::Open {
            dir: dir.display().to_string(),
            source,
        };
        let replicas = Arc::<replica::Replicas>::default();
        let (publish, published) = tokio::sync::mpsc::unbounded_channel();
        if let Some(local) = &local {
            let _ = local.groups.set(state::Groups {
                replicas: Arc::clone(&replicas),
                transport: Arc::clone(&transport),
                publish,
            });
            // Retention of the replicated partitions goes through their groups.
            replica::retain_through_groups(&local.storage, Arc::downgrade(&replicas));
        }
        let log = store::LogStore::open(dir).map_err(open_err)?;
        let started_blank = log.is_blank();
        let sm = state::StateMachine::open(dir, local).map_err(open_err)?;
        let shared = sm.shared();
        let network = network::NetworkFactory::new(Arc::clone(&transport));
        let raft = Raft::new(node_id, config, network, log, sm)
            .await
            .map_err(|e| ClusterError::Stopped(e.to_string()))?;
        let cluster = Self {
            node_id,
            raft,
            state: shared,
            transport,
            started_blank,
            joining: Arc::default(),
            replicas,
        };
        tokio::spawn(cluster.clone().write_published(published));
        Ok(cluster)
    }

    /// Writes the partition leaders' [`Command::LeaderChanged`]s through the group until the
    /// group stops (see [`publish_until_committed`]).
    async fn write_published(
        self,
        published: tokio::sync::mpsc::UnboundedReceiver<(PartitionId, state::Elected)>,
    ) {
        let mut metrics = self.raft.metrics();
        let stopped = async move { while metrics.changed().await.is_ok() {} };
        let write = |id: PartitionId, e: state::Elected| {
            let command = Command::LeaderChanged {
                topic: id.topic,
                partition: id.partition,
                leader: e.leader,
                term: e.term,
            };
            let cluster = self.clone();
            async move { cluster.write_once(command).await.map(drop) }
        };
        publish_until_committed(published, stopped, write, publish_retry()).await;
    }

    /// The partition groups this broker runs (the cluster link delivers their messages).
    pub fn replicas(&self) -> &replica::Replicas {
        &self.replicas
    }

    /// Applies `storage`'s retention to its replicated partitions through this broker's
    /// partition groups ([`replica::retain_through_groups`]; [`Cluster::open`] does it for the
    /// broker's storage).
    pub fn retain_through_groups(&self, storage: &crate::storage::Storage) {
        replica::retain_through_groups(storage, Arc::downgrade(&self.replicas));
    }

    /// This broker's node id.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The Raft handle (metrics, `wait()`, RPC handling).
    pub fn raft(&self) -> &MetaRaft {
        &self.raft
    }

    /// The metadata applied on this broker (a follower's may lag the leader's a little).
    pub fn metadata(&self) -> Metadata {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .metadata
            .clone()
    }

    /// Who serves `topic`/`partition` now, read under the lock without copying the metadata
    /// (this runs on every Produce, Fetch and GetOffset in cluster mode).
    ///
    /// A partition this broker holds a replica of is led by whom its Raft group says (this
    /// broker when it is the group's leader); otherwise by
    /// [`PartitionPlacement::leader`](state::PartitionPlacement::leader), its preferred leader.
    pub fn partition_leader(&self, topic: &str, partition: u32) -> PartitionLeader {
        let state = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(t) = state.metadata.topics.get(topic) else {
            return PartitionLeader::Unknown;
        };
        let placed = usize::try_from(partition)
            .ok()
            .and_then(|p| t.partitions.get(p));
        let Some(placed) = placed else {
            return PartitionLeader::Unknown;
        };
        let leader = match self.group_leader(topic, partition) {
            Some((leader, _)) => leader.and_then(|l| u32::try_from(l).ok()),
            None => placed.leader(),
        };
        match leader {
            Some(l) if u64::from(l) == self.node_id => PartitionLeader::Here,
            Some(l) => PartitionLeader::Elsewhere {
                leader: l,
                address: state.metadata.brokers.get(&l).cloned(),
            },
            None => PartitionLeader::NoLeader,
        }
    }

    /// Whether `topic`/`partition`'s group may have had a leader before this broker's replica
    /// opened: the metadata names one its group elected, or this broker is still joining (its
    /// metadata is not caught up, so it cannot tell).
    pub fn partition_had_leader(&self, topic: &str, partition: u32) -> bool {
        if self.is_joining() {
            return true;
        }
        let state = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state
            .metadata
            .topics
            .get(topic)
            .and_then(|t| t.partitions.get(usize::try_from(partition).ok()?))
            .is_some_and(|p| p.elected.is_some())
    }

    /// The leader and term of `topic`/`partition` as its Raft group on this broker sees them;
    /// `None` if this broker runs no group for it.
    pub fn group_leader(&self, topic: &str, partition: u32) -> Option<(Option<u64>, u64)> {
        let raft = self.replicas.get(topic, partition)?;
        let metrics = raft.metrics();
        let m = metrics.borrow();
        Some((m.current_leader, m.current_term))
    }

    /// The node ids of the group's voters, as this broker's log has them.
    fn voter_ids(&self) -> Vec<u64> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// The number of brokers in the group (its voters).
    pub fn voters(&self) -> usize {
        self.voter_ids().len()
    }

    /// Initialises the group with `peers` as its voters, once: on a group that already has a
    /// membership (a restart), nothing happens.
    pub async fn bootstrap(&self, peers: BTreeMap<u64, BasicNode>) -> Result<(), ClusterError> {
        match self.raft.initialize(peers).await {
            Ok(()) => {
                tracing::info!(node_id = self.node_id, "bootstrapped the metadata group");
                Ok(())
            }
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ClusterError::Stopped(e.to_string())),
        }
    }

    /// Commits `command` through the group and returns what applying it did: on this broker
    /// if it leads, else forwarded to the leader over the cluster link. Without a leader (an
    /// election, a broker still starting), it waits for one and tries again, for up to
    /// [`WRITE_PATIENCE`].
    pub async fn write(&self, command: Command) -> Result<Committed, ClusterError> {
        let deadline = tokio::time::Instant::now() + WRITE_PATIENCE;
        loop {
            let result = self.write_once(command.clone()).await;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match result {
                Err(ClusterError::NoLeader(_) | ClusterError::Unreachable { .. })
                    if !left.is_zero() =>
                {
                    // Until a leader is known (at once if one is), then at most every 100 ms.
                    let _ = self
                        .raft
                        .wait(Some(left))
                        .metrics(|m| m.current_leader.is_some(), "a metadata leader")
                        .await;
                    tokio::time::sleep(Duration::from_millis(100).min(left)).await;
                }
                other => return other,
            }
        }
    }

    async fn write_once(&self, command: Command) -> Result<Committed, ClusterError> {
        match self.write_here(command.clone()).await {
            Err(WriteRefused::Forward { leader, node }) => {
                let call = self.transport.call(leader, &node, Rpc::Write(command));
                let reply = match tokio::time::timeout(FORWARD_TIMEOUT, call).await {
                    Ok(r) => r,
                    Err(_) => Err(TransportError::Timeout {
                        addr: node.addr.clone(),
                        timeout: FORWARD_TIMEOUT,
                    }),
                }
                .map_err(|source| ClusterError::Unreachable {
                    node: leader,
                    source,
                })?;
                match reply {
                    RpcReply::Write(Ok(applied)) => Ok(applied),
                    RpcReply::Write(Err(e)) => Err(e.into()),
                    other => Err(ClusterError::Stopped(format!(
                        "broker {leader} answered a forwarded write with {}",
                        other.kind()
                    ))),
                }
            }
            Err(e) => Err(e.into()),
            Ok(applied) => Ok(applied),
        }
    }

    /// Commits `command` if this broker leads the group; never forwards.
    pub(crate) async fn write_here(&self, command: Command) -> Result<Committed, WriteRefused> {
        match self.raft.client_write(command).await {
            Ok(r) => Ok(Committed {
                index: r.log_id.index,
                applied: r.data,
            }),
            Err(e) => Err(self.refused(e)),
        }
    }

    /// Why openraft did not take a write or a membership change here.
    fn refused(&self, e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> WriteRefused {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                match (f.leader_id, f.leader_node) {
                    (Some(leader), Some(node)) if leader != self.node_id => {
                        WriteRefused::Forward { leader, node }
                    }
                    _ => WriteRefused::NoLeader(
                        "an election is under way or too few brokers are up".into(),
                    ),
                }
            }
            RaftError::APIError(e) => WriteRefused::NoLeader(e.to_string()),
            RaftError::Fatal(e) => WriteRefused::Stopped(e.to_string()),
        }
    }

    /// Whether this broker's store held nothing when it was opened: a first start, or a data
    /// directory wiped since. Such a broker must [`join`](Self::join).
    pub fn started_blank(&self) -> bool {
        self.started_blank
    }

    /// From now until [`join`](Self::join) succeeds, this broker refuses every vote: it may be
    /// a voter that lost its log and with it a vote it cast in the current term, and voting
    /// again could elect two leaders in one term. Call it before serving the cluster link.
    pub fn start_joining(&self) {
        self.joining.store(true, Ordering::Release);
    }

    /// Whether votes are refused now (see [`start_joining`](Self::start_joining)).
    pub fn is_joining(&self) -> bool {
        self.joining.load(Ordering::Acquire)
    }

    /// Whether this broker is a voter of the group, as far as its own log says (a broker on
    /// its first start, or one whose data directory was wiped, is not yet).
    pub fn is_voter(&self) -> bool {
        self.voter_ids().contains(&self.node_id)
    }

    /// Makes broker `node` (its cluster listener at `addr`) a voter, if this broker leads the
    /// group: it is added as a learner, which waits until it has caught up with the log, then
    /// promoted. A broker asks only when its own log does not make it a voter, so a voter that
    /// asks has lost its log: on the cluster's first start (it has not registered its client
    /// address yet) it is answered at once; after that (it registered, then its data directory
    /// was wiped) it may have forgotten a vote it cast, so it is first demoted to a learner,
    /// which cannot vote, and promoted again once caught up. One the group knows at another
    /// address is refused. A broker that belongs to no group answers [`Joined::Blank`].
    pub(crate) async fn join_here(&self, node: u64, addr: String) -> Result<Joined, WriteRefused> {
        let membership = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .clone();
        if membership.voter_ids().next().is_none() {
            return Ok(Joined::Blank);
        }
        match membership.get_node(&node) {
            Some(known) if known.addr != addr => {
                return Err(WriteRefused::Invalid(format!(
                    "broker {node} is a member of the cluster with its cluster listener at {}, not {addr}: changing a broker's --cluster-listen address is not supported",
                    known.addr
                )));
            }
            Some(_) if membership.voter_ids().any(|v| v == node) => {
                if !self.registered(node) {
                    return Ok(Joined::Voter);
                }
                tracing::warn!(
                    node,
                    "broker {node} lost its metadata log; demoting it to a learner until it has caught up"
                );
                self.raft
                    .change_membership(ChangeMembers::RemoveVoters([node].into()), true)
                    .await
                    .map_err(|e| self.refused(e))?;
            }
            Some(_) | None => {}
        }
        self.raft
            .add_learner(node, BasicNode::new(addr), true)
            .await
            .map_err(|e| self.refused(e))?;
        self.raft
            .change_membership(ChangeMembers::AddVoterIds([node].into()), false)
            .await
            .map_err(|e| self.refused(e))?;
        tracing::info!(node, "a broker joined the metadata group as a voter");
        Ok(Joined::Voter)
    }

    /// Whether broker `node` has registered its client address in the applied metadata.
    fn registered(&self, node: u64) -> bool {
        let Ok(id) = u32::try_from(node) else {
            return false;
        };
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .metadata
            .brokers
            .contains_key(&id)
    }

    /// Asks broker `target` (at `node`) to make this broker a voter, following it to the
    /// leader once if it is a follower.
    async fn ask_join(
        &self,
        target: u64,
        node: &BasicNode,
        own: &str,
    ) -> Result<Joined, ClusterError> {
        let mut to = (target, node.clone());
        for _ in 0..2 {
            let rpc = Rpc::Join {
                node: self.node_id,
                addr: own.to_owned(),
            };
            let call = self.transport.call(to.0, &to.1, rpc);
            let reply = match tokio::time::timeout(JOIN_TIMEOUT, call).await {
                Ok(r) => r,
                Err(_) => Err(TransportError::Timeout {
                    addr: to.1.addr.clone(),
                    timeout: JOIN_TIMEOUT,
                }),
            }
            .map_err(|source| ClusterError::Unreachable { node: to.0, source })?;
            match reply {
                RpcReply::Join(Ok(joined)) => return Ok(joined),
                RpcReply::Join(Err(WriteRefused::Forward { leader, .. }))
                    if leader == self.node_id =>
                {
                    // The group has not noticed yet that this broker (its leader before it
                    // lost its log) is gone: a group exists; wait for its next leader.
                    return Err(ClusterError::NoLeader(format!(
                        "the others still take broker {leader}, this one before it lost its log, for their leader"
                    )));
                }
                RpcReply::Join(Err(WriteRefused::Forward { leader, node })) => to = (leader, node),
                RpcReply::Join(Err(e)) => return Err(e.into()),
                other => {
                    return Err(ClusterError::Stopped(format!(
                        "broker {} answered a join with {}",
                        to.0,
                        other.kind()
                    )));
                }
            }
        }
        Err(ClusterError::NoLeader(format!(
            "the leader moved while broker {} was joining; retry",
            self.node_id
        )))
    }

    /// Brings this broker, which [started blank](Self::started_blank), into the group named by
    /// `peers` (every broker's cluster listener, this one's included): it asks the others to
    /// add it, which the leader does (a new broker growing the cluster, or one whose data
    /// directory was wiped, which is demoted to a learner first), retrying until the group
    /// answers that it is a voter; votes are refused meanwhile
    /// ([`start_joining`](Self::start_joining)). With `may_bootstrap` (the lowest id in
    /// `--peers`), when every other peer is unreachable or belongs to no group either (the
    /// cluster's very first start), it initialises the group with `peers` as voters instead,
    /// so a blank broker never starts a second group beside a live one it can reach.
    pub async fn join(
        &self,
        peers: &BTreeMap<u64, BasicNode>,
        may_bootstrap: bool,
    ) -> Result<(), ClusterError> {
        let own = peers
            .get(&self.node_id)
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        self.start_joining();
        let mut delay = Duration::from_millis(50);
        loop {
            let mut blank = true;
            for (id, node) in peers.iter().filter(|(id, _)| **id != self.node_id) {
                match self.ask_join(*id, node, &own).await {
                    Ok(Joined::Voter) => {
                        self.joining.store(false, Ordering::Release);
                        return Ok(());
                    }
                    Ok(Joined::Blank) | Err(ClusterError::Unreachable { .. }) => {}
                    Err(e @ (ClusterError::Refused(_) | ClusterError::Stopped(_))) => {
                        return Err(e);
                    }
                    Err(e) => {
                        blank = false;
                        tracing::debug!(node = self.node_id, "joining, will retry: {e}");
                    }
                }
            }
            if may_bootstrap && blank && !self.is_voter() {
                self.bootstrap(peers.clone()).await?;
                self.joining.store(false, Ordering::Release);
                return Ok(());
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// Registers this broker's advertised client address, retrying until the group takes it
    /// (a leader is elected and reachable) or the group stops.
    pub async fn register(&self, host: String, port: u16) {
        let Ok(node_id) = u32::try_from(self.node_id) else {
            return;
        };
        let command = Command::RegisterBroker {
            node_id,
            host,
            port,
        };
        let mut delay = Duration::from_millis(50);
        loop {
            match self.write(command.clone()).await {
                Ok(_) => {
                    tracing::info!(node_id, "registered in the metadata group");
                    return;
                }
                Err(ClusterError::Stopped(e)) => {
                    tracing::warn!(node_id, "not registered: {e}");
                    return;
                }
                Err(e) => tracing::debug!(node_id, "registering, will retry: {e}"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// Waits (up to `timeout`) until this broker has applied the log up to `index`: after a
    /// write committed elsewhere, this broker's metadata then shows it too.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), ClusterError> {
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "a metadata write applied here")
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::NoLeader(format!("not applied here yet: {e}")))
    }

    /// Stops this broker's member of the group.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("stopping the metadata group: {e}");
        }
    }
}

/// Who serves a partition's Produce, Fetch and GetOffset: see [`Cluster::partition_leader`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PartitionLeader {
    /// This broker leads it.
    Here,
    /// Another broker leads it.
    Elsewhere {
        /// The leader's node id.
        leader: u32,
        /// Its advertised client address (`None`: not registered yet).
        address: Option<state::BrokerAddress>,
    },
    /// It has no leader now.
    NoLeader,
    /// The metadata group does not know the topic or the partition: the request goes on to
    /// the storage, which answers TopicNotFound or PartitionNotFound.
    Unknown,
}

/// What a broker answers a join ([`Rpc::Join`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Joined {
    /// The broker that asked is a voter now (or already was).
    Voter,
    /// The answering broker belongs to no group yet (it is starting for the first time too).
    Blank,
}

/// A committed metadata write: its log index and what applying it did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Committed {
    /// The log index of the write.
    pub index: u64,
    /// What applying it did.
    pub applied: Applied,
}

/// Why a write was not committed here (sent back over the link for a forwarded write).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum WriteRefused {
    /// Another broker leads: send it there.
    #[error("broker {leader} leads the metadata group")]
    Forward {
        /// The leader's node id.
        leader: u64,
        /// Its cluster address.
        node: BasicNode,
    },
    /// No leader now.
    #[error("the metadata group has no leader now: {0}")]
    NoLeader(String),
    /// This broker's Raft stopped.
    #[error("the metadata group stopped: {0}")]
    Stopped(String),
    /// Refused for good: retrying will not help.
    #[error("{0}")]
    Invalid(String),
}

impl From<WriteRefused> for ClusterError {
    fn from(e: WriteRefused) -> Self {
        match e {
            // A forwarded write that found another leader: the leader changed meanwhile.
            WriteRefused::Forward { leader, .. } => {
                ClusterError::NoLeader(format!("the leader changed to broker {leader}; retry"))
            }
            WriteRefused::NoLeader(why) => ClusterError::NoLeader(why),
            WriteRefused::Stopped(why) => ClusterError::Stopped(why),
            WriteRefused::Invalid(why) => ClusterError::Refused(why),
        }
    }
}
