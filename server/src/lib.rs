//! # streambus-server
//!
//! The StreamBus broker: [`Broker`] routes the seven v1 requests to the durable, partitioned
//! log [`storage`] engine, and [`start`] serves it on the runtime the [`Config`] names
//! (tokio, smol or blocking, through `streambus-adapters`).

pub mod auth;
pub mod broker;
pub mod cluster;
pub mod config;
mod fds;
mod longpoll;
pub mod metrics;
pub mod storage;
mod syncer;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use broker::{Broker, BrokerConfig};
pub use config::{
    Advertised, Cli, ClusterSettings, Config, ConfigError, FsyncMode, RuntimeKind, TlsFiles,
};
use metrics::Metrics;
use storage::{FsyncPolicy, Storage, StorageConfig};
use streambus_adapters::ServeOptions;
use streambus_core::ServerConfig;

/// Why the broker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The storage engine failed to open.
    #[error("storage: {0}")]
    Storage(#[from] storage::StorageError),
    /// A listener could not be bound or a runtime started.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS files could not be loaded.
    #[error(transparent)]
    Tls(ConfigError),
    /// The server thread panicked.
    #[error("the server thread panicked")]
    Panicked,
    /// The auth file could not be used.
    #[error("{0}")]
    Auth(#[from] auth::AuthError),
    /// The cluster side could not start.
    #[error("cluster: {0}")]
    Cluster(#[from] cluster::node::StartError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// How a running broker is told to stop.
#[derive(Debug)]
enum Stop {
    Async(smol::channel::Sender<()>),
    Blocking(streambus_adapters::blocking::Shutdown),
}

/// A broker serving in a background thread.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    storage: Arc<Storage>,
    /// Weak: the broker goes with the server thread, before the final fsync.
    broker: std::sync::Weak<Broker>,
    /// `--auth-file`, reloaded by [`Running::reload_auth`].
    auth: Option<Arc<auth::Auth>>,
    metrics: Arc<Metrics>,
    stop: Stop,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
    /// Cluster mode: the cluster side, stopped after the client side.
    cluster: Option<cluster::ClusterNode>,
}

impl Running {
    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The storage engine's counters (appends, fsyncs, recovery truncations, …).
    pub fn storage_stats(&self) -> storage::StorageStats {
        self.storage.stats()
    }

    /// Long-poll fetches waiting now (0 once the broker has stopped).
    pub fn waiting_fetches(&self) -> usize {
        self.broker.upgrade().map_or(0, |b| b.waiting_fetches())
    }

    /// The broker's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Cluster mode: the bound `--cluster-listen` address.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.cluster.as_ref().map(cluster::ClusterNode::listen_addr)
    }

    /// Cluster mode: the metadata group.
    pub fn cluster(&self) -> Option<&cluster::Cluster> {
        self.cluster.as_ref().map(cluster::ClusterNode::cluster)
    }

    /// The metrics listener's address, if on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Reads the auth file again (on SIGHUP): a valid file applies to every request from now
    /// on; an invalid one keeps the rules in force and logs one line saying why. Returns
    /// `Ok(None)` when the broker runs without authentication.
    pub fn reload_auth(&self) -> Result<Option<usize>, auth::AuthError> {
        let Some(auth) = &self.auth else {
            tracing::info!("no --auth-file: nothing to reload");
            return Ok(None);
        };
        match auth.reload() {
            Ok(n) => {
                self.metrics.auth_reload("ok");
                tracing::info!(principals = n, file = %auth.path().display(), "auth file reloaded");
                Ok(Some(n))
            }
            Err(e) => {
                self.metrics.auth_reload("invalid");
                tracing::error!("auth file not reloaded, the previous rules stay in force: {e}");
                Err(e)
            }
        }
    }

    /// Graceful shutdown: stop accepting, let open connections finish what they have read,
    /// then fsync every log. Returns once done.
    pub fn shutdown(mut self) -> Result<(), ServerError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), ServerError> {
        match &self.stop {
            Stop::Async(tx) => tx.close(),
            Stop::Blocking(s) => {
                s.trigger();
                true
            }
        };
        let result = match self.thread.take() {
            Some(t) => t.join().map_err(|_| ServerError::Panicked)?,
            None => Ok(()),
        };
        if let Some(mut c) = self.cluster.take() {
            c.shutdown();
        }
        self.storage.sync_all()?;
        tracing::info!("broker stopped; logs synced");
        result
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop_and_join();
        }
    }
}

