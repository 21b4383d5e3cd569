//! A broker's cluster side: its own small tokio runtime (whatever `--runtime` serves the
//! clients), the cluster listener, its member of the metadata group, the first start's
//! bootstrap and the registration of its client address.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use openraft::BasicNode;

use super::network::{self, TcpTransport};
use super::state::LocalReplicas;
use super::{Cluster, ClusterError};
use crate::config::{Advertised, ClusterSettings};

/// What the broker holds of the cluster side: the group and a handle on its runtime (which
/// the [`ClusterNode`] owns and stops).
#[derive(Debug, Clone)]
pub struct ClusterHandle {
    /// The metadata group.
    pub cluster: Cluster,
    /// The cluster runtime.
    pub runtime: tokio::runtime::Handle,
}

/// A running cluster side; dropping it stops it.
#[derive(Debug)]
pub struct ClusterNode {
    cluster: Cluster,
    listen: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Why the cluster side could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The runtime or the listener.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The metadata group.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

impl ClusterNode {
    /// Starts broker `node_id`'s cluster side: binds `settings.listen`, opens the group in
    /// `<data_dir>/cluster`, and in the background joins it unless its log already makes this
    /// broker a voter ([`Cluster::join`]: the lowest id in `--peers` bootstraps the group when
    /// no other peer belongs to one) and registers `advertise` in it.
    pub fn start(
        node_id: u32,
        settings: &ClusterSettings,
        data_dir: &Path,
        advertise: &Advertised,
        local: LocalReplicas,
    ) -> Result<Self, StartError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("streambus-cluster")
            .enable_all()
            .build()
            .map_err(|source| StartError::Io {
                what: "starting the cluster runtime".into(),
                source,
            })?;
        let std_listener =
            std::net::TcpListener::bind(settings.listen).map_err(|source| StartError::Io {
                what: format!("binding --cluster-listen {}", settings.listen),
                source,
            })?;
        let listen = std_listener
            .local_addr()
            .and_then(|a| std_listener.set_nonblocking(true).map(|()| a))
            .map_err(|source| StartError::Io {
                what: "the cluster listener".into(),
                source,
            })?;
        let peers: BTreeMap<u64, BasicNode> = settings
            .peers
            .iter()
            .map(|(id, a)| (u64::from(*id), BasicNode::new(a.to_string())))
            .collect();
        let first = settings.peers.keys().next().copied();
        let dir = data_dir.join("cluster");
        let id = u64::from(node_id);
        let cluster = runtime.block_on(async {
            let listener = tokio::net::TcpListener::from_std(std_listener).map_err(|source| {
                StartError::Io {
                    what: "the cluster listener".into(),
                    source,
                }
            })?;
            let tls = match &settings.tls {
                Some(files) => {
                    let (server, client) = files.load().map_err(|e| StartError::Io {
                        what: "the cluster link's TLS".into(),
                        source: std::io::Error::other(e.to_string()),
                    })?;
                    Some(network::LinkTls::new(server, client))
                }
                None => None,
            };
            let transport = TcpTransport::with_tls(id, tls.clone());
            let cluster =
                Cluster::open(id, &dir, super::raft_config(), transport, Some(local)).await?;
            let blank = cluster.started_blank();
            if blank {
                // Before the link serves anything: no vote until the group has answered.
                cluster.start_joining();
            }
            tokio::spawn(network::serve(listener, cluster.clone(), tls));
            let c = cluster.clone();
            let may_bootstrap = first == Some(node_id);
            let (host, port) = (advertise.host.clone(), advertise.port);
            tokio::spawn(async move {
                // A first start (the lowest id bootstraps the group unless one is already
                // up), a broker growing the cluster, or one whose data directory was wiped.
                // Registered only once a voter: the leader tells a first start from a wiped
                // broker by the registration.
                if blank {
                    match c.join(&peers, may_bootstrap).await {
                        Ok(()) => tracing::info!(node_id, "a voter of the metadata group"),
                        Err(e) => {
                            tracing::error!(node_id, "could not join the cluster: {e}");
                            return;
                        }
                    }
                }
                c.register(host, port).await;
            });
            Ok::<_, StartError>(cluster)
        })?;
        tracing::info!(%listen, node_id, peers = settings.peers.len(), "cluster link listening");
        if !listen.ip().is_loopback() && settings.tls.is_none() {
            tracing::warn!(
                %listen,
                "the cluster link is plaintext and unauthenticated: whoever reaches --cluster-listen can change the cluster's metadata; set --cluster-tls-cert, --cluster-tls-key and --cluster-tls-ca, or keep it on a private network"
            );
        }
        Ok(Self {
            cluster,
            listen,
            runtime: Some(runtime),
        })
    }

    /// The group handle.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The bound cluster listener.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The group handle with the cluster runtime's, for the broker: it runs metadata writes
    /// there and answers their replies when they are committed.
    pub fn handle(&self) -> Option<ClusterHandle> {
        self.runtime.as_ref().map(|rt| ClusterHandle {
            cluster: self.cluster.clone(),
            runtime: rt.handle().clone(),
        })
    }

    /// Stops the group member and the runtime.
    pub fn shutdown(&mut self) {
        if let Some(rt) = self.runtime.take() {
            let c = self.cluster.clone();
            if tokio::runtime::Handle::try_current().is_ok() {
                // Inside another runtime, which must not block: stop without waiting.
                rt.spawn(async move { c.shutdown().await });
                rt.shutdown_background();
            } else {
                rt.block_on(async move { c.shutdown().await });
                rt.shutdown_timeout(Duration::from_secs(2));
            }
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.shutdown();
    }
}
