//! See [`ServerConnection`].

use core::fmt::{self, Write as _};
use core::time::Duration;

use crate::conn::time::{Instant, earliest};
use crate::error::{DecodeError, EncodeError};
use crate::wire::Text;
use crate::wire::frame::FetchFrameParts;
use crate::wire::frame::{
    PROTOCOL_VERSION, REQUEST_ID_END, RequestFrame, encode_response, peek_request_id,
};
use crate::wire::reader::{
    DEFAULT_MAX_FRAME_LEN, FrameDecoder, FrameReader, MIN_REQUEST_LENGTH, Status,
};
use crate::wire::request::Request;
use crate::wire::response::{ErrorResponse, FetchResponse, FetchTrailer, Response};
use crate::wire::types::{ErrorCode, Flags, RequestType};

/// The longest error message [`ServerConnection::respond_error`] writes, in bytes; longer
/// messages are cut at a character boundary.
pub const MAX_ERROR_MESSAGE_LEN: usize = 256;

/// Settings of a [`ServerConnection`]: plain fields, `Default`, and chaining setters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub struct ServerConfig {
    /// Largest accepted Length field (default [`DEFAULT_MAX_FRAME_LEN`], 10 MiB); judged on the
    /// 4 Length bytes alone, before the body is buffered.
    pub max_frame_len: u32,
    /// Requests in flight (read, not yet answered) before the connection stops reading
    /// (default 128; at least 1).
    pub max_in_flight: usize,
    /// Consecutive CRC mismatches after which the connection closes, the last one answered
    /// (default 3; at least 1).
    pub max_checksum_faults: u8,
    /// How long an incomplete frame may sit without new bytes (default 30 s).
    pub read_timeout: Duration,
    /// How long a connection with nothing in flight may stay without a frame (default 10 min).
    pub idle_timeout: Duration,
    /// The broker requires authentication (§6.3): a connection not marked
    /// [`authenticated`](ServerConnection::authenticated) within
    /// [`read_timeout`](Self::read_timeout) of being accepted is closed (default off).
    pub require_authentication: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            max_in_flight: 128,
            max_checksum_faults: 3,
            read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            require_authentication: false,
        }
    }
}

impl ServerConfig {
    /// Sets [`max_frame_len`](Self::max_frame_len) (raised to the minimum frame, 16).
    pub fn max_frame_len(&mut self, max: u32) -> &mut Self {
        self.max_frame_len = max.max(MIN_REQUEST_LENGTH);
        self
    }
    /// Sets [`max_in_flight`](Self::max_in_flight) (raised to 1).
    pub fn max_in_flight(&mut self, max: usize) -> &mut Self {
        self.max_in_flight = max.max(1);
        self
    }
    /// Sets [`max_checksum_faults`](Self::max_checksum_faults) (raised to 1).
    pub fn max_checksum_faults(&mut self, max: u8) -> &mut Self {
        self.max_checksum_faults = max.max(1);
        self
    }
    /// Sets [`read_timeout`](Self::read_timeout).
    pub fn read_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.read_timeout = timeout;
        self
    }
    /// Sets [`idle_timeout`](Self::idle_timeout).
    pub fn idle_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.idle_timeout = timeout;
        self
    }
    /// Sets [`require_authentication`](Self::require_authentication).
    pub fn require_authentication(&mut self, on: bool) -> &mut Self {
        self.require_authentication = on;
        self
    }
}

