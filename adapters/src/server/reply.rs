//! Replies that outlive the call that received their request: [`Reply`], and the per-connection
//! outbox it writes into.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use streambus_core::broker::{
    encode_error_response, encode_fetch_frame_parts, encode_fetch_response,
};
use streambus_core::{
    EncodeError, ErrorCode, FetchResponse, FetchTrailer, Response, encode_response,
    response_encoded_len,
};

use crate::server::budget::Budget;
use crate::server::connection::Connection;
use crate::server::transmit::TxBuf;
use crate::{FileChunk, Peer};

/// The size an error reply is first encoded into; the encoder asks for more if the message is
/// long (it is capped at 256 bytes).
const ERROR_GUESS: usize = 96;

/// Replies completed for one connection and not yet taken by it.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// The completed replies' frames, in completion order.
    pub(crate) tx: TxBuf,
    /// How many replies `tx` holds (the connection counts them out of its in-flight table).
    pub(crate) answered: usize,
    /// Woken when a reply completes while the connection waits.
    pub(crate) waker: Option<Waker>,
    /// The connection is gone: replies are dropped.
    closed: bool,
    /// What `tx`'s buffer holds of the memory budget (charged as replies are delivered, so the
    /// budget sees output the moment it exists).
    charged: usize,
}

/// One connection's outbox, shared with every [`Reply`] it handed out.
#[derive(Debug)]
pub(crate) struct OutboxCell {
    outbox: Mutex<Outbox>,
    /// Who the connection is with.
    peer: Peer,
    budget: Arc<Budget>,
    /// Bytes waiting in the outbox, readable without the lock (the connection stops handing out
    /// requests while its queued output is over its share of the memory budget).
    queued: AtomicU64,
    /// What the handler keeps for the connection and asks of it.
    pub(crate) connection: Connection,
}

