//! [`Client`]: the connection pool and the admin calls.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

use streambus_adapters::tls::{self, ClientTls, rustls};

use crate::conn::{self, Callback, Job, LoadGuard, MAX_IN_FLIGHT, Reply, ReplyTo, Req};
use crate::error::{Context, Error, ErrorCode, Result};
use crate::route::RouteTable;
use crate::types::{Health, Metadata, PartitionOffsets, TopicInfo};

/// Settings of a [`Client`]; build one with [`Client::builder`]. Every duration is at most
/// 365 days ([`Error::Config`] names one that is longer).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Connections to each broker at most (default 2). They are opened on demand.
    pub pool_size: usize,
    /// Requests in flight per connection at most (default 64, at most 128). When every
    /// connection is this busy, a call waits for room up to its timeout.
    pub max_in_flight: usize,
    /// Time to open one TCP connection (default 10 s).
    pub connect_timeout: Duration,
    /// Time for one request, from the call to its answer, waiting for a connection included
    /// (default 30 s). A long-poll fetch gets its wait on top.
    pub request_timeout: Duration,
    /// The largest frame sent or accepted (default 10 MiB, the broker's default). Each
    /// connection reserves two buffers of this size (touched only as far as used).
    pub max_frame_len: u32,
    /// First delay before dialling again after a failed dial (default 50 ms); it doubles up to
    /// [`reconnect_backoff_max`](Self::reconnect_backoff_max), with random jitter. A Fetch or
    /// GetOffset whose partition leader was lost is retried after the same backoff, the
    /// Metadata read every `reconnect_backoff` meanwhile (at once when it names a new leader).
    pub reconnect_backoff: Duration,
    /// Largest delay between dials (default 5 s).
    pub reconnect_backoff_max: Duration,
    /// The longest long-poll wait a consumer may ask for (default 30 s, the broker's cap).
    pub max_poll_wait: Duration,
    /// Connect over TLS with these settings (default `None`: plaintext).
    pub tls: Option<TlsOptions>,
    /// The token each connection authenticates with right after it is opened, and again after
    /// every reconnect (protocol §6.3; default none). A refused token fails the call that
    /// needed the connection with [`Error::Broker`] code AuthenticationFailed (40), which is not
    /// retriable.
    pub token: Option<Token>,
    /// How often the client reads the cluster's Metadata again even when nothing failed
    /// (default 5 min; must not be zero). It is also read at once after a NotLeader and after
    /// a lost connection to a partition's leader.
    pub metadata_refresh: Duration,
}

/// The TLS settings of a [`Client`]: whom to trust, what to present, and the name to check.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct TlsOptions {
    /// A PEM file of the CA certificates to trust; `None`: the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain and its private key (PEM files), for a broker that requires
    /// client certificates (mTLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The name the broker's certificate must carry; `None`: the host of the broker address.
    pub server_name: Option<String>,
    /// A rustls configuration of your own, used instead of `ca_file` and `client_cert`.
    pub config: Option<Arc<rustls::ClientConfig>>,
}

impl TlsOptions {
    /// What a TLS dial to `addr` (`host:port`) needs: the rustls configuration (its files
    /// loaded) and the name the broker's certificate must carry. The client does this once;
    /// it is public for tools that open connections of their own with the adapters' drivers.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when a file cannot be read or the name is not a valid server name.
    pub fn client_tls(&self, addr: &str) -> Result<ClientTls> {
        let config = match &self.config {
            Some(c) => Arc::clone(c),
            None => tls::client_config(
                self.ca_file.as_deref(),
                self.client_cert
                    .as_ref()
                    .map(|(c, k)| (c.as_path(), k.as_path())),
            )
            .map_err(|e| Error::config("tls", e.to_string()))?,
        };
        let host = match &self.server_name {
            Some(name) => name.as_str(),
            None => addr.rsplit_once(':').map_or(addr, |(host, _)| host),
        };
        let server_name =
            tls::server_name(host).map_err(|e| Error::config("tls_server_name", e.to_string()))?;
        Ok(ClientTls {
            config,
            server_name,
        })
    }
}

/// A secret token for [`ClientConfig::token`]. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl Token {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(Arc::from(token.into()))
    }

    /// The token itself (to send it).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            pool_size: 2,
            max_in_flight: 64,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_frame_len: streambus_core::DEFAULT_MAX_FRAME_LEN,
            reconnect_backoff: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(5),
            max_poll_wait: Duration::from_secs(30),
            tls: None,
            token: None,
            metadata_refresh: Duration::from_secs(300),
        }
    }
}

impl ClientConfig {
    fn validate(&self) -> Result<()> {
        if self.pool_size == 0 {
            return Err(Error::config("pool_size", "must be at least 1"));
        }
        if self.max_in_flight == 0 || self.max_in_flight > MAX_IN_FLIGHT {
            return Err(Error::config(
                "max_in_flight",
                format!("must be 1..={MAX_IN_FLIGHT}, got {}", self.max_in_flight),
            ));
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("metadata_refresh", self.metadata_refresh),
        ] {
            if d.is_zero() {
                return Err(Error::config(name, "must be greater than zero"));
            }
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("metadata_refresh", self.metadata_refresh),
            ("reconnect_backoff", self.reconnect_backoff),
            ("reconnect_backoff_max", self.reconnect_backoff_max),
            ("max_poll_wait", self.max_poll_wait),
        ] {
            Error::check_duration(name, d)?;
        }
        if self.token.as_ref().is_some_and(|t| t.expose().is_empty()) {
            return Err(Error::config("token", "must not be empty"));
        }
        if self.max_frame_len < 64 {
            return Err(Error::config(
                "max_frame_len",
                format!("must be at least 64 bytes, got {}", self.max_frame_len),
            ));
        }
        Ok(())
    }
}

/// Builds a [`Client`]: `Client::builder().pool_size(4).connect("host:9092").await`.
#[derive(Debug, Clone, Default)]
pub struct ClientBuilder {
    config: ClientConfig,
}