/// What [`ServerConnection::poll_request`] found at the front of the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ServerEvent<'a> {
    /// A well-formed request, borrowed from `rx`. It is in flight until answered with
    /// [`ServerConnection::respond`] or [`ServerConnection::respond_error`]. Drop `consumed`
    /// bytes from the front of `rx` once done with `request`.
    Request {
        /// Bytes of `rx` this frame took.
        consumed: usize,
        /// The RequestID to answer.
        request_id: u64,
        /// The request's flags (unknown bits kept).
        flags: Flags,
        /// The decoded request.
        request: Request<'a>,
    },
    /// An intact frame that can't be executed: bad CRC, unknown type, wrong version, malformed
    /// payload, or a compressed Produce. Drop `consumed` bytes and answer with
    /// [`ServerConnection::respond_fault`]; the connection stays open. It counts as in flight.
    Reply {
        /// Bytes of `rx` this frame took.
        consumed: usize,
        /// The RequestID to answer (as read; a CRC fault may have damaged it).
        request_id: u64,
        /// What was wrong.
        error: DecodeError,
    },
    /// `rx` holds no whole frame: read at least `at_least` more bytes. `frame_len` is the whole
    /// frame's size once its Length is known (so the adapter can reserve it), at most the
    /// configured maximum plus 4.
    NeedMore {
        /// Bytes missing before the next step can be taken.
        at_least: usize,
        /// Size of the frame being received, Length field included, once known.
        frame_len: Option<usize>,
    },
    /// [`ServerConfig::max_in_flight`] requests are unanswered: stop reading until a response
    /// goes out (back-pressure), then poll again.
    Blocked,
    /// The stream can't go on. Send the reply if there is one (with
    /// [`ServerConnection::respond_fault`]), then close. Every later poll returns
    /// `Close { reply: None }`.
    Close {
        /// The RequestID (0 when it can't be known) and the error to answer with.
        reply: Option<(u64, DecodeError)>,
    },
}

/// The broker's state of one connection.
///
/// The broker's side of one connection: framing, limits, fault rules and timers, with no
/// buffers of its own.
///
/// The adapter owns a growable receive buffer and a transmit buffer and lends them as slices,
/// so an idle connection costs only this small struct (a broker holds thousands) while a
/// single frame may still be as large as the configured maximum (10 MiB by default).
///
/// The loop an adapter runs:
///
/// 1. read bytes into `rx`, then call [`ServerConnection::poll_request`] until it asks for more;
/// 2. on [`ServerEvent::Request`] drop `consumed` bytes from the front of `rx` (after it is
///    done with the borrowed request), execute it, and answer with
///    [`ServerConnection::respond`] (any order: clients match replies by RequestID);
/// 3. on [`ServerEvent::Reply`] drop `consumed` bytes and answer with
///    [`ServerConnection::respond_fault`];
/// 4. on [`ServerEvent::Close`] send the reply if there is one, then close;
/// 5. on [`ServerEvent::Blocked`] stop reading until a response went out;
/// 6. arm a timer at [`ServerConnection::poll_timeout`] and call
///    [`ServerConnection::handle_timeout`] when it fires; close when it returns `true`.
///
/// The exact rules are in `docs/protocol.md`, section 8, "Connection rules".
#[derive(Debug, Clone)]
pub struct ServerConnection {
    config: ServerConfig,
    /// The frame at the front of `rx`.
    reader: FrameReader,
    in_flight: usize,
    checksum_faults: u8,
    closed: bool,
    /// The idle timer runs from here while nothing is in flight.
    idle_since: Instant,
    /// The last response emptied the pipeline: restart the idle timer at the next `now`.
    idle_restart: bool,
    /// The read timer: when `rx` last grew while holding an incomplete frame, and its length.
    partial: Option<(Instant, usize)>,
    /// With [`ServerConfig::require_authentication`], the connection is closed at
    /// `authenticate_by` while `awaiting_authentication` (kept as two fields: an `Option` would
    /// cost 8 more bytes per connection).
    authenticate_by: Instant,
    awaiting_authentication: bool,
}

impl ServerConnection {
    /// A connection accepted at `now`.
    pub fn new(config: ServerConfig, now: Instant) -> Self {
        Self {
            config,
            reader: FrameReader::new(FrameDecoder::new(MIN_REQUEST_LENGTH, config.max_frame_len)),
            in_flight: 0,
            checksum_faults: 0,
            closed: false,
            idle_since: now,
            idle_restart: false,
            partial: None,
            authenticate_by: now.saturating_add(config.read_timeout),
            awaiting_authentication: config.require_authentication,
        }
    }

