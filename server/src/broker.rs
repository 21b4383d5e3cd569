//! Request routing: the seven v1 requests and Metadata (§6.4) against the storage engine,
//! answered exactly as the protocol says, error codes and messages included; with
//! `--auth-file`, each request is first checked against the connection's principal (§6.3, see
//! `auth`).
//!
//! Most requests are answered before [`Handler::handle`] returns. Two kinds keep their
//! [`Reply`] and answer later: a Produce under `--fsync always` (once the group-commit fsync
//! covering it is done, see `syncer`) and a long-poll Fetch (once enough data came or its wait
//! ran out, see `longpoll`). Requests that touch directories (CreateTopic, DeleteTopic, a
//! Produce that auto-creates its topic) are marked as blocking, so the adapters run them off
//! the async executors.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use streambus_adapters::{ConnEvent, FileChunk, Handler, Reply};
use streambus_core::{
    AuthenticateRequest, AuthenticateResponse, CreateTopicResponse, DeleteTopicResponse, ErrorCode,
    FETCH_RESPONSE_FIXED_LEN, FetchRequest, FetchResponse, FetchTrailer, Flags, GetOffsetResponse,
    HealthCheckResponse, ListTopicsResponse, MECHANISM_TOKEN, MessageSet, ProduceRequest,
    ProduceResponse, RESPONSE_HEADER_LEN, Request, Response, Text, Topic, TopicInfo, TopicList,
    response_encoded_len,
};
use streambus_core::{
    BrokerInfo, BrokerList, MetadataRequest, MetadataResponse, PartitionList, PartitionMetadata,
    ReplicaList, TopicMetadata, TopicMetadataList,
};

use crate::auth::{Access, Auth, Refusal};
use crate::cluster::replica::Batch;
use crate::cluster::{Applied, ClusterError, ClusterHandle, Command, Committed, PartitionLeader};
use crate::config::Advertised;
use crate::longpoll::{LongPolls, Registered, Waiter};
use crate::metrics::Metrics;
use crate::storage::{AppendResult, FetchPlan, ProducerBatch, Storage, StorageError, TopicConfig};
use crate::syncer::Syncer;
use openraft::error::{ClientWriteError, RaftError};

/// Fetches at least this large are sent from the log files with `sendfile`; smaller ones are
/// copied into the reply (one write instead of three).
const SENDFILE_MIN: u64 = 64 * 1024;

/// Reads a fetch plan's ranges into one buffer.
fn read_ranges(plan: &FetchPlan) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![0u8; usize::try_from(plan.len).unwrap_or(usize::MAX)];
    let mut at = 0;
    for r in &plan.ranges {
        let len = usize::try_from(r.len).unwrap_or(usize::MAX);
        let dst = out
            .get_mut(at..at + len)
            .ok_or(std::io::ErrorKind::InvalidData)?;
        r.file.read_exact_at(dst, r.offset)?;
        at += len;
    }
    Ok(out)
}

/// Failed `Authenticate` requests in a row after which the connection closes (§6.3).
pub const MAX_AUTH_FAILURES: u8 = 3;

/// Largest partition count a topic may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// Routing settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// This broker's node id in Metadata replies (at most `i32::MAX`: it is also the
    /// LeaderID).
    pub node_id: u32,
    /// The address Metadata replies tell clients to connect to.
    pub advertise: Advertised,
    /// Create a missing topic (one partition) on Produce.
    pub auto_create_topics: bool,
    /// The maximum frame Length, which bounds message and fetch sizes.
    pub max_frame_len: u32,
    /// The longest a long-poll Fetch waits (a larger MaxWaitMs is cut to it).
    pub max_fetch_wait: Duration,
    /// Cluster mode: the metadata group; `None` is a single broker.
    pub cluster: Option<ClusterHandle>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            node_id: 0,
            advertise: Advertised {
                host: "127.0.0.1".into(),
                port: 9092,
            },
            auto_create_topics: true,
            max_frame_len: streambus_core::DEFAULT_MAX_FRAME_LEN,
            max_fetch_wait: Duration::from_secs(30),
            cluster: None,
        }
    }
}

impl BrokerConfig {
    /// Sets [`auto_create_topics`](Self::auto_create_topics).
    pub fn auto_create_topics(mut self, on: bool) -> Self {
        self.auto_create_topics = on;
        self
    }

    /// Sets [`max_frame_len`](Self::max_frame_len).
    pub fn max_frame_len(mut self, max: u32) -> Self {
        self.max_frame_len = max;
        self
    }

    /// Sets [`node_id`](Self::node_id).
    pub fn node_id(mut self, id: u32) -> Self {
        self.node_id = id;
        self
    }

    /// Sets [`advertise`](Self::advertise).
    pub fn advertise(mut self, address: Advertised) -> Self {
        self.advertise = address;
        self
    }

    /// Sets [`cluster`](Self::cluster): topics are created, deleted and listed through the
    /// metadata group, and Metadata answers with its brokers and placement.
    pub fn cluster(mut self, cluster: ClusterHandle) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Sets [`max_fetch_wait`](Self::max_fetch_wait).
    pub fn max_fetch_wait(mut self, max: Duration) -> Self {
        self.max_fetch_wait = max;
        self
    }
}

