//! Small wire types: request types, flags, error codes, statuses and topic names.

use core::fmt;

use crate::error::Malformed;

/// The seven v1 request types and the §6 extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
#[repr(u8)]
pub enum RequestType {
    /// 0x01: append messages to a partition.
    Produce = 0x01,
    /// 0x02: read messages from an offset.
    Fetch = 0x02,
    /// 0x03: a partition's start and end offsets.
    GetOffset = 0x03,
    /// 0x04: create a topic.
    CreateTopic = 0x04,
    /// 0x05: delete a topic.
    DeleteTopic = 0x05,
    /// 0x06: list topics.
    ListTopics = 0x06,
    /// 0x07: broker liveness.
    HealthCheck = 0x07,
    /// 0x10: authenticate the connection (§6.3).
    Authenticate = 0x10,
    /// 0x11: brokers, topics, partitions and their leaders (§6.4; feature `metadata`).
    #[cfg(feature = "metadata")]
    Metadata = 0x11,
}

impl RequestType {
    /// All request types, in wire order.
    #[cfg(not(feature = "metadata"))]
    pub const ALL: [RequestType; 8] = [
        Self::Produce,
        Self::Fetch,
        Self::GetOffset,
        Self::CreateTopic,
        Self::DeleteTopic,
        Self::ListTopics,
        Self::HealthCheck,
        Self::Authenticate,
    ];

    /// All request types, in wire order.
    #[cfg(feature = "metadata")]
    pub const ALL: [RequestType; 9] = [
        Self::Produce,
        Self::Fetch,
        Self::GetOffset,
        Self::CreateTopic,
        Self::DeleteTopic,
        Self::ListTopics,
        Self::HealthCheck,
        Self::Authenticate,
        Self::Metadata,
    ];

    /// The type for a wire byte, if it names one.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => Self::Produce,
            0x02 => Self::Fetch,
            0x03 => Self::GetOffset,
            0x04 => Self::CreateTopic,
            0x05 => Self::DeleteTopic,
            0x06 => Self::ListTopics,
            0x07 => Self::HealthCheck,
            0x10 => Self::Authenticate,
            #[cfg(feature = "metadata")]
            0x11 => Self::Metadata,
            _ => return None,
        })
    }

    /// The wire byte.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// A short lowercase name (`produce`, `fetch`, …), for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Produce => "produce",
            Self::Fetch => "fetch",
            Self::GetOffset => "get_offset",
            Self::CreateTopic => "create_topic",
            Self::DeleteTopic => "delete_topic",
            Self::ListTopics => "list_topics",
            Self::HealthCheck => "health_check",
            #[cfg(feature = "metadata")]
            Self::Metadata => "metadata",
            Self::Authenticate => "authenticate",
        }
    }
}

/// Request flags (u16). Unknown bits are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Flags(pub u16);

