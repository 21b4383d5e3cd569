//! See [`ClientConnection`].

use core::fmt;
use core::time::Duration;

use crate::conn::time::{Instant, earliest};
use crate::error::{DecodeError, EncodeError};
use crate::wire::Payload;
use crate::wire::frame::{ResponseFrame, encode_request_payload, peek_request_id};
use crate::wire::reader::{
    DEFAULT_MAX_FRAME_LEN, FrameDecoder, FrameReader, LENGTH_LEN, MIN_RESPONSE_LENGTH, Status,
    accepted_frame_len,
};
use crate::wire::request::Request;
use crate::wire::response::{PayloadParser, Response, payload_parser};
use crate::wire::types::{Flags, RequestType};

/// Settings of a [`ClientConnection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub struct ClientConfig {
    /// Largest accepted response Length field (default 10 MiB). The receive buffer's size
    /// bounds it too.
    pub max_frame_len: u32,
    /// Time from [`ClientConnection::send_request`] to [`ClientEvent::TimedOut`] (default 30 s).
    pub request_timeout: Duration,
    /// Flags sent with every request by [`ClientConnection::send_request`] (default none).
    pub flags: Flags,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            request_timeout: Duration::from_secs(30),
            flags: Flags::NONE,
        }
    }
}

impl ClientConfig {
    /// Sets [`max_frame_len`](Self::max_frame_len).
    pub fn max_frame_len(&mut self, max: u32) -> &mut Self {
        self.max_frame_len = max;
        self
    }
    /// Sets [`request_timeout`](Self::request_timeout).
    pub fn request_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.request_timeout = timeout;
        self
    }
    /// Sets [`flags`](Self::flags).
    pub fn flags(&mut self, flags: Flags) -> &mut Self {
        self.flags = flags;
        self
    }
}

/// The broker broke the protocol; the connection is poisoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum PeerError {
    /// A response can't be framed or decoded: Length out of range, bad CRC, bad Status, or a
    /// payload that doesn't fit the request's type.
    Decode(DecodeError),
    /// A response answers no request in flight (or answers one twice).
    UnknownResponse {
        /// The RequestID as read.
        request_id: u64,
    },
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Decode(e) => write!(f, "bad response: {e}"),
            Self::UnknownResponse { request_id } => {
                write!(
                    f,
                    "response to request {request_id}, which is not in flight"
                )
            }
        }
    }
}

impl core::error::Error for PeerError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Decode(e) => Some(e),
            Self::UnknownResponse { .. } => None,
        }
    }
}

/// Why a [`ClientConnection`] call failed, grouped by who is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ClientError {
    /// Resource: `N` requests are in flight. Nothing was sent; retry after a completion.
    Busy,
    /// Resource: the request's frame (`required` bytes) doesn't fit the free transmit space.
    /// Nothing was sent; retry after the pending bytes are written, or, if `required` exceeds
    /// the whole buffer, never.
    BufferTooSmall {
        /// The frame's size.
        required: usize,
    },
    /// Resource, fatal: a response frame is larger than the receive buffer.
    ResponseTooLarge {
        /// The frame's size, Length field included.
        frame_len: usize,
        /// The receive buffer's size.
        capacity: usize,
    },
    /// Caller: the request can't be encoded (a field longer than its u32 length prefix).
    Encode(EncodeError),
    /// Peer, fatal: the broker broke the protocol.
    Peer(PeerError),
}

impl ClientError {
    /// Whether the connection is poisoned and must be closed.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::ResponseTooLarge { .. } | Self::Peer(_))
    }
}

impl From<PeerError> for ClientError {
    fn from(e: PeerError) -> Self {
        Self::Peer(e)
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Busy => f.write_str("too many requests in flight"),
            Self::BufferTooSmall { required } => {
                write!(
                    f,
                    "request frame of {required} bytes does not fit the transmit buffer"
                )
            }
            Self::ResponseTooLarge {
                frame_len,
                capacity,
            } => write!(
                f,
                "response frame of {frame_len} bytes exceeds the {capacity}-byte receive buffer"
            ),
            Self::Encode(e) => write!(f, "can't encode request: {e}"),
            Self::Peer(e) => write!(f, "protocol violation by the broker: {e}"),
        }
    }
}

