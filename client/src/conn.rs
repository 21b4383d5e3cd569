//! One connection: a task owning the core's async driver, fed through a channel. Callers
//! send owned [`Req`]s with a reply channel; the task queues them (pipelining up to the
//! configured depth), matches completions by RequestID and answers each caller exactly once.
//! No parsing happens here: requests are encoded and responses decoded by the core.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use streambus_core::io::DriverError;
use streambus_core::io::asynch::Wake;
use streambus_core::{
    ClientError, CreateTopicRequest, DeleteTopicRequest, FetchExtension, FetchRequest,
    GetOffsetRequest, LongPoll, MessageSet, MetadataRequest, ProduceRequest, ProducerInfo, Request,
    Response, Topic, TopicNames,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::error::{Context, Error, ProtocolError, Result};
use crate::types::{
    BrokerMetadata, ConsumerRecord, Health, Metadata, PartitionMetadata, PartitionOffsets,
    TopicInfo, TopicMetadata,
};

/// The pipelining depth the driver is built for; the configured depth is at most this.
pub(crate) const MAX_IN_FLIGHT: usize = 128;

/// The core driver over a tokio socket.
pub(crate) type Driver = streambus_adapters::tokio::Client<MAX_IN_FLIGHT>;

/// An owned request, turned into the core's borrowed [`Request`] inside the task.
#[derive(Debug, Clone)]
pub(crate) enum Req {
    Produce {
        topic: Arc<str>,
        partition: u32,
        count: u32,
        /// Records encoded by the core's encoder.
        records: Arc<Vec<u8>>,
        /// Idempotent produce: the producer's id, epoch and the batch's base sequence.
        producer: Option<ProducerInfo>,
    },
    Fetch {
        topic: Arc<str>,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        long_poll: Option<LongPoll>,
        /// A consumer's read ahead: when this fetch brings records and the channel is empty,
        /// the connection sends the next fetch (from the answer's NextOffset) before it copies
        /// this answer out, and that fetch's answer goes to the channel (see [`Fetched::ahead`]).
        ahead: Option<Ahead>,
    },
    GetOffset {
        topic: Arc<str>,
        partition: u32,
    },
    CreateTopic {
        topic: Arc<str>,
        partitions: u32,
        replication_factor: u16,
    },
    DeleteTopic {
        topic: Arc<str>,
    },
    ListTopics,
    Health,
    /// Metadata of these topics (empty: every topic).
    Metadata {
        topics: Arc<[Arc<str>]>,
    },
}

/// A consumer's read ahead on one partition: where the answers of the fetches sent ahead go
/// (a channel of [`AHEAD_DEPTH`] answers), and the consumer's fetch slots. A fetch is only
/// sent ahead for a call still awaited, while the channel is empty and a slot is free without
/// waiting (held until it completes), so one such fetch is in flight at a time, its answer
/// always finds room, a consumer that stops reading stops its fetches after at most two
/// answers, and partitions waiting for a slot get theirs in turn.
#[derive(Debug, Clone)]
pub(crate) struct Ahead {
    pub(crate) tx: AheadTx,
    pub(crate) slots: Arc<Semaphore>,
}

/// The sending side of an [`Ahead`] channel.
pub(crate) type AheadTx = mpsc::Sender<Result<Reply>>;

/// The room of an [`Ahead`] channel.
pub(crate) const AHEAD_DEPTH: usize = 2;

/// A fetch's answer.
#[derive(Debug)]
pub(crate) struct Fetched {
    /// The offset this fetch read from.
    pub(crate) offset: i64,
    /// The offset of the fetch the connection sent ahead after this one (its answer goes to
    /// the request's [`Ahead`] channel), if it did.
    pub(crate) ahead: Option<i64>,
    pub(crate) next_offset: Option<i64>,
    /// The partition's high-water mark when the broker answered.
    pub(crate) high_water_mark: i64,
    topic: Arc<str>,
    partition: u32,
    /// The number of records in `set`.
    count: u32,
    /// The records' wire bytes, validated by the core when the answer was decoded.
    set: Arc<[u8]>,
}

impl Fetched {
    /// The records, as views into the fetch's one copy of their bytes.
    pub(crate) fn records(&self) -> Result<Vec<ConsumerRecord>> {
        let base: &[u8] = &self.set;
        let at = |part: &[u8]| -> Result<std::ops::Range<usize>> {
            let start = (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
            let end = start.wrapping_add(part.len());
            if part.is_empty() {
                Ok(0..0)
            } else if start <= end && end <= base.len() {
                Ok(start..end)
            } else {
                Err(unexpected("a record outside its message set".into()))
            }
        };
        let set = MessageSet::new_unchecked(self.count, base);
        let mut records = Vec::with_capacity(self.count as usize);
        for m in set.iter() {
            let mut headers = Vec::new();
            for h in m.headers.iter() {
                headers.push((at(h.key)?, at(h.value)?));
            }
            records.push(ConsumerRecord::new(
                self.topic.clone(),
                self.partition,
                m.offset,
                m.timestamp,
                self.set.clone(),
                at(m.key)?,
                at(m.value)?,
                headers,
            ));
        }
        if records.len() != self.count as usize {
            return Err(unexpected(format!(
                "a fetch of {} records held {}",
                self.count,
                records.len()
            )));
        }
        Ok(records)
    }
}

/// An owned success reply.
#[derive(Debug)]
pub(crate) enum Reply {
    Produce { base_offset: i64 },
    Fetch(Fetched),
    Offsets(PartitionOffsets),
    Created(bool),
    Deleted,
    Topics(Vec<TopicInfo>),
    Health(Health),
    Metadata(Metadata),
}

/// A callback run by the connection task with a call's result: it must be quick and never
/// block (it runs between two socket reads).
pub(crate) type Callback = Box<dyn FnOnce(Result<Reply>) + Send>;

/// Where a call's result goes.
pub(crate) enum ReplyTo {
    /// A caller awaiting it.
    Caller(Option<oneshot::Sender<Result<Reply>>>),
    /// A callback; if the job is dropped unanswered, it gets [`Error::Closed`].
    Callback(Option<Callback>),
    /// A fetch sent ahead: its answer goes to the consumer's channel, which has room for it
    /// (see [`Ahead`]); if the job is dropped unanswered, the channel gets [`Error::Closed`].
    Ahead(Option<AheadTx>),
}

impl std::fmt::Debug for ReplyTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Caller(_) => "Caller",
            Self::Callback(_) => "Callback",
            Self::Ahead(_) => "Ahead",
        })
    }
}