impl ClientBuilder {
    /// Sets [`ClientConfig::pool_size`].
    pub fn pool_size(mut self, n: usize) -> Self {
        self.config.pool_size = n;
        self
    }
    /// Sets [`ClientConfig::max_in_flight`].
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config.max_in_flight = n;
        self
    }
    /// Sets [`ClientConfig::connect_timeout`].
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.config.connect_timeout = d;
        self
    }
    /// Sets [`ClientConfig::request_timeout`].
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.config.request_timeout = d;
        self
    }
    /// Sets [`ClientConfig::max_frame_len`].
    pub fn max_frame_len(mut self, n: u32) -> Self {
        self.config.max_frame_len = n;
        self
    }
    /// Sets [`ClientConfig::reconnect_backoff`] and
    /// [`ClientConfig::reconnect_backoff_max`].
    pub fn reconnect_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.config.reconnect_backoff = first;
        self.config.reconnect_backoff_max = max;
        self
    }
    /// Sets [`ClientConfig::max_poll_wait`].
    pub fn max_poll_wait(mut self, d: Duration) -> Self {
        self.config.max_poll_wait = d;
        self
    }
    /// Connects over TLS, trusting the system's trust store unless
    /// [`tls_ca_file`](Self::tls_ca_file) says otherwise.
    pub fn tls(mut self) -> Self {
        self.config.tls.get_or_insert_default();
        self
    }
    /// Connects over TLS, trusting the CA certificates in `path` (PEM).
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.tls.get_or_insert_default().ca_file = Some(path.into());
        self
    }
    /// Connects over TLS presenting this client certificate chain and key (PEM files), for a
    /// broker that requires client certificates.
    pub fn tls_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.config.tls.get_or_insert_default().client_cert = Some((cert.into(), key.into()));
        self
    }
    /// Connects over TLS checking the broker's certificate against `name` instead of the host
    /// of the broker address.
    pub fn tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.config.tls.get_or_insert_default().server_name = Some(name.into());
        self
    }
    /// Sets every TLS setting at once (`None`: plaintext).
    pub fn tls_options(mut self, options: Option<TlsOptions>) -> Self {
        self.config.tls = options;
        self
    }
    /// Connects over TLS with a rustls configuration of your own (built with
    /// [`streambus_client::rustls`](crate::rustls) and a crypto provider).
    pub fn tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.config.tls.get_or_insert_default().config = Some(config);
        self
    }
    /// Sets [`ClientConfig::token`]: every connection authenticates with it (§6.3).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.config.token = Some(Token::new(token));
        self
    }
    /// Sets [`ClientConfig::metadata_refresh`].
    pub fn metadata_refresh(mut self, d: Duration) -> Self {
        self.config.metadata_refresh = d;
        self
    }
    /// The settings so far.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Validates the settings and connects to `addr`: one broker (`host:port`, resolved again
    /// at every dial) or a comma-separated bootstrap list (`"h1:9092,h2:9092"`, see
    /// [`connect_bootstrap`](Self::connect_bootstrap)). Must run inside a tokio runtime.
    pub async fn connect(self, addr: impl Into<String>) -> Result<Client> {
        let addr = addr.into();
        self.connect_bootstrap(addr.split(',').map(str::trim)).await
    }

    /// Validates the settings and connects to the first broker of `addrs` (each `host:port`)
    /// that answers a Metadata request, in order, and learns the cluster's brokers and
    /// partition leaders from that answer. Partition requests then go to each partition's
    /// leader, and the others to this broker. When none answers, the error is
    /// [`Error::Unreachable`], naming each address and why. A single address is only dialled
    /// (its Metadata is read when a call first needs it) and fails with its own error, as
    /// [`connect`](Self::connect) always did. Must run inside a tokio runtime.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), streambus_client::Error> {
    /// use streambus_client::Client;
    /// let client = Client::builder()
    ///     .connect_bootstrap(["10.0.0.1:9092", "10.0.0.2:9092", "10.0.0.3:9092"])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_bootstrap<I, S>(self, addrs: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.validate()?;
        let addrs: Vec<String> = addrs.into_iter().map(Into::into).collect();
        if addrs.is_empty() {
            return Err(Error::config("addr", "no broker address given"));
        }
        for addr in &addrs {
            let port_ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(Error::config(
                    "addr",
                    format!("{addr:?} is not host:port (like 127.0.0.1:9092)"),
                ));
            }
        }
        // One address: dialled as always, the Metadata read when a call first needs it (a
        // topic's partition count, a NotLeader). Several: the first to answer a Metadata.
        let ask_metadata = addrs.len() > 1;
        let mut failed = Vec::new();
        for addr in addrs {
            let client = Client::new(addr.clone(), self.config.clone())?;
            match client.bootstrap(ask_metadata).await {
                Ok(()) => {
                    client.start_refresher();
                    return Ok(client);
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "bootstrap broker did not answer");
                    failed.push((addr, e));
                }
            }
        }
        match failed.len() {
            1 => Err(failed.swap_remove(0).1),
            _ => Err(Error::unreachable(failed)),
        }
    }
}

/// A handle to a broker or a cluster: a pool of pipelined connections per broker, and the
/// admin calls. Cheap to clone; clones share the pools.
///
/// **Routing.** The client reads the cluster's Metadata (protocol §6.4) when it connects
/// through a bootstrap list (from one address: when a call first needs it): Produce, Fetch and
/// GetOffset of a partition go to that partition's leader, over a pool opened the first time
/// a partition it leads is used (and closed when the broker leaves the Metadata); the admin
/// calls go to the bootstrap broker (any broker forwards them), or, once a Metadata,
/// ListTopics or Health call found it unreachable, to the next known broker that answered.
/// The Metadata is read again on a NotLeader answer (the leader the message names is not
/// trusted: Metadata is), on a lost connection to a leader, and every
/// [`metadata_refresh`](ClientConfig::metadata_refresh); fetches and offset reads are then
/// retried within their timeout, and the [`Producer`](crate::Producer) retries its batch
/// within its delivery timeout (with the same sequence numbers, so an idempotent batch lands
/// once). A single broker is not routed: everything goes over the connection it answered on.
///
/// ```no_run
/// # async fn demo() -> Result<(), streambus_client::Error> {
/// use streambus_client::Client;
/// let client = Client::connect("127.0.0.1:9092").await?;
/// client.create_topic("orders", 3).await?;
/// for t in client.list_topics().await? {
///     println!("{} has {} partitions", t.name, t.partitions);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: ClientConfig,
    /// The bootstrap broker's pool: admin calls, and partitions whose leader is not known.
    pub(crate) pool: Arc<Pool>,
    capacity: Arc<Semaphore>,
    /// The brokers and partition leaders, and a pool per broker address.
    routing: RwLock<Routing>,
    /// The latest Metadata lists several brokers (read without the lock: a single broker's
    /// calls never take it).
    cluster: AtomicBool,
    /// The periodic Metadata refresh, stopped when the client goes.
    refresher: OnceLock<tokio::task::AbortHandle>,
    /// Topics whose Metadata a [`Client::refresh_soon`] task is reading.
    refreshing: Mutex<HashSet<Arc<str>>>,
}

#[derive(Debug, Default)]
struct Routing {
    table: RouteTable,
    /// The brokers' pools other than the bootstrap one, by client address.
    pools: HashMap<Arc<str>, Arc<Pool>>,
    /// The broker admin calls go to instead of the bootstrap one, since the bootstrap one
    /// was found unreachable and this one answered (cleared when it leaves the Metadata).
    admin: Option<Arc<str>>,
    /// Pools of brokers that left the Metadata, kept until no request is in flight on them
    /// (an answer may still come; closing a connection fails what it holds): dropped at a
    /// later update once idle.
    retiring: Vec<Arc<Pool>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.refresher.get() {
            task.abort();
        }
    }
}

