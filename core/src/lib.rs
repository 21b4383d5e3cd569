//! # streambus-core
//!
//! The sans-IO core of the StreamBus v1 wire protocol.
//!
//! **The contract.** This crate performs no I/O, reads no clock, allocates nothing and never
//! panics on any input: every byte slice a peer can send is either decoded or rejected with a
//! typed error. It is `#![no_std]` and builds for bare-metal targets such as
//! `thumbv7em-none-eabihf`. All buffers belong to the caller.
//!
//! What lives here:
//!
//! - [`checksum`]: the CRC-32 (ISO-HDLC) of the protocol, with incremental hashing and
//!   [`checksum::combine`] for checksumming concatenations without re-reading bytes;
//! - framing: one frame reader finds frame boundaries in a byte stream and enforces the maximum
//!   frame length from the 4 length bytes alone, for [`FrameDecoder`], [`ServerConnection`] and
//!   [`ClientConnection`] alike; [`RequestFrame`] / [`ResponseFrame`] are
//!   zero-copy views validated once;
//! - payload codecs for the seven request types and the Metadata extension (§6.4) ([`Request`], [`Response`]) and the message
//!   record format ([`MessageSet`], [`MessageSetBuilder`]);
//! - errors split by who is at fault: [`DecodeError`] (the peer's bytes), [`EncodeError`]
//!   (the caller's buffer or values).
//!
//! Encoding follows one rule everywhere: `encoded_len()` is exactly what `encode()` writes, and
//! when the buffer is too small `encode()` returns [`EncodeError::BufferTooSmall`] with the
//! required size and writes nothing.
//!
//! ```
//! use streambus_core::{encode_request, FrameDecoder, Request, RequestFrame, Flags, Status};
//!
//! let mut buf = [0u8; 64];
//! let n = encode_request(1, Flags::NONE, &Request::HealthCheck, &mut buf).unwrap();
//! assert_eq!(&buf[..n], &[0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 1, 7, 1, 0, 0, 0xda, 0xa0, 0xbd, 0x51]);
//!
//! let decoder = FrameDecoder::default();
//! let Status::Complete(len) = decoder.next_frame(&buf[..n]).unwrap() else { panic!() };
//! let frame = RequestFrame::new_checked(&buf[..len]).unwrap();
//! assert_eq!(frame.request_id(), 1);
//! assert_eq!(Request::parse(&frame).unwrap(), Request::HealthCheck);
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic,
        clippy::cast_possible_truncation,
        clippy::arithmetic_side_effects
    )
)]

#[macro_use]
mod fmt;

pub mod checksum;
mod conn;
#[cfg(any(feature = "embedded-io", feature = "embedded-io-async"))]
pub mod embedded;
mod error;
#[cfg(any(feature = "embedded-io", feature = "embedded-io-async"))]
pub mod io;
mod wire;

pub use conn::client::{
    ClientConfig, ClientConnection, ClientError, ClientEvent, Completion, PeerError,
};
pub use conn::server::{ServerConfig, ServerConnection, ServerEvent};
pub use conn::time::Instant;
pub use error::{DecodeError, EncodeError, Malformed};
pub use wire::frame::{
    PROTOCOL_VERSION, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN, RequestFrame, RequestHeader,
    ResponseFrame, ResponseHeader, encode_request, encode_response, request_encoded_len,
    response_encoded_len,
};
pub use wire::message::{
    Header, Headers, HeadersIter, MESSAGE_FIXED_LEN, Message, MessageSet, MessageSetBuilder,
    MessageSetIter, RecordIter,
};
#[cfg(feature = "metadata")]
pub use wire::metadata::{
    BrokerInfo, BrokerList, BrokerListIter, MetadataRequest, MetadataResponse, PartitionList,
    PartitionListIter, PartitionMetadata, ReplicaList, ReplicaListIter, TopicMetadata,
    TopicMetadataList, TopicMetadataListIter, TopicNames, TopicNamesIter,
};
pub use wire::reader::{DEFAULT_MAX_FRAME_LEN, FrameDecoder, Status};
pub use wire::request::{
    AuthenticateRequest, CreateTopicRequest, DeleteTopicRequest, FetchExtension, FetchRequest,
    GetOffsetRequest, LongPoll, MECHANISM_TOKEN, ProduceRequest, ProducerInfo, Request,
};
pub use wire::response::{
    AuthenticateResponse, CreateTopicResponse, DeleteTopicResponse, ErrorResponse,
    FETCH_RESPONSE_FIXED_LEN, FetchResponse, FetchTrailer, GetOffsetResponse, HealthCheckResponse,
    ListTopicsResponse, ProduceResponse, Response, TopicInfo, TopicList, TopicListIter,
};
pub use wire::types::{ErrorCode, Flags, MAX_TOPIC_LEN, RequestType, ResponseStatus, Topic};
pub use wire::{Encode, Text};

/// What a broker needs beyond the codec and its [`ServerConnection`]: replies encoded apart
/// from the connection (on another thread, or around records sent from a file), error replies
/// formatted without allocating, and the stamping of stored records. Clients never need these.
pub mod broker {
    pub use crate::conn::server::{
        MAX_ERROR_MESSAGE_LEN, encode_error_response, encode_fault_response,
    };
    pub use crate::wire::frame::{
        FETCH_HEAD_LEN, FETCH_TAIL_LEN, FetchFrameParts, encode_fetch_frame_parts,
        encode_fetch_response, peek_request_id,
    };
    pub use crate::wire::message::stamp_record;
}
