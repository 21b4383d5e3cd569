//! The broker-to-broker link. Brokers exchange [`Rpc`]s and [`RpcReply`]s: openraft's own
//! messages (AppendEntries, Vote, a full snapshot) and metadata writes forwarded to the leader.
//!
//! Over TCP ([`TcpTransport`], [`serve`]) on `--cluster-listen`, a listener of its own that
//! clients never reach: each frame is a `tokio-util` `LengthDelimitedCodec` frame (a 4-byte
//! big-endian length, then the payload) holding one value: the handshake in JSON (`serde_json`),
//! the messages after it with `postcard` (link version 3). The connecting
//! broker first sends a [`Hello`] naming [`LINK_VERSION`]; a broker speaking another version
//! answers with an error naming both and closes the connection, so mixed versions fail loudly
//! instead of misreading each other. Then requests and replies alternate on the connection.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Snapshot, SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::replica::{PartitionId, PartitionReply, PartitionRpc};
use super::{Cluster, Command, Committed, Joined, MetaRaft, TypeConfig, WriteRefused};

/// The version of the link's messages; a peer with another is refused. Version 2 added the
/// partition groups' messages ([`Rpc::Partition`]); version 3 encodes the messages after the
/// [`Hello`] with `postcard` (a partition entry's records as bytes) instead of JSON.
pub const LINK_VERSION: u32 = 3;

/// The largest frame on the link (a metadata snapshot is the largest message).
pub const MAX_LINK_FRAME: usize = 64 << 20;

/// How long a connection attempt may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The first frame on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always `"streambus-cluster"`: what a client connecting here by mistake lacks.
    pub link: String,
    /// The sender's [`LINK_VERSION`].
    pub version: u32,
    /// The sender's node id.
    pub from: u64,
}

/// The answer to a [`Hello`]: `Ok` or why the connection is refused.
pub type HelloReply = Result<(), String>;

/// The link's name in a [`Hello`].
pub const LINK_NAME: &str = "streambus-cluster";

/// A request from one broker to another.
#[derive(Debug, Serialize, Deserialize)]
#[non_exhaustive]
#[allow(clippy::large_enum_variant)]
pub enum Rpc {
    /// Raft log replication and heartbeats.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// A Raft election.
    Vote(VoteRequest<u64>),
    /// A whole snapshot of the metadata, to a broker too far behind for the log.
    Snapshot {
        /// The leader's vote.
        vote: Vote<u64>,
        /// What the snapshot covers.
        meta: SnapshotMeta<u64, BasicNode>,
        /// The state machine, serialised.
        data: Vec<u8>,
    },
    /// A metadata write for the leader.
    Write(Command),
    /// A broker asks to become a voter of the metadata group (growing the cluster, or coming
    /// back with a wiped data directory).
    Join {
        /// Its node id.
        node: u64,
        /// Its cluster listener.
        addr: String,
    },
    /// A message to one partition's Raft group (partition replication); all groups between
    /// two brokers share the link.
    Partition {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The group's message.
        rpc: PartitionRpc,
    },
}

/// The answer to an [`Rpc`] of the same name.
#[derive(Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RpcReply {
    /// To [`Rpc::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// To [`Rpc::Vote`].
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// To [`Rpc::Snapshot`].
    Snapshot(Result<SnapshotResponse<u64>, Fatal<u64>>),
    /// To [`Rpc::Write`].
    Write(Result<Committed, WriteRefused>),
    /// To [`Rpc::Join`].
    Join(Result<Joined, WriteRefused>),
    /// To [`Rpc::Partition`].
    Partition(PartitionReply),
}

impl RpcReply {
    /// The reply's name, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AppendEntries(_) => "AppendEntries",
            Self::Vote(_) => "Vote",
            Self::Snapshot(_) => "Snapshot",
            Self::Write(_) => "Write",
            Self::Join(_) => "Join",
            Self::Partition(_) => "Partition",
        }
    }
}