impl Inner {
    fn refreshing(&self) -> MutexGuard<'_, HashSet<Arc<str>>> {
        self.refreshing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn routing(&self) -> RwLockReadGuard<'_, Routing> {
        self.routing.read().unwrap_or_else(|p| p.into_inner())
    }

    fn routing_mut(&self) -> RwLockWriteGuard<'_, Routing> {
        self.routing.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Client {
    /// Connects with the default settings.
    pub async fn connect(addr: impl Into<String>) -> Result<Self> {
        Self::builder().connect(addr).await
    }

    /// A builder for custom settings.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    fn new(addr: String, config: ClientConfig) -> Result<Self> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| Error::config("runtime", format!("no tokio runtime: {e}")))?;
        let tls = match &config.tls {
            Some(t) => Some(t.client_tls(&addr)?),
            None => None,
        };
        let pool = Arc::new(Pool::new(addr, config.clone(), tls, runtime));
        let capacity = Arc::new(Semaphore::new(config.pool_size * config.max_in_flight));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                pool,
                capacity,
                routing: RwLock::default(),
                cluster: AtomicBool::new(false),
                refresher: OnceLock::new(),
                refreshing: Mutex::default(),
            }),
        })
    }

    /// Connects to the bootstrap broker (dial and authentication, as every connection) and,
    /// with `ask_metadata`, reads the Metadata of every topic from it. A broker that answers
    /// Metadata with an error is live: the client connects, and learns the routes later.
    async fn bootstrap(&self, ask_metadata: bool) -> Result<()> {
        let ctx = Context::new("connect");
        let deadline = Instant::now() + self.inner.config.request_timeout;
        let (conn, _load) = self.inner.pool.get(deadline, &ctx, false).await?;
        drop(conn);
        if !ask_metadata {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let req = Req::Metadata {
            topics: Arc::from([]),
        };
        match self.call_resending(req, &ctx, left, None).await {
            Ok(Reply::Metadata(m)) => {
                self.learn(&m, true);
                Ok(())
            }
            Ok(other) => Err(mismatch(ctx, &other)),
            Err(Error::Broker { code, message, .. }) => {
                tracing::debug!(code = code.0, %message, "bootstrap Metadata refused");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Starts the periodic Metadata refresh.
    fn start_refresher(&self) {
        let every = self.inner.config.metadata_refresh;
        let task = self
            .inner
            .pool
            .runtime()
            .spawn(refresh_periodically(Arc::downgrade(&self.inner), every));
        let _ = self.inner.refresher.set(task.abort_handle());
    }

    /// Takes in a Metadata reply (`every_topic`: it answered a request for every topic):
    /// the routes change, and the pools of brokers no longer listed are closed.
    fn learn(&self, m: &Metadata, every_topic: bool) {
        let closed: Vec<Arc<Pool>> = {
            let mut r = self.inner.routing_mut();
            r.table.learn(m, every_topic);
            self.inner
                .cluster
                .store(r.table.is_cluster(), Ordering::Relaxed);
            let gone: Vec<Arc<str>> = r
                .pools
                .keys()
                .filter(|a| !r.table.has_address(a))
                .cloned()
                .collect();
            if r.admin.as_ref().is_some_and(|a| !r.table.has_address(a)) {
                r.admin = None;
            }
            let mut left: Vec<Arc<Pool>> = gone.iter().filter_map(|a| r.pools.remove(a)).collect();
            r.retiring.append(&mut left);
            let (idle, busy) = std::mem::take(&mut r.retiring)
                .into_iter()
                .partition(|p| p.is_idle());
            r.retiring = busy;
            idle
        };
        for pool in &closed {
            tracing::debug!(addr = %pool.addr, "broker left the metadata: its pool is closed");
        }
    }

    /// The pool of the broker at `addr` (the bootstrap pool for its own address), created
    /// (without dialling) the first time.
    fn pool_for(&self, addr: &Arc<str>) -> Result<Arc<Pool>> {
        if **addr == *self.inner.pool.addr {
            return Ok(self.inner.pool.clone());
        }
        if let Some(p) = self.inner.routing().pools.get(addr) {
            return Ok(p.clone());
        }
        // Outside the lock: TLS settings may read files.
        let tls = match &self.inner.config.tls {
            Some(t) => Some(t.client_tls(addr)?),
            None => None,
        };
        let mut r = self.inner.routing_mut();
        let pool = r.pools.entry(addr.clone()).or_insert_with(|| {
            tracing::debug!(%addr, "new broker pool");
            Arc::new(Pool::new(
                addr.to_string(),
                self.inner.config.clone(),
                tls,
                self.inner.pool.runtime().clone(),
            ))
        });
        Ok(pool.clone())
    }

    /// The pool of the request's partition leader; `None`: the bootstrap pool (a single
    /// broker, an admin request, or a leader not known).
    fn route(&self, req: &Req) -> Result<Option<Arc<Pool>>> {
        if !self.inner.cluster.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let (Req::Produce {
            topic, partition, ..
        }
        | Req::Fetch {
            topic, partition, ..
        }
        | Req::GetOffset { topic, partition }) = req
        else {
            return Ok(None);
        };
        let Some(addr) = self
            .inner
            .routing()
            .table
            .leader(topic, *partition)
            .cloned()
        else {
            return Ok(None);
        };
        self.pool_for(&addr).map(Some)
    }

    /// The leader address the table holds for a partition.
    pub(crate) fn leader_of(&self, topic: &str, partition: u32) -> Option<Arc<str>> {
        self.inner.routing().table.leader(topic, partition).cloned()
    }

    /// Whether `e` says the partition's leader is elsewhere or gone: NotLeader, or (in a
    /// cluster) a lost connection or no answer in time (a hung leader, whose kernel still
    /// takes connections). The Metadata is then read again and the request retried.
    pub(crate) fn leader_lost(&self, e: &Error) -> bool {
        e.code() == Some(ErrorCode::NOT_LEADER)
            || (e.broker_silent() && self.inner.cluster.load(Ordering::Relaxed))
    }

    /// Reads `topic`'s Metadata again in the background (within the request timeout), unless
    /// a read of it started this way is still going (the fetchers of many partitions of a hung
    /// leader time out together): the next call to one of its partitions goes to the leader
    /// named now. The task does not keep the client alive. Returns whether it started one.
    fn refresh_soon(&self, topic: &Arc<str>) -> bool {
        if !self.inner.refreshing().insert(topic.clone()) {
            return false;
        }
        let (inner, topic) = (Arc::downgrade(&self.inner), topic.clone());
        let deadline = Instant::now() + self.inner.config.request_timeout;
        self.inner.pool.runtime().spawn(async move {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let client = Client { inner };
            client.refresh(std::slice::from_ref(&topic), deadline).await;
            client.inner.refreshing().remove(&topic);
        });
        true
    }

    /// After a request to the partition's leader at `failed` met a lost leader
    /// ([`leader_lost`](Self::leader_lost)): reads the partition's Metadata again at once, then
    /// every `poll`, until it names a leader other than `failed` or `wait` (the retry's
    /// backoff) has passed, `deadline` at the latest. Returns whether it names another leader
    /// (then retry at once). A dead leader's survivors name it until they elect another (an
    /// election timeout or two); waiting out a whole exponential backoff instead left the
    /// retry up to seconds after the new leader was serving.
    pub(crate) async fn await_new_leader(
        &self,
        topic: &Arc<str>,
        partition: u32,
        failed: Option<&Arc<str>>,
        wait: Duration,
        poll: Duration,
        deadline: Instant,
    ) -> bool {
        let until = (Instant::now() + wait).min(deadline);
        loop {
            self.refresh(std::slice::from_ref(topic), deadline).await;
            let now = self.leader_of(topic, partition);
            if now.is_some() && now.as_ref() != failed {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // At least 1 ms apart, whatever the settings.
            tokio::time::sleep(poll.max(Duration::from_millis(1)).min(left)).await;
        }
    }

    /// Reads the Metadata of `topics` again (every topic when empty) by `deadline`, from any
    /// live broker; a failure is logged (the request that wanted it reports its own error).
    pub(crate) async fn refresh(&self, topics: &[Arc<str>], deadline: Instant) {
        let timeout = deadline
            .saturating_duration_since(Instant::now())
            .min(self.inner.config.request_timeout);
        if timeout.is_zero() {
            return;
        }
        let ctx = Context::new("metadata refresh");
        if let Err(e) = self.fetch_metadata(topics.into(), &ctx, timeout).await {
            tracing::debug!(error = %e, "metadata refresh failed");
        }
    }

    /// A Metadata request, from the bootstrap broker or (when it is unreachable) another
    /// broker the table knows; the reply updates the routes.
    async fn fetch_metadata(
        &self,
        topics: Arc<[Arc<str>]>,
        ctx: &Context,
        timeout: Duration,
    ) -> Result<Metadata> {
        let every_topic = topics.is_empty();
        match self
            .call_any(Req::Metadata { topics }, ctx, timeout)
            .await?
        {
            Reply::Metadata(m) => {
                self.learn(&m, every_topic);
                Ok(m)
            }
            other => Err(mismatch(ctx.clone(), &other)),
        }
    }

    /// The settings.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The address of the broker this client connected to (the first of a bootstrap list
    /// that answered), which serves its admin calls.
    pub fn broker(&self) -> &str {
        &self.inner.pool.addr
    }

    /// Sends one request and waits for its answer within `timeout` (waiting for a free
    /// connection included). A broken connection is replaced by the next call. Partition
    /// requests go to their leader; a Fetch or GetOffset that meets NotLeader or a lost
    /// leader reads the Metadata again and is retried within `timeout`; Metadata, ListTopics
    /// and Health go to another known broker when the bootstrap one is unreachable.
    pub(crate) async fn call(&self, req: Req, ctx: &Context, timeout: Duration) -> Result<Reply> {
        match &req {
            Req::Fetch {
                topic, partition, ..
            }
            | Req::GetOffset { topic, partition } => {
                let (topic, partition) = (topic.clone(), *partition);
                self.call_following(req, &topic, partition, ctx, timeout)
                    .await
            }
            Req::Metadata { .. } | Req::ListTopics | Req::Health => {
                self.call_any(req, ctx, timeout).await
            }
            Req::CreateTopic { .. } | Req::DeleteTopic { .. } => {
                self.call_admin_write(req, ctx, timeout).await
            }
            Req::Produce { .. } => self.call_resending(req, ctx, timeout, None).await,
        }
    }

    /// A read of one partition, at its leader; after NotLeader or a lost leader, the Metadata
    /// is read again and the read retried (at once when the leader moved, else after a
    /// backoff) until `timeout`.
    async fn call_following(
        &self,
        req: Req,
        topic: &Arc<str>,
        partition: u32,
        ctx: &Context,
        timeout: Duration,
    ) -> Result<Reply> {
        let deadline = Instant::now() + timeout;
        let mut backoff = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let target = self.leader_of(topic, partition);
            let e = match self.call_resending(req.clone(), ctx, left, None).await {
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            if !self.leader_lost(&e) {
                return Err(e);
            }
            let delay = backoff
                .get_or_insert_with(|| self.retry_backoff())
                .next()
                .unwrap_or(self.inner.config.reconnect_backoff_max);
            if Instant::now() + delay >= deadline {
                // No time left to wait for a new leader (an attempt that timed out used it
                // all): the table is read again meanwhile, so the next call goes to the
                // leader named now rather than to the same one.
                let _ = self.refresh_soon(topic);
                return Err(e);
            }
            tracing::debug!(%ctx, error = %e, "leader elsewhere or gone: reading Metadata");
            let poll = self.inner.config.reconnect_backoff;
            self.await_new_leader(topic, partition, target.as_ref(), delay, poll, deadline)
                .await;
        }
    }

    /// The backoff between retries of a partition read: the reconnect backoff's.
    fn retry_backoff(&self) -> ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(self.inner.config.reconnect_backoff)
            .with_max_delay(self.inner.config.reconnect_backoff_max)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// The pool admin calls go to: the bootstrap broker's, or (`Some`) the broker that
    /// answered since the bootstrap one was found unreachable.
    fn admin_pool(&self) -> Result<Option<Arc<Pool>>> {
        let admin = self.inner.routing().admin.clone();
        admin.map(|a| self.pool_for(&a)).transpose()
    }

    /// A read-only admin request to the admin broker (the bootstrap one at first), or, when
    /// it is unreachable (a connection error, or a timeout dialling it, writing to it or
    /// waiting for its answer), to the other brokers the Metadata lists, in turn; the one that
    /// answers takes the admin calls from then on. In a cluster each broker tried gets an
    /// equal share of the time left (at least the connect timeout), so one that hangs (its
    /// kernel still accepting connections) leaves time for the others.
    async fn call_any(&self, req: Req, ctx: &Context, timeout: Duration) -> Result<Reply> {
        let unreachable = |r: &Result<Reply>| r.as_ref().is_err_and(Error::broker_silent);
        self.call_failing_over(req, ctx, timeout, unreachable, Share::Each)
            .await
    }

    /// An admin write (CreateTopic, DeleteTopic), never sent twice where it may have been
    /// applied: to the admin broker, or to the next broker the Metadata lists when the
    /// request could not be sent (the broker refused the connection, or connecting timed
    /// out); a NotLeader (no metadata leader while the group elects one: nothing applied) is
    /// sent again after a backoff, until `timeout`.
    async fn call_admin_write(&self, req: Req, ctx: &Context, timeout: Duration) -> Result<Reply> {
        let deadline = Instant::now() + timeout;
        let mut backoff = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = self
                .call_failing_over(
                    req.clone(),
                    ctx,
                    left,
                    |r| r.as_ref().is_err_and(Error::never_sent),
                    Share::First,
                )
                .await;
            match &r {
                Err(e) if e.code() == Some(ErrorCode::NOT_LEADER) => {
                    let delay = backoff
                        .get_or_insert_with(|| self.retry_backoff())
                        .next()
                        .unwrap_or(self.inner.config.reconnect_backoff_max);
                    if Instant::now() + delay >= deadline {
                        return r;
                    }
                    tracing::debug!(%ctx, error = %e, "no metadata leader yet: sending again");
                    tokio::time::sleep(delay).await;
                }
                _ => return r,
            }
        }
    }

    /// `req` to the admin broker, or, when `unreachable` says its answer is one another broker
    /// may do better with, to the other brokers the Metadata lists, in turn, until `timeout`;
    /// the one that answers takes the admin calls from then on. `share`: how the time is
    /// split between the brokers tried.
    async fn call_failing_over(
        &self,
        req: Req,
        ctx: &Context,
        timeout: Duration,
        unreachable: fn(&Result<Reply>) -> bool,
        share: Share,
    ) -> Result<Reply> {
        let deadline = Instant::now() + timeout;
        let again = self
            .inner
            .cluster
            .load(Ordering::Relaxed)
            .then(|| req.clone());
        let admin = self.admin_pool()?;
        let tried: Arc<str> = match &admin {
            Some(p) => Arc::from(p.addr.as_str()),
            None => Arc::from(self.inner.pool.addr.as_str()),
        };
        let mut others: Vec<Arc<str>> = match &again {
            Some(_) => self.inner.routing().table.addresses(),
            None => Vec::new(),
        };
        others.retain(|a| *a != tried);
        // The time for one broker when `left` is shared by it and the `after` others still to
        // be tried: at least the connect timeout (a broker not connected yet is dialled
        // first), within what is left.
        let floor = self.inner.config.connect_timeout;
        let budget = |left: Duration, after: usize| match share {
            Share::First => left,
            Share::Each => (left / u32::try_from(after.saturating_add(1)).unwrap_or(u32::MAX))
                .max(floor)
                .min(left),
        };
        let first = self
            .call_resending(req, ctx, budget(timeout, others.len()), admin)
            .await;
        let Some(req) = again.filter(|_| unreachable(&first)) else {
            return first;
        };
        let count = others.len();
        for (i, addr) in others.into_iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let pool = self.pool_for(&addr)?;
            let after = count.saturating_sub(i + 1);
            let r = self
                .call_resending(req.clone(), ctx, budget(left, after), Some(pool))
                .await;
            if !unreachable(&r) {
                tracing::debug!(%addr, unreachable = %tried, "admin calls go to another broker");
                self.inner.routing_mut().admin = (*addr != *self.inner.pool.addr).then_some(addr);
                return r;
            }
            tracing::debug!(%addr, "broker unreachable; trying the next");
        }
        first
    }

    /// One request to its route (or to `to`); a read-only request that meets a connection
    /// closed under it is sent once more.
    async fn call_resending(
        &self,
        req: Req,
        ctx: &Context,
        timeout: Duration,
        to: Option<Arc<Pool>>,
    ) -> Result<Reply> {
        let pool = match to {
            Some(p) => Some(p),
            None => self.route(&req)?,
        };
        // A read-only request that meets a connection closed under it (the broker's idle
        // timeout, a restart) is sent once more on a fresh connection, within its timeout.
        let again = matches!(
            req,
            Req::Fetch { .. }
                | Req::GetOffset { .. }
                | Req::ListTopics
                | Req::Health
                | Req::Metadata { .. }
        )
        .then(|| req.clone());
        let started = Instant::now();
        match (
            self.call_once(pool.as_ref(), req, ctx, timeout).await,
            again,
        ) {
            (Err(Error::Io { .. }), Some(req)) if started.elapsed() < timeout => {
                let left = timeout.saturating_sub(started.elapsed());
                tracing::debug!(%ctx, "connection lost; sending the request again");
                self.call_once(pool.as_ref(), req, ctx, left).await
            }
            (result, _) => result,
        }
    }

    async fn call_once(
        &self,
        pool: Option<&Arc<Pool>>,
        req: Req,
        ctx: &Context,
        timeout: Duration,
    ) -> Result<Reply> {
        let pool = pool.unwrap_or(&self.inner.pool);
        let deadline = Instant::now() + timeout;
        let timed_out = |waiting| Error::TimedOut {
            context: ctx.clone(),
            waiting,
            after: timeout,
        };
        // No timer unless the client is saturated.
        let mut permit = match self.inner.capacity.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                tokio::time::timeout_at(deadline, self.inner.capacity.clone().acquire_owned())
                    .await
                    .map_err(|_| timed_out("waiting for a free connection slot"))?
                    .map_err(|_| Error::Closed {
                        context: ctx.clone(),
                        what: "client",
                    })?
            }
        };
        let (tx, rx) = oneshot::channel();
        // In a cluster, a partition request meeting its leader's pool in reconnect backoff
        // fails at once: its caller reads the Metadata (the leader may have moved) instead of
        // waiting out the backoff against a broker that may be gone.
        let fail_fast = self.inner.cluster.load(Ordering::Relaxed)
            && matches!(
                req,
                Req::Produce { .. } | Req::Fetch { .. } | Req::GetOffset { .. }
            );
        let (mut req, mut reply) = (req, ReplyTo::Caller(Some(tx)));
        // A connection that died since it was picked refuses the job: pick again, once (the
        // pool then knows it closed, and whether that counts as a failed dial). A second
        // one fails the call, with the request certainly not sent.
        let mut dead = 0u8;
        loop {
            let (conn, load) = pool.get(deadline, ctx, fail_fast).await?;
            let job = Job {
                req,
                reply,
                deadline,
                timeout,
                _permit: permit,
                _load: load,
                _slot: None,
            };
            match conn.send(job) {
                Ok(()) => break,
                Err(mpsc::error::SendError(j)) if dead == 0 => {
                    dead += 1;
                    (req, reply, permit) = (j.req, j.reply, j._permit)
                }
                Err(_) => {
                    return Err(Error::closed_before_sent(ctx.clone(), None));
                }
            }
        }
        // No timer of the caller's own: the connection task fails the call at `deadline`
        // (its one timer covers every call in flight, and races its writes too), and a job
        // is only handed to a connection with a free slot, so it never waits unwatched.
        match rx.await {
            Err(_) => Err(Error::closed_by_peer(ctx.clone())),
            Ok(r) => r.map_err(|e| e.with_context(ctx)),
        }
    }

    /// Sends one request now if a connection has room, without waiting; its result goes to
    /// `callback`, run by the connection task (by `timeout` at the latest). On `on` only when
    /// given (a connection an earlier call returned), else on any connection of the pool the
    /// request routes to. Returns the connection it went on, or the callback unused when
    /// that connection (or every one) has no room or is closed.
    pub(crate) fn try_send(
        &self,
        req: Req,
        timeout: Duration,
        callback: Callback,
        on: Option<&Lane>,
    ) -> std::result::Result<Lane, Callback> {
        let Ok(permit) = self.inner.capacity.clone().try_acquire_owned() else {
            return Err(callback);
        };
        let found = match on {
            Some(lane) if !lane.tx.is_closed() => {
                LoadGuard::try_new(&lane.load, self.inner.config.max_in_flight)
                    .map(|g| (lane.tx.clone(), g))
            }
            Some(_) => None,
            None => match self.route(&req) {
                Ok(routed) => routed.as_ref().unwrap_or(&self.inner.pool).try_get(),
                Err(_) => None,
            },
        };
        let Some((conn, load)) = found else {
            return Err(callback);
        };
        let lane = Lane {
            tx: conn.clone(),
            load: load.0.clone(),
        };
        let job = Job {
            req,
            reply: ReplyTo::Callback(Some(callback)),
            deadline: Instant::now() + timeout,
            timeout,
            _permit: permit,
            _load: load,
            _slot: None,
        };
        match conn.send(job) {
            Ok(()) => Ok(lane),
            Err(mpsc::error::SendError(mut job)) => {
                // Disarmed first, so dropping the job doesn't run it.
                let callback = match &mut job.reply {
                    ReplyTo::Callback(f) => f.take(),
                    ReplyTo::Caller(_) | ReplyTo::Ahead(_) => None,
                };
                drop(job);
                callback.map_or(Ok(lane), Err)
            }
        }
    }

    fn timeout(&self) -> Duration {
        self.inner.config.request_timeout
    }

    /// Creates `topic` with `partitions` partitions (1..=1024). Returns `true` when created,
    /// `false` when it already existed with that count; a different count is
    /// [`Error::Broker`] with code TopicExists (9).
    pub async fn create_topic(&self, topic: &str, partitions: u32) -> Result<bool> {
        self.create_topic_replicated(topic, partitions, 0).await
    }

    /// [`create_topic`](Self::create_topic) with `replication_factor` copies of each partition
    /// on distinct brokers of a cluster; 0 is the broker's default. A single broker takes 0 or 1
    /// and answers anything more with InvalidRequest (2).
    pub async fn create_topic_replicated(
        &self,
        topic: &str,
        partitions: u32,
        replication_factor: u16,
    ) -> Result<bool> {
        let ctx = Context::new("create topic").topic(topic);
        let t = validate_topic(topic, &ctx)?;
        if !(1..=1024).contains(&partitions) {
            return Err(Error::invalid(
                ctx,
                format!("partition count must be 1..=1024, got {partitions}"),
            ));
        }
        match self
            .call(
                Req::CreateTopic {
                    topic: t,
                    partitions,
                    replication_factor,
                },
                &ctx,
                self.timeout(),
            )
            .await?
        {
            Reply::Created(c) => Ok(c),
            other => Err(mismatch(ctx, &other)),
        }
    }

    /// Deletes `topic`; a missing topic is [`Error::Broker`] with code TopicNotFound (8).
    pub async fn delete_topic(&self, topic: &str) -> Result<()> {
        let ctx = Context::new("delete topic").topic(topic);
        let t = validate_topic(topic, &ctx)?;
        match self
            .call(Req::DeleteTopic { topic: t }, &ctx, self.timeout())
            .await?
        {
            Reply::Deleted => Ok(()),
            other => Err(mismatch(ctx, &other)),
        }
    }

    /// Every topic with its partition count, sorted by name.
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let ctx = Context::new("list topics");
        match self.call(Req::ListTopics, &ctx, self.timeout()).await? {
            Reply::Topics(t) => Ok(t),
            other => Err(mismatch(ctx, &other)),
        }
    }

    /// One partition's start and end offsets.
    pub async fn offsets(&self, topic: &str, partition: u32) -> Result<PartitionOffsets> {
        let ctx = Context::new("get offsets")
            .topic(topic)
            .partition(partition);
        let t = validate_topic(topic, &ctx)?;
        let req = Req::GetOffset {
            topic: t,
            partition,
        };
        match self.call(req, &ctx, self.timeout()).await? {
            Reply::Offsets(o) => Ok(o),
            other => Err(mismatch(ctx, &other)),
        }
    }

    /// The brokers, and the partitions of `topics` with their leaders and replicas (protocol
    /// §6.4); no topics asks for every topic. Each topic asked for is listed once, sorted by
    /// name; one that does not exist has [`ErrorCode::TOPIC_NOT_FOUND`](crate::ErrorCode)
    /// and no partitions (the call still succeeds). An invalid name is [`Error::InvalidInput`]
    /// before anything is sent.
    ///
    /// ```no_run
    /// # async fn demo(client: streambus_client::Client) -> Result<(), streambus_client::Error> {
    /// let m = client.metadata(["orders"]).await?;
    /// for p in &m.topic("orders").expect("asked for").partitions {
    ///     let leader = p.leader.and_then(|id| m.broker(id)).map(|b| b.address());
    ///     println!("partition {} led by {leader:?}, replicas {:?}", p.partition, p.replicas);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn metadata<I, S>(&self, topics: I) -> Result<Metadata>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut ctx = Context::new("metadata");
        let mut names = Vec::new();
        for t in topics {
            let t = t.as_ref();
            names.push(validate_topic(t, &ctx.clone().topic(t))?);
        }
        if let [one] = &names[..] {
            ctx = ctx.topic(one.clone());
        }
        self.fetch_metadata(names.into(), &ctx, self.timeout())
            .await
    }

    /// Every partition's offsets of `topic` (its partition count from [`metadata`](Self::metadata)).
    pub async fn describe_topic(&self, topic: &str) -> Result<Vec<PartitionOffsets>> {
        let ctx = Context::new("describe topic").topic(topic);
        validate_topic(topic, &ctx)?;
        let count = self
            .partition_count(topic)
            .await?
            .ok_or_else(|| Error::Broker {
                context: ctx.clone(),
                code: crate::ErrorCode::TOPIC_NOT_FOUND,
                message: format!("topic {topic} does not exist"),
            })?;
        let mut out = Vec::with_capacity(count as usize);
        for p in 0..count {
            out.push(self.offsets(topic, p).await?);
        }
        Ok(out)
    }

    /// The partition count of `topic` (from [`metadata`](Self::metadata)), `None` if it does
    /// not exist.
    pub async fn partition_count(&self, topic: &str) -> Result<Option<u32>> {
        let m = self.metadata([topic]).await?;
        Ok(m.topic(topic)
            .filter(|t| t.exists())
            .and_then(|t| u32::try_from(t.partitions.len()).ok()))
    }

    /// The broker's health check.
    pub async fn health(&self) -> Result<Health> {
        let ctx = Context::new("health check");
        match self.call(Req::Health, &ctx, self.timeout()).await? {
            Reply::Health(h) => Ok(h),
            other => Err(mismatch(ctx, &other)),
        }
    }
}