    /// Closes the connection at the broker's request (the third failed `Authenticate` in a
    /// row, §6.3): no further request is handed out ([`poll_request`](Self::poll_request)
    /// returns `Close { reply: None }`); replies to the requests in flight may still be sent.
    pub fn close_after_replies(&mut self) {
        self.closed = true;
        self.partial = None;
    }

    /// Records that the connection authenticated (§6.3): the authentication deadline of
    /// [`ServerConfig::require_authentication`] no longer applies. Poll
    /// [`poll_timeout`](Self::poll_timeout) again after it.
    pub fn authenticated(&mut self) {
        self.awaiting_authentication = false;
    }

    /// The authentication deadline, while it applies.
    fn authentication_deadline(&self) -> Option<Instant> {
        self.awaiting_authentication.then_some(self.authenticate_by)
    }

    /// The settings.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Requests read and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether the connection must be closed (after a [`ServerEvent::Close`] or a timeout).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Looks at the adapter's unconsumed received bytes `rx` (front = oldest) and returns the
    /// next event. Call it after every read and after every response, until it returns
    /// [`ServerEvent::NeedMore`] or [`ServerEvent::Blocked`].
    ///
    /// `rx` starts where the last event's `consumed` bytes ended (at the first byte for a new
    /// connection): the connection remembers the Length of the frame it is receiving, so it
    /// judges each Length once, on its 4 bytes, before the body is buffered.
    pub fn poll_request<'a>(&mut self, now: Instant, rx: &'a [u8]) -> ServerEvent<'a> {
        if self.closed {
            return ServerEvent::Close { reply: None };
        }
        self.restart_idle(now);
        if self.in_flight >= self.config.max_in_flight.max(1) {
            // Not reading: the read timer waits until reading resumes.
            self.partial = None;
            return ServerEvent::Blocked;
        }
        let total = match self.reader.poll(rx) {
            Ok(Status::Complete(total)) => total,
            Ok(Status::Partial(missing)) => {
                return self.need_more(now, rx.len(), missing, self.reader.frame_len());
            }
            // Decided on the 4 Length bytes; the answer echoes the RequestID, so wait for it.
            Err(error @ DecodeError::FrameTooLarge { .. }) => {
                return match peek_request_id(rx) {
                    Some(id) => self.close(Some((id, error))),
                    None => {
                        let missing = REQUEST_ID_END.saturating_sub(rx.len());
                        self.need_more(now, rx.len(), missing, None)
                    }
                };
            }
            Err(error) => return self.close(Some((0, error))),
        };
        let Some(frame) = rx.get(..total) else {
            // Unreachable: the reader counted these bytes.
            return self.need_more(now, rx.len(), 1, None);
        };
        self.partial = None;
        self.idle_since = now;
        self.in_flight = self.in_flight.saturating_add(1);
        match self.decode(frame) {
            Ok((request_id, flags, request)) => ServerEvent::Request {
                consumed: total,
                request_id,
                flags,
                request,
            },
            Err((request_id, error)) => {
                if matches!(error, DecodeError::ChecksumMismatch { .. }) {
                    self.checksum_faults = self.checksum_faults.saturating_add(1);
                    if self.checksum_faults >= self.config.max_checksum_faults.max(1) {
                        self.in_flight = self.in_flight.saturating_sub(1);
                        return self.close(Some((request_id, error)));
                    }
                }
                ServerEvent::Reply {
                    consumed: total,
                    request_id,
                    error,
                }
            }
        }
    }

    /// Checks and decodes one whole frame.
    fn decode<'a>(
        &mut self,
        frame: &'a [u8],
    ) -> Result<(u64, Flags, Request<'a>), (u64, DecodeError)> {
        let checked = RequestFrame::new_checked(frame)
            .map_err(|e| (peek_request_id(frame).unwrap_or(0), e))?;
        // An intact frame ends a run of CRC faults, whatever its content.
        self.checksum_faults = 0;
        let request_id = checked.request_id();
        let flags = checked.flags();
        let fail = |error| (request_id, error);
        if checked.version() != PROTOCOL_VERSION {
            return Err(fail(DecodeError::UnsupportedVersion {
                request_id,
                version: checked.version(),
            }));
        }
        let Some(ty) = checked.request_type() else {
            return Err(fail(DecodeError::UnknownRequestType {
                request_id,
                request_type: checked.request_type_byte(),
            }));
        };
        if ty == RequestType::Produce && flags.contains(Flags::COMPRESSED) {
            return Err(fail(DecodeError::UnsupportedFlags {
                request_id,
                flags: flags.0,
            }));
        }
        let request = Request::parse_payload(ty, checked.payload_slice()).map_err(fail)?;
        Ok((request_id, flags, request))
    }

    /// `have` bytes of an incomplete frame are in `rx`, `missing` more are needed.
    fn need_more(
        &mut self,
        now: Instant,
        have: usize,
        missing: usize,
        frame_len: Option<usize>,
    ) -> ServerEvent<'static> {
        self.partial = match self.partial {
            _ if have == 0 => None,
            Some((since, len)) if len >= have => Some((since, len)),
            _ => Some((now, have)),
        };
        ServerEvent::NeedMore {
            at_least: missing.max(1),
            frame_len,
        }
    }

    fn close(&mut self, reply: Option<(u64, DecodeError)>) -> ServerEvent<'static> {
        debug!("closing connection: {}", reply);
        self.closed = true;
        self.partial = None;
        ServerEvent::Close { reply }
    }

    fn restart_idle(&mut self, now: Instant) {
        if self.idle_restart {
            self.idle_restart = false;
            self.idle_since = now;
        }
    }

    fn answered(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight == 0 {
            self.idle_restart = true;
        }
    }

    /// Records that the reply to the in-flight request `request_id` was encoded elsewhere (with
    /// [`encode_response`](crate::encode_response) and its siblings, on another thread, say)
    /// and queued for sending: the request is no longer in flight. Answering an id that is not
    /// in flight only miscounts (never below zero).
    pub fn complete(&mut self, request_id: u64) {
        let _ = request_id;
        self.answered();
    }

    /// Encodes the reply to an in-flight request into `tx` and returns its length; the request
    /// is no longer in flight.
    ///
    /// [`EncodeError::BufferTooSmall`] writes nothing and changes nothing: grow `tx` to
    /// `required` and retry. Answering an id that is not in flight only miscounts (never
    /// below zero).
    pub fn respond(
        &mut self,
        request_id: u64,
        response: &Response<'_>,
        tx: &mut [u8],
    ) -> Result<usize, EncodeError> {
        let n = encode_response(request_id, response, tx)?;
        self.answered();
        Ok(n)
    }

    /// [`respond`](Self::respond) for a Fetch success whose records' CRC is already known:
    /// see [`encode_fetch_response`](crate::broker::encode_fetch_response). Same contract.
    pub fn respond_fetch(
        &mut self,
        request_id: u64,
        fetch: &FetchResponse<'_>,
        records_crc: u32,
        tx: &mut [u8],
    ) -> Result<usize, EncodeError> {
        let n = crate::wire::frame::encode_fetch_response(request_id, fetch, records_crc, tx)?;
        self.answered();
        Ok(n)
    }

    /// The head and tail of a Fetch success frame whose records the adapter sends from
    /// elsewhere (see [`encode_fetch_frame_parts`](crate::broker::encode_fetch_frame_parts)); the
    /// request is no longer in flight.
    pub fn respond_fetch_parts(
        &mut self,
        request_id: u64,
        high_water_mark: i64,
        count: u32,
        records_len: usize,
        records_crc: u32,
        trailer: FetchTrailer,
    ) -> Result<FetchFrameParts, EncodeError> {
        let parts = crate::wire::frame::encode_fetch_frame_parts(
            request_id,
            high_water_mark,
            count,
            records_len,
            records_crc,
            trailer,
        )?;
        self.answered();
        Ok(parts)
    }

    /// Encodes an error reply whose message is `message`, formatted without allocating and cut
    /// at a character boundary after [`MAX_ERROR_MESSAGE_LEN`] bytes. Same contract as
    /// [`respond`](Self::respond).
    pub fn respond_error(
        &mut self,
        request_id: u64,
        code: ErrorCode,
        message: fmt::Arguments<'_>,
        tx: &mut [u8],
    ) -> Result<usize, EncodeError> {
        let n = encode_error_response(request_id, code, message, tx)?;
        self.answered();
        Ok(n)
    }

    /// Encodes the reply to a fault ([`ServerEvent::Reply`] or [`ServerEvent::Close`]): the
    /// error's code and its `Display` text.
    pub fn respond_fault(
        &mut self,
        request_id: u64,
        error: &DecodeError,
        tx: &mut [u8],
    ) -> Result<usize, EncodeError> {
        let n = encode_fault_response(request_id, error, tx)?;
        if !self.closed {
            self.answered();
        }
        Ok(n)
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called, if ever.
    ///
    /// Poll again after every call to `poll_request`, `respond*` and `handle_timeout`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        let read = self
            .partial
            .map(|(since, _)| since.saturating_add(self.config.read_timeout));
        let idle =
            (self.in_flight == 0).then(|| self.idle_since.saturating_add(self.config.idle_timeout));
        earliest(earliest(read, idle), self.authentication_deadline())
    }

    /// Fires the timers due at `now`; returns `true` when the connection must be closed: an
    /// incomplete frame got no new bytes for the read timeout, nothing happened for the idle
    /// timeout, or authentication is required and did not happen within the read timeout.
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        if self.closed {
            return true;
        }
        self.restart_idle(now);
        let read_expired = self
            .partial
            .is_some_and(|(since, _)| now >= since.saturating_add(self.config.read_timeout));
        let idle_expired =
            self.in_flight == 0 && now >= self.idle_since.saturating_add(self.config.idle_timeout);
        let unauthenticated = self.authentication_deadline().is_some_and(|by| now >= by);
        if read_expired || idle_expired || unauthenticated {
            self.closed = true;
            self.partial = None;
        }
        self.closed
    }
}