/// Why an [`Rpc`] got no reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The peer could not be reached or the connection broke.
    #[error("{addr}: {source}")]
    Io {
        /// The peer's cluster address.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The peer refused the connection (another link version, …).
    #[error("{addr} refused the cluster link: {reason}")]
    Refused {
        /// The peer's cluster address.
        addr: String,
        /// Its reason.
        reason: String,
    },
    /// A message could not be encoded or decoded.
    #[error("{addr}: a cluster message could not be read: {source}")]
    Codec {
        /// The peer's cluster address.
        addr: String,
        /// The codec error.
        source: CodecError,
    },
    /// No reply in time.
    #[error("{addr}: no reply within {timeout:?}")]
    Timeout {
        /// The peer's cluster address.
        addr: String,
        /// The limit.
        timeout: Duration,
    },
}

/// Why a message on the link could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The handshake's JSON ([`Hello`] and its answer).
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The `postcard` encoding of the messages after the handshake.
    #[error("postcard: {0}")]
    Postcard(#[from] postcard::Error),
}

/// A boxed future, for the object-safe [`Transport`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Carries [`Rpc`]s to other brokers.
pub trait Transport: Send + Sync + std::fmt::Debug + 'static {
    /// Sends `rpc` to broker `target` at `node` and waits for its reply.
    fn call(
        &self,
        target: u64,
        node: &BasicNode,
        rpc: Rpc,
    ) -> BoxFuture<'static, Result<RpcReply, TransportError>>;
}

/// Answers an [`Rpc`] with this broker's Raft (the receiving side of every transport).
pub async fn answer(raft: &MetaRaft, cluster: Option<&Cluster>, rpc: Rpc) -> RpcReply {
    match rpc {
        Rpc::AppendEntries(r) => RpcReply::AppendEntries(raft.append_entries(r).await),
        // Not granted while joining (a broker that lost its log may have voted in this term).
        Rpc::Vote(r) if cluster.is_some_and(Cluster::is_joining) => {
            RpcReply::Vote(Ok(VoteResponse::new(r.vote, None, false)))
        }
        Rpc::Vote(r) => RpcReply::Vote(raft.vote(r).await),
        Rpc::Snapshot { vote, meta, data } => RpcReply::Snapshot(
            raft.install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: Box::new(data),
                },
            )
            .await,
        ),
        Rpc::Write(command) => RpcReply::Write(match cluster {
            Some(c) => c.write_here(command).await,
            None => Err(WriteRefused::Stopped("not serving writes".into())),
        }),
        Rpc::Join { node, addr } => RpcReply::Join(match cluster {
            Some(c) => c.join_here(node, addr).await,
            None => Err(WriteRefused::Stopped("not serving joins".into())),
        }),
        Rpc::Partition {
            topic,
            partition,
            rpc,
        } => RpcReply::Partition(match cluster {
            Some(c) => {
                let had_leader = || c.partition_had_leader(&topic, partition);
                let id = PartitionId {
                    topic: topic.clone(),
                    partition,
                };
                c.replicas().answer(&id, rpc, had_leader).await
            }
            None => PartitionReply::NoGroup("not serving partition groups".into()),
        }),
    }
}

/// openraft's network over a [`Transport`].
#[derive(Debug, Clone)]
pub struct NetworkFactory {
    transport: Arc<dyn Transport>,
}

impl NetworkFactory {
    /// Over `transport`.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Self { transport }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Network {
        Network {
            target,
            node: node.clone(),
            transport: Arc::clone(&self.transport),
        }
    }
}

/// The link to one broker.
#[derive(Debug)]
pub struct Network {
    target: u64,
    node: BasicNode,
    transport: Arc<dyn Transport>,
}

type RaftRpcError = RPCError<u64, BasicNode, RaftError<u64>>;

