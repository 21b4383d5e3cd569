//! Request routing: the seven v1 requests against the storage engine, answered exactly as the
//! protocol says, error codes and messages included.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use streambus_adapters::{ConnEvent, FileChunk, Handler, Responder};
use streambus_core::{
    CreateTopicResponse, DeleteTopicResponse, ErrorCode, FETCH_RESPONSE_FIXED_LEN, FetchResponse,
    FetchTrailer, Flags, GetOffsetResponse, HealthCheckResponse, ListTopicsResponse, MessageSet,
    ProduceResponse, RESPONSE_HEADER_LEN, Request, Response, Text, Topic, TopicInfo, TopicList,
    response_encoded_len,
};

use crate::metrics::Metrics;
use crate::storage::{FetchPlan, Storage, StorageError, TopicConfig};

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

/// Largest partition count a topic may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// Routing settings.
#[derive(Debug, Clone, Copy)]
pub struct BrokerConfig {
    /// Create a missing topic (one partition) on Produce.
    pub auto_create_topics: bool,
    /// The maximum frame Length, which bounds message and fetch sizes.
    pub max_frame_len: u32,
    /// Appends wait for an fsync (`--fsync always`): requests may block.
    pub fsync_always: bool,
}

/// The broker: a [`Handler`] over the storage engine.
#[derive(Debug)]
pub struct Broker {
    storage: Arc<Storage>,
    config: BrokerConfig,
    started: Instant,
    metrics: Arc<Metrics>,
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
    /// A broker over `storage`.
    pub fn new(storage: Arc<Storage>, config: BrokerConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            storage,
            config,
            started: Instant::now(),
            metrics,
        }
    }

    /// The storage engine.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// The largest message record a Produce may carry: one message must fit a Fetch reply.
    fn max_record(&self) -> usize {
        (self.config.max_frame_len as usize)
            .saturating_sub(RESPONSE_HEADER_LEN - 4 + FETCH_RESPONSE_FIXED_LEN + 4)
    }

    fn route(
        &self,
        flags: Flags,
        request: &Request<'_>,
        reply: &mut Responder<'_>,
    ) -> Result<(), Failure> {
        let _ = flags; // Compressed Produce is refused by the connection layer; other bits are ignored.
        match request {
            Request::Produce(p) => {
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
                let topic = p.topic.as_str();
                let now = now_unix_ns();
                let appended = match self.storage.append(topic, p.partition, &p.messages, now) {
                    Err(StorageError::TopicNotFound { .. }) if self.config.auto_create_topics => {
                        match self.storage.create_topic(topic, 1, TopicConfig::default()) {
                            Ok(true) => {
                                tracing::info!(topic, "auto-created topic with 1 partition");
                            }
                            // Created meanwhile by another request, with any partition count:
                            // the append below decides (PartitionNotFound if it lacks ours).
                            Ok(false) | Err(StorageError::TopicExists { .. }) => {}
                            Err(e) => return Err(e.into()),
                        }
                        self.storage.append(topic, p.partition, &p.messages, now)?
                    }
                    other => other?,
                };
                reply.respond(&Response::Produce(ProduceResponse {
                    base_offset: appended.base_offset,
                    num_messages: appended.count,
                    high_water_mark: appended.high_water_mark,
                }));
            }
            Request::Fetch(f) => {
                let cap = u32::try_from(self.max_record()).unwrap_or(u32::MAX);
                let plan = self.storage.fetch_plan(
                    f.topic.as_str(),
                    f.partition,
                    f.offset,
                    f.max_bytes,
                    cap,
                )?;
                let trailer = FetchTrailer {
                    last_stable_offset: plan.high_water_mark,
                    next_offset: plan.next_offset,
                };
                // The storage engine validated these records when they were appended and
                // checks their CRCs on recovery; the frame CRC is combined from the stored
                // batch CRCs, so a bit flipped on disk since then fails the client's check.
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
                    reply.respond_fetch_file(
                        plan.high_water_mark,
                        plan.count,
                        trailer,
                        plan.crc,
                        ranges,
                    );
                } else {
                    let records = read_ranges(&plan).map_err(|e| {
                        fail(
                            ErrorCode::STORAGE_ERROR,
                            format!("reading the log at offset {}: {e}", f.offset),
                        )
                    })?;
                    let messages = MessageSet::new_unchecked(plan.count, &records);
                    reply.respond_fetch(
                        &FetchResponse {
                            high_water_mark: plan.high_water_mark,
                            messages,
                            trailer: Some(trailer),
                        },
                        plan.crc,
                    );
                }
            }
            Request::GetOffset(g) => {
                let (start, end) = self.storage.offsets(g.topic.as_str(), g.partition)?;
                reply.respond(&Response::GetOffset(GetOffsetResponse {
                    topic: g.topic,
                    partition: g.partition,
                    start_offset: start,
                    end_offset: end,
                    high_water_mark: end,
                }));
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
                reply.respond(&Response::CreateTopic(CreateTopicResponse {
                    topic: c.topic,
                    created,
                }));
            }
            Request::DeleteTopic(d) => {
                self.storage.delete_topic(d.topic.as_str())?;
                reply.respond(&Response::DeleteTopic(DeleteTopicResponse {
                    topic: d.topic,
                    deleted: true,
                }));
            }
            Request::ListTopics => {
                let list = self.storage.list_topics();
                let topics: Vec<TopicInfo<'_>> = list
                    .iter()
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
                    return Err(fail(
                        ErrorCode::MESSAGE_TOO_LARGE,
                        format!(
                            "the list of {} topics takes a {length}-byte frame, over the maximum of {}",
                            topics.len(),
                            self.config.max_frame_len
                        ),
                    ));
                }
                reply.respond(&response);
            }
            Request::HealthCheck => {
                let uptime = i64::try_from(self.started.elapsed().as_secs()).unwrap_or(i64::MAX);
                reply.respond(&Response::HealthCheck(HealthCheckResponse {
                    status: Text(b"healthy"),
                    uptime_secs: uptime,
                }));
            }
            _ => {
                return Err(fail(
                    ErrorCode::UNKNOWN_REQUEST,
                    format!("request type {:?} is not supported", request.request_type()),
                ));
            }
        }
        Ok(())
    }
}

impl Handler for Broker {
    fn handle(
        &self,
        request_id: u64,
        flags: Flags,
        request: &Request<'_>,
        reply: &mut Responder<'_>,
    ) {
        let t0 = Instant::now();
        let status = match self.route(flags, request, reply) {
            Ok(()) => "ok",
            Err(f) => {
                tracing::debug!(request_id, code = %f.code, message = %f.message, "request failed");
                reply.error(f.code, format_args!("{}", f.message));
                f.code.name().unwrap_or("Unknown")
            }
        };
        self.metrics
            .request(request.request_type().name(), status, t0.elapsed());
    }

    fn may_block(&self) -> bool {
        self.config.fsync_always
    }

    fn on_event(&self, event: ConnEvent) {
        self.metrics.connection_event(event);
    }
}