/// The broker: a [`Handler`] over the storage engine.
#[derive(Debug)]
pub struct Broker {
    inner: Arc<Inner>,
    /// Replies of `--fsync always` produces waiting for their fsync.
    syncer: Syncer,
    /// Ends waits whose deadline passed; stops when the long-poll table closes.
    timer: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Inner {
    storage: Arc<Storage>,
    config: BrokerConfig,
    started: Instant,
    metrics: Arc<Metrics>,
    polls: LongPolls,
    /// `--auth-file`: who may do what; `None` lets everyone do everything.
    auth: Option<Arc<Auth>>,
}

/// A reply with what its request's metrics need.
#[derive(Debug)]
struct Answer {
    reply: Reply,
    kind: &'static str,
    started: Instant,
    metrics: Arc<Metrics>,
}

impl Answer {
    fn respond(self, response: &Response<'_>) {
        self.done("ok").respond(response);
    }

    fn fail(self, f: Failure) {
        tracing::debug!(request_id = self.reply.request_id(), code = %f.code, message = %f.message, "request failed");
        let status = f.code.name().unwrap_or("Unknown");
        self.done(status)
            .error(f.code, format_args!("{}", f.message));
    }

    fn done(self, status: &'static str) -> Reply {
        self.metrics
            .request(self.kind, status, self.started.elapsed());
        self.reply
    }
}

/// An error reply: code and message.
struct Failure {
    code: ErrorCode,
    message: String,
}

impl From<StorageError> for Failure {
    fn from(e: StorageError) -> Self {
        if e.error_code() == ErrorCode::STORAGE_ERROR {
            tracing::error!(error = %e, "storage failure");
        }
        Failure {
            code: e.error_code(),
            message: e.to_string(),
        }
    }
}

fn fail(code: ErrorCode, message: String) -> Failure {
    Failure { code, message }
}

fn now_unix_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

impl Broker {
    /// A broker over `storage`; starts its group-commit and long-poll timer threads.
    pub fn new(
        storage: Arc<Storage>,
        config: BrokerConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        Self::with_auth(storage, config, metrics, None)
    }

    /// [`new`](Self::new), requiring authentication and checking permissions with `auth`
    /// (§6.3) when it is set.
    pub fn with_auth(
        storage: Arc<Storage>,
        config: BrokerConfig,
        metrics: Arc<Metrics>,
        auth: Option<Arc<Auth>>,
    ) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            storage,
            config,
            started: Instant::now(),
            metrics,
            polls: LongPolls::default(),
            auth,
        });
        let syncer = Syncer::start()?;
        let t = Arc::clone(&inner);
        let timer = std::thread::Builder::new()
            .name("streambus-longpoll".into())
            .spawn(move || {
                while let Some(expired) = t.polls.next_expired() {
                    for w in expired {
                        t.answer_waiter(w, None);
                    }
                }
            })?;
        Ok(Self {
            inner,
            syncer,
            timer: Some(timer),
        })
    }

    /// The storage engine.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.inner.storage
    }

    /// Answers the long-poll fetches waiting on `topic` (deleted) with TopicNotFound.
    pub fn topic_deleted(&self, topic: &str) {
        self.inner.topic_deleted(topic);
    }

    /// Cluster mode: a replicated partition's high-water mark moved to `end` (committed
    /// entries applied): the long-poll fetches it satisfies are answered.
    pub fn partition_committed(&self, topic: &str, partition: u32, end: i64) {
        self.inner.wake_fetches(topic, partition, end);
    }

    /// Cluster mode: this broker stopped leading a replicated partition: the long-poll
    /// fetches waiting on it are answered NotLeader (naming the new leader when known) at once,
    /// not at their MaxWaitMs.
    pub fn partition_lost(&self, topic: &str, partition: u32) {
        let inner = &*self.inner;
        let waiters = inner.polls.remove_partition(topic, partition);
        if waiters.is_empty() {
            return;
        }
        let message = inner
            .config
            .cluster
            .as_ref()
            .and_then(|c| not_leader_message(c, topic, partition))
            .unwrap_or_else(|| {
                format!(
                    "this broker no longer leads partition {partition} of topic {topic:?}; refresh Metadata and retry"
                )
            });
        for w in waiters {
            Answer {
                reply: w.reply,
                kind: "Fetch",
                started: w.started,
                metrics: Arc::clone(&inner.metrics),
            }
            .fail(fail(ErrorCode::NOT_LEADER, message.clone()));
        }
    }

    /// Long-poll fetches waiting now.
    pub fn waiting_fetches(&self) -> usize {
        self.inner.polls.waiting()
    }

    fn route(&self, request: &Request<'_>, answer: Answer, access: &Access) {
        let inner = &*self.inner;
        // Cluster mode: a partition is served by its leader only. (A single broker skips
        // this: one branch on `None`, no lookup.)
        if let Some(c) = &inner.config.cluster
            && let Err(f) = partition_served_here(c, request)
        {
            return answer.fail(f);
        }
        match request {
            Request::Produce(p)
                if inner.config.cluster.is_some()
                    && inner.storage.is_raft_topic(p.topic.as_str()) == Some(true) =>
            {
                inner.produce_replicated(p, answer);
            }
            Request::Produce(p) => match inner.produce(p) {
                Ok((appended, None)) => {
                    inner.wake_fetches(p.topic.as_str(), p.partition, appended.high_water_mark);
                    answer.respond(&produced(appended));
                }
                Ok((appended, Some(pending))) => {
                    // Fetches may see the batch now (as before group commit); the producer
                    // hears back once it is on disk.
                    inner.wake_fetches(p.topic.as_str(), p.partition, appended.high_water_mark);
                    self.syncer.push(
                        pending,
                        Box::new(move |synced| match synced {
                            Ok(()) => answer.respond(&produced(appended)),
                            Err(e) => answer.fail(e.into()),
                        }),
                    );
                }
                Err(f) => answer.fail(f),
            },
            Request::Fetch(f) => inner.fetch(f, answer),
            Request::CreateTopic(_) | Request::DeleteTopic(_) if inner.config.cluster.is_some() => {
                self.cluster_write(request, answer);
            }
            Request::ListTopics => inner.list_topics(answer, access),
            Request::Metadata(m) => inner.metadata(m, answer, access),
            Request::Authenticate(a) => inner.authenticate(a, answer),
            _ => match inner.admin(request) {
                Ok(Some(response)) => answer.respond(&response),
                Ok(None) => unreachable_request(request, answer),
                Err(f) => answer.fail(f),
            },
        }
    }
}