impl OutboxCell {
    pub(crate) fn new(budget: Arc<Budget>, peer: Peer) -> Self {
        Self {
            outbox: Mutex::default(),
            peer,
            budget,
            queued: AtomicU64::new(0),
            connection: Connection::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Outbox> {
        // Every critical section leaves the outbox consistent before anything that can panic.
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The server's memory budget.
    pub(crate) fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Who the connection is with.
    pub(crate) fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Bytes waiting in the outbox (as of the last change).
    pub(crate) fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Records what the outbox holds now, in bytes waiting and in budget (called with its
    /// lock held, after every change to its buffer).
    pub(crate) fn note_queued(&self, ob: &mut Outbox) {
        self.queued.store(ob.tx.waiting(), Ordering::Relaxed);
        let capacity = ob.tx.capacity();
        self.budget.recharge(&mut ob.charged, capacity);
    }

    /// Ready when a reply waits to be taken; otherwise `cx` is woken when one completes.
    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut ob = self.lock();
        if ob.answered > 0 {
            return Poll::Ready(());
        }
        match &ob.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => ob.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Wakes the connection if it waits (the server is stopping).
    #[cfg(any(feature = "tokio", feature = "smol"))]
    pub(crate) fn wake(&self) {
        let waker = self.lock().waker.take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The connection is gone: later replies are dropped, and queued ones freed.
    pub(crate) fn close(&self) {
        let mut ob = self.lock();
        ob.closed = true;
        ob.tx = TxBuf::default();
        ob.waker = None;
        self.note_queued(&mut ob);
    }
}

/// The answer to one request, owned by the handler until it responds: it may respond at once,
/// or keep the `Reply` and respond later from any thread or task (a fetch that waits for data,
/// a produce that waits for its fsync). Every method consumes it, so a request is answered
/// exactly once; a `Reply` dropped without an answer still answers, with `StorageError`, so a
/// client is never left waiting.
///
/// The connection writes each reply as soon as it completes, in completion order (clients match
/// replies by RequestID). While [`ServerConfig::max_in_flight`](streambus_core::ServerConfig)
/// requests of a connection wait for their replies, it reads no more requests.
pub struct Reply {
    request_id: u64,
    outbox: Option<Arc<OutboxCell>>,
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("request_id", &self.request_id)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Reply {
    pub(crate) fn new(request_id: u64, outbox: Arc<OutboxCell>) -> Self {
        Self {
            request_id,
            outbox: Some(outbox),
        }
    }

    /// The RequestID being answered.
    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    /// Who sent the request: the peer's address and, over mTLS, its client certificate's
    /// subject. `None` only once the reply was sent.
    pub fn peer(&self) -> Option<&Peer> {
        self.outbox.as_deref().map(|o| &o.peer)
    }

    /// The connection the request came on: its principal, and what the handler may ask of it.
    pub fn connection(&self) -> &Connection {
        static ANSWERED: Connection = Connection::new();
        self.outbox.as_ref().map_or(&ANSWERED, |o| &o.connection)
    }

    /// Whether the connection has closed, so an answer would be dropped (a handler holding
    /// replies for long can let such ones go).
    pub fn is_closed(&self) -> bool {
        self.outbox.as_ref().is_none_or(|o| o.lock().closed)
    }

    /// Sends a response (success or [`Response::Error`]).
    pub fn respond(mut self, response: &Response<'_>) {
        let id = self.request_id;
        self.deliver(|tx| {
            tx.append(response_encoded_len(response), |buf| {
                encode_response(id, response, buf)
            })
        });
    }

    /// Sends a Fetch success whose records' CRC-32 is already known (combined from stored
    /// batch CRCs), so the records aren't hashed again; see
    /// [`streambus_core::broker::encode_fetch_response`].
    pub fn respond_fetch(mut self, fetch: &FetchResponse<'_>, records_crc: u32) {
        let id = self.request_id;
        let len = response_encoded_len(&Response::Fetch(*fetch));
        self.deliver(|tx| {
            tx.append(len, |buf| {
                encode_fetch_response(id, fetch, records_crc, buf)
            })
        });
    }

    /// Sends a Fetch success whose records are the file `ranges` (in order), sent with
    /// `sendfile` instead of being copied; `records_crc` is their CRC-32 (combined from stored
    /// batch CRCs).
    pub fn respond_fetch_file(
        mut self,
        high_water_mark: i64,
        count: u32,
        trailer: FetchTrailer,
        records_crc: u32,
        ranges: Vec<FileChunk>,
    ) {
        let id = self.request_id;
        let len: u64 = ranges.iter().map(|r| r.len).sum();
        self.deliver(move |tx| {
            let len = usize::try_from(len).map_err(|_| EncodeError::TooLong { len: usize::MAX })?;
            let parts =
                encode_fetch_frame_parts(id, high_water_mark, count, len, records_crc, trailer)?;
            tx.push_bytes(&parts.head);
            for r in ranges {
                tx.push_file(r);
            }
            tx.push_bytes(&parts.tail);
            Ok(())
        });
    }

    /// Sends an error response with a formatted message (cut at 256 bytes).
    pub fn error(mut self, code: ErrorCode, message: fmt::Arguments<'_>) {
        let id = self.request_id;
        self.deliver(|tx| {
            tx.append(ERROR_GUESS, |buf| {
                encode_error_response(id, code, message, buf)
            })
        });
    }

    /// Writes the reply into the outbox and wakes the connection if it waits.
    fn deliver(&mut self, write: impl FnOnce(&mut TxBuf) -> Result<(), EncodeError>) {
        let Some(cell) = self.outbox.take() else {
            return;
        };
        let id = self.request_id;
        let mut ob = cell.lock();
        if ob.closed {
            return;
        }
        if let Err(e) = write(&mut ob.tx) {
            // Only a response over the u32 lengths fails to encode: answer with an error.
            tracing::error!(request_id = id, error = %e, "response could not be encoded");
            let fallback = ob.tx.append(ERROR_GUESS, |buf| {
                encode_error_response(
                    id,
                    ErrorCode::MESSAGE_TOO_LARGE,
                    format_args!("the response could not be encoded: {e}"),
                    buf,
                )
            });
            if fallback.is_err() {
                return;
            }
        }
        ob.answered += 1;
        cell.note_queued(&mut ob);
        let waker = ob.waker.take();
        drop(ob);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.outbox.is_some() {
            if self.is_closed() {
                // The connection is gone (a long-poll whose client left): nobody to answer.
                tracing::debug!(
                    request_id = self.request_id,
                    "reply dropped: connection closed"
                );
                return;
            }
            tracing::error!(
                request_id = self.request_id,
                "a request was dropped without an answer; replying StorageError"
            );
            let id = self.request_id;
            self.deliver(|tx| {
                tx.append(ERROR_GUESS, |buf| {
                    encode_error_response(
                        id,
                        ErrorCode::STORAGE_ERROR,
                        format_args!("the broker dropped this request without answering it"),
                        buf,
                    )
                })
            });
        }
    }
}
