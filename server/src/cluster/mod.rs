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
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Raft};

pub use network::{Rpc, RpcReply, Transport, TransportError};
pub use node::{ClusterHandle, ClusterNode};
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

/// How long a metadata write waits for a leader before it fails with
/// [`ClusterError::NoLeader`].
pub const WRITE_PATIENCE: Duration = Duration::from_secs(5);

/// How long a write forwarded to the leader may take to be committed there.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

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
        if let Some(local) = &local {
            let _ = local.groups.set(state::Groups {
                replicas: Arc::clone(&replicas),
                transport: Arc::clone(&transport),
            });
        }
        let log = store::LogStore::open(dir).map_err(open_err)?;
        let sm = state::StateMachine::open(dir, local).map_err(open_err)?;
        let shared = sm.shared();
        let network = network::NetworkFactory::new(Arc::clone(&transport));
        let raft = Raft::new(node_id, config, network, log, sm)
            .await
            .map_err(|e| ClusterError::Stopped(e.to_string()))?;
        Ok(Self {
            node_id,
            raft,
            state: shared,
            transport,
            replicas,
        })
    }

    /// The partition groups this broker runs (the cluster link delivers their messages).
    pub fn replicas(&self) -> &replica::Replicas {
        &self.replicas
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

    /// The leader and term of `topic`/`partition` as its Raft group on this broker sees them;
    /// `None` if this broker runs no group for it.
    pub fn group_leader(&self, topic: &str, partition: u32) -> Option<(Option<u64>, u64)> {
        let raft = self.replicas.get(topic, partition)?;
        let metrics = raft.metrics();
        let m = metrics.borrow();
        Some((m.current_leader, m.current_term))
    }

    /// The number of brokers in the group (its voters).
    pub fn voters(&self) -> usize {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .count()
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
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                match (f.leader_id, f.leader_node) {
                    (Some(leader), Some(node)) if leader != self.node_id => {
                        Err(WriteRefused::Forward { leader, node })
                    }
                    _ => Err(WriteRefused::NoLeader(
                        "an election is under way or too few brokers are up".into(),
                    )),
                }
            }
            Err(RaftError::APIError(e)) => Err(WriteRefused::NoLeader(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(WriteRefused::Stopped(e.to_string())),
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
        }
    }
}