/// How [`Client::call_failing_over`] splits its time between the brokers it tries.
#[derive(Debug, Clone, Copy)]
enum Share {
    /// The first broker may take all of it; the others get what is left (a write, which a
    /// timeout may have applied: only an error that says it was never sent fails over).
    First,
    /// Each broker gets an equal share of what is left (a read, which a timeout fails over).
    Each,
}

/// Reads the Metadata of the topics the client routes every `every`, until the client goes.
async fn refresh_periodically(inner: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let client = Client { inner };
        let topics = client.inner.routing().table.topics();
        let deadline = Instant::now() + client.inner.config.request_timeout;
        client.refresh(&topics, deadline).await;
    }
}

pub(crate) fn mismatch(ctx: Context, reply: &Reply) -> Error {
    Error::Protocol {
        context: ctx,
        source: crate::error::ProtocolError::Unexpected(format!("unexpected reply {reply:?}")),
    }
}

/// Checks a topic name before any call uses it: 1 to 249 bytes of `[A-Za-z0-9._-]`, and not
/// `.` or `..` (the protocol's rule, which the broker applies too). Every call checks its topic the same way; this
/// is for checking input early, say a name typed by a user.
///
/// ```
/// assert!(streambus_client::check_topic_name("orders.eu-1").is_ok());
/// let e = streambus_client::check_topic_name("orders/eu").unwrap_err();
/// assert_eq!(
///     e.to_string(),
///     "check topic name: invalid input: topic name \"orders/eu\" is invalid: 1-249 bytes of [A-Za-z0-9._-], not . or .."
/// );
/// ```
///
/// # Errors
///
/// [`Error::InvalidInput`] saying what the rule is.
pub fn check_topic_name(topic: &str) -> Result<()> {
    validate_topic(topic, &Context::new("check topic name")).map(|_| ())
}