impl ReplyTo {
    pub(crate) fn send(mut self, result: Result<Reply>) {
        match &mut self {
            Self::Caller(tx) => {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(result);
                }
            }
            Self::Callback(f) => {
                if let Some(f) = f.take() {
                    f(result);
                }
            }
            Self::Ahead(tx) => {
                if let Some(tx) = tx.take() {
                    // Room is kept for it; a full or closed channel means nobody reads on.
                    let _ = tx.try_send(result);
                }
            }
        }
    }

    /// Whether nobody waits for the result any more.
    fn is_closed(&self) -> bool {
        match self {
            Self::Caller(tx) => tx.as_ref().is_none_or(|t| t.is_closed()),
            Self::Callback(f) => f.is_none(),
            Self::Ahead(tx) => tx.as_ref().is_none_or(|t| t.is_closed()),
        }
    }
}

impl Drop for ReplyTo {
    fn drop(&mut self) {
        let closed = || {
            Err(Error::Closed {
                context: Context::default(),
                what: "connection",
            })
        };
        match self {
            Self::Callback(f) => {
                if let Some(f) = f.take() {
                    f(closed());
                }
            }
            Self::Ahead(tx) => {
                if let Some(tx) = tx.take() {
                    let _ = tx.try_send(closed());
                }
            }
            Self::Caller(_) => {}
        }
    }
}

/// One call waiting in a connection. Dropping it frees the caller's capacity.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) req: Req,
    pub(crate) reply: ReplyTo,
    /// When the call fails with [`Error::TimedOut`] if unanswered.
    pub(crate) deadline: Instant,
    /// The timeout that set the deadline (for the error).
    pub(crate) timeout: Duration,
    /// Declared before the permit, so it drops first: whoever gets the permit next finds
    /// the connection's load already lowered.
    pub(crate) _load: LoadGuard,
    pub(crate) _permit: OwnedSemaphorePermit,
    /// A fetch sent ahead: the consumer's fetch slot it holds.
    pub(crate) _slot: Option<OwnedSemaphorePermit>,
}

