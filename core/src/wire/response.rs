//! Response payloads: the per-type success payloads and the error payload.

use core::fmt;

use crate::error::{DecodeError, EncodeError, Malformed};
use crate::wire::frame::ResponseFrame;
use crate::wire::message::{MESSAGE_FIXED_LEN, MessageSet};
#[cfg(feature = "metadata")]
use crate::wire::metadata::MetadataResponse;
use crate::wire::types::{ErrorCode, RequestType, ResponseStatus, Topic};
use crate::wire::{Encode, Reader, Text, Writer, len_u32};

/// The fixed bytes of a Fetch success payload: HighWaterMark, NumMessages and the trailer.
pub const FETCH_RESPONSE_FIXED_LEN: usize = 8 + 4 + 16;

/// Produce success: exactly 20 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ProduceResponse {
    /// The first offset assigned.
    pub base_offset: i64,
    /// How many messages were appended.
    pub num_messages: u32,
    /// The next offset after the append.
    pub high_water_mark: i64,
}

/// Fetch trailer: read by the newer original SDK, ignored by older ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FetchTrailer {
    /// Equals the high-water mark (no transactions).
    pub last_stable_offset: i64,
    /// The offset after the last message returned (or the requested offset when none).
    pub next_offset: i64,
}

/// Fetch success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FetchResponse<'a> {
    /// The partition's high-water mark.
    pub high_water_mark: i64,
    /// The messages returned.
    pub messages: MessageSet<'a>,
    /// The trailer; always sent by this broker, absent from older brokers.
    pub trailer: Option<FetchTrailer>,
}

/// GetOffset success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct GetOffsetResponse<'a> {
    /// The topic.
    pub topic: Topic<'a>,
    /// The partition.
    pub partition: u32,
    /// The log start.
    pub start_offset: i64,
    /// The next offset to be assigned.
    pub end_offset: i64,
    /// Equals `end_offset` on a single broker.
    pub high_water_mark: i64,
}

/// CreateTopic success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CreateTopicResponse<'a> {
    /// The topic.
    pub topic: Topic<'a>,
    /// False when it already existed with the same partition count.
    pub created: bool,
}

/// DeleteTopic success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DeleteTopicResponse<'a> {
    /// The topic.
    pub topic: Topic<'a>,
    /// True when deleted.
    pub deleted: bool,
}

/// One entry of a ListTopics reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TopicInfo<'a> {
    /// The topic.
    pub name: Topic<'a>,
    /// Its partition count.
    pub num_partitions: u32,
}

impl<'a> TopicInfo<'a> {
    fn read(r: &mut Reader<'a>) -> Result<Self, Malformed> {
        let name = Topic::from_bytes(r.bytes("topic")?)?;
        let num_partitions = r.u32("partition count")?;
        Ok(Self {
            name,
            num_partitions,
        })
    }
}

#[derive(Clone, Copy)]
enum TopicListRepr<'a> {
    Wire { count: u32, bytes: &'a [u8] },
    Slice(&'a [TopicInfo<'a>]),
}

/// The topics of a ListTopics reply: borrowed from wire bytes (decoded) or from a caller's
/// slice (to encode).
#[derive(Clone, Copy)]
pub struct TopicList<'a>(TopicListRepr<'a>);

impl<'a> TopicList<'a> {
    /// A list to encode.
    pub const fn from_slice(topics: &'a [TopicInfo<'a>]) -> Self {
        Self(TopicListRepr::Slice(topics))
    }

    /// The number of topics.
    pub fn len(&self) -> usize {
        match self.0 {
            TopicListRepr::Wire { count, .. } => count as usize,
            TopicListRepr::Slice(s) => s.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The topics in order.
    pub fn iter(&self) -> TopicListIter<'a> {
        TopicListIter(match self.0 {
            TopicListRepr::Wire { count, bytes } => ListIterRepr::Wire {
                left: count,
                r: Reader::new(bytes),
            },
            TopicListRepr::Slice(s) => ListIterRepr::Slice(s.iter()),
        })
    }
}

impl PartialEq for TopicList<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for TopicList<'_> {}

impl fmt::Debug for TopicList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for TopicList<'_> {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "TopicList({=usize})", self.len())
    }
}