impl Network {
    async fn call(&self, rpc: Rpc, option: &RPCOption) -> Result<RpcReply, TransportError> {
        let ttl = option.hard_ttl();
        match tokio::time::timeout(ttl, self.transport.call(self.target, &self.node, rpc)).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout {
                addr: self.node.addr.clone(),
                timeout: ttl,
            }),
        }
    }

    fn unexpected(&self, reply: &RpcReply) -> NetworkError {
        NetworkError::new(&std::io::Error::other(format!(
            "broker {} answered with a {} reply",
            self.target,
            reply.kind()
        )))
    }
}

fn unreachable(e: &TransportError) -> Unreachable {
    Unreachable::new(e)
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RaftRpcError> {
        match self.call(Rpc::AppendEntries(rpc), &option).await {
            Ok(RpcReply::AppendEntries(r)) => r.map_err(|e| {
                RPCError::RemoteError(RemoteError::new_with_node(
                    self.target,
                    self.node.clone(),
                    e,
                ))
            }),
            Ok(other) => Err(RPCError::Network(self.unexpected(&other))),
            Err(e) => Err(RPCError::Unreachable(unreachable(&e))),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RaftRpcError> {
        match self.call(Rpc::Vote(rpc), &option).await {
            Ok(RpcReply::Vote(r)) => r.map_err(|e| {
                RPCError::RemoteError(RemoteError::new_with_node(
                    self.target,
                    self.node.clone(),
                    e,
                ))
            }),
            Ok(other) => Err(RPCError::Network(self.unexpected(&other))),
            Err(e) => Err(RPCError::Unreachable(unreachable(&e))),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        let rpc = Rpc::Snapshot {
            vote,
            meta: snapshot.meta,
            data: *snapshot.snapshot,
        };
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = self.call(rpc, &option) => r,
        };
        match reply {
            Ok(RpcReply::Snapshot(r)) => r.map_err(|e| {
                StreamingError::RemoteError(RemoteError::new_with_node(
                    self.target,
                    self.node.clone(),
                    e,
                ))
            }),
            Ok(other) => Err(StreamingError::Network(self.unexpected(&other))),
            Err(e) => Err(StreamingError::Unreachable(unreachable(&e))),
        }
    }
}

/// What a link runs over: a TCP stream, or TLS over it.
pub trait LinkIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> LinkIo for T {}

type Link = Framed<Box<dyn LinkIo>, LengthDelimitedCodec>;

/// Mutual TLS on the link (`--cluster-tls-*`): every broker accepts peers with `server` (which
/// requires a certificate signed by the brokers' CA) and connects to them with `client` (its
/// own certificate, and the same CA to verify theirs).
#[derive(Clone)]
pub struct LinkTls {
    /// Accepting peers.
    pub server: tokio_rustls::TlsAcceptor,
    /// Connecting to peers.
    pub client: tokio_rustls::TlsConnector,
}

impl LinkTls {
    /// From the rustls configurations.
    pub fn new(
        server: Arc<streambus_adapters::tls::rustls::ServerConfig>,
        client: Arc<streambus_adapters::tls::rustls::ClientConfig>,
    ) -> Self {
        Self {
            server: server.into(),
            client: client.into(),
        }
    }
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkTls")
    }
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_LINK_FRAME)
        .new_codec()
}

/// How a frame's value is encoded: the handshake in JSON (so that a peer of any version reads
/// the [`Hello`] and gets the refusal naming both versions), everything after it with
/// `postcard`.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    Json,
    Postcard,
}

/// Encodes `value` as a frame's payload (see [`encoding_sizes`] for what each costs).
fn encode<T: Serialize>(encoding: Encoding, value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(match encoding {
        Encoding::Json => serde_json::to_vec(value)?,
        Encoding::Postcard => postcard::to_stdvec(value)?,
    })
}

fn decode<T: serde::de::DeserializeOwned>(
    encoding: Encoding,
    frame: &[u8],
) -> Result<T, CodecError> {
    Ok(match encoding {
        Encoding::Json => serde_json::from_slice(frame)?,
        Encoding::Postcard => postcard::from_bytes(frame)?,
    })
}

