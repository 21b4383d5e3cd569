//! Request payloads of the seven v1 request types, with the optional trailing extensions, and
//! the §6 request types.

use crate::error::{DecodeError, EncodeError};
use crate::wire::frame::{PROTOCOL_VERSION, RequestFrame};
use crate::wire::message::MessageSet;
#[cfg(feature = "metadata")]
use crate::wire::metadata::MetadataRequest;
use crate::wire::types::{RequestType, Topic};
use crate::wire::{Encode, Reader, Text, Writer};

/// Idempotent-produce fields, trailing a Produce request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ProducerInfo {
    /// The producer; 0 means "not idempotent".
    pub producer_id: i64,
    /// The producer's epoch.
    pub producer_epoch: i16,
    /// The sequence number of the batch's first message, when sent.
    pub base_sequence: Option<i32>,
}

/// 0x01 Produce: append messages to a partition as one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ProduceRequest<'a> {
    /// The topic.
    pub topic: Topic<'a>,
    /// The partition.
    pub partition: u32,
    /// The messages (their offsets are ignored by the broker).
    pub messages: MessageSet<'a>,
    /// Trailing idempotence fields, when present.
    pub producer: Option<ProducerInfo>,
}

/// Long-poll fields, trailing a Fetch request after the isolation level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct LongPoll {
    /// How long the broker may hold the fetch.
    pub max_wait_ms: u32,
    /// How many bytes of messages end the wait early.
    pub min_bytes: u32,
}

/// Trailing Fetch fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FetchExtension {
    /// 0 only (read uncommitted).
    pub isolation_level: i8,
    /// Long poll, when sent.
    pub long_poll: Option<LongPoll>,
}

/// 0x02 Fetch: read whole messages from an offset, up to a byte budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FetchRequest<'a> {
    /// The topic.
    pub topic: Topic<'a>,
    /// The partition.
    pub partition: u32,
    /// The first offset wanted.
    pub offset: i64,
    /// The byte budget for message records (at least one message is always returned).
    pub max_bytes: u32,
    /// Trailing fields, when present.
    pub extension: Option<FetchExtension>,
}

/// 0x03 GetOffset: a partition's start and end offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct GetOffsetRequest<'a> {
    /// The topic.
    pub topic: Topic<'a>,
    /// The partition.
    pub partition: u32,
}

/// 0x04 CreateTopic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CreateTopicRequest<'a> {
    /// The topic.
    pub topic: Topic<'a>,
    /// 1..=1024.
    pub num_partitions: u32,
    /// 0 or 1.
    pub replication_factor: u16,
}

/// 0x05 DeleteTopic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DeleteTopicRequest<'a> {
    /// The topic.
    pub topic: Topic<'a>,
}

/// The mechanism name of token authentication (§6.3): the credential is the token's bytes.
pub const MECHANISM_TOKEN: &str = "token";

/// 0x10 Authenticate (§6.3): prove who the connection speaks for.
///
/// `Debug` (and `defmt`) show the credential's length only, never its bytes, so a logged
/// request cannot leak it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AuthenticateRequest<'a> {
    /// The mechanism, e.g. [`MECHANISM_TOKEN`].
    pub mechanism: Text<'a>,
    /// The secret: for `token`, the token's bytes.
    pub credential: &'a [u8],
}

impl<'a> AuthenticateRequest<'a> {
    /// A `token` authentication.
    pub fn token(token: &'a [u8]) -> Self {
        Self {
            mechanism: Text(MECHANISM_TOKEN.as_bytes()),
            credential: token,
        }
    }

    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let mechanism = Text(r.bytes("mechanism")?);
        let credential = r.bytes("credential")?;
        Ok(Self {
            mechanism,
            credential,
        })
    }
}

/// The payload of an Authenticate request.
impl Encode for AuthenticateRequest<'_> {
    fn encoded_len(&self) -> usize {
        self.mechanism
            .0
            .len()
            .saturating_add(self.credential.len())
            .saturating_add(8)
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes(self.mechanism.0)?;
        w.bytes(self.credential)
    }
}

impl core::fmt::Debug for AuthenticateRequest<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("AuthenticateRequest")
            .field("mechanism", &self.mechanism)
            .field("credential_len", &self.credential.len())
            .finish()
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for AuthenticateRequest<'_> {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(
            f,
            "AuthenticateRequest {{ mechanism: {}, credential: {=usize} bytes }}",
            self.mechanism,
            self.credential.len()
        )
    }
}