/// Encodes an error response whose message is formatted from `message` straight into a
/// bounded stack buffer (no allocation), cut at a character boundary after
/// [`MAX_ERROR_MESSAGE_LEN`] bytes. Writes nothing on [`EncodeError::BufferTooSmall`].
pub fn encode_error_response(
    request_id: u64,
    code: ErrorCode,
    message: fmt::Arguments<'_>,
    tx: &mut [u8],
) -> Result<usize, EncodeError> {
    let mut text = Truncating {
        buf: [0; MAX_ERROR_MESSAGE_LEN],
        len: 0,
        full: false,
    };
    // `Truncating` never fails; a failing `Display` impl just leaves a shorter message.
    let _ = text.write_fmt(message);
    let message = Text(text.buf.get(..text.len).unwrap_or_default());
    encode_response(
        request_id,
        &Response::Error(ErrorResponse { code, message }),
        tx,
    )
}

/// Encodes the error response for a decode fault: [`DecodeError::error_code`] and the error's
/// `Display` text.
pub fn encode_fault_response(
    request_id: u64,
    error: &DecodeError,
    tx: &mut [u8],
) -> Result<usize, EncodeError> {
    encode_error_response(request_id, error.error_code(), format_args!("{error}"), tx)
}

/// A `fmt::Write` into a fixed buffer that drops what doesn't fit, at a char boundary.
struct Truncating {
    buf: [u8; MAX_ERROR_MESSAGE_LEN],
    len: usize,
    /// Something was cut: write nothing more, so the message never has a hole.
    full: bool,
}

impl fmt::Write for Truncating {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.full {
            return Ok(());
        }
        let room = MAX_ERROR_MESSAGE_LEN.saturating_sub(self.len);
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            // Index 0 is a boundary: this stops.
            take = take.saturating_sub(1);
        }
        if let (Some(dst), Some(src)) = (
            self.buf.get_mut(self.len..).and_then(|b| b.get_mut(..take)),
            s.as_bytes().get(..take),
        ) {
            dst.copy_from_slice(src);
            self.len = self.len.saturating_add(take);
        }
        self.full = take < s.len();
        Ok(())
    }
}