/// Counts a call against its connection until dropped.
#[derive(Debug)]
pub(crate) struct LoadGuard(pub(crate) Arc<AtomicUsize>);

impl LoadGuard {
    /// Counts a call against `load` if it is under `limit` (checked and counted at once, so
    /// racing callers never push it past the limit).
    pub(crate) fn try_new(load: &Arc<AtomicUsize>, limit: usize) -> Option<Self> {
        load.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < limit).then_some(n + 1)
        })
        .ok()
        .map(|_| Self(load.clone()))
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn topic(t: &str) -> Result<Topic<'_>> {
    Topic::new(t).map_err(|e| Error::invalid(Context::new("encode"), e.to_string()))
}

/// The core's request for `req`; `names` holds a Metadata request's topic names.
fn request<'a>(req: &'a Req, names: &'a mut Vec<Topic<'a>>) -> Result<Request<'a>> {
    Ok(match req {
        Req::Produce {
            topic: t,
            partition,
            count,
            records,
            producer,
        } => Request::Produce(ProduceRequest {
            topic: topic(t)?,
            partition: *partition,
            // Encoded by the core's own encoder, record by record.
            messages: MessageSet::new_unchecked(*count, records),
            producer: *producer,
        }),
        Req::Fetch {
            topic: t,
            partition,
            offset,
            max_bytes,
            long_poll,
            ahead: _,
        } => Request::Fetch(FetchRequest {
            topic: topic(t)?,
            partition: *partition,
            offset: *offset,
            max_bytes: *max_bytes,
            extension: Some(FetchExtension {
                isolation_level: 0,
                long_poll: *long_poll,
            }),
        }),
        Req::GetOffset {
            topic: t,
            partition,
        } => Request::GetOffset(GetOffsetRequest {
            topic: topic(t)?,
            partition: *partition,
        }),
        Req::CreateTopic {
            topic: t,
            partitions,
            replication_factor,
        } => Request::CreateTopic(CreateTopicRequest {
            topic: topic(t)?,
            num_partitions: *partitions,
            replication_factor: *replication_factor,
        }),
        Req::DeleteTopic { topic: t } => {
            Request::DeleteTopic(DeleteTopicRequest { topic: topic(t)? })
        }
        Req::ListTopics => Request::ListTopics,
        Req::Health => Request::HealthCheck,
        Req::Metadata { topics } => {
            for t in topics.iter() {
                names.push(topic(t)?);
            }
            Request::Metadata(MetadataRequest {
                topics: TopicNames::from_slice(names),
            })
        }
    })
}

fn unexpected(what: String) -> Error {
    Error::Protocol {
        context: Context::default(),
        source: ProtocolError::Unexpected(what),
    }
}