impl Flags {
    /// No flags.
    pub const NONE: Flags = Flags(0);
    /// 0x0001: the client wants an acknowledgement (the broker always answers anyway).
    pub const REQUIRE_ACK: Flags = Flags(0x0001);
    /// 0x0002: the payload is compressed (refused on Produce until compression exists).
    pub const COMPRESSED: Flags = Flags(0x0002);
    /// 0x0004: a batch.
    pub const BATCH: Flags = Flags(0x0004);
    /// 0x0008: asynchronous.
    pub const ASYNC: Flags = Flags(0x0008);
    /// 0x0010: idempotent produce.
    pub const IDEMPOTENT: Flags = Flags(0x0010);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl core::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

/// A v1 error code (u16). Any value round-trips; the named constants are the v1 table.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// 0: no error.
    pub const NONE: ErrorCode = ErrorCode(0);
    /// 1: the request type is unknown.
    pub const UNKNOWN_REQUEST: ErrorCode = ErrorCode(1);
    /// 2: the request is malformed or has an invalid value.
    pub const INVALID_REQUEST: ErrorCode = ErrorCode(2);
    /// 3: the offset is below the log start or above the high-water mark.
    pub const OFFSET_OUT_OF_RANGE: ErrorCode = ErrorCode(3);
    /// 4: a message record is malformed.
    pub const CORRUPT_MESSAGE: ErrorCode = ErrorCode(4);
    /// 5: the partition does not exist.
    pub const PARTITION_NOT_FOUND: ErrorCode = ErrorCode(5);
    /// 6: the request timed out.
    pub const REQUEST_TIMEOUT: ErrorCode = ErrorCode(6);
    /// 7: the broker's storage failed.
    pub const STORAGE_ERROR: ErrorCode = ErrorCode(7);
    /// 8: the topic does not exist.
    pub const TOPIC_NOT_FOUND: ErrorCode = ErrorCode(8);
    /// 9: the topic exists with another partition count.
    pub const TOPIC_EXISTS: ErrorCode = ErrorCode(9);
    /// 10: the frame's CRC does not match.
    pub const CHECKSUM_MISMATCH: ErrorCode = ErrorCode(10);
    /// 11: the frame violates the protocol (version, length).
    pub const INVALID_PROTOCOL: ErrorCode = ErrorCode(11);
    /// 12: the frame or a message is too large.
    pub const MESSAGE_TOO_LARGE: ErrorCode = ErrorCode(12);
    /// 13: an idempotent produce's BaseSequence is not the next expected one (§6.2).
    pub const OUT_OF_ORDER_SEQUENCE: ErrorCode = ErrorCode(13);
    /// 14: an idempotent producer the partition has no state for sent BaseSequence ≠ 0 (§6.2).
    pub const UNKNOWN_PRODUCER: ErrorCode = ErrorCode(14);
    /// 15: this broker does not lead the partition (§6.4).
    pub const NOT_LEADER: ErrorCode = ErrorCode(15);
    /// 30: an idempotent produce's ProducerEpoch is below the known epoch (§6.2).
    pub const INVALID_PRODUCER_EPOCH: ErrorCode = ErrorCode(30);
    /// 40: authentication is required, or the credential was refused (§6.3).
    pub const AUTHENTICATION_FAILED: ErrorCode = ErrorCode(40);
    /// 41: the principal may not make this request (§6.3).
    pub const AUTHORIZATION_FAILED: ErrorCode = ErrorCode(41);

    /// The v1 name of a known code.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "None",
            1 => "UnknownRequest",
            2 => "InvalidRequest",
            3 => "OffsetOutOfRange",
            4 => "CorruptMessage",
            5 => "PartitionNotFound",
            6 => "RequestTimeout",
            7 => "StorageError",
            8 => "TopicNotFound",
            9 => "TopicExists",
            10 => "ChecksumMismatch",
            11 => "InvalidProtocol",
            12 => "MessageTooLarge",
            13 => "OutOfOrderSequence",
            14 => "UnknownProducer",
            15 => "NotLeader",
            30 => "InvalidProducerEpoch",
            40 => "AuthenticationFailed",
            41 => "AuthorizationFailed",
            _ => return None,
        })
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}({})", self.0),
            None => write!(f, "ErrorCode({})", self.0),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A response's Status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ResponseStatus {
    /// 0: the per-type success payload follows.
    Ok,
    /// 1: the error payload follows.
    Error,
    /// 2: reserved (PartialSuccess); never sent by this broker, read as success by the
    /// original SDK.
    PartialSuccess,
}

impl ResponseStatus {
    /// The status for a wire byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Ok),
            1 => Some(Self::Error),
            2 => Some(Self::PartialSuccess),
            _ => None,
        }
    }

    /// The wire byte.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::Error => 1,
            Self::PartialSuccess => 2,
        }
    }
}

/// The longest valid topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 249;

/// A validated topic name: 1–249 bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
///
/// Validation happens once, at construction, so a `Topic` is always safe to use as a path
/// component.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Topic<'a>(&'a str);

impl<'a> Topic<'a> {
    /// Validates a name.
    pub fn new(name: &'a str) -> Result<Self, Malformed> {
        Self::from_bytes(name.as_bytes())
    }

    /// Validates a name given as bytes (as read off the wire).
    pub fn from_bytes(name: &'a [u8]) -> Result<Self, Malformed> {
        let err = Malformed::InvalidTopicName { len: name.len() };
        let valid = !name.is_empty()
            && name.len() <= MAX_TOPIC_LEN
            && name != b"."
            && name != b".."
            && name
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            return Err(err);
        }
        core::str::from_utf8(name).map(Topic).map_err(|_| err)
    }

    /// The name.
    pub fn as_str(&self) -> &'a str {
        self.0
    }

    /// Bytes of its encoding: the u32 length prefix and the name (at most 253).
    pub(crate) fn encoded_len(&self) -> usize {
        self.0.len().saturating_add(4)
    }
}

impl fmt::Debug for Topic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

impl fmt::Display for Topic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl AsRef<str> for Topic<'_> {
    fn as_ref(&self) -> &str {
        self.0
    }
}