/// Checks a topic name with the core's rules (1–249 bytes of `[A-Za-z0-9._-]`).
pub(crate) fn validate_topic(topic: &str, ctx: &Context) -> Result<Arc<str>> {
    streambus_core::Topic::new(topic)
        .map_err(|_| {
            Error::invalid(
                ctx.clone(),
                format!(
                    "topic name {topic:?} is invalid: 1-249 bytes of [A-Za-z0-9._-], not . or .."
                ),
            )
        })
        .map(|t| Arc::from(t.as_str()))
}

type ConnTx = mpsc::UnboundedSender<Job>;

/// One connection of a pool, as [`Client::try_send`] returns it: requests sent on it again
/// reach the broker in the order sent.
#[derive(Debug, Clone)]
pub(crate) struct Lane {
    tx: ConnTx,
    load: Arc<AtomicUsize>,
}

#[derive(Debug)]
enum Slot {
    Empty,
    Dialing,
    Ready {
        tx: ConnTx,
        load: Arc<AtomicUsize>,
        link: Arc<conn::Link>,
        opened: Instant,
    },
}

#[derive(Debug)]
struct PoolState {
    slots: Vec<Slot>,
    backoff: Option<ExponentialBackoff>,
    /// No dial before this (after a failure).
    retry_at: Option<Instant>,
    dial_failures: u64,
    last_error: Option<Error>,
    /// The last connection that closed was closed unused (see [`Pool::get`]).
    closed_unused: bool,
}

