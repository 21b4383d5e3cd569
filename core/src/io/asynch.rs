//! The async driver over `embedded_io_async::{Read, Write}`: reads and waits for the next
//! deadline at once, so requests time out even when the peer goes silent.

use core::future::{Future, poll_fn};
use core::pin::pin;
use core::task::Poll;

use embedded_io_async::{Read, Write};

use crate::conn::client::{ClientConnection, Completion};
use crate::conn::time::Instant;
use crate::io::{Clock, DriverError};
use crate::wire::request::Request;
use crate::wire::response::Response;
use crate::wire::types::RequestType;

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
        let now = self.timer.now();
        let id = self.conn.send_request(now, request)?;
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

    /// Waits for the next request to complete (a response or a timeout); read a response's
    /// body with [`response`](Self::response).
    pub async fn next_completion(&mut self) -> Result<Completion, DriverError<T::Error>> {
        loop {
            let now = self.timer.now();
            self.conn.handle_timeout(now);
            if let Some(done) = self.conn.poll_completion() {
                return Ok(done);
            }
            if let Some(e) = self.conn.error() {
                return Err(e.into());
            }
            let deadline = self.conn.poll_timeout();
            let buf = self.conn.recv_buffer();
            if buf.is_empty() {
                return Err(DriverError::Closed);
            }
            let read = {
                let mut read = pin!(self.io.read(buf));
                match deadline {
                    None => Some(read.await),
                    Some(at) => {
                        let mut sleep = pin!(self.timer.sleep_until(at));
                        poll_fn(|cx| {
                            if let Poll::Ready(r) = read.as_mut().poll(cx) {
                                return Poll::Ready(Some(r));
                            }
                            sleep.as_mut().poll(cx).map(|()| None)
                        })
                        .await
                    }
                }
            };
            if let Some(r) = read {
                let n = r.map_err(DriverError::Io)?;
                if n == 0 {
                    return Err(DriverError::Closed);
                }
                let now = self.timer.now();
                self.conn.handle_received(now, n)?;
            }
        }
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
        let id = self.send(request).await?;
        loop {
            let done = self.next_completion().await?;
            if done.request_id != id {
                continue;
            }
            if done.timed_out {
                return Err(DriverError::TimedOut { request_id: id });
            }
            return self
                .conn
                .response(done.request_type)
                .ok_or(DriverError::Closed);
        }
    }
}