/// The bytes of `value` as the link encodes a message, and as version 2 did (JSON): for the
/// tests that measure the encoding.
#[cfg(test)]
pub(crate) fn encoding_sizes<T: Serialize>(value: &T) -> (usize, usize) {
    let len = |e| encode(e, value).map_or(0, |b| b.len());
    (len(Encoding::Postcard), len(Encoding::Json))
}

async fn send<T: Serialize>(
    link: &mut Link,
    addr: &str,
    encoding: Encoding,
    value: &T,
) -> Result<(), TransportError> {
    let bytes = encode(encoding, value).map_err(|source| TransportError::Codec {
        addr: addr.to_owned(),
        source,
    })?;
    link.send(bytes::Bytes::from(bytes))
        .await
        .map_err(|source| TransportError::Io {
            addr: addr.to_owned(),
            source,
        })
}

async fn receive<T: serde::de::DeserializeOwned>(
    link: &mut Link,
    addr: &str,
    encoding: Encoding,
) -> Result<T, TransportError> {
    let frame = match link.next().await {
        Some(Ok(f)) => f,
        Some(Err(source)) => {
            return Err(TransportError::Io {
                addr: addr.to_owned(),
                source,
            });
        }
        None => {
            return Err(TransportError::Io {
                addr: addr.to_owned(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
    };
    decode(encoding, &frame).map_err(|source| TransportError::Codec {
        addr: addr.to_owned(),
        source,
    })
}

/// The TCP transport: two connections per peer, one for Raft's RPCs and one for forwarded
/// writes and joins (which wait for a commit and must not hold up heartbeats and votes), each opened on
/// first use with a [`Hello`] and opened again after it breaks.
pub struct TcpTransport {
    from: u64,
    tls: Option<LinkTls>,
    /// By peer and whether the link carries forwarded writes.
    links: std::sync::Mutex<BTreeMap<(u64, bool), Slot>>,
}

/// One connection to a peer, held across a whole request and reply.
type Slot = Arc<Mutex<Option<Link>>>;

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("from", &self.from)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl TcpTransport {
    /// A transport for broker `from`, in plaintext.
    pub fn new(from: u64) -> Arc<Self> {
        Self::with_tls(from, None)
    }

    /// A transport for broker `from`, over mutual TLS when `tls` is given.
    pub fn with_tls(from: u64, tls: Option<LinkTls>) -> Arc<Self> {
        Arc::new(Self {
            from,
            tls,
            links: std::sync::Mutex::default(),
        })
    }

    fn slot(&self, target: u64, writes: bool) -> Slot {
        let mut links = self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(links.entry((target, writes)).or_default())
    }
}

/// Opens a link to `addr` (over mutual TLS with `tls`) and says hello.
pub async fn connect(
    addr: &str,
    hello: &Hello,
    tls: Option<&LinkTls>,
) -> Result<Link, TransportError> {
    let io = |source| TransportError::Io {
        addr: addr.to_owned(),
        source,
    };
    let timeout = || TransportError::Timeout {
        addr: addr.to_owned(),
        timeout: CALL_TIMEOUT,
    };
    let stream = tokio::time::timeout(CALL_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| timeout())?
        .map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let stream: Box<dyn LinkIo> = match tls {
        None => Box::new(stream),
        Some(tls) => {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            let name = streambus_adapters::tls::server_name(host).map_err(|e| {
                TransportError::Refused {
                    addr: addr.to_owned(),
                    reason: e.to_string(),
                }
            })?;
            let tls = tokio::time::timeout(CALL_TIMEOUT, tls.client.connect(name, stream))
                .await
                .map_err(|_| timeout())?
                .map_err(|e| TransportError::Refused {
                    addr: addr.to_owned(),
                    reason: format!("TLS handshake: {e}"),
                })?;
            Box::new(tls)
        }
    };
    let mut link = Framed::new(stream, codec());
    send(&mut link, addr, Encoding::Json, hello).await?;
    match receive::<HelloReply>(&mut link, addr, Encoding::Json).await? {
        Ok(()) => Ok(link),
        Err(reason) => Err(TransportError::Refused {
            addr: addr.to_owned(),
            reason,
        }),
    }
}

impl Transport for TcpTransport {
    fn call(
        &self,
        target: u64,
        node: &BasicNode,
        rpc: Rpc,
    ) -> BoxFuture<'static, Result<RpcReply, TransportError>> {
        // Writes and joins wait for a commit: never in front of heartbeats and votes.
        let slot = self.slot(target, matches!(rpc, Rpc::Write(_) | Rpc::Join { .. }));
        let addr = node.addr.clone();
        let tls = self.tls.clone();
        let hello = Hello {
            link: LINK_NAME.into(),
            version: LINK_VERSION,
            from: self.from,
        };
        Box::pin(async move {
            let mut guard = slot.lock().await;
            let mut link = match guard.take() {
                Some(l) => l,
                None => connect(&addr, &hello, tls.as_ref()).await?,
            };
            send(&mut link, &addr, Encoding::Postcard, &rpc).await?;
            let reply = receive::<RpcReply>(&mut link, &addr, Encoding::Postcard).await?;
            // Kept only after a whole exchange: a broken or timed-out one is reopened.
            *guard = Some(link);
            Ok(reply)
        })
    }
}

/// Serves the cluster link on `listener` for `cluster` (over mutual TLS with `tls`) until the
/// runtime stops.
pub async fn serve(listener: TcpListener, cluster: Cluster, tls: Option<LinkTls>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("accepting on the cluster listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cluster = cluster.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_link(stream, &cluster, tls.as_ref()).await {
                tracing::debug!(%peer, "cluster link closed: {e}");
            }
        });
    }
}