/// The connections to one broker. Dials run in their own task, never under the lock, and a
/// dead connection (its task ended) is replaced on demand.
#[derive(Debug)]
pub(crate) struct Pool {
    addr: String,
    config: ClientConfig,
    tls: Option<ClientTls>,
    runtime: tokio::runtime::Handle,
    state: Mutex<PoolState>,
    changed: watch::Sender<u64>,
    /// The live connections, one cell per slot, read without the pool's lock: a call takes
    /// the first with room from a per-thread starting point (no global lock, no shared
    /// counter), and only when none has room takes the lock to grow the pool or wait.
    ready: Box<[RwLock<Option<Conn>>]>,
    /// Every slot holds a connection: the fast path may fill connections to the brim (the
    /// pool has nothing left to grow).
    full: AtomicBool,
}

/// A live connection: its task's channel and its load.
#[derive(Debug, Clone)]
struct Conn {
    tx: ConnTx,
    load: Arc<AtomicUsize>,
}

thread_local! {
    /// Where this thread's next call starts looking in the pool, so threads spread over the
    /// connections without sharing a counter.
    static CURSOR: Cell<usize> = const { Cell::new(0) };
}

enum Next {
    Use(ConnTx, LoadGuard),
    Dial(usize),
    Wait(watch::Receiver<u64>, Option<Instant>),
}

impl Pool {
    fn new(
        addr: String,
        config: ClientConfig,
        tls: Option<ClientTls>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let slots = (0..config.pool_size).map(|_| Slot::Empty).collect();
        let ready = (0..config.pool_size).map(|_| RwLock::new(None)).collect();
        Self {
            addr,
            config,
            tls,
            runtime,
            state: Mutex::new(PoolState {
                slots,
                backoff: None,
                retry_at: None,
                dial_failures: 0,
                last_error: None,
                closed_unused: false,
            }),
            changed: watch::channel(0).0,
            ready,
            full: AtomicBool::new(false),
        }
    }

