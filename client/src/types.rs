//! Records and results: the values users build and get back.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

/// A record to produce.
///
/// Its topic is an `Arc<str>` and its key, value and headers are [`Bytes`]: a record made from
/// data the application already shares (an `Arc<str>` topic, a `Bytes` value) costs no
/// allocation or copy; the producer copies each record once, into its batch.
///
/// ```
/// use streambus_client::Record;
/// let r = Record::new("orders", "payload").key("customer-7").header("trace", "abc");
/// assert_eq!(&r.value[..], b"payload");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The topic.
    pub topic: Arc<str>,
    /// An explicit partition; `None` lets the producer choose (by key hash, or round robin
    /// for keyless records; see [`partition_for_key`](crate::partition_for_key)).
    pub partition: Option<u32>,
    /// The key; an empty key is the same as none on the wire.
    pub key: Option<Bytes>,
    /// The value.
    pub value: Bytes,
    /// Headers, in order; duplicate keys are kept.
    pub headers: Vec<(Bytes, Bytes)>,
    /// Unix time in ns; `None` lets the broker stamp its append time.
    pub timestamp: Option<i64>,
}

impl Record {
    /// A record of `value` for `topic`. Both are taken without a copy when they are already
    /// shared (`Arc<str>`, [`Bytes`]) or owned (`String`, `Vec<u8>`); to build one from a
    /// borrowed slice, use [`Bytes::copy_from_slice`].
    pub fn new(topic: impl Into<Arc<str>>, value: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            partition: None,
            key: None,
            value: value.into(),
            headers: Vec::new(),
            timestamp: None,
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets an explicit partition.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Appends a header.
    pub fn header(mut self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }

    /// Sets the timestamp (Unix ns; 0 lets the broker stamp it).
    pub fn timestamp(mut self, unix_nanos: i64) -> Self {
        self.timestamp = Some(unix_nanos);
        self
    }
}

/// Where a produced record landed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordMetadata {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: u32,
    /// The offset the broker assigned.
    pub offset: i64,
}

/// A record read by a consumer.
///
/// Its key, value and headers are views into the fetch's bytes, shared by every record of
/// that fetch (one copy per fetch, not per record): keeping one record keeps its fetch's
/// buffer (up to the consumer's `max_bytes`) alive. Copy out with `to_vec()` to keep less.
#[derive(Clone)]
pub struct ConsumerRecord {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: u32,
    /// The record's offset.
    pub offset: i64,
    /// Unix time in ns (the producer's, or the broker's append time).
    pub timestamp: i64,
    buf: Arc<[u8]>,
    key: Range<usize>,
    value: Range<usize>,
    headers: Vec<(Range<usize>, Range<usize>)>,
}

impl ConsumerRecord {
    /// A record over `buf`; the ranges are checked by the caller.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        topic: Arc<str>,
        partition: u32,
        offset: i64,
        timestamp: i64,
        buf: Arc<[u8]>,
        key: Range<usize>,
        value: Range<usize>,
        headers: Vec<(Range<usize>, Range<usize>)>,
    ) -> Self {
        Self {
            topic,
            partition,
            offset,
            timestamp,
            buf,
            key,
            value,
            headers,
        }
    }

    fn slice(&self, r: &Range<usize>) -> &[u8] {
        self.buf.get(r.clone()).unwrap_or_default()
    }

    /// The key (empty when none was sent).
    pub fn key(&self) -> &[u8] {
        self.slice(&self.key)
    }

    /// The value.
    pub fn value(&self) -> &[u8] {
        self.slice(&self.value)
    }

    /// The headers, in the order sent, as `(key, value)`.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8])> + '_ {
        self.headers
            .iter()
            .map(|(k, v)| (self.slice(k), self.slice(v)))
    }
}

impl PartialEq for ConsumerRecord {
    fn eq(&self, other: &Self) -> bool {
        self.topic == other.topic
            && self.partition == other.partition
            && self.offset == other.offset
            && self.timestamp == other.timestamp
            && self.key() == other.key()
            && self.value() == other.value()
            && self.headers().eq(other.headers())
    }
}

impl Eq for ConsumerRecord {}

impl fmt::Debug for ConsumerRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerRecord")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("timestamp", &self.timestamp)
            .field("key", &String::from_utf8_lossy(self.key()))
            .field("value_len", &self.value().len())
            .field("headers", &self.headers.len())
            .finish()
    }
}

/// A topic and its partition count, as listed by the broker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicInfo {
    /// The name.
    pub name: String,
    /// Its partition count.
    pub partitions: u32,
}

/// One partition's offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartitionOffsets {
    /// The partition.
    pub partition: u32,
    /// The first offset still stored (moves with retention).
    pub start: i64,
    /// The next offset to be assigned.
    pub end: i64,
    /// The high-water mark (equal to `end` on a single broker).
    pub high_water_mark: i64,
}

/// The broker's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The broker's status text (`healthy`).
    pub status: String,
    /// Seconds since the broker started.
    pub uptime_secs: i64,
}

/// The cluster as a broker describes it ([`Client::metadata`](crate::Client::metadata),
/// protocol §6.4).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Metadata {
    /// The brokers.
    pub brokers: Vec<BrokerMetadata>,
    /// The topics, once each, sorted by name.
    pub topics: Vec<TopicMetadata>,
}

impl Metadata {
    /// The topic named `name`, if the reply lists it.
    pub fn topic(&self, name: &str) -> Option<&TopicMetadata> {
        self.topics.iter().find(|t| t.name == name)
    }

    /// The broker with node id `node_id`, if listed.
    pub fn broker(&self, node_id: u32) -> Option<&BrokerMetadata> {
        self.brokers.iter().find(|b| b.node_id == node_id)
    }
}

/// One broker of a [`Metadata`] reply.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct BrokerMetadata {
    /// Its node id.
    pub node_id: u32,
    /// The host clients connect to.
    pub host: String,
    /// The port clients connect to.
    pub port: u16,
}

impl BrokerMetadata {
    /// `host:port`, with an IPv6 host in brackets.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// One topic of a [`Metadata`] reply.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicMetadata {
    /// The name.
    pub name: String,
    /// [`ErrorCode::NONE`](crate::ErrorCode::NONE), or
    /// [`ErrorCode::TOPIC_NOT_FOUND`](crate::ErrorCode::TOPIC_NOT_FOUND) for a topic asked for
    /// that does not exist (then `partitions` is empty).
    pub error_code: crate::ErrorCode,
    /// Its partitions, by increasing id.
    pub partitions: Vec<PartitionMetadata>,
}

impl TopicMetadata {
    /// Whether the topic exists.
    pub fn exists(&self) -> bool {
        self.error_code == crate::ErrorCode::NONE
    }
}

/// One partition of a [`TopicMetadata`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct PartitionMetadata {
    /// The partition.
    pub partition: u32,
    /// The leader's node id; `None` when the partition has no leader now.
    pub leader: Option<u32>,
    /// The leader's epoch.
    pub leader_epoch: i32,
    /// The node ids holding replicas.
    pub replicas: Vec<u32>,
}
