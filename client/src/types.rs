//! Records and results: the values users build and get back.

use std::sync::Arc;

/// A record to produce.
///
/// ```
/// use streambus_client::Record;
/// let r = Record::new("orders", "payload").key("customer-7").header("trace", "abc");
/// assert_eq!(r.value, b"payload");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Record {
    /// The topic.
    pub topic: String,
    /// An explicit partition; `None` lets the producer choose (by key hash, or round robin
    /// for keyless records; see [`partition_for_key`](crate::partition_for_key)).
    pub partition: Option<u32>,
    /// The key; an empty key is the same as none on the wire.
    pub key: Option<Vec<u8>>,
    /// The value.
    pub value: Vec<u8>,
    /// Headers, in order; duplicate keys are kept.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Unix time in ns; `None` lets the broker stamp its append time.
    pub timestamp: Option<i64>,
}

impl Record {
    /// A record of `value` for `topic`.
    pub fn new(topic: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            topic: topic.into(),
            value: value.into(),
            ..Self::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets an explicit partition.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Appends a header.
    pub fn header(mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
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
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerRecord {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: u32,
    /// The record's offset.
    pub offset: i64,
    /// Unix time in ns (the producer's, or the broker's append time).
    pub timestamp: i64,
    /// The key (empty when none was sent).
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// Headers, in the order sent.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
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
