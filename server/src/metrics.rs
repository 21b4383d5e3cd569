//! Prometheus metrics, encoded by `prometheus-client` and served over HTTP by `tiny_http` on
//! their own listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use streambus_adapters::ConnEvent;

/// Labels of the per-request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `produce`, `fetch`, …
    pub r#type: &'static str,
    /// `ok` or the error name (`TopicNotFound`, …).
    pub status: &'static str,
}

/// Labels of the security counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why: `required`, `bad_credential`, `unknown_mechanism`, `not_enabled`,
    /// `unknown_principal` (authentication); the missing permission (authorization); `ok` or
    /// `invalid` (auth file reloads); `timeout`, `not_tls`, `no_client_certificate`,
    /// `bad_certificate`, … (TLS handshakes).
    pub reason: &'static str,
}

/// Every metric the broker exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections_open: Gauge,
    connections_accepted: Counter,
    connections_refused: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
    frame_faults: Family<RequestLabels, Counter>,
    tls_handshake_failures: Family<ReasonLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    latency: Histogram,
    authentications_failed: Family<ReasonLabels, Counter>,
    authorizations_denied: Family<ReasonLabels, Counter>,
    auth_reloads: Family<ReasonLabels, Counter>,
    /// Storage counters, updated from the engine's stats on each scrape.
    pub(crate) storage_appends: Counter,
    pub(crate) storage_fsyncs: Counter,
    pub(crate) storage_truncations: Counter,
    /// Idempotent producer state, updated on each scrape.
    producers: Gauge,
    producer_state_bytes: Gauge,
    /// The process (Prometheus' standard names, unprefixed), read from `/proc` on each scrape.
    resident_memory: Gauge,
    open_fds: Gauge,
    /// Cluster mode only: the metadata group as this broker sees it, updated on each scrape.
    cluster: Option<ClusterGauges>,
}

/// The metadata group's gauges, and those of the partition replicas this broker holds
/// (cluster mode).
#[derive(Debug, Default)]
struct ClusterGauges {
    node_id: Gauge,
    leader: Gauge,
    term: Gauge,
    applied: Gauge,
    brokers: Gauge,
    partition_leader: Family<PartitionLabels, Gauge>,
    partition_epoch: Family<PartitionLabels, Gauge>,
    partition_end: Family<PartitionLabels, Gauge>,
    partition_hwm: Family<PartitionLabels, Gauge>,
    partition_leader_changes: Family<PartitionLabels, Counter>,
    replica_lag: Family<ReplicaLabels, Gauge>,
}

/// Labels of a partition replica's metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
}

/// Labels of the replication lag a leader sees of one of its replicas.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The replica's node id.
    pub replica: u64,
}

/// One partition replica on this broker, as a scrape reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartitionSample {
    pub topic: String,
    pub partition: u32,
    /// The leader this replica knows (`None`: none now).
    pub leader: Option<u64>,
    /// The group's term (the partition's leader epoch).
    pub epoch: u64,
    /// The offset after the last record stored here, committed or not.
    pub end: i64,
    /// The high-water mark here.
    pub high_water_mark: i64,
    /// Leader changes this replica saw.
    pub leader_changes: u64,
    /// On the leader: per replica, the Raft entries (batches) it has yet to acknowledge.
    pub lag: Vec<(u64, u64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        let m = Self {
            connections_open: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_refused: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            frame_faults: Family::default(),
            tls_handshake_failures: Family::default(),
            requests: Family::default(),
            // 10 µs .. ~5 s
            latency: Histogram::new(exponential_buckets(1e-5, 2.0, 20)),
            authentications_failed: Family::default(),
            authorizations_denied: Family::default(),
            auth_reloads: Family::default(),
            storage_appends: Counter::default(),
            storage_fsyncs: Counter::default(),
            storage_truncations: Counter::default(),
            producers: Gauge::default(),
            producer_state_bytes: Gauge::default(),
            resident_memory: Gauge::default(),
            open_fds: Gauge::default(),
            cluster: None,
            registry: Registry::default(),
        };
        root.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes (Linux: VmRSS)",
            m.resident_memory.clone(),
        );
        root.register(
            "process_open_fds",
            "Open file descriptors (Linux)",
            m.open_fds.clone(),
        );
        let registry = root.sub_registry_with_prefix("streambus");
        registry.register(
            "connections_open",
            "Client connections open",
            m.connections_open.clone(),
        );
        registry.register(
            "connections_accepted",
            "Client connections accepted",
            m.connections_accepted.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at once (over the cap)",
            m.connections_refused.clone(),
        );
        registry.register("bytes_in", "Bytes read from clients", m.bytes_in.clone());
        registry.register("bytes_out", "Bytes written to clients", m.bytes_out.clone());
        registry.register(
            "frame_faults",
            "Frames answered with an error by the connection layer",
            m.frame_faults.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes failed, by reason",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by type and status",
            m.requests.clone(),
        );
        registry.register(
            "request_latency_seconds",
            "Time to execute a request",
            m.latency.clone(),
        );
        registry.register(
            "authentications_failed",
            "Requests answered AuthenticationFailed (40), by reason",
            m.authentications_failed.clone(),
        );
        registry.register(
            "authorizations_denied",
            "Requests answered AuthorizationFailed (41), by the permission missing",
            m.authorizations_denied.clone(),
        );
        // Both results are scraped from the start, at 0 (a series that appears only at its
        // first increment can be seen there at 0 for an instant, too).
        for reason in ["ok", "invalid"] {
            let _ = m.auth_reloads.get_or_create(&ReasonLabels { reason });
        }
        registry.register(
            "auth_reloads",
            "Auth file reloads (SIGHUP), by result: ok or invalid (the old rules kept)",
            m.auth_reloads.clone(),
        );
        registry.register(
            "storage_appends",
            "Batches appended",
            m.storage_appends.clone(),
        );
        registry.register("storage_fsyncs", "fsync calls", m.storage_fsyncs.clone());
        registry.register(
            "storage_recovery_truncations",
            "Torn or corrupt log tails truncated on recovery",
            m.storage_truncations.clone(),
        );
        registry.register(
            "idempotent_producers",
            "Idempotent producers whose state the partitions keep",
            m.producers.clone(),
        );
        registry.register(
            "idempotent_producer_state_bytes",
            "Approximate memory of the idempotent producers' state",
            m.producer_state_bytes.clone(),
        );
        Self {
            registry: root,
            ..m
        }
    }
}