/// How long a broker waits to apply its own metadata write after the leader committed it
/// (so its own ListTopics and Metadata show it) before answering anyway.
const APPLY_WAIT: Duration = Duration::from_secs(5);

impl Broker {
    /// CreateTopic and DeleteTopic in cluster mode: committed through the metadata group
    /// (forwarded to its leader by a follower), answered once this broker applied it too.
    ///
    /// A follower forwards rather than answering NotLeader: §6.4 defines NotLeader for the
    /// partition requests only, and admin clients (the CLI's single `--broker`) may talk to
    /// any broker; the extra hop costs nothing on such rare requests.
    fn cluster_write(&self, request: &Request<'_>, answer: Answer) {
        let Some(handle) = &self.inner.config.cluster else {
            return unreachable_request(request, answer);
        };
        let (command, name) = match request {
            Request::CreateTopic(c) => {
                if !(1..=MAX_PARTITIONS).contains(&c.num_partitions) {
                    return answer.fail(fail(
                        ErrorCode::INVALID_REQUEST,
                        format!(
                            "partition count {} is out of range: want 1 to {MAX_PARTITIONS}",
                            c.num_partitions
                        ),
                    ));
                }
                let name = c.topic.as_str().to_owned();
                (
                    Command::CreateTopic {
                        name: name.clone(),
                        partitions: c.num_partitions,
                        replication_factor: u32::from(c.replication_factor),
                    },
                    name,
                )
            }
            Request::DeleteTopic(d) => {
                let name = d.topic.as_str().to_owned();
                (Command::DeleteTopic { name: name.clone() }, name)
            }
            _ => return unreachable_request(request, answer),
        };
        let inner = Arc::clone(&self.inner);
        let cluster = handle.cluster.clone();
        handle.runtime.spawn(async move {
            let applied = match cluster.write(command).await {
                Ok(Committed { index, applied }) => {
                    if let Err(e) = cluster.wait_applied(index, APPLY_WAIT).await {
                        tracing::warn!(topic = %name, "answering before applying here: {e}");
                    }
                    applied
                }
                Err(e) => return answer.fail(cluster_failure(&e)),
            };
            let Ok(topic) = Topic::new(&name) else {
                return answer.fail(fail(
                    ErrorCode::INVALID_REQUEST,
                    format!("{name:?} is not a valid topic name"),
                ));
            };
            match applied {
                Applied::Created(created) => {
                    answer.respond(&Response::CreateTopic(CreateTopicResponse {
                        topic,
                        created,
                    }));
                }
                Applied::Done => {
                    inner.topic_deleted(&name);
                    answer.respond(&Response::DeleteTopic(DeleteTopicResponse {
                        topic,
                        deleted: true,
                    }));
                }
                Applied::Refused { code, message } => answer.fail(fail(ErrorCode(code), message)),
            }
        });
    }
}

/// Cluster mode: `Ok` unless `request` is a Produce, Fetch or GetOffset for a partition that
/// another broker leads, or that has no leader now: then NotLeader (15), naming the leader's
/// node id and advertised address (§6.4). A partition the metadata group does not know goes
/// on to the storage (TopicNotFound, PartitionNotFound).
///
/// A long-poll Fetch is checked when it arrives; if this broker stops leading the partition
/// while it waits, it is answered NotLeader at once ([`Broker::partition_lost`]).
fn partition_served_here(cluster: &ClusterHandle, request: &Request<'_>) -> Result<(), Failure> {
    let (topic, partition) = match request {
        Request::Produce(p) => (p.topic.as_str(), p.partition),
        Request::Fetch(f) => (f.topic.as_str(), f.partition),
        Request::GetOffset(g) => (g.topic.as_str(), g.partition),
        _ => return Ok(()),
    };
    match not_leader_message(cluster, topic, partition) {
        None => Ok(()),
        Some(message) => Err(fail(ErrorCode::NOT_LEADER, message)),
    }
}