/// Copies the response out of the receive buffer; `ahead` is the offset of the fetch sent
/// ahead after it, if any.
fn reply(req: &Req, response: Response<'_>, ahead: Option<i64>) -> Result<Reply> {
    Ok(match (req, response) {
        (_, Response::Error(e)) => {
            return Err(Error::Broker {
                context: Context::default(),
                code: e.code,
                message: e.message.to_string(),
            });
        }
        (Req::Produce { count, .. }, Response::Produce(p)) => {
            if p.num_messages != *count {
                return Err(unexpected(format!(
                    "produce of {count} records acknowledged {}",
                    p.num_messages
                )));
            }
            Reply::Produce {
                base_offset: p.base_offset,
            }
        }
        (
            Req::Fetch {
                topic,
                partition,
                offset,
                ..
            },
            Response::Fetch(f),
        ) => {
            // One copy of the records per fetch; the consumer's records are views into it,
            // built by its fetcher (off this task, which reads the next answer meanwhile).
            Reply::Fetch(Fetched {
                offset: *offset,
                ahead,
                next_offset: f.trailer.map(|t| t.next_offset),
                high_water_mark: f.high_water_mark,
                topic: topic.clone(),
                partition: *partition,
                count: f.messages.count(),
                set: Arc::from(f.messages.as_bytes()),
            })
        }
        (Req::GetOffset { partition, .. }, Response::GetOffset(g)) => {
            Reply::Offsets(PartitionOffsets {
                partition: *partition,
                start: g.start_offset,
                end: g.end_offset,
                high_water_mark: g.high_water_mark,
            })
        }
        (Req::CreateTopic { .. }, Response::CreateTopic(c)) => Reply::Created(c.created),
        (Req::DeleteTopic { .. }, Response::DeleteTopic(_)) => Reply::Deleted,
        (Req::ListTopics, Response::ListTopics(l)) => Reply::Topics(
            l.topics
                .iter()
                .map(|t| TopicInfo {
                    name: t.name.as_str().to_owned(),
                    partitions: t.num_partitions,
                })
                .collect(),
        ),
        (Req::Health, Response::HealthCheck(h)) => Reply::Health(Health {
            status: h.status.to_string(),
            uptime_secs: h.uptime_secs,
        }),
        (Req::Metadata { .. }, Response::Metadata(m)) => Reply::Metadata(Metadata {
            brokers: m
                .brokers
                .iter()
                .map(|b| BrokerMetadata {
                    node_id: b.node_id,
                    host: b.host.to_string(),
                    port: b.port,
                })
                .collect(),
            topics: m
                .topics
                .iter()
                .map(|t| TopicMetadata {
                    name: t.name.as_str().to_owned(),
                    error_code: t.error_code,
                    partitions: t
                        .partitions
                        .iter()
                        .map(|p| PartitionMetadata {
                            partition: p.partition,
                            leader: u32::try_from(p.leader).ok(),
                            leader_epoch: p.leader_epoch,
                            replicas: p.replicas.iter().collect(),
                        })
                        .collect(),
                })
                .collect(),
        }),
        (req, other) => {
            return Err(unexpected(format!(
                "reply {other:?} does not answer {}",
                request_name(req)
            )));
        }
    })
}

fn request_name(req: &Req) -> &'static str {
    match req {
        Req::Produce { .. } => "produce",
        Req::Fetch { .. } => "fetch",
        Req::GetOffset { .. } => "get offset",
        Req::CreateTopic { .. } => "create topic",
        Req::DeleteTopic { .. } => "delete topic",
        Req::ListTopics => "list topics",
        Req::Health => "health check",
        Req::Metadata { .. } => "metadata",
    }
}

pub(crate) fn driver_error(e: DriverError<std::io::Error>, request_timeout: Duration) -> Error {
    let context = Context::new("connection");
    match e {
        DriverError::Io(e) => Error::io(context, e),
        DriverError::Closed => Error::closed_by_peer(context),
        DriverError::Client(ClientError::BufferTooSmall { required }) => Error::invalid(
            context,
            format!("a request of {required} bytes exceeds the maximum frame"),
        ),
        DriverError::Client(ClientError::Encode(e)) => Error::invalid(context, e.to_string()),
        DriverError::Client(e) => Error::Protocol {
            context,
            source: ProtocolError::Core(e),
        },
        DriverError::TimedOut { .. } => Error::TimedOut {
            context,
            waiting: crate::error::WAITING_ANSWER,
            after: request_timeout,
        },
        other => Error::Protocol {
            context,
            source: ProtocolError::Unexpected(other.to_string()),
        },
    }
}

enum Event {
    Job(Option<Job>),
    /// The held call can go now (what was queued before it is written).
    Held,
    Deadline,
}

/// The calls in flight by RequestID, with their deadlines in order (no scan per wake-up).
#[derive(Default)]
struct Pending {
    /// FxHash: the keys are our own RequestIDs, not peer input.
    jobs: HashMap<u64, Job, rustc_hash::FxBuildHasher>,
    deadlines: BTreeSet<(Instant, u64)>,
}

impl Pending {
    fn len(&self) -> usize {
        self.jobs.len()
    }

    fn insert(&mut self, id: u64, job: Job) {
        self.deadlines.insert((job.deadline, id));
        if let Some(old) = self.jobs.insert(id, job) {
            self.deadlines.remove(&(old.deadline, id));
        }
    }