impl Metrics {
    /// Records a connection event.
    pub fn connection_event(&self, e: ConnEvent) {
        match e {
            ConnEvent::Accepted => {
                self.connections_accepted.inc();
                self.connections_open.inc();
            }
            ConnEvent::Closed => {
                self.connections_open.dec();
            }
            ConnEvent::Refused => {
                self.connections_refused.inc();
            }
            ConnEvent::BytesIn(n) => {
                self.bytes_in.inc_by(n as u64);
            }
            ConnEvent::BytesOut(n) => {
                self.bytes_out.inc_by(n as u64);
            }
            ConnEvent::Fault(code) => {
                self.frame_faults
                    .get_or_create(&RequestLabels {
                        r#type: "frame",
                        status: code.name().unwrap_or("Unknown"),
                    })
                    .inc();
            }
            ConnEvent::TlsHandshakeFailed(reason) => {
                self.tls_handshake_failures
                    .get_or_create(&ReasonLabels {
                        reason: reason.as_str(),
                    })
                    .inc();
            }
            _ => {}
        }
    }

    /// TLS handshakes failed for `reason` so far.
    pub fn tls_handshake_failures(&self, reason: streambus_adapters::HandshakeFailure) -> u64 {
        self.tls_handshake_failures
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .get()
    }

    /// Records one answered request.
    pub fn request(&self, r#type: &'static str, status: &'static str, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels { r#type, status })
            .inc();
        self.latency.observe(took.as_secs_f64());
    }

