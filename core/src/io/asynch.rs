//! The async driver over `embedded_io_async::{Read, Write}`: reads and waits for the next
//! deadline at once, so requests time out even when the peer goes silent.

use core::convert::Infallible;
use core::future::{Future, pending, poll_fn};
use core::pin::pin;
use core::task::Poll;

use embedded_io_async::{Read, Write};

use crate::conn::client::{ClientConnection, Completion};
use crate::conn::time::Instant;
use crate::io::{Call, Clock, DriverError};
use crate::wire::request::Request;
use crate::wire::response::Response;
use crate::wire::types::RequestType;

/// What ended [`Driver::next_completion_or`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Wake<T> {
    /// A request completed.
    Completion(Completion),
    /// The other future completed first, with this output.
    Other(T),
}

enum Step<T, R> {
    Other(T),
    Read(R),
    Deadline,
}

/// A clock that can also sleep (tokio's `sleep_until`, embassy's `Timer::at`, …).
pub trait Timer: Clock {
    /// Completes at `deadline` (at once if it has passed).
    fn sleep_until(&mut self, deadline: Instant) -> impl Future<Output = ()>;
}

/// Runs a [`ClientConnection`] over an async transport.
///
/// The transport's `read` must be cancel-safe (tokio's and embassy's are): it is dropped
/// when a deadline passes first.
#[derive(Debug)]
pub struct Driver<T, C, B, const N: usize> {
    io: T,
    timer: C,
    conn: ClientConnection<B, N>,
}

