//! The blocking driver over `embedded_io::{Read, Write}`.

use embedded_io::{Error as _, ErrorKind, Read, Write};

use crate::conn::client::{ClientConnection, Completion};
use crate::io::{Call, Clock, DriverError};
use crate::wire::request::Request;
use crate::wire::response::Response;
use crate::wire::types::RequestType;

/// Runs a [`ClientConnection`] over a blocking transport.
///
/// Deadlines are checked whenever a read returns, so a request times out only if the
/// transport's `read` comes back: give the transport a read timeout (a read failing with
/// `ErrorKind::TimedOut` or `Interrupted` is retried after checking deadlines), or use the
/// async driver, which sleeps and reads at once.
#[derive(Debug)]
pub struct Driver<T, C, B, const N: usize> {
    io: T,
    clock: C,
    conn: ClientConnection<B, N>,
}

impl<T, C, B, const N: usize> Driver<T, C, B, N>
where
    T: Read + Write,
    C: Clock,
    B: AsRef<[u8]> + AsMut<[u8]>,
{
    /// A driver running `conn` over `io`.
    pub fn new(io: T, clock: C, conn: ClientConnection<B, N>) -> Self {
        Self { io, clock, conn }
    }

    /// The connection.
    pub fn connection(&self) -> &ClientConnection<B, N> {
        &self.conn
    }

    /// The transport, clock and connection.
    pub fn into_parts(self) -> (T, C, ClientConnection<B, N>) {
        (self.io, self.clock, self.conn)
    }

    /// Queues `request` and writes it out; returns its RequestID.
    pub fn send(&mut self, request: &Request<'_>) -> Result<u64, DriverError<T::Error>> {
        self.send_call(Call::of(request))
    }

    fn send_call(&mut self, call: Call<'_>) -> Result<u64, DriverError<T::Error>> {
        let now = self.clock.now();
        let flags = self.conn.config().flags;
        let id = self
            .conn
            .send_payload(now, flags, call.request_type, call.payload)?;
        self.flush()?;
        Ok(id)
    }

    /// Queues `request` without writing it (the next [`flush`](Self::flush) or
    /// [`send`](Self::send) writes it); returns its RequestID.
    pub fn queue(&mut self, request: &Request<'_>) -> Result<u64, DriverError<T::Error>> {
        let now = self.clock.now();
        Ok(self.conn.send_request(now, request)?)
    }

    /// The next completion among the replies already received, without reading or writing:
    /// a pipelining host drains these before queueing more requests, then writes them all at
    /// once.
    pub fn poll_completion(&mut self) -> Option<Completion> {
        self.conn.poll_completion()
    }

    /// Writes every queued byte and flushes the transport.
    pub fn flush(&mut self) -> Result<(), DriverError<T::Error>> {
        while let Some(bytes) = self.conn.poll_transmit() {
            let n = self.io.write(bytes).map_err(DriverError::Io)?;
            if n == 0 {
                return Err(DriverError::Closed);
            }
            self.conn.consume_transmit(n);
        }
        self.io.flush().map_err(DriverError::Io)
    }

    /// Blocks until the next request completes (a response or a timeout); read a response's
    /// body with [`response`](Self::response).
    pub fn next_completion(&mut self) -> Result<Completion, DriverError<T::Error>> {
        loop {
            let now = self.clock.now();
            self.conn.handle_timeout(now);
            if let Some(done) = self.conn.poll_completion() {
                return Ok(done);
            }
            if let Some(e) = self.conn.error() {
                return Err(e.into());
            }
            let buf = self.conn.recv_buffer();
            if buf.is_empty() {
                // Unreachable while events are drained; refuse instead of spinning.
                return Err(DriverError::Closed);
            }
            let n = match self.io.read(buf) {
                Ok(n) => n,
                // A read timeout is the transport's way to let deadlines be checked.
                Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                    continue;
                }
                Err(e) => return Err(DriverError::Io(e)),
            };
            if n == 0 {
                return Err(DriverError::Closed);
            }
            let now = self.clock.now();
            // A fault poisons the connection; the loop still hands out the replies that
            // came intact before it, then returns the error.
            let _ = self.conn.handle_received(now, n);
        }
    }

    /// The response of the last completion, borrowed from the receive buffer.
    pub fn response(&self, request_type: RequestType) -> Option<Response<'_>> {
        self.conn.response(request_type)
    }

    /// Sends `request` and blocks until its own response. Meant for one request at a time:
    /// completions of other requests arriving meanwhile are dropped.
    pub fn request(
        &mut self,
        request: &Request<'_>,
    ) -> Result<Response<'_>, DriverError<T::Error>> {
        self.call(Call::of(request))
    }

    /// [`request`](Self::request) for a [`Call`].
    pub(crate) fn call(&mut self, call: Call<'_>) -> Result<Response<'_>, DriverError<T::Error>> {
        let id = self.send_call(call)?;
        loop {
            let done = self.next_completion()?;
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