impl core::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Encode(e) => Some(e),
            Self::Peer(e) => Some(e),
            _ => None,
        }
    }
}

/// How a request ended, without the response body (see [`ClientConnection::poll_completion`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Completion {
    /// The request's id.
    pub request_id: u64,
    /// The request's type.
    pub request_type: RequestType,
    /// `true` when the request timed out; otherwise [`ClientConnection::response`] has the
    /// response.
    pub timed_out: bool,
}

/// Something that happened on a [`ClientConnection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ClientEvent<'a> {
    /// A response, borrowed from the receive buffer until the next `poll_*`/`handle_*` call.
    /// Error replies from the broker arrive as [`Response::Error`].
    Response {
        /// The request's id.
        request_id: u64,
        /// The request's type.
        request_type: RequestType,
        /// The decoded response.
        response: Response<'a>,
    },
    /// No response came by the request's deadline.
    TimedOut {
        /// The request's id.
        request_id: u64,
        /// The request's type.
        request_type: RequestType,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
enum SlotState {
    /// Unused.
    Free,
    /// Sent, waiting for the response.
    Waiting,
    /// The response is in the receive buffer, not yet handed out.
    Answered,
    /// Past its deadline, not yet reported. `late` once the response came anyway.
    Expired { late: bool },
    /// Reported as timed out; a late response is dropped and frees the slot.
    Abandoned,
}

#[derive(Debug, Clone, Copy)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
struct Slot {
    id: u64,
    deadline: Instant,
    ty: RequestType,
    state: SlotState,
}

impl Slot {
    const FREE: Slot = Slot {
        id: 0,
        deadline: Instant::ZERO,
        ty: RequestType::HealthCheck,
        state: SlotState::Free,
    };
}

/// The client's state of one connection, with `N` requests in flight at most.
///
/// The client's side of one connection: request ids, pipelining, response matching and
/// per-request deadlines over two caller-provided buffers.
///
/// The buffers are any `B: AsRef<[u8]> + AsMut<[u8]>`: `&mut [u8]` on a microcontroller,
/// `Vec<u8>` or `Box<[u8]>` on a host. They are fixed for the connection's life: the transmit
/// buffer bounds the largest request, the receive buffer the largest response (see
/// `docs/protocol.md` §8 for how to size it for fetches).
///
/// The loop an adapter runs:
///
/// 1. [`send_request`](ClientConnection::send_request) queues a frame and returns its
///    RequestID;
/// 2. write [`poll_transmit`](ClientConnection::poll_transmit) to the transport and report
///    what was written with [`consume_transmit`](ClientConnection::consume_transmit);
/// 3. read into [`recv_buffer`](ClientConnection::recv_buffer) and call
///    [`handle_received`](ClientConnection::handle_received) (or copy with
///    [`handle_input`](ClientConnection::handle_input));
/// 4. drain [`poll_event`](ClientConnection::poll_event) (or the borrow-friendly pair
///    [`poll_completion`](ClientConnection::poll_completion) +
///    [`response`](ClientConnection::response));
/// 5. wake at [`poll_timeout`](ClientConnection::poll_timeout) and call
///    [`handle_timeout`](ClientConnection::handle_timeout), then drain events again.
///
/// An error from `handle_*` poisons the connection: every later call returns it again, and
/// the adapter closes the transport once it has drained the events: the responses that
/// arrived intact before the fault are still handed out, so what completes never depends on
/// how the bytes were split into reads.
#[derive(Debug)]
pub struct ClientConnection<B, const N: usize> {
    config: ClientConfig,
    tx: B,
    /// Pending bytes are `tx[tx_start..tx_end]`.
    tx_start: usize,
    tx_end: usize,
    rx: B,
    /// Received bytes are `rx[rx_start..rx_end]`; those before `rx_checked` are whole,
    /// validated frames.
    rx_start: usize,
    rx_checked: usize,
    rx_end: usize,
    /// The frame being received at `rx_checked`.
    reader: FrameReader,
    /// The frame at `rx_start` was handed out; drop it at the next call.
    delivered: usize,
    slots: [Slot; N],
    /// Every slot in use is below this index (slots are taken lowest first), so scans stop
    /// there: a connection with one request in flight looks at one slot, not `N`.
    hi: usize,
    next_id: u64,
    error: Option<ClientError>,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>, const N: usize> ClientConnection<B, N> {
    /// A connection that encodes requests into `tx` and receives responses into `rx`.
    pub fn new(config: ClientConfig, tx: B, rx: B) -> Self {
        Self {
            config,
            tx,
            tx_start: 0,
            tx_end: 0,
            rx,
            rx_start: 0,
            rx_checked: 0,
            rx_end: 0,
            reader: FrameReader::new(FrameDecoder::new(MIN_RESPONSE_LENGTH, config.max_frame_len)),
            delivered: 0,
            slots: [Slot::FREE; N],
            hi: 0,
            next_id: 1,
            error: None,
        }
    }

    /// The settings.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Requests sent whose completion was not yet handed out (timed-out requests whose late
    /// response has not arrived included).
    pub fn in_flight(&self) -> usize {
        self.active()
            .iter()
            .filter(|s| s.state != SlotState::Free)
            .count()
    }

    /// The error that poisoned the connection, if any.
    pub fn error(&self) -> Option<ClientError> {
        self.error
    }

    /// The slots that may be in use.
    fn active(&self) -> &[Slot] {
        self.slots.get(..self.hi).unwrap_or(&self.slots)
    }

    fn active_mut(&mut self) -> &mut [Slot] {
        let hi = self.hi.min(self.slots.len());
        self.slots.get_mut(..hi).unwrap_or_default()
    }

    /// Lowers [`hi`](Self::hi) past the free slots at the top.
    fn shrink(&mut self) {
        while let Some(i) = self.hi.checked_sub(1)
            && self.slots.get(i).is_none_or(|s| s.state == SlotState::Free)
        {
            self.hi = i;
        }
    }

    fn check(&self) -> Result<(), ClientError> {
        self.error.map_or(Ok(()), Err)
    }

    fn poison(&mut self, e: ClientError) -> ClientError {
        warn!("connection poisoned: {}", e);
        self.error = Some(e);
        e
    }

    /// Queues `request` with the configured flags; returns its RequestID.
    pub fn send_request(
        &mut self,
        now: Instant,
        request: &Request<'_>,
    ) -> Result<u64, ClientError> {
        self.send_request_with_flags(now, self.config.flags, request)
    }

    /// Queues `request` with `flags`; returns its RequestID. On error nothing changes.
    pub fn send_request_with_flags(
        &mut self,
        now: Instant,
        flags: Flags,
        request: &Request<'_>,
    ) -> Result<u64, ClientError> {
        self.send_payload(now, flags, request.request_type(), request)
    }

    /// [`send_request_with_flags`](Self::send_request_with_flags) for a request given as its
    /// type and payload.
    pub(crate) fn send_payload(
        &mut self,
        now: Instant,
        flags: Flags,
        request_type: RequestType,
        payload: &dyn Payload,
    ) -> Result<u64, ClientError> {
        self.check()?;
        let Some(free_slot) = self.slots.iter().position(|s| s.state == SlotState::Free) else {
            return Err(ClientError::Busy);
        };
        if self.tx_start > 0 {
            shift_to_front(self.tx.as_mut(), self.tx_start, self.tx_end);
            self.tx_end = self.tx_end.saturating_sub(self.tx_start);
            self.tx_start = 0;
        }
        let id = self.next_id;
        let free = self.tx.as_mut().get_mut(self.tx_end..).unwrap_or_default();
        let n = encode_request_payload(id, flags, request_type, payload, free).map_err(
            |e| match e {
                EncodeError::BufferTooSmall { required } => {
                    ClientError::BufferTooSmall { required }
                }
                e => ClientError::Encode(e),
            },
        )?;
        if let Some(slot) = self.slots.get_mut(free_slot) {
            *slot = Slot {
                id,
                deadline: now.saturating_add(self.config.request_timeout),
                ty: request_type,
                state: SlotState::Waiting,
            };
            self.hi = self.hi.max(free_slot.saturating_add(1));
        }
        self.tx_end = self.tx_end.saturating_add(n);
        self.next_id = id.wrapping_add(1).max(1);
        Ok(id)
    }

    /// The bytes waiting to be written, if any.
    pub fn poll_transmit(&self) -> Option<&[u8]> {
        self.tx
            .as_ref()
            .get(self.tx_start..self.tx_end)
            .filter(|b| !b.is_empty())
    }

    /// Marks the first `n` bytes of [`poll_transmit`](Self::poll_transmit) as written.
    pub fn consume_transmit(&mut self, n: usize) {
        self.tx_start = self.tx_start.saturating_add(n).min(self.tx_end);
        if self.tx_start == self.tx_end {
            self.tx_start = 0;
            self.tx_end = 0;
        }
    }

    /// Drops the frame handed out by the last event.
    fn release(&mut self) {
        self.rx_start = self.rx_start.saturating_add(self.delivered);
        self.delivered = 0;
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_checked = 0;
            self.rx_end = 0;
        }
    }

    /// The free end of the receive buffer: read into it, then call
    /// [`handle_received`](Self::handle_received). Ends the borrow of the last event.
    /// Empty when the buffer is full of responses not yet handed out: drain events first.
    pub fn recv_buffer(&mut self) -> &mut [u8] {
        self.release();
        if self.rx_start > 0 && !self.current_frame_fits() {
            shift_to_front(self.rx.as_mut(), self.rx_start, self.rx_end);
            self.rx_checked = self.rx_checked.saturating_sub(self.rx_start);
            self.rx_end = self.rx_end.saturating_sub(self.rx_start);
            self.rx_start = 0;
        }
        self.rx.as_mut().get_mut(self.rx_end..).unwrap_or_default()
    }

    /// Whether the frame being received fits between its start and the buffer's end (so
    /// nothing needs to move).
    fn current_frame_fits(&self) -> bool {
        let need = self.reader.frame_len().unwrap_or(LENGTH_LEN);
        self.rx_checked.saturating_add(need) <= self.rx.as_ref().len()
    }

    /// Takes `n` bytes written into [`recv_buffer`](Self::recv_buffer) and checks every frame
    /// they complete (Length, CRC, a request in flight; the payload is decoded when it is
    /// handed out). Errors poison the connection.
    pub fn handle_received(&mut self, _now: Instant, n: usize) -> Result<(), ClientError> {
        self.check()?;
        self.rx_end = self.rx_end.saturating_add(n).min(self.rx.as_ref().len());
        while let Some(len) = self.next_frame()? {
            self.rx_checked = self.rx_checked.saturating_add(len);
        }
        Ok(())
    }

    /// Copies as much of `data` as fits into the receive buffer and checks every frame it
    /// completes; returns how many bytes were taken (fewer than `data.len()` only when the
    /// buffer is full of responses not yet handed out: drain events and call again).
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) -> Result<usize, ClientError> {
        self.check()?;
        let free = self.recv_buffer();
        let n = free.len().min(data.len());
        if let (Some(dst), Some(src)) = (free.get_mut(..n), data.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.handle_received(now, n)?;
        Ok(n)
    }

    /// Validates the frame at `rx_checked` if it is complete; returns its length.
    fn next_frame(&mut self) -> Result<Option<usize>, ClientError> {
        let rx = self.rx.as_ref();
        let capacity = rx.len();
        let buf = rx.get(self.rx_checked..self.rx_end).unwrap_or_default();
        let total = match self.reader.poll(buf) {
            Ok(Status::Complete(total)) => total,
            Ok(Status::Partial(_)) => match self.reader.frame_len() {
                Some(frame_len) if frame_len > capacity => {
                    return Err(self.poison(ClientError::ResponseTooLarge {
                        frame_len,
                        capacity,
                    }));
                }
                _ => return Ok(None),
            },
            Err(e) => return Err(self.poison(PeerError::Decode(e).into())),
        };
        let frame = buf.get(..total).unwrap_or_default();
        let hi = self.hi.min(self.slots.len());
        let outcome = check_response(frame, self.slots.get_mut(..hi).unwrap_or_default());
        outcome.map_err(|e| self.poison(e.into()))?;
        self.shrink();
        Ok(Some(total))
    }

    /// The next completion, if any: a timed-out request or a response (read its body with
    /// [`response`](Self::response)). Ends the borrow of the last event. Poll after every
    /// `handle_*` call until it returns `None`.
    pub fn poll_completion(&mut self) -> Option<Completion> {
        self.release();
        // Once poisoned, only the replies that arrived intact before the fault (no timeouts):
        // what completes must not depend on how the bytes were split into reads.
        let expired = match self.error {
            None => self
                .active()
                .iter()
                .position(|s| matches!(s.state, SlotState::Expired { .. })),
            Some(_) => None,
        };
        if let Some(i) = expired {
            let slot = self.slots.get_mut(i)?;
            let done = Completion {
                request_id: slot.id,
                request_type: slot.ty,
                timed_out: true,
            };
            slot.state = if slot.state == (SlotState::Expired { late: true }) {
                SlotState::Free
            } else {
                SlotState::Abandoned
            };
            self.shrink();
            return Some(done);
        }
        while self.rx_start < self.rx_checked {
            let frame = self.rx.as_ref().get(self.rx_start..self.rx_checked)?;
            let len = accepted_frame_len(frame);
            let id = peek_request_id(frame)?;
            let answered = self
                .active_mut()
                .iter_mut()
                .find(|s| s.id == id && s.state == SlotState::Answered);
            match answered {
                Some(slot) => {
                    slot.state = SlotState::Free;
                    let request_type = slot.ty;
                    self.delivered = len;
                    self.shrink();
                    return Some(Completion {
                        request_id: id,
                        request_type,
                        timed_out: false,
                    });
                }
                // A late response to a timed-out request: drop it.
                None => self.rx_start = self.rx_start.saturating_add(len.max(1)),
            }
        }
        None
    }

    /// The response of the last [`Completion`] that was not a timeout, borrowed from the
    /// receive buffer until the next `poll_*`/`handle_*`/`recv_buffer` call.
    ///
    /// This is where a response is decoded (once). `None` also when its payload doesn't fit
    /// the request's type: [`poll_event`](Self::poll_event) and the `io` drivers report
    /// that as [`PeerError::Decode`] and poison the connection.
    pub fn response(&self, request_type: RequestType) -> Option<Response<'_>> {
        decode_delivered(
            self.rx.as_ref(),
            self.rx_start,
            self.delivered,
            payload_parser(request_type),
        )?
        .ok()
    }

    /// [`response`](Self::response), with a payload that doesn't fit its request (as `parse`
    /// decodes it) reported and poisoning the connection. `None` when no response was handed
    /// out.
    pub(crate) fn take_response(
        &mut self,
        parse: PayloadParser,
    ) -> Option<Result<Response<'_>, ClientError>> {
        let end = self.rx_start.saturating_add(self.delivered);
        // Borrows only `rx`, so the error path can still poison.
        let decoded = decode_delivered(self.rx.as_ref(), self.rx_start, self.delivered, parse)?;
        Some(decoded.map_err(|e| {
            let e = ClientError::Peer(PeerError::Decode(e));
            warn!("connection poisoned: {}", e);
            self.error = Some(e);
            // Nothing after the bad reply is handed out.
            self.rx_checked = end;
            self.rx_end = end;
            e
        }))
    }

    /// The next event, if any. Poll after every `handle_*` call until it returns `None`.
    /// A response whose payload doesn't fit its request poisons the connection (see
    /// [`error`](Self::error)) and ends the events.
    pub fn poll_event(&mut self) -> Option<ClientEvent<'_>> {
        let done = self.poll_completion()?;
        if done.timed_out {
            return Some(ClientEvent::TimedOut {
                request_id: done.request_id,
                request_type: done.request_type,
            });
        }
        let response = self
            .take_response(payload_parser(done.request_type))?
            .ok()?;
        Some(ClientEvent::Response {
            request_id: done.request_id,
            request_type: done.request_type,
            response,
        })
    }

    /// The earliest deadline of a request still waiting, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.active()
            .iter()
            .filter(|s| s.state == SlotState::Waiting)
            .fold(None, |t, s| earliest(t, Some(s.deadline)))
    }

    /// Expires every request whose deadline is at or before `now`; poll events afterwards.
    pub fn handle_timeout(&mut self, now: Instant) {
        for s in self.active_mut() {
            if s.state == SlotState::Waiting && s.deadline <= now {
                s.state = SlotState::Expired { late: false };
            }
        }
    }
}