#[derive(Clone)]
enum ListIterRepr<'a> {
    Wire { left: u32, r: Reader<'a> },
    Slice(core::slice::Iter<'a, TopicInfo<'a>>),
}

/// Iterator over a [`TopicList`].
#[derive(Clone)]
pub struct TopicListIter<'a>(ListIterRepr<'a>);

impl fmt::Debug for TopicListIter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicListIter").finish_non_exhaustive()
    }
}

impl<'a> Iterator for TopicListIter<'a> {
    type Item = TopicInfo<'a>;

    fn next(&mut self) -> Option<TopicInfo<'a>> {
        match &mut self.0 {
            ListIterRepr::Slice(it) => it.next().copied(),
            ListIterRepr::Wire { left, r } => {
                *left = left.checked_sub(1)?;
                TopicInfo::read(r).ok()
            }
        }
    }
}

/// ListTopics success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ListTopicsResponse<'a> {
    /// The topics, sorted by name.
    pub topics: TopicList<'a>,
}

/// HealthCheck success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct HealthCheckResponse<'a> {
    /// `healthy`.
    pub status: Text<'a>,
    /// Seconds since the broker started.
    pub uptime_secs: i64,
}

/// Authenticate success (§6.3): the principal the connection now speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct AuthenticateResponse<'a> {
    /// The principal's name.
    pub principal: Text<'a>,
}

impl<'a> AuthenticateResponse<'a> {
    fn read(r: &mut Reader<'a>) -> Result<Self, Malformed> {
        Ok(Self {
            principal: Text(r.bytes("principal")?),
        })
    }

    fn encoded_len(&self) -> usize {
        self.principal.0.len().saturating_add(4)
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes(self.principal.0)
    }
}

/// The error payload (Status 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ErrorResponse<'a> {
    /// The error code, carried in the frame header.
    pub code: ErrorCode,
    /// A human-readable message: what was wrong and with which value.
    pub message: Text<'a>,
}