    fn remove(&mut self, id: u64) -> Option<Job> {
        let job = self.jobs.remove(&id)?;
        self.deadlines.remove(&(job.deadline, id));
        Some(job)
    }

    /// The earliest deadline of the calls in flight.
    fn earliest(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Takes the reply of a call whose deadline is at or before `now`, with the call's
    /// timeout. The call itself stays (its capacity and load still counted) until the core
    /// frees its slot: a late answer, or the core's own timeout.
    fn pop_expired(&mut self, now: Instant) -> Option<(ReplyTo, Duration)> {
        loop {
            let &(at, id) = self.deadlines.first()?;
            if at > now {
                return None;
            }
            self.deadlines.pop_first();
            if let Some(job) = self.jobs.get_mut(&id) {
                let reply = std::mem::replace(&mut job.reply, ReplyTo::Caller(None));
                return Some((reply, job.timeout));
            }
        }
    }

    fn drain(&mut self) -> impl Iterator<Item = Job> + '_ {
        self.deadlines.clear();
        self.jobs.drain().map(|(_, job)| job)
    }
}

/// Waits for `at` on `timer` (moved there first; a later deadline moves a registered tokio
/// timer without the timer wheel's lock), or forever when there is none.
async fn sleep_until(timer: Pin<&mut tokio::time::Sleep>, at: Option<Instant>) {
    match at {
        Some(at) => {
            let mut timer = timer;
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            timer.await
        }
        None => std::future::pending().await,
    }
}

/// Queues `job`'s request on the connection (written by the driver's next wait), or answers
/// it at once when it can't be sent. Gives the job back when it does not fit in the transmit
/// buffer behind the requests queued there already: submitted again once they are written,
/// it is queued then, or fails if it is larger than the buffer.
fn submit(
    driver: &mut Driver,
    pending: &mut Pending,
    job: Job,
    request_timeout: Duration,
) -> Option<Job> {
    if job.reply.is_closed() {
        // The caller gave up (timeout, cancel) before this was sent.
        return None;
    }
    let mut names = Vec::new();
    let queued = request(&job.req, &mut names).map(|r| driver.queue(&r));
    match queued {
        Ok(Ok(id)) => pending.insert(id, job),
        Ok(Err(DriverError::Client(ClientError::BufferTooSmall { .. })))
            if driver.connection().poll_transmit().is_some() =>
        {
            return Some(job);
        }
        Ok(Err(e)) => job.reply.send(Err(driver_error(e, request_timeout))),
        Err(e) => job.reply.send(Err(e)),
    }
    None
}

/// The capacity a call holds: its connection's load, its slot in the client and, for a fetch
/// sent ahead, its consumer's fetch slot.
type Held = (
    LoadGuard,
    OwnedSemaphorePermit,
    Option<OwnedSemaphorePermit>,
);

/// For a completed consumer fetch (one with an [`Ahead`] channel, now empty, and a caller
/// still waiting for it) that brought records and said where the next fetch starts: queues
/// that fetch on this connection with the call's capacity (`held`) and a consumer fetch slot,
/// and writes it out if the socket takes it at once (else the next wait does). Returns the
/// offset fetched ahead, or the capacity back when nothing was sent.
fn send_ahead(
    driver: &mut Driver,
    pending: &mut Pending,
    req: &Req,
    to: &ReplyTo,
    timeout: Duration,
    held: Held,
    request_type: streambus_core::RequestType,
) -> std::result::Result<i64, Held> {
    let Req::Fetch { ahead: Some(a), .. } = req else {
        return Err(held);
    };
    // A call that timed out (its late answer is here) or whose caller left sends nothing.
    if to.is_closed() || a.tx.capacity() < AHEAD_DEPTH || a.tx.is_closed() {
        return Err(held);
    }
    let next = match driver.response(request_type) {
        Some(Response::Fetch(f)) if !f.messages.is_empty() => f.trailer.map(|t| t.next_offset),
        _ => None,
    };
    let Some(next) = next else {
        return Err(held);
    };
    // The slot of a fetch sent ahead is given back first: when partitions wait for one, the
    // first in line gets it and this one's fetcher queues behind them.
    let (_load, _permit, slot) = held;
    drop(slot);
    let Ok(slot) = a.slots.clone().try_acquire_owned() else {
        return Err((_load, _permit, None));
    };
    let mut ahead = req.clone();
    if let Req::Fetch { offset, .. } = &mut ahead {
        *offset = next;
    }
    let mut names = Vec::new();
    let Some(id) = request(&ahead, &mut names)
        .ok()
        .and_then(|r| driver.queue(&r).ok())
    else {
        return Err((_load, _permit, None));
    };
    let _slot = Some(slot);
    pending.insert(
        id,
        Job {
            req: ahead,
            reply: ReplyTo::Ahead(Some(a.tx.clone())),
            deadline: Instant::now() + timeout,
            timeout,
            _load,
            _permit,
            _slot,
        },
    );
    // A socket that can't take it all now gets the rest at the next wait (the core tracks
    // partial writes); a write error surfaces there too.
    let flush = std::pin::pin!(driver.flush());
    let _ = flush.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
    Ok(next)
}