/// The NotLeader message for `topic`/`partition` on this broker; `None` if it leads it (or the
/// metadata group does not know it).
fn not_leader_message(cluster: &ClusterHandle, topic: &str, partition: u32) -> Option<String> {
    let here = cluster.cluster.node_id();
    let message = match cluster.cluster.partition_leader(topic, partition) {
        PartitionLeader::Here | PartitionLeader::Unknown => return None,
        PartitionLeader::Elsewhere {
            leader,
            address: Some(a),
        } => format!(
            "broker {here} does not lead partition {partition} of topic {topic:?}: broker {leader} at {}:{} does; refresh Metadata and retry there",
            a.host, a.port
        ),
        PartitionLeader::Elsewhere {
            leader,
            address: None,
        } => format!(
            "broker {here} does not lead partition {partition} of topic {topic:?}: broker {leader} does, whose address is not registered yet; refresh Metadata and retry"
        ),
        _ => format!(
            "partition {partition} of topic {topic:?} has no leader now; refresh Metadata and retry"
        ),
    };
    Some(message)
}

/// The error reply for a metadata write that did not go through: NotLeader (15) when the group
/// has no reachable leader now (the client retries later), StorageError (7) otherwise.
fn cluster_failure(e: &ClusterError) -> Failure {
    let code = match e {
        ClusterError::NoLeader(_) | ClusterError::Unreachable { .. } => ErrorCode::NOT_LEADER,
        _ => ErrorCode::STORAGE_ERROR,
    };
    fail(code, e.to_string())
}

fn unreachable_request(request: &Request<'_>, answer: Answer) {
    answer.fail(fail(
        ErrorCode::UNKNOWN_REQUEST,
        format!("request type {:?} is not supported", request.request_type()),
    ));
}

fn produced(a: AppendResult) -> Response<'static> {
    Response::Produce(ProduceResponse {
        base_offset: a.base_offset,
        num_messages: a.count,
        high_water_mark: a.high_water_mark,
    })
}

impl Inner {
    /// The largest message record a Produce may carry: one message must fit a Fetch reply.
    fn max_record(&self) -> usize {
        (self.config.max_frame_len as usize)
            .saturating_sub(RESPONSE_HEADER_LEN - 4 + FETCH_RESPONSE_FIXED_LEN + 4)
    }

    /// Checks a Produce's message sizes and producer fields; returns the producer.
    fn produce_checks(&self, p: &ProduceRequest<'_>) -> Result<Option<ProducerBatch>, Failure> {
        let max = self.max_record();
        if let Some((i, len)) = p
            .messages
            .records()
            .map(<[u8]>::len)
            .enumerate()
            .find(|&(_, len)| len > max)
        {
            return Err(fail(
                ErrorCode::MESSAGE_TOO_LARGE,
                format!(
                    "message #{i} is {len} bytes; the largest accepted is {max} (max frame minus 43)"
                ),
            ));
        }
        // §6.2: zero messages is a plain produce whatever the producer fields hold.
        match p.producer {
            Some(info) if p.messages.count() > 0 => {
                ProducerBatch::from_wire(info.producer_id, info.producer_epoch, info.base_sequence)
                    .map_err(|e| fail(ErrorCode::INVALID_REQUEST, e.to_string()))
            }
            _ => Ok(None),
        }
    }

