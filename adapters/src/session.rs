//! The runtime-independent half of every server adapter: the connection's buffers and the poll
//! loop over the core's [`ServerConnection`]. Runtimes only read into [`Session::read_buf`],
//! write out [`Session::pending`], and run the timers.

use std::fmt;

use streambus_core::{
    EncodeError, ErrorCode, FetchResponse, FetchTrailer, Instant, MAX_ERROR_MESSAGE_LEN, Response,
    ServerConfig, ServerConnection, ServerEvent, response_encoded_len,
};

use crate::{ConnEvent, FileChunk, Handler};

/// Bytes first offered to a read; doubled while reads fill what they are offered.
const FIRST_CHUNK: usize = 4 * 1024;
/// The largest read offered when no frame size is known.
const MAX_CHUNK: usize = 1024 * 1024;
/// A transmit buffer above this is released once written out, so idle connections stay small.
const KEEP_CAPACITY: usize = 256 * 1024;
/// How long a quiet connection keeps its buffers before giving them back: long enough that a
/// request/response client (tens of µs between requests) never pays for re-allocating them.
const LINGER: core::time::Duration = core::time::Duration::from_millis(2);
/// Stop reading new requests while this much output waits (a slow reader).
const TX_HIGH_WATER: u64 = 4 * 1024 * 1024;
/// Room for an error reply: header, message length, message, CRC.
const ERROR_REPLY_LEN: usize = 15 + 4 + MAX_ERROR_MESSAGE_LEN + 4;

/// What the runtime must do after [`Session::process`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Write what is pending, then wait for input (or the timer).
    Read,
    /// Write what is pending before anything else (back-pressure), then process again.
    Flush,
    /// Write what is pending, then close.
    Close,
}

/// One connection's buffers and state.
///
/// Both buffers keep their initialized length and track the live region with indices, so
/// bytes are zeroed once when a buffer grows, never per read or per response.
#[derive(Debug)]
pub(crate) struct Session {
    conn: ServerConnection,
    /// Received bytes: `rx[rx_start..rx_end]` is unconsumed.
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    /// What the last [`Session::read_buf`] offered, to grow the next offer.
    offered: usize,
    chunk: usize,
    /// The frame size the core is waiting for, to read it in as few calls as possible.
    want: usize,
    /// Output waiting to be written.
    tx: TxBuf,
    /// When a quiet connection's buffers go back (set while it waits holding them).
    linger_until: Option<Instant>,
}

/// The transmit queue: `buf[start..end]` waits to be written, with file ranges spliced in
/// at given positions of `buf` (sent with `sendfile`, never copied).
#[derive(Debug, Default)]
pub(crate) struct TxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// `(position in buf, range)`: the range goes out once `buf` is written up to the position.
    files: std::collections::VecDeque<(usize, FileChunk)>,
    file_bytes: u64,
}