/// Submits the calls already waiting in `jobs`, as long as the connection has room; a call
/// that does not fit behind the bytes queued already goes to `held` (and nothing after it is
/// taken: calls keep their order on the connection), to be submitted once they are written.
fn drain(
    driver: &mut Driver,
    pending: &mut Pending,
    jobs: &mut mpsc::UnboundedReceiver<Job>,
    held: &mut Option<Job>,
    depth: usize,
    request_timeout: Duration,
) {
    while held.is_none() && driver.connection().in_flight() < depth {
        match jobs.try_recv() {
            Ok(job) => *held = submit(driver, pending, job, request_timeout),
            Err(_) => break,
        }
    }
}

/// What a connection's task tells its pool: whether a request went out on it, and the error
/// it ended with.
#[derive(Debug, Default)]
pub(crate) struct Link {
    used: AtomicBool,
    ended: OnceLock<Error>,
}

impl Link {
    /// Whether a request was handed to the connection.
    pub(crate) fn used(&self) -> bool {
        self.used.load(Ordering::Acquire)
    }

    /// The error of a connection that closed before any request went out on it: its TLS
    /// error when that is why (a broker refusing the client's certificate), else
    /// [`Error::closed_unused`] naming why it ended.
    pub(crate) fn refusal(&self) -> Error {
        let ctx = Context::new("connect");
        match self.ended.get() {
            Some(e @ Error::Tls { .. }) => e.clone().with_context(&ctx),
            Some(e) => Error::closed_unused(ctx, Some(e)),
            None => Error::closed_unused(ctx, None),
        }
    }
}

