//! The one I/O driver: runs a [`ClientConnection`](crate::ClientConnection) over an
//! `embedded-io` transport ([`blocking`], feature `embedded-io`) or an `embedded-io-async`
//! transport ([`asynch`], feature `embedded-io-async`), with a caller-supplied clock.
//!
//! Adapters wrap their sockets (`embedded-io-adapters`' `FromStd`, `FromTokio`,
//! `FromFutures`) and hand them to a driver; none of them re-implements this loop.

use core::fmt;

use crate::conn::client::ClientError;
use crate::conn::time::Instant;
use crate::wire::Payload;
use crate::wire::request::Request;
use crate::wire::response::{PayloadParser, payload_parser};
use crate::wire::types::RequestType;

#[cfg(feature = "embedded-io-async")]
pub mod asynch;
#[cfg(feature = "embedded-io")]
pub mod blocking;

/// One request as a driver sends it: its type, its payload and the decoder of its reply's
/// payload. From a [`Request`] ([`Call::of`]), or from one request type's struct and parser,
/// as the embedded client builds it: then only that type's codecs are linked.
#[derive(Clone, Copy)]
pub(crate) struct Call<'r> {
    pub(crate) request_type: RequestType,
    pub(crate) payload: &'r dyn Payload,
    pub(crate) parse: PayloadParser,
}

impl<'r> Call<'r> {
    /// The call sending `request`.
    pub(crate) fn of(request: &'r Request<'_>) -> Self {
        let request_type = request.request_type();
        Self {
            request_type,
            payload: request,
            parse: payload_parser(request_type),
        }
    }
}

/// A monotonic clock: a closure `FnMut() -> Instant` is one.
pub trait Clock {
    /// The current time.
    fn now(&mut self) -> Instant;
}

impl<F: FnMut() -> Instant> Clock for F {
    fn now(&mut self) -> Instant {
        self()
    }
}

/// Why a driver call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum DriverError<E> {
    /// The transport failed.
    Io(E),
    /// The transport reached end of stream (the peer closed), or accepted no bytes.
    Closed,
    /// The connection refused the call or is poisoned (see [`ClientError::is_fatal`]).
    Client(ClientError),
    /// The request got no response by its deadline.
    TimedOut {
        /// The request's id.
        request_id: u64,
    },
}

impl<E> From<ClientError> for DriverError<E> {
    fn from(e: ClientError) -> Self {
        Self::Client(e)
    }
}

impl<E: fmt::Debug> fmt::Display for DriverError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "transport error: {e:?}"),
            Self::Closed => f.write_str("connection closed by the peer"),
            Self::Client(e) => fmt::Display::fmt(e, f),
            Self::TimedOut { request_id } => write!(f, "request {request_id} timed out"),
        }
    }
}

impl<E: fmt::Debug> core::error::Error for DriverError<E> {}