/// A decoded response payload, borrowing the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Response<'a> {
    /// Reply to 0x01.
    Produce(ProduceResponse),
    /// Reply to 0x02.
    Fetch(FetchResponse<'a>),
    /// Reply to 0x03.
    GetOffset(GetOffsetResponse<'a>),
    /// Reply to 0x04.
    CreateTopic(CreateTopicResponse<'a>),
    /// Reply to 0x05.
    DeleteTopic(DeleteTopicResponse<'a>),
    /// Reply to 0x06.
    ListTopics(ListTopicsResponse<'a>),
    /// Reply to 0x07.
    HealthCheck(HealthCheckResponse<'a>),
    /// Reply to 0x11 (§6.4).
    #[cfg(feature = "metadata")]
    Metadata(MetadataResponse<'a>),
    /// Reply to 0x10 (§6.3).
    Authenticate(AuthenticateResponse<'a>),
    /// An error reply to any request.
    Error(ErrorResponse<'a>),
}

fn read_topic<'a>(r: &mut Reader<'a>) -> Result<Topic<'a>, Malformed> {
    Topic::from_bytes(r.bytes("topic")?)
}

impl<'a> Response<'a> {
    /// Decodes a validated frame answering a request of type `request_type` (a response
    /// carries no type of its own). Status 2 (reserved PartialSuccess) is read as success, as
    /// the original SDK does.
    pub fn parse(
        frame: &ResponseFrame<&'a [u8]>,
        request_type: RequestType,
    ) -> Result<Self, DecodeError> {
        Self::parse_with(frame, payload_parser(request_type))
    }

    /// [`parse`](Self::parse) with the success payload decoded by `parse`.
    pub(crate) fn parse_with(
        frame: &ResponseFrame<&'a [u8]>,
        parse: PayloadParser,
    ) -> Result<Self, DecodeError> {
        match frame.status() {
            Some(ResponseStatus::Error) => {
                Self::parse_error(frame.error_code(), frame.payload_slice())
            }
            Some(_) => parse(frame.payload_slice()),
            None => Err(Malformed::InvalidStatus {
                value: frame.status_byte(),
            }
            .into()),
        }
    }

    /// Decodes an error payload. An empty payload (a non-conforming peer) reads as an empty
    /// message rather than failing, so the error code still reaches the caller.
    pub fn parse_error(code: ErrorCode, payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let message = if payload.is_empty() {
            &[][..]
        } else {
            r.bytes("error message")?
        };
        Ok(Self::Error(ErrorResponse {
            code,
            message: Text(message),
        }))
    }

    /// Decodes the success payload of a reply to `ty`. Trailing bytes are ignored.
    pub fn parse_payload(ty: RequestType, payload: &'a [u8]) -> Result<Self, DecodeError> {
        payload_parser(ty)(payload)
    }

    /// The status byte this response is sent with.
    pub fn status(&self) -> ResponseStatus {
        match self {
            Self::Error(_) => ResponseStatus::Error,
            _ => ResponseStatus::Ok,
        }
    }
}

/// Decodes the success payload of a reply to one request type. Naming one parser (rather
/// than dispatching on a [`RequestType`] at run time) links only that type's decoder: the
/// embedded client's footprint depends on it.
pub(crate) type PayloadParser = for<'a> fn(&'a [u8]) -> Result<Response<'a>, DecodeError>;

/// The decoder of the success payload of a reply to `ty`.
pub(crate) fn payload_parser(ty: RequestType) -> PayloadParser {
    match ty {
        RequestType::Produce => parse_produce,
        RequestType::Fetch => parse_fetch,
        RequestType::GetOffset => parse_get_offset,
        RequestType::CreateTopic => parse_create_topic,
        RequestType::DeleteTopic => parse_delete_topic,
        RequestType::ListTopics => parse_list_topics,
        RequestType::HealthCheck => parse_health_check,
        RequestType::Authenticate => parse_authenticate,
        #[cfg(feature = "metadata")]
        RequestType::Metadata => parse_metadata,
    }
}

pub(crate) fn parse_authenticate(payload: &[u8]) -> Result<Response<'_>, DecodeError> {
    let mut r = Reader::new(payload);
    Ok(Response::Authenticate(AuthenticateResponse::read(&mut r)?))
}

#[cfg(feature = "metadata")]
fn parse_metadata(payload: &[u8]) -> Result<Response<'_>, DecodeError> {
    let mut r = Reader::new(payload);
    Ok(Response::Metadata(MetadataResponse::read(&mut r)?))
}

pub(crate) fn parse_produce(payload: &[u8]) -> Result<Response<'_>, DecodeError> {
    let mut r = Reader::new(payload);
    Ok(Response::Produce(ProduceResponse {
        base_offset: r.i64("base offset")?,
        num_messages: r.u32("message count")?,
        high_water_mark: r.i64("high-water mark")?,
    }))
}

pub(crate) fn parse_fetch(payload: &[u8]) -> Result<Response<'_>, DecodeError> {
    let mut r = Reader::new(payload);
    let high_water_mark = r.i64("high-water mark")?;
    let count = r.u32("message count")?;
    let messages = MessageSet::read(&mut r, count)?;
    let trailer = if r.remaining() >= 16 {
        Some(FetchTrailer {
            last_stable_offset: r.i64("last stable offset")?,
            next_offset: r.i64("next offset")?,
        })
    } else {
        None
    };
    Ok(Response::Fetch(FetchResponse {
        high_water_mark,
        messages,
        trailer,
    }))
}

pub(crate) fn parse_get_offset(payload: &[u8]) -> Result<Response<'_>, DecodeError> {
    let mut r = Reader::new(payload);
    Ok(Response::GetOffset(GetOffsetResponse {
        topic: read_topic(&mut r)?,
        partition: r.u32("partition")?,
        start_offset: r.i64("start offset")?,
        end_offset: r.i64("end offset")?,
        high_water_mark: r.i64("high-water mark")?,
    }))
}

pub(crate) fn parse_create_topic(payload: &[u8]) -> Result<Response<'_>, DecodeError> {
    let mut r = Reader::new(payload);
    Ok(Response::CreateTopic(CreateTopicResponse {
        topic: read_topic(&mut r)?,
        created: r.bool("created")?,
    }))
}