/// A decoded request payload, borrowing the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Request<'a> {
    /// 0x01.
    Produce(ProduceRequest<'a>),
    /// 0x02.
    Fetch(FetchRequest<'a>),
    /// 0x03.
    GetOffset(GetOffsetRequest<'a>),
    /// 0x04.
    CreateTopic(CreateTopicRequest<'a>),
    /// 0x05.
    DeleteTopic(DeleteTopicRequest<'a>),
    /// 0x06 (empty payload).
    ListTopics,
    /// 0x07 (empty payload).
    HealthCheck,
    /// 0x11 (§6.4).
    #[cfg(feature = "metadata")]
    Metadata(MetadataRequest<'a>),
    /// 0x10 (§6.3).
    Authenticate(AuthenticateRequest<'a>),
}

fn topic<'a>(r: &mut Reader<'a>) -> Result<Topic<'a>, DecodeError> {
    Ok(Topic::from_bytes(r.bytes("topic")?)?)
}

impl<'a> Request<'a> {
    /// The request's type.
    pub fn request_type(&self) -> RequestType {
        match self {
            Self::Produce(_) => RequestType::Produce,
            Self::Fetch(_) => RequestType::Fetch,
            Self::GetOffset(_) => RequestType::GetOffset,
            Self::CreateTopic(_) => RequestType::CreateTopic,
            Self::DeleteTopic(_) => RequestType::DeleteTopic,
            Self::ListTopics => RequestType::ListTopics,
            Self::HealthCheck => RequestType::HealthCheck,
            #[cfg(feature = "metadata")]
            Self::Metadata(_) => RequestType::Metadata,
            Self::Authenticate(_) => RequestType::Authenticate,
        }
    }

    /// The topic the request names, if any.
    pub fn topic(&self) -> Option<Topic<'a>> {
        match self {
            Self::Produce(p) => Some(p.topic),
            Self::Fetch(f) => Some(f.topic),
            Self::GetOffset(g) => Some(g.topic),
            Self::CreateTopic(c) => Some(c.topic),
            Self::DeleteTopic(d) => Some(d.topic),
            Self::ListTopics | Self::HealthCheck | Self::Authenticate(_) => None,
            #[cfg(feature = "metadata")]
            Self::Metadata(_) => None,
        }
    }

    /// Decodes a validated frame: checks the version and type, then the payload.
    pub fn parse(frame: &RequestFrame<&'a [u8]>) -> Result<Self, DecodeError> {
        let request_id = frame.request_id();
        if frame.version() != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                request_id,
                version: frame.version(),
            });
        }
        let Some(ty) = frame.request_type() else {
            return Err(DecodeError::UnknownRequestType {
                request_id,
                request_type: frame.request_type_byte(),
            });
        };
        Self::parse_payload(ty, frame.payload_slice())
    }

    /// Decodes the payload of a request of type `ty`. Bytes after the last known field are
    /// accepted and ignored; known extensions are read when wholly present.
    pub fn parse_payload(ty: RequestType, payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        Ok(match ty {
            RequestType::Produce => {
                let topic = topic(&mut r)?;
                let partition = r.u32("partition")?;
                let count = r.u32("message count")?;
                let messages = MessageSet::read(&mut r, count)?;
                let producer = if r.remaining() >= 10 {
                    let producer_id = r.i64("producer id")?;
                    let producer_epoch = r.i16("producer epoch")?;
                    let base_sequence = if r.remaining() >= 4 {
                        Some(r.i32("base sequence")?)
                    } else {
                        None
                    };
                    Some(ProducerInfo {
                        producer_id,
                        producer_epoch,
                        base_sequence,
                    })
                } else {
                    None
                };
                Self::Produce(ProduceRequest {
                    topic,
                    partition,
                    messages,
                    producer,
                })
            }
            RequestType::Fetch => {
                let topic = topic(&mut r)?;
                let partition = r.u32("partition")?;
                let offset = r.i64("offset")?;
                let max_bytes = r.u32("max bytes")?;
                let extension = if r.remaining() >= 1 {
                    let isolation_level = r.i8("isolation level")?;
                    let long_poll = if r.remaining() >= 8 {
                        Some(LongPoll {
                            max_wait_ms: r.u32("max wait")?,
                            min_bytes: r.u32("min bytes")?,
                        })
                    } else {
                        None
                    };
                    Some(FetchExtension {
                        isolation_level,
                        long_poll,
                    })
                } else {
                    None
                };
                Self::Fetch(FetchRequest {
                    topic,
                    partition,
                    offset,
                    max_bytes,
                    extension,
                })
            }
            RequestType::GetOffset => {
                let topic = topic(&mut r)?;
                let partition = r.u32("partition")?;
                Self::GetOffset(GetOffsetRequest { topic, partition })
            }
            RequestType::CreateTopic => {
                let topic = topic(&mut r)?;
                let num_partitions = r.u32("partition count")?;
                let replication_factor = r.u16("replication factor")?;
                Self::CreateTopic(CreateTopicRequest {
                    topic,
                    num_partitions,
                    replication_factor,
                })
            }
            RequestType::DeleteTopic => Self::DeleteTopic(DeleteTopicRequest {
                topic: topic(&mut r)?,
            }),
            RequestType::ListTopics => Self::ListTopics,
            RequestType::HealthCheck => Self::HealthCheck,
            #[cfg(feature = "metadata")]
            RequestType::Metadata => Self::Metadata(MetadataRequest::read(&mut r)?),
            RequestType::Authenticate => Self::Authenticate(AuthenticateRequest::read(&mut r)?),
        })
    }
}