async fn serve_link(
    stream: TcpStream,
    cluster: &Cluster,
    tls: Option<&LinkTls>,
) -> Result<(), TransportError> {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let _ = stream.set_nodelay(true);
    let stream: Box<dyn LinkIo> = match tls {
        None => Box::new(stream),
        Some(tls) => match tokio::time::timeout(CALL_TIMEOUT, tls.server.accept(stream)).await {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => {
                // A peer without a certificate the brokers' CA signed, or not speaking TLS.
                tracing::warn!(%peer, "refused a cluster link: TLS handshake: {e}");
                return Ok(());
            }
            Err(_) => {
                tracing::warn!(%peer, "refused a cluster link: no TLS handshake within {CALL_TIMEOUT:?}");
                return Ok(());
            }
        },
    };
    let mut link = Framed::new(stream, codec());
    let refusal = match receive::<Hello>(&mut link, &peer, Encoding::Json).await {
        Ok(h) if h.link == LINK_NAME && h.version == LINK_VERSION => None,
        Ok(h) if h.link == LINK_NAME => Some(format!(
            "cluster link version {} is not supported: broker {} speaks version {LINK_VERSION}",
            h.version,
            cluster.node_id()
        )),
        Ok(h) => Some(format!("{:?} is not the StreamBus cluster link", h.link)),
        Err(TransportError::Codec { .. }) => Some(format!(
            "the first frame is not a cluster link hello (version {LINK_VERSION}); clients connect to the client port, not --cluster-listen"
        )),
        Err(e) => return Err(e),
    };
    if let Some(reason) = refusal {
        tracing::warn!(%peer, "refused a cluster link: {reason}");
        send(&mut link, &peer, Encoding::Json, &HelloReply::Err(reason)).await?;
        return Ok(());
    }
    send(&mut link, &peer, Encoding::Json, &HelloReply::Ok(())).await?;
    loop {
        let rpc = match receive::<Rpc>(&mut link, &peer, Encoding::Postcard).await {
            Ok(r) => r,
            Err(TransportError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let reply = answer(cluster.raft(), Some(cluster), rpc).await;
        send(&mut link, &peer, Encoding::Postcard, &reply).await?;
    }
}