/// What to write next.
#[derive(Debug)]
pub(crate) enum Pending<'a> {
    /// Nothing.
    None,
    /// These bytes.
    Bytes(&'a [u8]),
    /// This file range.
    File(&'a FileChunk),
}

impl TxBuf {
    /// Bytes waiting, file ranges included.
    fn waiting(&self) -> u64 {
        (self.end - self.start) as u64 + self.file_bytes
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        if self.buf.len() < self.end + bytes.len() {
            self.buf.resize(self.end + bytes.len(), 0);
        }
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    fn push_file(&mut self, chunk: FileChunk) {
        if chunk.len > 0 {
            self.file_bytes += chunk.len;
            self.files.push_back((self.end, chunk));
        }
    }

    fn pending(&self) -> Pending<'_> {
        match self.files.front() {
            Some((at, chunk)) if *at == self.start => Pending::File(chunk),
            Some((at, _)) => Pending::Bytes(&self.buf[self.start..*at]),
            None if self.start < self.end => Pending::Bytes(&self.buf[self.start..self.end]),
            None => Pending::None,
        }
    }

    fn sent(&mut self, n: usize) {
        match self.files.front_mut() {
            Some((at, chunk)) if *at == self.start => {
                let n = (n as u64).min(chunk.len);
                chunk.offset += n;
                chunk.len -= n;
                self.file_bytes -= n;
                if chunk.len == 0 {
                    self.files.pop_front();
                }
            }
            _ => self.start += n,
        }
        if self.start >= self.end && self.files.is_empty() {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Appends one encoded frame, growing the buffer to what the encoder says it needs.
    fn append(
        &mut self,
        guess: usize,
        mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
    ) -> bool {
        let mut size = guess;
        for _ in 0..2 {
            if self.buf.len() < self.end + size {
                self.buf.resize(self.end + size, 0);
            }
            match encode(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return true;
                }
                Err(EncodeError::BufferTooSmall { required }) => size = required,
                Err(e) => {
                    tracing::error!(error = %e, "response could not be encoded");
                    break;
                }
            }
        }
        false
    }
}

impl Session {
    pub(crate) fn new(config: ServerConfig, now: Instant) -> Self {
        Self {
            conn: ServerConnection::new(config, now),
            rx: Vec::new(),
            rx_start: 0,
            rx_end: 0,
            offered: 0,
            chunk: FIRST_CHUNK,
            want: 0,
            tx: TxBuf::default(),
            linger_until: None,
        }
    }

    /// Spare room at the end of the receive buffer to read into.
    pub(crate) fn read_buf(&mut self) -> &mut [u8] {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx_start > 0
            && (self.rx_start >= self.rx.len() / 2 || self.rx_end == self.rx.len())
        {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        let unread = self.rx_end - self.rx_start;
        // Toward the awaited frame, but at most doubling what has arrived: a Length alone
        // (16 bytes claiming 10 MiB) must not buy a 10 MiB buffer.
        let room = self
            .want
            .saturating_sub(unread)
            .min(unread.max(self.chunk))
            .max(self.chunk);
        if self.rx.len() < self.rx_end + room {
            self.rx.resize(self.rx_end + room, 0);
        }
        self.offered = self.rx.len() - self.rx_end;
        &mut self.rx[self.rx_end..]
    }

    /// Records that `n` bytes were read into the last [`read_buf`](Self::read_buf).
    pub(crate) fn filled(&mut self, n: usize) {
        if n > 0 {
            self.linger_until = None;
        }
        self.rx_end += n;
        if n > 0 && n == self.offered {
            self.chunk = (self.chunk * 2).min(MAX_CHUNK);
        }
    }

    /// What to write next.
    pub(crate) fn pending(&self) -> Pending<'_> {
        self.tx.pending()
    }

    /// Records that `n` bytes of what [`pending`](Self::pending) gave were written.
    pub(crate) fn sent(&mut self, n: usize) {
        self.tx.sent(n);
    }

    /// Drops buffers that are empty, so an idle connection holds almost no memory. Call it
    /// before waiting for input.
    pub(crate) fn release_idle(&mut self) {
        if self.rx_start == self.rx_end && self.rx.capacity() > 0 {
            self.rx = Vec::new();
            self.rx_start = 0;
            self.rx_end = 0;
            self.chunk = FIRST_CHUNK;
        }
        if self.tx.waiting() == 0 && self.tx.buf.len() > KEEP_CAPACITY {
            self.tx = TxBuf::default();
        }
    }

    /// The core's next deadline.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.conn.poll_timeout()
    }

    fn holds_idle_buffers(&self) -> bool {
        (self.rx_start == self.rx_end && self.rx.capacity() > 0)
            || (self.tx.waiting() == 0 && self.tx.buf.len() > KEEP_CAPACITY)
    }

    /// The deadline to wait for input until, for the async runtimes: the core's, or earlier
    /// the moment a quiet connection gives its buffers back ([`LINGER`] after it started
    /// waiting), so a busy connection keeps them and an idle one holds almost no memory.
    pub(crate) fn wait_deadline(&mut self, now: Instant) -> Option<Instant> {
        let core = self.deadline();
        if !self.holds_idle_buffers() {
            self.linger_until = None;
            return core;
        }
        let linger = *self.linger_until.get_or_insert(now.saturating_add(LINGER));
        Some(core.map_or(linger, |d| d.min(linger)))
    }

    /// Fires the timers due at `now`: gives back lingering buffers, then the core's; `true`
    /// means close.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> bool {
        if self.linger_until.is_some_and(|t| t <= now) {
            self.linger_until = None;
            self.release_idle();
        }
        self.deadline().is_some_and(|d| d <= now) && self.conn.handle_timeout(now)
    }

    /// Decodes and answers every whole request in the receive buffer.
    pub(crate) fn process<H: Handler + ?Sized>(&mut self, now: Instant, handler: &H) -> Next {
        loop {
            if self.tx.waiting() > TX_HIGH_WATER {
                return Next::Flush;
            }
            let Self {
                conn,
                rx,
                rx_start,
                rx_end,
                want,
                tx,
                ..
            } = self;
            let unread = &rx[*rx_start..*rx_end];
            match conn.poll_request(now, unread) {
                ServerEvent::Request {
                    consumed,
                    request_id,
                    flags,
                    request,
                } => {
                    let mut reply = Responder {
                        conn,
                        tx,
                        request_id,
                        answered: false,
                    };
                    handler.handle(request_id, flags, &request, &mut reply);
                    if !reply.answered {
                        tracing::error!(
                            request_id,
                            "handler did not answer; replying StorageError"
                        );
                        reply.error(
                            ErrorCode::STORAGE_ERROR,
                            format_args!("the broker did not answer this request"),
                        );
                    }
                    *rx_start += consumed;
                    *want = 0;
                }
                ServerEvent::Reply {
                    consumed,
                    request_id,
                    error,
                } => {
                    tracing::debug!(request_id, %error, "answering a bad frame");
                    handler.on_event(ConnEvent::Fault(error.error_code()));
                    tx.append(ERROR_REPLY_LEN, |buf| {
                        conn.respond_fault(request_id, &error, buf)
                    });
                    *rx_start += consumed;
                    *want = 0;
                }
                ServerEvent::NeedMore { frame_len, .. } => {
                    *want = frame_len.unwrap_or(0);
                    return Next::Read;
                }
                ServerEvent::Blocked => return Next::Flush,
                ServerEvent::Close { reply } => {
                    if let Some((request_id, error)) = reply {
                        tracing::debug!(request_id, %error, "closing after a fatal frame error");
                        handler.on_event(ConnEvent::Fault(error.error_code()));
                        tx.append(ERROR_REPLY_LEN, |buf| {
                            conn.respond_fault(request_id, &error, buf)
                        });
                    }
                    return Next::Close;
                }
                _ => return Next::Close,
            }
        }
    }
}

