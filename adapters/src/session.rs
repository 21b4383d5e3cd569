//! The runtime-independent half of every server adapter: the connection's buffers and the poll
//! loop over the core's [`ServerConnection`]. Runtimes only read into [`Session::read_buf`],
//! write out [`Session::pending`], and run the timers.

use std::fmt;

use streambus_core::{
    EncodeError, ErrorCode, Instant, MAX_ERROR_MESSAGE_LEN, Response, ServerConfig,
    ServerConnection, ServerEvent, response_encoded_len,
};

use crate::{ConnEvent, Handler};

/// Bytes asked of the socket per read when no frame size is known yet.
const READ_CHUNK: usize = 64 * 1024;
/// Buffers above this are released when they empty, so idle connections stay small.
const KEEP_CAPACITY: usize = 256 * 1024;
/// Stop reading new requests while this much output waits (a slow reader).
const TX_HIGH_WATER: usize = 4 * 1024 * 1024;
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
#[derive(Debug)]
pub(crate) struct Session {
    conn: ServerConnection,
    rx: Vec<u8>,
    rx_start: usize,
    /// The frame size the core is waiting for, to read it in as few calls as possible.
    want: usize,
    /// Where the last [`Session::read_buf`] began.
    read_from: usize,
    tx: Vec<u8>,
    tx_start: usize,
}

impl Session {
    pub(crate) fn new(config: ServerConfig, now: Instant) -> Self {
        Self {
            conn: ServerConnection::new(config, now),
            rx: Vec::new(),
            rx_start: 0,
            want: 0,
            read_from: 0,
            tx: Vec::new(),
            tx_start: 0,
        }
    }

    /// Spare room at the end of the receive buffer to read into.
    pub(crate) fn read_buf(&mut self) -> &mut [u8] {
        if self.rx_start == self.rx.len() {
            self.rx.clear();
            self.rx_start = 0;
        } else if self.rx_start > 0 && self.rx_start >= self.rx.len() / 2 {
            self.rx.drain(..self.rx_start);
            self.rx_start = 0;
        }
        let unread = self.rx.len() - self.rx_start;
        let room = self.want.saturating_sub(unread).max(READ_CHUNK);
        self.read_from = self.rx.len();
        self.rx.resize(self.read_from + room, 0);
        &mut self.rx[self.read_from..]
    }

    /// Records that `n` bytes were read into the last [`read_buf`](Self::read_buf).
    pub(crate) fn filled(&mut self, n: usize) {
        self.rx.truncate(self.read_from + n);
    }

    /// Output waiting to be written.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.tx[self.tx_start..]
    }

    /// Records that `n` bytes of [`pending`](Self::pending) were written.
    pub(crate) fn sent(&mut self, n: usize) {
        self.tx_start += n;
        if self.tx_start >= self.tx.len() {
            self.tx.clear();
            self.tx_start = 0;
        }
    }

    /// Drops buffers that are empty, so an idle connection holds almost no memory.
    pub(crate) fn release_idle(&mut self) {
        if self.rx_start == self.rx.len() && self.rx.capacity() > 0 {
            self.rx = Vec::new();
            self.rx_start = 0;
        }
        if self.tx_start == self.tx.len() && self.tx.capacity() > KEEP_CAPACITY {
            self.tx = Vec::new();
            self.tx_start = 0;
        }
    }

    /// The core's next deadline.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.conn.poll_timeout()
    }

    /// Fires the core's timers; `true` means close.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> bool {
        self.conn.handle_timeout(now)
    }

    /// Decodes and answers every whole request in the receive buffer.
    pub(crate) fn process<H: Handler + ?Sized>(&mut self, now: Instant, handler: &H) -> Next {
        loop {
            if self.tx.len() - self.tx_start > TX_HIGH_WATER {
                return Next::Flush;
            }
            let Self {
                conn,
                rx,
                rx_start,
                want,
                tx,
                ..
            } = self;
            let unread = &rx[*rx_start..];
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
                    append(tx, ERROR_REPLY_LEN, |buf| {
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
                        append(tx, ERROR_REPLY_LEN, |buf| {
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

/// Appends one encoded frame to `tx`, growing it to what the encoder says it needs.
fn append(
    tx: &mut Vec<u8>,
    guess: usize,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> bool {
    let start = tx.len();
    let mut size = guess;
    for _ in 0..2 {
        tx.resize(start + size, 0);
        match encode(&mut tx[start..]) {
            Ok(n) => {
                tx.truncate(start + n);
                return true;
            }
            Err(EncodeError::BufferTooSmall { required }) => size = required,
            Err(e) => {
                tracing::error!(error = %e, "response could not be encoded");
                break;
            }
        }
    }
    tx.truncate(start);
    false
}

/// Answers one request: handed to [`Handler::handle`].
pub struct Responder<'a> {
    conn: &'a mut ServerConnection,
    tx: &'a mut Vec<u8>,
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
        if append(self.tx, response_encoded_len(response), |buf| {
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

    /// Sends an error response with a formatted message (cut at 256 bytes).
    pub fn error(&mut self, code: ErrorCode, message: fmt::Arguments<'_>) {
        if self.answered {
            return;
        }
        let (conn, id) = (&mut *self.conn, self.request_id);
        self.answered = append(self.tx, ERROR_REPLY_LEN, |buf| {
            conn.respond_error(id, code, message, buf)
        });
    }
}