/// Decodes the frame of `len` bytes at `start` of `rx` (checked on arrival by
/// [`check_response`]), its success payload decoded by `parse`; `None` when `len` is 0
/// (nothing handed out).
fn decode_delivered(
    rx: &[u8],
    start: usize,
    len: usize,
    parse: PayloadParser,
) -> Option<Result<Response<'_>, DecodeError>> {
    let frame = rx.get(start..)?.get(..len).filter(|f| !f.is_empty())?;
    Some(Response::parse_with(
        &ResponseFrame::new_prechecked(frame),
        parse,
    ))
}

/// Checks one whole response frame's framing and CRC, and marks its request's slot. The
/// payload is decoded once, when it is handed out.
fn check_response(frame: &[u8], slots: &mut [Slot]) -> Result<(), PeerError> {
    let request_id = ResponseFrame::new_checked(frame)
        .map_err(PeerError::Decode)?
        .request_id();
    let unknown = PeerError::UnknownResponse { request_id };
    let slot = slots
        .iter_mut()
        .find(|s| {
            s.id == request_id
                && matches!(
                    s.state,
                    SlotState::Waiting | SlotState::Abandoned | SlotState::Expired { late: false }
                )
        })
        .ok_or(unknown)?;
    slot.state = match slot.state {
        SlotState::Waiting => SlotState::Answered,
        SlotState::Expired { .. } => SlotState::Expired { late: true },
        _ => SlotState::Free,
    };
    Ok(())
}

/// Moves `buf[from..end]` to the front with non-overlapping copies of `from` bytes each
/// (plain `memcpy`, so firmware doesn't link a `memmove` for this).
fn shift_to_front(buf: &mut [u8], from: usize, end: usize) {
    let (mut dst, mut src) = (0, from);
    while src < end && dst < src {
        // The loop condition keeps both differences positive.
        let n = end.saturating_sub(src).min(src.saturating_sub(dst));
        let (head, tail) = buf.split_at_mut(src);
        if let (Some(d), Some(s)) = (
            head.get_mut(dst..).and_then(|h| h.get_mut(..n)),
            tail.get(..n),
        ) {
            d.copy_from_slice(s);
        }
        dst = dst.saturating_add(n);
        src = src.saturating_add(n);
    }
}