/// Answers one request: handed to [`Handler::handle`].
pub struct Responder<'a> {
    conn: &'a mut ServerConnection,
    tx: &'a mut TxBuf,
    request_id: u64,
    answered: bool,
}

impl fmt::Debug for Responder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

impl Responder<'_> {
    /// The RequestID being answered.
    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    /// Sends a response (success or [`Response::Error`]).
    pub fn respond(&mut self, response: &Response<'_>) {
        if self.answered {
            return;
        }
        let (conn, id) = (&mut *self.conn, self.request_id);
        if self.tx.append(response_encoded_len(response), |buf| {
            conn.respond(id, response, buf)
        }) {
            self.answered = true;
        } else {
            // Only a response over u32 lengths fails to encode; answer with an error instead.
            self.error(
                ErrorCode::MESSAGE_TOO_LARGE,
                format_args!("the response is too large to encode"),
            );
        }
    }

    /// Sends a Fetch success whose records' CRC-32 is already known (combined from stored
    /// batch CRCs), so the records aren't hashed again; see
    /// [`streambus_core::encode_fetch_response`].
    pub fn respond_fetch(&mut self, fetch: &FetchResponse<'_>, records_crc: u32) {
        if self.answered {
            return;
        }
        let (conn, id) = (&mut *self.conn, self.request_id);
        let len = response_encoded_len(&Response::Fetch(*fetch));
        if self
            .tx
            .append(len, |buf| conn.respond_fetch(id, fetch, records_crc, buf))
        {
            self.answered = true;
        } else {
            self.error(
                ErrorCode::MESSAGE_TOO_LARGE,
                format_args!("the response is too large to encode"),
            );
        }
    }

    /// Sends a Fetch success whose records are the file `ranges` (in order), sent with
    /// `sendfile` instead of being copied; `records_crc` is their CRC-32 (combined from stored
    /// batch CRCs).
    pub fn respond_fetch_file(
        &mut self,
        high_water_mark: i64,
        count: u32,
        trailer: FetchTrailer,
        records_crc: u32,
        ranges: Vec<FileChunk>,
    ) {
        if self.answered {
            return;
        }
        let len: u64 = ranges.iter().map(|r| r.len).sum();
        let parts = usize::try_from(len)
            .map_err(|_| EncodeError::TooLong { len: usize::MAX })
            .and_then(|len| {
                self.conn.respond_fetch_parts(
                    self.request_id,
                    high_water_mark,
                    count,
                    len,
                    records_crc,
                    trailer,
                )
            });
        match parts {
            Ok(parts) => {
                self.tx.push_bytes(&parts.head);
                for r in ranges {
                    self.tx.push_file(r);
                }
                self.tx.push_bytes(&parts.tail);
                self.answered = true;
            }
            Err(_) => self.error(
                ErrorCode::MESSAGE_TOO_LARGE,
                format_args!("the response is too large to encode"),
            ),
        }
    }

    /// Sends an error response with a formatted message (cut at 256 bytes).
    pub fn error(&mut self, code: ErrorCode, message: fmt::Arguments<'_>) {
        if self.answered {
            return;
        }
        let (conn, id) = (&mut *self.conn, self.request_id);
        self.answered = self.tx.append(ERROR_REPLY_LEN, |buf| {
            conn.respond_error(id, code, message, buf)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use streambus_core::{Flags, Request};

    struct Nobody;

    impl Handler for Nobody {
        fn handle(&self, _: u64, _: Flags, _: &Request<'_>, reply: &mut Responder<'_>) {
            reply.error(ErrorCode::INVALID_REQUEST, format_args!("no"));
        }
    }

    /// A quiet connection keeps its buffers for [`LINGER`], then gives them back and waits
    /// for the core's deadline alone.
    #[test]
    fn buffers_linger_then_go_back() {
        let t0 = Instant::from_millis(0);
        let mut s = Session::new(ServerConfig::default(), t0);
        let idle = s.deadline().expect("the idle timer runs");
        assert!(s.read_buf().len() >= FIRST_CHUNK);
        s.filled(0);
        let linger = t0.saturating_add(LINGER);
        assert_eq!(s.wait_deadline(t0), Some(linger));
        // Woken early (not by the timer): the same linger deadline stands.
        let t1 = Instant::from_micros(500);
        assert_eq!(s.wait_deadline(t1), Some(linger));
        assert!(!s.handle_timeout(t1));
        assert!(s.rx.capacity() > 0, "released before the linger ran out");
        assert!(!s.handle_timeout(linger));
        assert_eq!(s.rx.capacity(), 0, "buffers kept past the linger");
        assert_eq!(s.wait_deadline(linger), Some(idle));
        // A buffer holding part of a frame is never given back: the core's timers rule.
        s.read_buf()[0] = 0;
        s.filled(1);
        let t2 = Instant::from_millis(10);
        assert_eq!(s.wait_deadline(t2), s.deadline());
        assert!(!s.handle_timeout(t2.saturating_add(LINGER)));
        assert!(s.rx.capacity() > 0);
    }

    /// A peer that sends only the first 16 bytes of a 10 MB frame gets a buffer sized by what
    /// it sent, not by what the Length claims; real bytes grow it.
    #[test]
    fn a_length_alone_does_not_buy_its_frame_buffer() {
        use streambus_core::{
            Encode, Message, MessageSetBuilder, ProduceRequest, Topic, encode_request,
            request_encoded_len,
        };
        let value = vec![7u8; 9_999_000];
        let message = Message::new(b"", &value);
        let mut set = vec![0u8; message.encoded_len()];
        let mut b = MessageSetBuilder::new(&mut set);
        b.push(&message).unwrap();
        let request = Request::Produce(ProduceRequest {
            topic: Topic::new("t").unwrap(),
            partition: 0,
            messages: b.finish(),
            producer: None,
        });
        let mut frame = vec![0u8; request_encoded_len(&request)];
        encode_request(1, Flags::NONE, &request, &mut frame).unwrap();
        let t = Instant::from_millis(0);
        let mut s = Session::new(ServerConfig::default(), t);
        s.read_buf()[..16].copy_from_slice(&frame[..16]);
        s.filled(16);
        assert_eq!(s.process(t, &Nobody), Next::Read);
        let first = s.read_buf().len();
        assert!(
            first <= 2 * FIRST_CHUNK,
            "offered {first} bytes for 16 received"
        );
        // As the body arrives, the offers grow with it.
        let mut received = 16;
        while received < 1 << 20 {
            let buf = s.read_buf();
            let n = buf.len();
            buf.copy_from_slice(&frame[received..received + n]);
            received += n;
            s.filled(n);
            assert_eq!(s.process(t, &Nobody), Next::Read);
        }
        assert!(s.read_buf().len() >= 1 << 20, "reads stay small");
        assert!(
            s.rx.len() <= 4 << 20,
            "buffer {} for {received} bytes",
            s.rx.len()
        );
    }
}