impl Encode for Request<'_> {
    fn encoded_len(&self) -> usize {
        match self {
            Self::Produce(p) => p.encoded_len(),
            Self::Fetch(f) => f.encoded_len(),
            Self::GetOffset(g) => g.encoded_len(),
            Self::CreateTopic(c) => c.encoded_len(),
            Self::DeleteTopic(d) => d.encoded_len(),
            Self::ListTopics | Self::HealthCheck => 0,
            #[cfg(feature = "metadata")]
            Self::Metadata(m) => m.encoded_len(),
            Self::Authenticate(a) => a.encoded_len(),
        }
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        match self {
            Self::Produce(p) => p.write(w),
            Self::Fetch(f) => f.write(w),
            Self::GetOffset(g) => g.write(w),
            Self::CreateTopic(c) => c.write(w),
            Self::DeleteTopic(d) => d.write(w),
            Self::ListTopics | Self::HealthCheck => Ok(()),
            #[cfg(feature = "metadata")]
            Self::Metadata(m) => m.write(w),
            Self::Authenticate(a) => a.write(w),
        }
    }
}

/// The payload of a Produce request.
impl Encode for ProduceRequest<'_> {
    fn encoded_len(&self) -> usize {
        // PartitionID, NumMessages, then the extension groups present.
        let fixed = match self.producer {
            None => 8,
            Some(ProducerInfo {
                base_sequence: None,
                ..
            }) => 8 + 10,
            Some(_) => 8 + 14,
        };
        self.messages
            .encoded_len()
            .saturating_add(self.topic.encoded_len())
            .saturating_add(fixed)
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes(self.topic.as_str().as_bytes())?;
        w.u32(self.partition)?;
        w.u32(self.messages.count())?;
        self.messages.write(w)?;
        if let Some(info) = self.producer {
            w.i64(info.producer_id)?;
            w.i16(info.producer_epoch)?;
            if let Some(seq) = info.base_sequence {
                w.i32(seq)?;
            }
        }
        Ok(())
    }
}

/// The payload of a Fetch request.
impl Encode for FetchRequest<'_> {
    fn encoded_len(&self) -> usize {
        // PartitionID, Offset, MaxBytes, then the extension groups present.
        let fixed = match self.extension {
            None => 16,
            Some(FetchExtension {
                long_poll: None, ..
            }) => 16 + 1,
            Some(_) => 16 + 9,
        };
        self.topic.encoded_len().saturating_add(fixed)
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes(self.topic.as_str().as_bytes())?;
        w.u32(self.partition)?;
        w.i64(self.offset)?;
        w.u32(self.max_bytes)?;
        if let Some(e) = self.extension {
            w.put(&e.isolation_level.to_be_bytes())?;
            if let Some(lp) = e.long_poll {
                w.u32(lp.max_wait_ms)?;
                w.u32(lp.min_bytes)?;
            }
        }
        Ok(())
    }
}

/// The payload of a GetOffset request.
impl Encode for GetOffsetRequest<'_> {
    fn encoded_len(&self) -> usize {
        self.topic.encoded_len().saturating_add(4)
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes(self.topic.as_str().as_bytes())?;
        w.u32(self.partition)
    }
}

/// The payload of a CreateTopic request.
impl Encode for CreateTopicRequest<'_> {
    fn encoded_len(&self) -> usize {
        self.topic.encoded_len().saturating_add(6)
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes(self.topic.as_str().as_bytes())?;
        w.u32(self.num_partitions)?;
        w.u16(self.replication_factor)
    }
}

/// The payload of a DeleteTopic request.
impl Encode for DeleteTopicRequest<'_> {
    fn encoded_len(&self) -> usize {
        self.topic.encoded_len()
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes(self.topic.as_str().as_bytes())
    }
}