/// Opens the storage, binds the listeners and starts serving in a background thread.
pub fn start(config: Config) -> Result<Running, ServerError> {
    // Before the logs are opened: a data directory with many segments needs descriptors too.
    let fd_limit = fds::raise_limit();
    let fsync = match config.fsync {
        FsyncMode::Always => FsyncPolicy::Always,
        FsyncMode::Interval => FsyncPolicy::Interval(config.fsync_interval),
        FsyncMode::Never => FsyncPolicy::Never,
    };
    let mut storage_config = StorageConfig::new(&config.data_dir);
    storage_config.fsync = fsync;
    storage_config.segment_bytes = config.segment_bytes;
    storage_config.retention_age = config.retention_time;
    storage_config.retention_check_interval = config.retention_check_interval;
    storage_config.retention_bytes = config.retention_bytes;
    let auth = match &config.auth_file {
        Some(path) => Some(Arc::new(auth::Auth::load(path)?)),
        None => None,
    };
    storage_config.max_producers_per_partition = config.max_producers_per_partition;
    if config.data_dir.exists() && !config.data_dir.is_dir() {
        return Err(ServerError::Io {
            what: format!("data directory {}", config.data_dir.display()),
            source: std::io::Error::other("it is a file, not a directory (--data-dir)"),
        });
    }
    // The port first: a broker that cannot listen leaves no data directory behind.
    let listener =
        TcpListener::bind(config.listen).map_err(io_err(format!("binding {}", config.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(io_err("reading the listen address"))?;
    // The metrics port too, before storage: it reads the storage once that is open.
    let metrics = Arc::new(if config.cluster.is_some() {
        let m = Metrics::for_cluster();
        m.set_node_id(config.node_id);
        m
    } else {
        Metrics::default()
    });
    let opened: Arc<std::sync::OnceLock<Arc<Storage>>> = Arc::default();
    let joined: Arc<std::sync::OnceLock<cluster::Cluster>> = Arc::default();
    let metrics_addr = match config.metrics_listen {
        Some(a) => {
            let (m, s, j) = (metrics.clone(), opened.clone(), joined.clone());
            let refresh = move || {
                m.refresh_process();
                if let Some(c) = j.get() {
                    let r = c.raft().metrics().borrow().clone();
                    m.set_cluster(
                        r.current_leader,
                        r.current_term,
                        r.last_applied.map_or(0, |l| l.index),
                        c.metadata().brokers.len(),
                    );
                    if let Some(s) = s.get() {
                        m.set_partitions(&partition_samples(c, s));
                    }
                }
                let Some(s) = s.get() else { return };
                let st = s.stats();
                Metrics::set_counter(&m.storage_appends, st.appends);
                Metrics::set_counter(&m.storage_fsyncs, st.fsyncs);
                Metrics::set_counter(&m.storage_truncations, st.recovery_truncations);
                m.set_producers(st.producers, st.producer_state_bytes);
            };
            Some(
                metrics::serve(a, metrics.clone(), refresh)
                    .map_err(io_err(format!("binding metrics on {a}")))?,
            )
        }
        None => None,
    };
    let storage = Arc::new(Storage::open(storage_config)?);
    let _ = opened.set(storage.clone());

    // Connections may never take the descriptors storage needs.
    let plan = fds::plan(config.max_connections, fd_limit, fds::in_use()).map_err(|reason| {
        ServerError::Io {
            what: "--max-connections".into(),
            source: std::io::Error::other(reason),
        }
    })?;
    if plan.connections < config.max_connections {
        tracing::warn!(
            "serving at most {} connections, not --max-connections {}: the open-file limit is {} and {} descriptors are open or kept for storage",
            plan.connections,
            config.max_connections,
            plan.limit,
            plan.in_use + plan.reserve
        );
    }
    let mut conn = ServerConfig::default();
    conn.max_frame_len(config.max_frame_bytes)
        .read_timeout(config.read_timeout)
        .idle_timeout(config.idle_timeout)
        .require_authentication(auth.is_some());
    let mut options = ServeOptions::default()
        .max_connections(plan.connections)
        .connection(conn)
        .write_timeout(config.write_timeout)
        .max_buffered_bytes(config.max_buffered_bytes);
    if let Some(files) = &config.tls {
        options = options.tls(files.load().map_err(ServerError::Tls)?);
    } else if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "listening on a non-loopback address without TLS: clients' data and credentials cross the network in plaintext (set --tls-cert and --tls-key)"
        );
    }
    let advertise = match &config.advertise {
        Some(a) => a.clone(),
        None => {
            let (a, unspecified) = Advertised::for_listener(addr);
            if unspecified {
                tracing::warn!(
                    "listening on {addr} without --advertise: Metadata replies advertise {a}, which only clients on this host can reach"
                );
            }
            a
        }
    };
    let local = cluster::state::LocalReplicas::new(config.node_id, Arc::clone(&storage));
    let cluster = match &config.cluster {
        Some(settings) => Some(cluster::ClusterNode::start(
            config.node_id,
            settings,
            &config.data_dir,
            &advertise,
            local.clone(),
        )?),
        None => None,
    };
    if let Some(c) = &cluster {
        let _ = joined.set(c.cluster().clone());
    }
    let mut broker_config = BrokerConfig::default()
        .node_id(config.node_id)
        .advertise(advertise.clone())
        .auto_create_topics(config.auto_create_topics)
        .max_frame_len(config.max_frame_bytes)
        .max_fetch_wait(config.max_fetch_wait);
    if let Some(handle) = cluster.as_ref().and_then(cluster::ClusterNode::handle) {
        broker_config = broker_config.cluster(handle);
    }
    let broker = Arc::new(
        Broker::with_auth(
            storage.clone(),
            broker_config,
            metrics.clone(),
            auth.clone(),
        )
        .map_err(io_err("starting the broker's threads"))?,
    );
    // A topic deleted through the group: the fetches waiting on it here are answered.
    let weak = Arc::downgrade(&broker);
    let _ = local
        .on_deleted
        .set(cluster::state::DeletedHook(Box::new(move |topic| {
            if let Some(b) = weak.upgrade() {
                b.topic_deleted(topic);
            }
        })));
    // A replicated partition's committed entries applied: the fetches waiting on it here are
    // answered.
    let weak = Arc::downgrade(&broker);
    let _ = local
        .on_committed
        .set(cluster::state::CommittedHook(Arc::new(
            move |topic, partition, end| {
                if let Some(b) = weak.upgrade() {
                    b.partition_committed(topic, partition, end);
                }
            },
        )));
    // This broker stopped leading a replicated partition: the fetches waiting on it here are
    // answered NotLeader at once.
    let weak = Arc::downgrade(&broker);
    let _ = local
        .on_step_down
        .set(cluster::state::SteppedDownHook(Arc::new(
            move |topic, partition, _leader| {
                if let Some(b) = weak.upgrade() {
                    b.partition_lost(topic, partition);
                }
            },
        )));
    let metrics_at = metrics_addr.map_or_else(|| "off".to_owned(), |a| a.to_string());
    let config_file = config
        .config_file
        .as_ref()
        .map_or_else(|| "none".to_owned(), |p| p.display().to_string());
    let tls = match &config.tls {
        None => "off",
        Some(f) if f.client_ca.is_some() => "on, client certificates required",
        Some(_) => "on",
    };
    let cluster_at = cluster
        .as_ref()
        .map_or_else(|| "off".to_owned(), |c| c.listen_addr().to_string());
    tracing::info!(%addr, %advertise, node_id = config.node_id, metrics = %metrics_at, cluster = %cluster_at, runtime = ?config.runtime, tls, data_dir = %config.data_dir.display(), fsync = ?config.fsync, config = %config_file, auth = auth.is_some(), "broker listening");
    if auth.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "listening on a non-loopback address without authentication: anyone who can reach it may read, write and delete every topic; set --auth-file"
        );
    }

    let weak_broker = Arc::downgrade(&broker);
    let metrics_handle = metrics;
    let (stop, body): (Stop, Box<dyn FnOnce() -> Result<(), ServerError> + Send>) =
        match config.runtime {
            RuntimeKind::Tokio => {
                let (tx, rx) = smol::channel::bounded::<()>(1);
                let body = move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .enable_all()
                        .thread_name("streambus-tokio")
                        .build()
                        .map_err(io_err("starting tokio"))?;
                    rt.block_on(async move {
                        listener.set_nonblocking(true).map_err(io_err("listener"))?;
                        let l = tokio::net::TcpListener::from_std(listener)
                            .map_err(io_err("listener"))?;
                        streambus_adapters::tokio::serve(l, broker, options, async move {
                            let _ = rx.recv().await;
                        })
                        .await
                        .map_err(io_err("serving"))
                    })
                };
                (Stop::Async(tx), Box::new(body))
            }
            RuntimeKind::Smol => {
                let (tx, rx) = smol::channel::bounded::<()>(1);
                let body = move || {
                    let l = smol::Async::new(listener).map_err(io_err("listener"))?;
                    smol::block_on(streambus_adapters::smol::serve(
                        l,
                        broker,
                        options,
                        async move {
                            let _ = rx.recv().await;
                        },
                    ))
                    .map_err(io_err("serving"))
                };
                (Stop::Async(tx), Box::new(body))
            }
            RuntimeKind::Blocking => {
                let handle = streambus_adapters::blocking::shutdown_handle(&listener)
                    .map_err(io_err("listener"))?;
                let h = handle.clone();
                let body = move || {
                    streambus_adapters::blocking::serve(listener, broker, options, h)
                        .map_err(io_err("serving"))
                };
                (Stop::Blocking(handle), Box::new(body))
            }
        };
    let thread = std::thread::Builder::new()
        .name("streambus-server".into())
        .spawn(body)
        .map_err(io_err("starting the server thread"))?;
    Ok(Running {
        addr,
        metrics_addr,
        storage,
        broker: weak_broker,
        auth,
        metrics: metrics_handle,
        stop,
        thread: Some(thread),
        cluster,
    })
}

/// What `/metrics` reports of each partition replica this broker runs a group for.
fn partition_samples(c: &cluster::Cluster, storage: &Storage) -> Vec<metrics::PartitionSample> {
    c.replicas()
        .all()
        .into_iter()
        .filter_map(|(id, raft)| {
            let m = raft.metrics().borrow().clone();
            let log = storage.raft_log_state(&id.topic, id.partition).ok()?;
            let last = m.last_log_index.unwrap_or(0);
            let lag = m
                .replication
                .iter()
                .flatten()
                .filter(|(node, _)| **node != c.node_id())
                .map(|(node, matched)| (*node, last.saturating_sub(matched.map_or(0, |l| l.index))))
                .collect();
            Some(metrics::PartitionSample {
                leader_changes: c.replicas().leader_changes(&id),
                topic: id.topic,
                partition: id.partition,
                leader: m.current_leader,
                epoch: m.current_term,
                end: log.end,
                high_water_mark: log.high_water_mark,
                lag,
            })
        })
        .collect()
}