    /// Cluster mode, a replicated topic: the batch is proposed to the partition's Raft group
    /// (this broker leads it: `partition_served_here` checked) and answered once committed on
    /// a majority of its replicas (each stored it, fsynced per its policy) and applied here;
    /// the leader stamps its offsets as it appends it. Until then the reply is deferred.
    fn produce_replicated(&self, p: &ProduceRequest<'_>, answer: Answer) {
        let producer = match self.produce_checks(p) {
            Ok(pr) => pr,
            Err(f) => return answer.fail(f),
        };
        let (topic, partition) = (p.topic.as_str(), p.partition);
        let Some(handle) = &self.config.cluster else {
            return unreachable_request(&Request::Produce(*p), answer);
        };
        let Some(raft) = handle.cluster.replicas().get(topic, partition) else {
            // A partition the topic does not have keeps its own error.
            if let Err(e) = self.storage.offsets(topic, partition) {
                return answer.fail(e.into());
            }
            return answer.fail(fail(
                ErrorCode::NOT_LEADER,
                format!(
                    "partition {partition} of topic {topic:?} has no running Raft group on broker {} now; refresh Metadata and retry",
                    handle.cluster.node_id()
                ),
            ));
        };
        if p.messages.count() == 0 {
            return match self.storage.offsets(topic, partition) {
                Ok((_, end)) => answer.respond(&produced(AppendResult {
                    base_offset: end,
                    count: 0,
                    high_water_mark: end,
                })),
                Err(e) => answer.fail(e.into()),
            };
        }
        let batch = Batch::new(&p.messages, now_unix_ns(), producer);
        let (topic, here) = (topic.to_owned(), handle.cluster.node_id());
        // Proposed here, in the order the connection's requests came: the proposal is an
        // unbounded send to the group's core, done at the first poll. A connection's
        // pipelined batches are so appended (stamped, and checked against their producer's
        // sequence) in the order sent; proposed from a task each, a later one could go
        // first and be refused OutOfOrderSequence. Only the wait for the commit is a task.
        let mut submit = Box::pin(async move { raft.client_write_ff(batch).await });
        let polled = submit
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        let submitted = match polled {
            std::task::Poll::Ready(r) => Ok(r),
            std::task::Poll::Pending => Err(submit),
        };
        handle.runtime.spawn(async move {
            let proposed = match submitted {
                Ok(r) => r,
                Err(pending) => pending.await,
            };
            let written = match proposed {
                Ok(rx) => match rx.await {
                    Ok(result) => result.map_err(RaftError::APIError),
                    Err(_) => Err(RaftError::Fatal(openraft::error::Fatal::Stopped)),
                },
                Err(fatal) => Err(RaftError::Fatal(fatal)),
            };
            match written {
                // An idempotent batch the leader refused by §6.2, as a single broker would.
                Ok(ref r) if let Some(refused) = &r.data.refused => {
                    answer.fail(fail(ErrorCode(refused.code), refused.message.clone()));
                }
                // Stored, or a retry answered with the original batch's offsets.
                Ok(r) => answer.respond(&produced(AppendResult {
                    base_offset: r.data.base_offset,
                    count: r.data.count,
                    high_water_mark: r.data.high_water_mark,
                })),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    let message = match f.leader_id {
                        Some(l) => format!(
                            "broker {here} no longer leads partition {partition} of topic {topic:?}: broker {l} does; refresh Metadata and retry there"
                        ),
                        None => format!(
                            "partition {partition} of topic {topic:?} has no leader now; refresh Metadata and retry"
                        ),
                    };
                    answer.fail(fail(ErrorCode::NOT_LEADER, message));
                }
                Err(e) => answer.fail(fail(
                    ErrorCode::NOT_LEADER,
                    format!(
                        "partition {partition} of topic {topic:?}: not committed ({e}); refresh Metadata and retry"
                    ),
                )),
            }
        });
    }

    fn produce(
        &self,
        p: &ProduceRequest<'_>,
    ) -> Result<(AppendResult, Option<crate::storage::PendingSync>), Failure> {
        let producer = self.produce_checks(p)?;
        let topic = p.topic.as_str();
        let now = now_unix_ns();
        let storage = &self.storage;
        let append =
            || storage.append_unsynced_idempotent(topic, p.partition, &p.messages, now, producer);
        let appended = match append() {
            // In cluster mode topics exist only through the metadata group (CreateTopic).
            Err(StorageError::TopicNotFound { .. })
                if self.config.auto_create_topics && self.config.cluster.is_none() =>
            {
                match storage.create_topic(topic, 1, TopicConfig::default()) {
                    Ok(true) => {
                        tracing::info!(topic, "auto-created topic with 1 partition");
                    }
                    // Created meanwhile by another request, with any partition count:
                    // the append below decides (PartitionNotFound if it lacks ours).
                    Ok(false) | Err(StorageError::TopicExists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                append()?
            }
            other => other?,
        };
        Ok(appended)
    }

    /// What a fetch returns now, as file ranges.
    fn plan(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: u32,
    ) -> Result<FetchPlan, StorageError> {
        let cap = u32::try_from(self.max_record()).unwrap_or(u32::MAX);
        self.storage
            .fetch_plan(topic, partition, offset, max_bytes, cap)
    }

    fn fetch(&self, f: &FetchRequest<'_>, answer: Answer) {
        let ext = f.extension.unwrap_or_default();
        if !matches!(ext.isolation_level, 0 | 1) {
            return answer.fail(fail(
                ErrorCode::INVALID_REQUEST,
                format!(
                    "isolation level {} is not supported: want 0 or 1",
                    ext.isolation_level
                ),
            ));
        }
        let (topic, partition, offset) = (f.topic.as_str(), f.partition, f.offset);
        let plan = self.plan(topic, partition, offset, f.max_bytes);
        let wait = ext
            .long_poll
            .filter(|lp| lp.max_wait_ms > 0 && lp.min_bytes > 0);
        let Some(lp) = wait else {
            return self.answer_plan(answer, offset, plan);
        };
        let min_bytes = u64::from(lp.min_bytes.min(f.max_bytes));
        match plan {
            Ok(p) if !Waiter::satisfied_by(&p, min_bytes) => {}
            // Errors are answered at once, never after a wait; so is enough data.
            done => return self.answer_plan(answer, offset, done),
        }
        let wait = Duration::from_millis(u64::from(lp.max_wait_ms)).min(self.config.max_fetch_wait);
        let Answer {
            reply,
            kind,
            started,
            metrics,
        } = answer;
        let registered = self.polls.register(
            topic,
            partition,
            reply,
            started,
            (offset, f.max_bytes, min_bytes),
            started + wait,
            || self.plan(topic, partition, offset, f.max_bytes),
        );
        if let Registered::Now(reply, plan) = registered {
            let answer = Answer {
                reply,
                kind,
                started,
                metrics,
            };
            self.answer_plan(answer, offset, plan);
        }
    }

    /// Answers the fetches on `topic`/`partition` that an append up to `end` satisfies.
    fn wake_fetches(&self, topic: &str, partition: u32, end: i64) {
        let ready = self.polls.appended(topic, partition, end, |w| {
            self.plan(topic, partition, w.offset, w.max_bytes)
        });
        for (w, plan) in ready {
            self.answer_waiter(w, Some(plan));
        }
    }

    /// Answers a waiting fetch with `plan`, or with what exists now.
    fn answer_waiter(&self, w: Waiter, plan: Option<Result<FetchPlan, StorageError>>) {
        let plan = plan.unwrap_or_else(|| self.plan(&w.topic, w.partition, w.offset, w.max_bytes));
        let answer = Answer {
            reply: w.reply,
            kind: "Fetch",
            started: w.started,
            metrics: Arc::clone(&self.metrics),
        };
        self.answer_plan(answer, w.offset, plan);
    }

    fn answer_plan(&self, answer: Answer, offset: i64, plan: Result<FetchPlan, StorageError>) {
        let plan = match plan {
            Ok(p) => p,
            Err(e) => return answer.fail(e.into()),
        };
        let trailer = FetchTrailer {
            last_stable_offset: plan.high_water_mark,
            next_offset: plan.next_offset,
        };
        // The storage engine validated these records when they were appended and checks their
        // CRCs on recovery; the frame CRC is combined from the stored batch CRCs, so a bit
        // flipped on disk since then fails the client's check.
        if plan.len >= SENDFILE_MIN {
            let ranges = plan
                .ranges
                .into_iter()
                .map(|r| FileChunk {
                    file: r.file,
                    offset: r.offset,
                    len: r.len,
                })
                .collect();
            answer.done("ok").respond_fetch_file(
                plan.high_water_mark,
                plan.count,
                trailer,
                plan.crc,
                ranges,
            );
            return;
        }
        let records = match read_ranges(&plan) {
            Ok(r) => r,
            Err(e) => {
                return answer.fail(fail(
                    ErrorCode::STORAGE_ERROR,
                    format!("reading the log at offset {offset}: {e}"),
                ));
            }
        };
        let messages = MessageSet::new_unchecked(plan.count, &records);
        answer.done("ok").respond_fetch(
            &FetchResponse {
                high_water_mark: plan.high_water_mark,
                messages,
                trailer: Some(trailer),
            },
            plan.crc,
        );
    }

    /// The requests answered at once (`None`: not one of them).
    fn admin<'r>(&self, request: &Request<'r>) -> Result<Option<Response<'r>>, Failure> {
        let response = match request {
            Request::GetOffset(g) => {
                let (start, end) = self.storage.offsets(g.topic.as_str(), g.partition)?;
                Response::GetOffset(GetOffsetResponse {
                    topic: g.topic,
                    partition: g.partition,
                    start_offset: start,
                    end_offset: end,
                    high_water_mark: end,
                })
            }
            Request::CreateTopic(c) => {
                if !(1..=MAX_PARTITIONS).contains(&c.num_partitions) {
                    return Err(fail(
                        ErrorCode::INVALID_REQUEST,
                        format!(
                            "partition count {} is out of range: want 1 to {MAX_PARTITIONS}",
                            c.num_partitions
                        ),
                    ));
                }
                if c.replication_factor > 1 {
                    return Err(fail(
                        ErrorCode::INVALID_REQUEST,
                        format!(
                            "replication factor {} is not supported: want 0 or 1",
                            c.replication_factor
                        ),
                    ));
                }
                let created = self.storage.create_topic(
                    c.topic.as_str(),
                    c.num_partitions,
                    TopicConfig::default(),
                )?;
                Response::CreateTopic(CreateTopicResponse {
                    topic: c.topic,
                    created,
                })
            }
            Request::DeleteTopic(d) => {
                let topic = d.topic.as_str();
                self.storage.delete_topic(topic)?;
                self.topic_deleted(topic);
                Response::DeleteTopic(DeleteTopicResponse {
                    topic: d.topic,
                    deleted: true,
                })
            }
            Request::HealthCheck => {
                let uptime = i64::try_from(self.started.elapsed().as_secs()).unwrap_or(i64::MAX);
                Response::HealthCheck(HealthCheckResponse {
                    status: Text(b"healthy"),
                    uptime_secs: uptime,
                })
            }
            _ => return Ok(None),
        };
        Ok(Some(response))
    }
}