    fn ready_cell(&self, slot: usize) -> Option<RwLockWriteGuard<'_, Option<Conn>>> {
        self.ready
            .get(slot)
            .map(|c| c.write().unwrap_or_else(|p| p.into_inner()))
    }

    /// A live connection with room, found without the pool's lock: the first from this
    /// thread's cursor whose load is under `limit` (`max_in_flight` once the pool is full,
    /// else half of it, the point where the slow path grows the pool).
    fn fast_get(&self) -> Option<(ConnTx, LoadGuard)> {
        let n = self.ready.len();
        let max = self.config.max_in_flight;
        let limit = if self.full.load(Ordering::Relaxed) {
            max
        } else {
            max.div_ceil(2)
        };
        let start = CURSOR.with(|c| {
            let v = c.get();
            c.set(v.wrapping_add(1));
            v
        });
        for i in 0..n {
            let Some(cell) = self.ready.get(start.wrapping_add(i) % n) else {
                continue;
            };
            let cell = cell.read().unwrap_or_else(|p| p.into_inner());
            let Some(conn) = cell.as_ref() else {
                continue;
            };
            if conn.tx.is_closed() {
                continue;
            }
            if let Some(guard) = LoadGuard::try_new(&conn.load, limit) {
                return Some((conn.tx.clone(), guard));
            }
        }
        None
    }

    /// Whether no request is in flight on any of its connections.
    fn is_idle(&self) -> bool {
        self.lock().slots.iter().all(|s| match s {
            Slot::Ready { load, .. } => load.load(Ordering::Relaxed) == 0,
            Slot::Empty => true,
            Slot::Dialing => false,
        })
    }

    /// The runtime the pool's tasks run on.
    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic elsewhere can't leave the state inconsistent (each update is one
        // assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A live connection with room for one more request, if there is one now.
    pub(crate) fn try_get(&self) -> Option<(ConnTx, LoadGuard)> {
        if let Some(found) = self.fast_get() {
            return Some(found);
        }
        let st = self.lock();
        st.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Ready { tx, load, .. } if !tx.is_closed() => {
                    Some((load.load(Ordering::Relaxed), tx, load))
                }
                _ => None,
            })
            .filter(|(n, _, _)| *n < self.config.max_in_flight)
            .min_by_key(|(n, _, _)| *n)
            .and_then(|(_, tx, load)| {
                LoadGuard::try_new(load, self.config.max_in_flight).map(|g| (tx.clone(), g))
            })
    }

    /// A connection with room for one more request; dials one when none has room. With
    /// `fail_fast`, when there is no connection and the last dial failed, the error of that
    /// dial at once rather than a wait for the reconnect backoff to end.
    pub(crate) async fn get(
        self: &Arc<Self>,
        deadline: Instant,
        ctx: &Context,
        fail_fast: bool,
    ) -> Result<(ConnTx, LoadGuard)> {
        if let Some(found) = self.fast_get() {
            return Ok(found);
        }
        let mut failures_seen = None;
        loop {
            let next = {
                let mut st = self.lock();
                let seen = *failures_seen.get_or_insert(st.dial_failures);
                let mut refused = None;
                let mut closed_used = false;
                for (i, s) in st.slots.iter_mut().enumerate() {
                    let Slot::Ready {
                        tx, link, opened, ..
                    } = s
                    else {
                        continue;
                    };
                    if !tx.is_closed() {
                        continue;
                    }
                    // Closed before it carried a request, within the connect timeout of its
                    // dial (a broker at its connection limit, a TLS handshake the broker
                    // refused): the dial failed, and the reconnect backoff applies, rather
                    // than a dial again at full speed for as long as the broker does that.
                    if !link.used() && opened.elapsed() < self.config.connect_timeout {
                        refused = Some(link.refusal());
                    } else {
                        closed_used = true;
                    }
                    *s = Slot::Empty;
                    self.full.store(false, Ordering::Relaxed);
                    if let Some(mut cell) = self.ready_cell(i) {
                        *cell = None;
                    }
                }
                if closed_used {
                    st.closed_unused = false;
                }
                if let Some(e) = refused {
                    tracing::debug!(addr = %self.addr, error = %e, "connection closed unused");
                    st.closed_unused = true;
                    self.failed(&mut st, e);
                    self.notify();
                }
                let best = st
                    .slots
                    .iter()
                    .filter_map(|s| match s {
                        Slot::Ready { tx, load, .. } => Some((tx, load)),
                        _ => None,
                    })
                    .map(|(tx, load)| (load.load(Ordering::Relaxed), tx, load))
                    .filter(|(n, _, _)| *n < self.config.max_in_flight)
                    .min_by_key(|(n, _, _)| *n);
                let best_full = best.is_none()
                    && st
                        .slots
                        .iter()
                        .any(|s| matches!(s, Slot::Ready { tx, .. } if !tx.is_closed()));
                let empty = st.slots.iter().position(|s| matches!(s, Slot::Empty));
                let dialing = st.slots.iter().any(|s| matches!(s, Slot::Dialing));
                let now = Instant::now();
                let may_dial = empty.is_some() && !dialing && st.retry_at.is_none_or(|t| t <= now);
                if let Some((n, tx, load)) = best {
                    // Counted only under the limit (a racing fast path may have taken the
                    // last slot): a job handed to a connection never waits unwatched for room.
                    let next = match LoadGuard::try_new(load, self.config.max_in_flight) {
                        Some(guard) => Next::Use(tx.clone(), guard),
                        None => Next::Wait(
                            self.changed.subscribe(),
                            Some(now + Duration::from_millis(1)),
                        ),
                    };
                    // Grow the pool in the background once a connection is half busy.
                    if may_dial
                        && n >= self.config.max_in_flight.div_ceil(2)
                        && let Some(i) = empty
                        && let Some(s) = st.slots.get_mut(i)
                    {
                        *s = Slot::Dialing;
                        let pool = self.clone();
                        self.runtime.spawn(async move { pool.dial(i).await });
                    }
                    next
                } else if st.dial_failures > seen
                    && let Some(e) = st.last_error.clone()
                {
                    return Err(e.with_context(ctx));
                } else if may_dial && let Some(i) = empty {
                    if let Some(s) = st.slots.get_mut(i) {
                        *s = Slot::Dialing;
                    }
                    Next::Dial(i)
                } else if best_full {
                    // Every connection is at its depth: room comes back as calls finish
                    // (nothing to be notified of here), so look again shortly.
                    Next::Wait(
                        self.changed.subscribe(),
                        Some(now + Duration::from_millis(1)),
                    )
                } else if fail_fast
                    && !dialing
                    && st.retry_at.is_some_and(|t| t > now)
                    && let Some(e) = st.last_error.clone()
                {
                    return Err(e.with_context(ctx));
                } else {
                    Next::Wait(self.changed.subscribe(), st.retry_at)
                }
            };
            match next {
                Next::Use(tx, guard) => return Ok((tx, guard)),
                Next::Dial(i) => {
                    let rx = self.changed.subscribe();
                    let pool = self.clone();
                    self.runtime.spawn(async move { pool.dial(i).await });
                    self.wait(rx, None, deadline, ctx).await?;
                }
                Next::Wait(rx, retry_at) => self.wait(rx, retry_at, deadline, ctx).await?,
            }
        }
    }

    async fn wait(
        &self,
        mut rx: watch::Receiver<u64>,
        retry_at: Option<Instant>,
        deadline: Instant,
        ctx: &Context,
    ) -> Result<()> {
        let wake = match retry_at {
            Some(t) if t < deadline => t,
            _ => deadline,
        };
        tokio::select! {
            _ = rx.changed() => Ok(()),
            () = tokio::time::sleep_until(wake) => {
                if wake >= deadline {
                    Err(Error::TimedOut {
                        context: ctx.clone(),
                        waiting: crate::error::WAITING_CONNECTION,
                        after: self.config.request_timeout,
                    })
                } else {
                    Ok(())
                }
            }
        }
    }

    async fn dial(self: Arc<Self>, slot: usize) {
        let result = self.open().await;
        let mut st = self.lock();
        match result {
            Ok(driver) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let depth = self.config.max_in_flight;
                let timeout = self.config.request_timeout + self.config.max_poll_wait;
                let link = Arc::new(conn::Link::default());
                self.runtime
                    .spawn(conn::run(driver, rx, depth, timeout, link.clone()));
                let load = Arc::new(AtomicUsize::new(0));
                if let Some(mut cell) = self.ready_cell(slot) {
                    *cell = Some(Conn {
                        tx: tx.clone(),
                        load: load.clone(),
                    });
                }
                if let Some(s) = st.slots.get_mut(slot) {
                    *s = Slot::Ready {
                        tx,
                        load,
                        link,
                        opened: Instant::now(),
                    };
                }
                let full = st.slots.iter().all(|s| matches!(s, Slot::Ready { .. }));
                self.full.store(full, Ordering::Relaxed);
                // A broker that closes connections right after accepting them is not back
                // until one carries a request: its backoff keeps growing until then.
                if !st.closed_unused {
                    st.backoff = None;
                }
                st.retry_at = None;
                tracing::debug!(addr = %self.addr, slot, "connected");
            }
            Err(e) => {
                if let Some(s) = st.slots.get_mut(slot) {
                    *s = Slot::Empty;
                }
                tracing::debug!(addr = %self.addr, error = %e, "dial failed");
                self.failed(&mut st, e);
            }
        }
        drop(st);
        self.notify();
    }

    /// Records a failed dial (or a connection the broker closed unused): no dial before the
    /// next reconnect backoff, and callers waiting for a connection get `e`.
    fn failed(&self, st: &mut PoolState, e: Error) {
        let config = &self.config;
        let delay = st
            .backoff
            .get_or_insert_with(|| {
                ExponentialBuilder::default()
                    .with_min_delay(config.reconnect_backoff)
                    .with_max_delay(config.reconnect_backoff_max)
                    .with_jitter()
                    .without_max_times()
                    .build()
            })
            .next()
            .unwrap_or(config.reconnect_backoff_max);
        st.retry_at = Some(Instant::now() + delay);
        st.dial_failures += 1;
        tracing::debug!(addr = %self.addr, ?delay, "next dial after the backoff");
        st.last_error = Some(e);
    }

    async fn open(&self) -> Result<conn::Driver> {
        let ctx = Context::new("connect");
        let timeout = self.config.connect_timeout;
        let dial = async {
            let addrs = tokio::net::lookup_host(&self.addr)
                .await
                .map_err(|e| Error::io(ctx.clone(), e))?;
            let mut last = None;
            let mut core = streambus_core::ClientConfig::default();
            core.max_frame_len(self.config.max_frame_len)
                .request_timeout(self.config.request_timeout + self.config.max_poll_wait);
            let buffer = self.config.max_frame_len as usize + 4;
            for a in addrs {
                let dialled = match &self.tls {
                    None => {
                        streambus_adapters::tokio::connect::<MAX_IN_FLIGHT>(a, core, buffer).await
                    }
                    Some(tls) => {
                        streambus_adapters::tokio::connect_tls::<MAX_IN_FLIGHT>(
                            a, tls, core, buffer,
                        )
                        .await
                    }
                };
                match dialled {
                    Ok(mut d) => {
                        if let Some(token) = &self.config.token {
                            authenticate(&mut d, token, self.config.request_timeout).await?;
                        }
                        return Ok(d);
                    }
                    // A certificate refused: another address of the name won't do better.
                    Err(e) if Error::is_tls(&e) => return Err(Error::io(ctx.clone(), e)),
                    Err(e) => last = Some(e),
                }
            }
            Err(Error::io(
                ctx.clone(),
                last.unwrap_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{} resolves to no address", self.addr),
                    )
                }),
            ))
        };
        tokio::time::timeout(timeout, dial)
            .await
            .unwrap_or_else(|_| {
                Err(Error::TimedOut {
                    context: ctx.clone(),
                    waiting: crate::error::WAITING_CONNECT,
                    after: timeout,
                })
            })
    }
}