/// Runs one connection until it breaks or every sender is gone; then fails whatever it
/// still holds (their callers get an error at once, not at their timeout). Each call's own
/// deadline is enforced here too, so a call answered by callback times out like one awaited.
pub(crate) async fn run(
    mut driver: Driver,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    depth: usize,
    request_timeout: Duration,
    link: Arc<Link>,
) {
    let mut pending = Pending::default();
    let mut used = false;
    // A call taken from `jobs` that did not fit behind the bytes queued before it: submitted
    // first once they are written (the driver's wait writes everything queued before it
    // polls for the next call).
    let mut held: Option<Job> = None;
    // One timer for the earliest call deadline, moved as it changes.
    let timer = tokio::time::sleep(request_timeout);
    tokio::pin!(timer);
    let failure = loop {
        let deadline = match (pending.earliest(), held.as_ref().map(|j| j.deadline)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let room = driver.connection().in_flight() < depth;
        let waiting = held.is_some();
        // The deadline races the whole wait, writes included: a broker that stops reading
        // (a full socket buffer) still fails each call at its deadline. The driver's wait is
        // cancel-safe (the core tracks partial writes; reads are cancel-safe).
        let wake = tokio::select! {
            biased;
            w = driver.next_completion_or(async {
                if waiting {
                    Event::Held
                } else if room {
                    Event::Job(jobs.recv().await)
                } else {
                    std::future::pending::<Event>().await
                }
            }) => w,
            () = sleep_until(timer.as_mut(), deadline) => Ok(Wake::Other(Event::Deadline)),
        };
        // A call to submit (new, or the held one), or what else woke the loop.
        let (next, wake) = match wake {
            Ok(Wake::Other(Event::Job(Some(job)))) => (Some(job), None),
            Ok(Wake::Other(Event::Held)) => (held.take(), None),
            w => (None, Some(w)),
        };
        if let Some(job) = next {
            if !used {
                used = true;
                link.used.store(true, Ordering::Release);
            }
            let busy = driver.connection().in_flight() > 0;
            held = submit(&mut driver, &mut pending, job, request_timeout);
            // Every call already waiting goes out in the same write. When calls are in flight
            // already (a pipelining load, not a lone caller waiting), the callers that are
            // ready run first, once, so their requests share this write too (one send per
            // request costs more than the request).
            let mut again = busy;
            loop {
                let (d, p, j, h) = (&mut driver, &mut pending, &mut jobs, &mut held);
                drain(d, p, j, h, depth, request_timeout);
                if !(again && held.is_none() && driver.connection().in_flight() < depth) {
                    break;
                }
                again = false;
                tokio::task::yield_now().await;
            }
            continue;
        }
        let Some(wake) = wake else {
            continue;
        };
        match wake {
            Ok(Wake::Other(Event::Job(None))) => break None,
            Ok(Wake::Other(Event::Deadline)) => {
                let now = Instant::now();
                while let Some((reply, timeout)) = pending.pop_expired(now) {
                    // Its late answer, if any, goes to nobody; its slot is freed then.
                    reply.send(Err(Error::TimedOut {
                        context: Context::default(),
                        waiting: crate::error::WAITING_ANSWER,
                        after: timeout,
                    }));
                }
                if let Some(job) = held.take_if(|j| j.deadline <= now) {
                    // Never sent (the requests before it are still being written).
                    job.reply.send(Err(Error::TimedOut {
                        context: Context::default(),
                        waiting: crate::error::WAITING_WRITE,
                        after: job.timeout,
                    }));
                }
            }
            Ok(Wake::Completion(done)) => {
                let Some(job) = pending.remove(done.request_id) else {
                    continue;
                };
                if done.timed_out {
                    // The deadline includes the longest long-poll wait: a broker this late
                    // is stuck or the path is dead. Drop the connection (its slots would
                    // stay taken until a late answer) and fail what it holds; the pool dials
                    // a fresh one.
                    let e = Error::TimedOut {
                        context: Context::default(),
                        waiting: crate::error::WAITING_ANSWER,
                        after: request_timeout,
                    };
                    job.reply.send(Err(e.clone()));
                    break Some(e);
                }
                // A consumer's next fetch goes out before this answer is copied out: the
                // broker reads it meanwhile.
                let Job {
                    req,
                    reply: to,
                    timeout,
                    _load,
                    _permit,
                    _slot,
                    ..
                } = job;
                let held = (_load, _permit, _slot);
                let (ahead, held) = match send_ahead(
                    &mut driver,
                    &mut pending,
                    &req,
                    &to,
                    timeout,
                    held,
                    done.request_type,
                ) {
                    Ok(next) => (Some(next), None),
                    Err(held) => (None, Some(held)),
                };
                let result = match driver.response(done.request_type) {
                    Some(r) => reply(&req, r, ahead),
                    None => Err(unexpected("a completion without a response".into())),
                };
                // Give back the request (its buffer can be reused), the capacity and the
                // load before the result goes out: a callback may send the next request.
                drop((req, held));
                to.send(result);
            }
            Ok(_) => {}
            Err(e) => break Some(driver_error(e, request_timeout)),
        }
    };
    tracing::debug!(error = ?failure, pending = pending.len(), "connection task ends");
    let err = failure.unwrap_or_else(|| Error::Closed {
        context: Context::default(),
        what: "client",
    });
    // Known before the pool can see the connection closed.
    let _ = link.ended.set(err.clone());
    jobs.close();
    for job in pending.drain() {
        job.reply.send(Err(err.clone()));
    }
    // Never written: certainly not sent (a TLS refusal stays what it is).
    let unsent = match &err {
        Error::Tls { .. } => err.clone(),
        _ => Error::closed_before_sent(Context::default(), Some(&err)),
    };
    for job in held
        .into_iter()
        .chain(std::iter::from_fn(|| jobs.try_recv().ok()))
    {
        job.reply.send(Err(unsent.clone()));
    }
}