fn parse_delete_topic(payload: &[u8]) -> Result<Response<'_>, DecodeError> {
    let mut r = Reader::new(payload);
    Ok(Response::DeleteTopic(DeleteTopicResponse {
        topic: read_topic(&mut r)?,
        deleted: r.bool("deleted")?,
    }))
}

fn parse_list_topics(payload: &[u8]) -> Result<Response<'_>, DecodeError> {
    let mut r = Reader::new(payload);
    // Each entry: a u32 name length, at least one name byte, a u32 count.
    let count = r.count("topic count", 9)?;
    let start = r.rest();
    for _ in 0..count {
        TopicInfo::read(&mut r)?;
    }
    let bytes = r.read_since(start);
    Ok(Response::ListTopics(ListTopicsResponse {
        topics: TopicList(TopicListRepr::Wire { count, bytes }),
    }))
}

pub(crate) fn parse_health_check(payload: &[u8]) -> Result<Response<'_>, DecodeError> {
    let mut r = Reader::new(payload);
    Ok(Response::HealthCheck(HealthCheckResponse {
        status: Text(r.bytes("status")?),
        uptime_secs: r.i64("uptime")?,
    }))
}

impl Encode for Response<'_> {
    fn encoded_len(&self) -> usize {
        match self {
            Self::Produce(_) => 20,
            Self::Fetch(f) => {
                // HighWaterMark, NumMessages, and the trailer when present.
                let fixed = if f.trailer.is_some() { 12 + 16 } else { 12 };
                f.messages.encoded_len().saturating_add(fixed)
            }
            Self::GetOffset(g) => g.topic.encoded_len().saturating_add(28),
            Self::CreateTopic(c) => c.topic.encoded_len().saturating_add(1),
            Self::DeleteTopic(d) => d.topic.encoded_len().saturating_add(1),
            Self::ListTopics(l) => l.topics.iter().fold(4, |sum: usize, t| {
                sum.saturating_add(t.name.encoded_len()).saturating_add(4)
            }),
            Self::HealthCheck(h) => h.status.0.len().saturating_add(4 + 8),
            Self::Authenticate(a) => a.encoded_len(),
            Self::Error(e) => e.message.0.len().saturating_add(4),
            #[cfg(feature = "metadata")]
            Self::Metadata(m) => m.encoded_len(),
        }
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        match self {
            Self::Produce(p) => {
                w.i64(p.base_offset)?;
                w.u32(p.num_messages)?;
                w.i64(p.high_water_mark)
            }
            Self::Fetch(f) => {
                w.i64(f.high_water_mark)?;
                w.u32(f.messages.count())?;
                f.messages.write(w)?;
                if let Some(t) = f.trailer {
                    w.i64(t.last_stable_offset)?;
                    w.i64(t.next_offset)?;
                }
                Ok(())
            }
            Self::GetOffset(g) => {
                w.bytes(g.topic.as_str().as_bytes())?;
                w.u32(g.partition)?;
                w.i64(g.start_offset)?;
                w.i64(g.end_offset)?;
                w.i64(g.high_water_mark)
            }
            Self::CreateTopic(c) => {
                w.bytes(c.topic.as_str().as_bytes())?;
                w.u8(u8::from(c.created))
            }
            Self::DeleteTopic(d) => {
                w.bytes(d.topic.as_str().as_bytes())?;
                w.u8(u8::from(d.deleted))
            }
            Self::ListTopics(l) => {
                w.u32(len_u32(l.topics.len())?)?;
                l.topics.iter().try_for_each(|t| {
                    w.bytes(t.name.as_str().as_bytes())?;
                    w.u32(t.num_partitions)
                })
            }
            Self::HealthCheck(h) => {
                w.bytes(h.status.0)?;
                w.i64(h.uptime_secs)
            }
            Self::Authenticate(a) => a.write(w),
            Self::Error(e) => w.bytes(e.message.0),
            #[cfg(feature = "metadata")]
            Self::Metadata(m) => m.write(w),
        }
    }
}

/// Keeps the message-record minimum visible to the Fetch fixed-size computation.
const _: () = assert!(FETCH_RESPONSE_FIXED_LEN + MESSAGE_FIXED_LEN == 56);