impl Inner {
    /// Fetches waiting on a deleted topic will never see data: answers them now.
    fn topic_deleted(&self, topic: &str) {
        for w in self.polls.remove_topic(topic) {
            self.answer_waiter(
                w,
                Some(Err(StorageError::TopicNotFound {
                    topic: topic.to_owned(),
                })),
            );
        }
    }

    /// The topics and their partition counts: the metadata group's in cluster mode, else the
    /// storage's.
    fn topics(&self) -> Vec<(String, u32)> {
        match &self.config.cluster {
            Some(c) => c
                .cluster
                .metadata()
                .topics
                .into_iter()
                .map(|(name, t)| (name, u32::try_from(t.partitions.len()).unwrap_or(u32::MAX)))
                .collect(),
            None => self.storage.list_topics(),
        }
    }

    fn list_topics(&self, answer: Answer, access: &Access) {
        let list = self.topics();
        let topics: Vec<TopicInfo<'_>> = list
            .iter()
            .filter(|(name, _)| access.sees(name))
            .filter_map(|(name, n)| {
                Topic::new(name).ok().map(|name| TopicInfo {
                    name,
                    num_partitions: *n,
                })
            })
            .collect();
        let response = Response::ListTopics(ListTopicsResponse {
            topics: TopicList::from_slice(&topics),
        });
        // The one reply that grows without bound: it must still fit a frame.
        let length = response_encoded_len(&response).saturating_sub(4); // after Length
        if length > self.config.max_frame_len as usize {
            return answer.fail(fail(
                ErrorCode::MESSAGE_TOO_LARGE,
                format!(
                    "the list of {} topics takes a {length}-byte frame, over the maximum of {}",
                    topics.len(),
                    self.config.max_frame_len
                ),
            ));
        }
        answer.respond(&response);
    }
}