impl<T, C, B, const N: usize> Driver<T, C, B, N>
where
    T: Read + Write,
    C: Timer,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// A driver running `conn` over `io`.
    pub fn new(io: T, timer: C, conn: ClientConnection<B, N>) -> Self {
        Self { io, timer, conn }
    }

    /// The connection.
    pub fn connection(&self) -> &ClientConnection<B, N> {
        &self.conn
    }

    /// The transport, timer and connection.
    pub fn into_parts(self) -> (T, C, ClientConnection<B, N>) {
        (self.io, self.timer, self.conn)
    }

    /// Queues `request` and writes it out; returns its RequestID.
    pub async fn send(&mut self, request: &Request<'_>) -> Result<u64, DriverError<T::Error>> {
        self.send_call(Call::of(request)).await
    }

    async fn send_call(&mut self, call: Call<'_>) -> Result<u64, DriverError<T::Error>> {
        let now = self.timer.now();
        let flags = self.conn.config().flags;
        let id = self
            .conn
            .send_payload(now, flags, call.request_type, call.payload)?;
        self.flush().await?;
        Ok(id)
    }

    /// Writes every queued byte and flushes the transport.
    pub async fn flush(&mut self) -> Result<(), DriverError<T::Error>> {
        while let Some(bytes) = self.conn.poll_transmit() {
            let n = self.io.write(bytes).await.map_err(DriverError::Io)?;
            if n == 0 {
                return Err(DriverError::Closed);
            }
            self.conn.consume_transmit(n);
        }
        self.io.flush().await.map_err(DriverError::Io)
    }

    /// Queues `request` without writing it (the next [`flush`](Self::flush),
    /// [`send`](Self::send) or wait writes it); returns its RequestID.
    pub fn queue(&mut self, request: &Request<'_>) -> Result<u64, DriverError<T::Error>> {
        let now = self.timer.now();
        Ok(self.conn.send_request(now, request)?)
    }

    /// [`queue`](Self::queue) with the request's own `timeout` in place of the configured
    /// one (see [`ClientConnection::send_request_with_timeout`]).
    pub fn queue_with_timeout(
        &mut self,
        request: &Request<'_>,
        timeout: core::time::Duration,
    ) -> Result<u64, DriverError<T::Error>> {
        let now = self.timer.now();
        let flags = self.conn.config().flags;
        Ok(self
            .conn
            .send_request_with_timeout(now, flags, timeout, request)?)
    }

    /// Waits for the next request to complete (a response or a timeout); read a response's
    /// body with [`response`](Self::response).
    pub async fn next_completion(&mut self) -> Result<Completion, DriverError<T::Error>> {
        match self.next_completion_or(pending::<Infallible>()).await? {
            Wake::Completion(done) => Ok(done),
            Wake::Other(never) => match never {},
        }
    }

    /// Like [`next_completion`](Self::next_completion), but also returns when `other`
    /// completes first: the one loop of a pipelining host client, which races its queue of
    /// new requests (`other`, e.g. a channel's `recv()`, which must be cancel-safe) against
    /// the connection, [`queue`](Self::queue)s what arrives and calls again. Queued bytes are
    /// written before waiting.
    pub async fn next_completion_or<F: Future>(
        &mut self,
        other: F,
    ) -> Result<Wake<F::Output>, DriverError<T::Error>> {
        let mut other = pin!(other);
        loop {
            self.flush().await?;
            let now = self.timer.now();
            self.conn.handle_timeout(now);
            if let Some(done) = self.conn.poll_completion() {
                return Ok(Wake::Completion(done));
            }
            if let Some(e) = self.conn.error() {
                return Err(e.into());
            }
            let deadline = self.conn.poll_timeout();
            let buf = self.conn.recv_buffer();
            if buf.is_empty() {
                // Unreachable while events are drained; refuse instead of spinning.
                return Err(DriverError::Closed);
            }
            let timer = &mut self.timer;
            let step = {
                let mut read = pin!(self.io.read(buf));
                let mut sleep = pin!(async move {
                    match deadline {
                        Some(at) => timer.sleep_until(at).await,
                        None => pending::<()>().await,
                    }
                });
                poll_fn(|cx| {
                    if let Poll::Ready(v) = other.as_mut().poll(cx) {
                        return Poll::Ready(Step::Other(v));
                    }
                    if let Poll::Ready(r) = read.as_mut().poll(cx) {
                        return Poll::Ready(Step::Read(r));
                    }
                    sleep.as_mut().poll(cx).map(|()| Step::Deadline)
                })
                .await
            };
            match step {
                Step::Other(v) => return Ok(Wake::Other(v)),
                Step::Read(r) => {
                    let n = r.map_err(DriverError::Io)?;
                    if n == 0 {
                        return Err(DriverError::Closed);
                    }
                    let now = self.timer.now();
                    // A fault poisons the connection; the loop still hands out the replies that
                    // came intact before it, then returns the error.
                    let _ = self.conn.handle_received(now, n);
                }
                // The loop's `handle_timeout` fires it.
                Step::Deadline => {}
            }
        }
    }

    /// The next completion among the replies already received, without reading or writing:
    /// a pipelining host drains these before queueing more requests, so the next wait writes
    /// them all at once.
    pub fn poll_completion(&mut self) -> Option<Completion> {
        self.conn.poll_completion()
    }

    /// The response of the last completion, borrowed from the receive buffer.
    pub fn response(&self, request_type: RequestType) -> Option<Response<'_>> {
        self.conn.response(request_type)
    }

    /// Sends `request` and waits for its own response. Meant for one request at a time:
    /// completions of other requests arriving meanwhile are dropped.
    pub async fn request(
        &mut self,
        request: &Request<'_>,
    ) -> Result<Response<'_>, DriverError<T::Error>> {
        self.call(Call::of(request)).await
    }

    /// [`request`](Self::request) for a [`Call`].
    pub(crate) async fn call(
        &mut self,
        call: Call<'_>,
    ) -> Result<Response<'_>, DriverError<T::Error>> {
        let id = self.send_call(call).await?;
        loop {
            let done = self.next_completion().await?;
            if done.request_id != id {
                continue;
            }
            if done.timed_out {
                return Err(DriverError::TimedOut { request_id: id });
            }
            return match self.conn.take_response(call.parse) {
                Some(decoded) => decoded.map_err(DriverError::Client),
                None => Err(DriverError::Closed),
            };
        }
    }
}