    /// Records a request answered AuthenticationFailed (40).
    pub fn authentication_failed(&self, reason: &'static str) {
        self.authentications_failed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Records a request answered AuthorizationFailed (41) for lack of `permission`.
    pub fn authorization_denied(&self, permission: &'static str) {
        self.authorizations_denied
            .get_or_create(&ReasonLabels { reason: permission })
            .inc();
    }

    /// Records an auth file reload: `ok` or `invalid`.
    pub fn auth_reload(&self, result: &'static str) {
        self.auth_reloads
            .get_or_create(&ReasonLabels { reason: result })
            .inc();
    }

    /// Brings a monotonic counter up to `value`.
    pub(crate) fn set_counter(c: &Counter, value: u64) {
        let now = c.get();
        if value > now {
            c.inc_by(value - now);
        }
    }

    /// The metrics of a broker in cluster mode: those of [`Default`] plus the metadata
    /// group's leader, term, applied log index and registered brokers.
    pub fn for_cluster() -> Self {
        let mut m = Self::default();
        let g = ClusterGauges::default();
        let registry = m.registry.sub_registry_with_prefix("streambus");
        registry.register(
            "cluster_node_id",
            "This broker's --node-id",
            g.node_id.clone(),
        );
        registry.register(
            "cluster_metadata_leader",
            "The metadata group's leader as this broker knows it (node id; -1: none)",
            g.leader.clone(),
        );
        registry.register(
            "cluster_metadata_term",
            "The metadata group's current Raft term on this broker",
            g.term.clone(),
        );
        registry.register(
            "cluster_metadata_applied_index",
            "The last metadata log index this broker applied",
            g.applied.clone(),
        );
        registry.register(
            "cluster_brokers",
            "Brokers registered in the metadata group",
            g.brokers.clone(),
        );
        registry.register(
            "partition_leader",
            "The leader of a partition this broker holds a replica of, as its replica knows it (node id; -1: none now)",
            g.partition_leader.clone(),
        );
        registry.register(
            "partition_leader_epoch",
            "The Raft term of a partition's group on this broker (Metadata's LeaderEpoch)",
            g.partition_epoch.clone(),
        );
        registry.register(
            "partition_log_end_offset",
            "The offset after the last record this replica stores, committed or not",
            g.partition_end.clone(),
        );
        registry.register(
            "partition_high_water_mark",
            "The offset up to which this replica knows records are committed (what consumers may read)",
            g.partition_hwm.clone(),
        );
        registry.register(
            "partition_leader_changes",
            "Times this replica saw its partition's leader become another broker (the first leader counts)",
            g.partition_leader_changes.clone(),
        );
        registry.register(
            "partition_replica_lag_entries",
            "On a partition's leader: the Raft entries (produce batches) a replica has not acknowledged yet",
            g.replica_lag.clone(),
        );
        m.cluster = Some(g);
        m
    }

    /// Sets this broker's node id (cluster mode).
    pub(crate) fn set_node_id(&self, id: u32) {
        if let Some(g) = &self.cluster {
            g.node_id.set(i64::from(id));
        }
    }

    /// Sets the partition replicas' metrics to `samples` (no-op for a single broker): the
    /// series of partitions no longer held here go.
    pub(crate) fn set_partitions(&self, samples: &[PartitionSample]) {
        let Some(g) = &self.cluster else { return };
        let sat = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        g.partition_leader.clear();
        g.partition_epoch.clear();
        g.partition_end.clear();
        g.partition_hwm.clear();
        g.replica_lag.clear();
        // Counters of deleted partitions go too; the others are set back to their total.
        let kept: Vec<(PartitionLabels, u64)> = samples
            .iter()
            .map(|s| {
                let labels = PartitionLabels {
                    topic: s.topic.clone(),
                    partition: s.partition,
                };
                (labels, s.leader_changes)
            })
            .collect();
        g.partition_leader_changes.clear();
        for (labels, total) in &kept {
            Self::set_counter(&g.partition_leader_changes.get_or_create(labels), *total);
        }
        for (s, (labels, _)) in samples.iter().zip(&kept) {
            g.partition_leader
                .get_or_create(labels)
                .set(s.leader.map_or(-1, sat));
            g.partition_epoch.get_or_create(labels).set(sat(s.epoch));
            g.partition_end.get_or_create(labels).set(s.end);
            g.partition_hwm.get_or_create(labels).set(s.high_water_mark);
            for (replica, lag) in &s.lag {
                let r = ReplicaLabels {
                    topic: s.topic.clone(),
                    partition: s.partition,
                    replica: *replica,
                };
                g.replica_lag.get_or_create(&r).set(sat(*lag));
            }
        }
    }

    /// Sets the cluster gauges (no-op for a single broker).
    pub(crate) fn set_cluster(&self, leader: Option<u64>, term: u64, applied: u64, brokers: usize) {
        if let Some(g) = &self.cluster {
            g.leader
                .set(leader.and_then(|l| i64::try_from(l).ok()).unwrap_or(-1));
            g.term.set(i64::try_from(term).unwrap_or(i64::MAX));
            g.applied.set(i64::try_from(applied).unwrap_or(i64::MAX));
            g.brokers.set(i64::try_from(brokers).unwrap_or(i64::MAX));
        }
    }

    /// Sets the idempotent producer gauges.
    pub(crate) fn set_producers(&self, producers: u64, bytes: u64) {
        self.producers
            .set(i64::try_from(producers).unwrap_or(i64::MAX));
        self.producer_state_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Reads the process's resident memory and open descriptors from `/proc/self` (left as
    /// they were where `/proc` cannot be read).
    pub(crate) fn refresh_process(&self) {
        let rss_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse::<i64>().ok()
            });
        if let Some(kib) = rss_kib {
            self.resident_memory.set(kib.saturating_mul(1024));
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            // The directory's own descriptor is one of the entries.
            let n = fds.count().saturating_sub(1);
            self.open_fds.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// Serves `GET /metrics` on `addr` from a background thread until the process ends.
/// `refresh` runs before each scrape (to pull storage stats).
pub fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    refresh: impl Fn() + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    let local = server.server_addr().to_ip().unwrap_or(addr);
    std::thread::Builder::new()
        .name("streambus-metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let resp = if req.url() == "/metrics" {
                    refresh();
                    let mut resp = tiny_http::Response::from_string(metrics.encode());
                    if let Ok(h) = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                    ) {
                        resp = resp.with_header(h);
                    }
                    resp
                } else {
                    tiny_http::Response::from_string("not found: try /metrics\n")
                        .with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })?;
    Ok(local)
}