impl Inner {
    /// Metadata (§6.4) of a single broker: itself at its advertised address, leader (epoch 0)
    /// and only replica of every partition; topics once each in byte order of their names, a
    /// missing one with TopicNotFound and no partitions.
    ///
    /// In cluster mode: the brokers registered in the metadata group, and each partition's
    /// replicas as placed by it, led by its preferred leader (the first replica; epoch 0 until
    /// partitions are replicated).
    ///
    /// With `--auth-file`, "every topic" lists only the topics the principal may see (as
    /// ListTopics does), and a topic asked for by name that it may not see has
    /// AuthorizationFailed (41) and no partitions.
    fn metadata(&self, m: &MetadataRequest<'_>, answer: Answer, access: &Access) {
        // In cluster mode: the group's brokers and placement, read once.
        let cluster = self.config.cluster.as_ref().map(|c| c.cluster.metadata());
        let count_of = |name: &str| match &cluster {
            Some(c) => c
                .topics
                .get(name)
                .map(|t| u32::try_from(t.partitions.len()).unwrap_or(u32::MAX)),
            None => self.storage.partition_count(name),
        };
        let topics: Vec<(String, Result<u32, ErrorCode>)> = if m.topics.is_empty() {
            self.topics()
                .into_iter()
                .filter(|(name, _)| access.sees(name))
                .map(|(name, n)| (name, Ok(n)))
                .collect()
        } else {
            m.topics
                .iter()
                .map(|t| {
                    let name = t.as_str();
                    let count = if !access.sees(name) {
                        Err(ErrorCode::AUTHORIZATION_FAILED)
                    } else {
                        count_of(name).ok_or(ErrorCode::TOPIC_NOT_FOUND)
                    };
                    (name.to_owned(), count)
                })
                .collect()
        };
        let mut topics = topics;
        topics.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        topics.dedup_by(|a, b| a.0 == b.0);

        let node = self.config.node_id;
        let single = [node];
        // Per topic, per partition: its leader and replicas. A single broker leads and holds
        // everything; in a cluster, the placement's leader (the one the NotLeader check uses).
        let placement = |name: &str, partition: u32| -> (i32, i32, &[u32]) {
            let placed = cluster.as_ref().and_then(|c| {
                c.topics
                    .get(name)?
                    .partitions
                    .get(usize::try_from(partition).ok()?)
            });
            // A partition with a Raft group here: its leader and term (the LeaderEpoch).
            let group = self
                .config
                .cluster
                .as_ref()
                .and_then(|c| c.cluster.group_leader(name, partition));
            match (&cluster, placed, group) {
                (Some(_), Some(p), Some((leader, term))) => (
                    leader.and_then(|l| i32::try_from(l).ok()).unwrap_or(-1),
                    i32::try_from(term).unwrap_or(i32::MAX),
                    &p.replicas,
                ),
                (Some(_), Some(p), None) => (
                    p.leader().and_then(|l| i32::try_from(l).ok()).unwrap_or(-1),
                    i32::try_from(p.leader_term()).unwrap_or(i32::MAX),
                    &p.replicas,
                ),
                (Some(_), None, _) => (-1, 0, &[]),
                (None, _, _) => (i32::try_from(node).unwrap_or(i32::MAX), 0, &single),
            }
        };
        let partitions: Vec<Vec<PartitionMetadata<'_>>> = topics
            .iter()
            .map(|(name, count)| {
                (0..*count.as_ref().unwrap_or(&0))
                    .map(|partition| {
                        let (leader, leader_epoch, replicas) = placement(name, partition);
                        PartitionMetadata {
                            partition,
                            leader,
                            leader_epoch,
                            replicas: ReplicaList::from_slice(replicas),
                        }
                    })
                    .collect()
            })
            .collect();
        let entries: Vec<TopicMetadata<'_>> = topics
            .iter()
            .zip(&partitions)
            .filter_map(|((name, count), parts)| {
                Some(TopicMetadata {
                    name: Topic::new(name).ok()?,
                    error_code: count.err().unwrap_or(ErrorCode::NONE),
                    partitions: PartitionList::from_slice(parts),
                })
            })
            .collect();
        let brokers: Vec<BrokerInfo<'_>> = match &cluster {
            Some(c) => c
                .brokers
                .iter()
                .map(|(id, a)| BrokerInfo {
                    node_id: *id,
                    host: Text(a.host.as_bytes()),
                    port: a.port,
                })
                .collect(),
            None => vec![BrokerInfo {
                node_id: node,
                host: Text(self.config.advertise.host.as_bytes()),
                port: self.config.advertise.port,
            }],
        };
        let response = Response::Metadata(MetadataResponse {
            brokers: BrokerList::from_slice(&brokers),
            topics: TopicMetadataList::from_slice(&entries),
        });
        // Grows with the topics and partitions: it must still fit a frame.
        let length = response_encoded_len(&response).saturating_sub(4); // after Length
        if length > self.config.max_frame_len as usize {
            return answer.fail(fail(
                ErrorCode::MESSAGE_TOO_LARGE,
                format!(
                    "the metadata of {} topics takes a {length}-byte frame, over the maximum of {}",
                    entries.len(),
                    self.config.max_frame_len
                ),
            ));
        }
        answer.respond(&response);
    }
}