/// Authenticates a fresh connection with `token` before it joins the pool: a refusal is the
/// broker's error (AuthenticationFailed, 40), never a retriable one.
async fn authenticate(
    driver: &mut conn::Driver,
    token: &Token,
    request_timeout: Duration,
) -> Result<()> {
    use streambus_core::{AuthenticateRequest, Request, Response};
    let ctx = Context::new("authenticate");
    let request = Request::Authenticate(AuthenticateRequest::token(token.expose().as_bytes()));
    match driver.request(&request).await {
        Ok(Response::Authenticate(a)) => {
            tracing::debug!(principal = %a.principal, "authenticated");
            Ok(())
        }
        Ok(Response::Error(e)) => Err(Error::Broker {
            context: ctx,
            code: e.code,
            message: e.message.to_string(),
        }),
        Ok(other) => Err(Error::Protocol {
            context: ctx,
            source: crate::error::ProtocolError::Unexpected(format!(
                "reply {other:?} does not answer authenticate"
            )),
        }),
        Err(e) => Err(conn::driver_error(e, request_timeout).with_context(&ctx)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{BrokerMetadata, PartitionMetadata, TopicMetadata};

    fn metadata(ports: &[u16], leaders: &[u32]) -> Metadata {
        Metadata {
            brokers: (1u32..)
                .zip(ports)
                .map(|(node_id, port)| BrokerMetadata {
                    node_id,
                    host: "127.0.0.1".into(),
                    port: *port,
                })
                .collect(),
            topics: vec![TopicMetadata {
                name: "t".into(),
                error_code: ErrorCode::NONE,
                partitions: (0u32..)
                    .zip(leaders)
                    .map(|(partition, leader)| PartitionMetadata {
                        partition,
                        leader: Some(*leader),
                        leader_epoch: 0,
                        replicas: vec![*leader],
                    })
                    .collect(),
            }],
        }
    }

    fn produce(partition: u32) -> Req {
        Req::Produce {
            topic: Arc::from("t"),
            partition,
            count: 0,
            records: Arc::default(),
            producer: None,
        }
    }

    /// The address a request is routed to (`None`: the bootstrap pool).
    fn routed(c: &Client, req: &Req) -> Option<String> {
        c.route(req).unwrap().map(|p| p.addr.clone())
    }

    /// Background Metadata reads of one topic (many fetchers timing out together) go one at
    /// a time: a second and third `refresh_soon` while the first one's Metadata request waits
    /// for its answer send nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_background_refresh_per_topic_at_a_time() {
        use std::sync::atomic::AtomicUsize;
        use streambus_core::{FrameDecoder, Status};
        use tokio::io::AsyncReadExt;
        // A broker that reads every request and answers none.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let (mut buf, mut chunk) = (Vec::new(), [0u8; 4096]);
                    loop {
                        while let Ok(Status::Complete(len)) =
                            FrameDecoder::default().next_frame(&buf)
                        {
                            count.fetch_add(1, Ordering::SeqCst);
                            buf.drain(..len);
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        let c = Client::new(addr.to_string(), ClientConfig::default()).unwrap();
        let topic: Arc<str> = Arc::from("t");
        assert!(c.refresh_soon(&topic));
        let until = Instant::now() + Duration::from_secs(10);
        while requests.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < until, "no Metadata request");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Neither starts a read (nothing to wait for: a read not started sends nothing).
        assert!(!c.refresh_soon(&topic));
        assert!(!c.refresh_soon(&topic));
        assert_eq!(c.inner.refreshing().len(), 1);
        assert_eq!(requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn requests_follow_the_metadata_and_pools_close_with_their_broker() {
        // Nothing listens on these ports: nothing is dialled here.
        let c = Client::new("127.0.0.1:9001".into(), ClientConfig::default()).unwrap();
        // Before any Metadata, and for a single broker: everything on the bootstrap pool.
        assert_eq!(routed(&c, &produce(1)), None);
        c.learn(&metadata(&[9001], &[1, 1]), true);
        assert_eq!(routed(&c, &produce(1)), None);

        c.learn(&metadata(&[9001, 9002, 9003], &[1, 2, 3]), true);
        assert_eq!(routed(&c, &produce(0)), Some("127.0.0.1:9001".into()));
        assert_eq!(routed(&c, &produce(1)), Some("127.0.0.1:9002".into()));
        let fetch = Req::Fetch {
            topic: Arc::from("t"),
            partition: 2,
            offset: 0,
            max_bytes: 1,
            long_poll: None,
            ahead: None,
        };
        assert_eq!(routed(&c, &fetch), Some("127.0.0.1:9003".into()));
        assert_eq!(routed(&c, &produce(3)), None, "no partition 3: bootstrap");
        assert_eq!(routed(&c, &Req::ListTopics), None);
        // One pool per broker, made once; the bootstrap broker's is the bootstrap pool.
        assert!(Arc::ptr_eq(
            &c.route(&produce(1)).unwrap().unwrap(),
            &c.route(&produce(1)).unwrap().unwrap()
        ));
        assert!(Arc::ptr_eq(
            &c.route(&produce(0)).unwrap().unwrap(),
            &c.inner.pool
        ));
        assert_eq!(c.inner.routing().pools.len(), 2);

        // NotLeader (and, in a cluster, a lost connection or no answer in time) asks for a
        // refresh.
        let not_leader = Error::Broker {
            context: Context::new("produce"),
            code: ErrorCode::NOT_LEADER,
            message: String::new(),
        };
        assert!(c.leader_lost(&not_leader));
        assert!(c.leader_lost(&Error::closed_by_peer(Context::new("fetch"))));
        assert!(c.leader_lost(&Error::TimedOut {
            context: Context::new("fetch"),
            waiting: crate::error::WAITING_ANSWER,
            after: Duration::from_secs(1),
        }));

        // Partition 1 moved to broker 1, and broker 3 left: its pool is closed (it is idle).
        c.learn(&metadata(&[9001, 9002], &[1, 1]), true);
        assert_eq!(routed(&c, &produce(1)), Some("127.0.0.1:9001".into()));
        assert_eq!(routed(&c, &fetch), None);
        let r = c.inner.routing();
        let mut open: Vec<&str> = r.pools.keys().map(|a| &**a).collect();
        open.sort_unstable();
        assert_eq!(open, ["127.0.0.1:9002"]);
        assert!(r.retiring.is_empty());
    }
}