/// Authentication and authorization (§6.3).
impl Inner {
    /// Whether the connection's principal may make `request`; without `--auth-file`, anyone
    /// may make any request.
    fn authorize(
        &self,
        request: &Request<'_>,
        connection: &streambus_adapters::Connection,
    ) -> Result<Access, Failure> {
        let Some(auth) = &self.auth else {
            return Ok(Access::All);
        };
        auth.check(request, connection.principal().as_ref())
            .map_err(|refusal| match refusal {
                Refusal::Unauthenticated => {
                    self.metrics.authentication_failed("required");
                    fail(
                        ErrorCode::AUTHENTICATION_FAILED,
                        format!(
                            "authentication required: send Authenticate (mechanisms: {}) first",
                            Auth::MECHANISMS
                        ),
                    )
                }
                Refusal::UnknownPrincipal(principal) => {
                    self.metrics.authentication_failed("unknown_principal");
                    fail(
                        ErrorCode::AUTHENTICATION_FAILED,
                        format!(
                            "principal {principal:?} is no longer in the auth file: authenticate again"
                        ),
                    )
                }
                Refusal::Denied {
                    principal,
                    permission,
                    topic,
                } => {
                    self.metrics.authorization_denied(permission.name());
                    let what = request.request_type().name();
                    fail(
                        ErrorCode::AUTHORIZATION_FAILED,
                        format!(
                            "principal {principal:?} may not {what} on topic {topic:?}: it lacks the {} permission",
                            permission.name()
                        ),
                    )
                }
            })
    }

    /// With `--auth-file` and mTLS: a connection not yet authenticated whose verified client
    /// certificate's subject (RFC 4514, like `O=Example,CN=alice`) is a principal's name in the
    /// file speaks for that principal, without an Authenticate (which may still replace it).
    fn certificate_principal(&self, reply: &Reply) {
        let (Some(auth), Some(peer)) = (&self.auth, reply.peer()) else {
            return;
        };
        let connection = reply.connection();
        if connection.is_authenticated() {
            return;
        }
        if let Some(subject) = &peer.tls_client_subject
            && let Some(principal) = auth.policy().principal_named(subject)
        {
            tracing::debug!(%principal, "connection authenticated by its client certificate");
            connection.set_principal(principal);
        }
    }

    /// Answers an Authenticate: the principal on success; 40 otherwise, closing the connection
    /// after the third failure in a row. Never says anything of the credential.
    fn authenticate(&self, a: &AuthenticateRequest<'_>, answer: Answer) {
        let Some(auth) = &self.auth else {
            self.metrics.authentication_failed("not_enabled");
            return answer.fail(fail(
                ErrorCode::AUTHENTICATION_FAILED,
                "authentication is not enabled on this broker".to_owned(),
            ));
        };
        let connection = answer.reply.connection();
        let (reason, what) = if a.mechanism.as_bytes() != MECHANISM_TOKEN.as_bytes() {
            ("unknown_mechanism", "the mechanism is not supported")
        } else if let Some(principal) = auth.policy().authenticate(a.credential) {
            connection.set_principal(Arc::clone(&principal));
            tracing::debug!(%principal, "connection authenticated");
            return answer.respond(&Response::Authenticate(AuthenticateResponse {
                principal: Text(principal.as_bytes()),
            }));
        } else {
            ("bad_credential", "the token is not valid")
        };
        self.metrics.authentication_failed(reason);
        let failures = connection.authentication_failed();
        let mechanisms = Auth::MECHANISMS;
        if failures >= MAX_AUTH_FAILURES {
            tracing::info!(
                failures,
                reason,
                "closing a connection after failed authentications"
            );
            connection.close();
            answer.fail(fail(
                ErrorCode::AUTHENTICATION_FAILED,
                format!(
                    "authentication failed: {what} (supported mechanisms: {mechanisms}); {failures} failures in a row: closing the connection"
                ),
            ));
        } else {
            answer.fail(fail(
                ErrorCode::AUTHENTICATION_FAILED,
                format!("authentication failed: {what} (supported mechanisms: {mechanisms})"),
            ));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        for w in self.inner.polls.close() {
            self.inner.answer_waiter(w, None);
        }
        if let Some(t) = self.timer.take()
            && t.join().is_err()
        {
            tracing::error!("the long-poll timer thread panicked");
        }
    }
}

impl Handler for Broker {
    fn handle(&self, flags: Flags, request: &Request<'_>, reply: Reply) {
        let _ = flags; // Compressed Produce is refused by the connection layer; other bits are ignored.
        let answer = Answer {
            reply,
            kind: request.request_type().name(),
            started: Instant::now(),
            metrics: Arc::clone(&self.inner.metrics),
        };
        self.inner.certificate_principal(&answer.reply);
        match self.inner.authorize(request, answer.reply.connection()) {
            Ok(access) => self.route(request, answer, &access),
            Err(f) => answer.fail(f),
        }
    }

    fn blocks(&self, request: &Request<'_>) -> bool {
        match request {
            Request::CreateTopic(_) | Request::DeleteTopic(_) => true,
            // Auto-create makes directories and fsyncs them.
            Request::Produce(p) => {
                self.inner.config.auto_create_topics
                    && self
                        .inner
                        .storage
                        .partition_count(p.topic.as_str())
                        .is_none()
            }
            _ => false,
        }
    }

    fn shutdown(&self) {
        for w in self.inner.polls.close() {
            self.inner.answer_waiter(w, None);
        }
    }

    fn on_event(&self, event: ConnEvent) {
        self.inner.metrics.connection_event(event);
    }
}
