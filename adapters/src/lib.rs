//! Thin I/O adapters that bind [`streambus_core`]'s sans-IO [`ServerConnection`](streambus_core::ServerConnection) to real
//! sockets.
//!
//! An adapter opens sockets, moves bytes, supplies time and maps errors; it never parses. The
//! runtime-independent part — the receive buffer, the poll loop over the core connection, the
//! transmit queue with its `sendfile` ranges, and the replies — is written once in private
//! modules; each runtime module (`tokio`, `smol`, `blocking`, one feature each) only does I/O,
//! timers and waiting.
//!
//! The broker plugs in through [`Handler`]: it gets each decoded request with an owned
//! [`Reply`], which it may answer at once or keep and answer later from any thread or task (a
//! long-poll fetch, a produce waiting for its fsync). A connection keeps up to
//! [`ServerConfig::max_in_flight`] requests waiting for replies, writes each reply as it
//! completes (out of order across requests, as the protocol allows) and stops reading while its
//! table is full. Requests whose handling blocks ([`Handler::blocks`]) run where blocking is
//! allowed, one at a time per connection, so requests on a connection keep their order.
//!
//! Per-connection state (the principal a connection authenticated as, §6.3) lives in the
//! [`Connection`] every [`Reply`] of that connection reaches ([`Reply::connection`]); through it
//! a handler also asks a connection to close after its reply.
//!
//! Shutdown is the same on every runtime: stop accepting, call [`Handler::shutdown`] (which
//! answers whatever waits), let every connection answer and write everything it has read, then
//! close; connections still open at [`ServeOptions::shutdown_grace`] are closed and have stopped
//! running when `serve` returns, so nothing is acknowledged after it.

use std::sync::OnceLock;
use std::time::Duration;

use streambus_core::{ErrorCode, Flags, Instant, Request, ServerConfig};

mod server;

#[cfg(feature = "blocking")]
pub mod blocking;
#[cfg(feature = "smol")]
pub mod smol;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tokio")]
pub mod tokio;

pub use server::connection::Connection;
pub use server::reply::Reply;

/// A byte range of a file to send as part of a response, with `sendfile` (no copy through
/// user space).
#[derive(Debug, Clone)]
pub struct FileChunk {
    /// The file.
    pub file: std::sync::Arc<std::fs::File>,
    /// Where the range starts.
    pub offset: u64,
    /// Its length.
    pub len: u64,
}

/// What happened on a connection, for the handler's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnEvent {
    /// A connection was accepted.
    Accepted,
    /// A connection was refused (over the connection cap) and closed at once.
    Refused,
    /// A connection closed.
    Closed,
    /// Bytes were read.
    BytesIn(usize),
    /// Bytes were written.
    BytesOut(usize),
    /// A frame was answered with an error by the connection layer (CRC, type, version,
    /// malformed payload, frame too large or too short).
    Fault(ErrorCode),
    /// A TLS handshake failed; the connection closes (a [`Closed`](Self::Closed) follows).
    TlsHandshakeFailed(HandshakeFailure),
}

/// Why a TLS handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// It did not complete within the read timeout.
    Timeout,
    /// The peer's bytes are not TLS (a plaintext client on the TLS port, say).
    NotTls,
    /// Client certificates are required and the client presented none.
    NoClientCertificate,
    /// A certificate was refused (unknown issuer, expired, not for this use).
    BadCertificate,
    /// No protocol version, cipher suite or key exchange in common.
    Incompatible,
    /// The peer ended the handshake with an alert (it refused our certificate, say).
    AlertReceived,
    /// The connection failed or closed during the handshake.
    Io,
    /// Another protocol error.
    Other,
}

impl HandshakeFailure {
    /// A short name, for metrics labels and logs (`timeout`, `not_tls`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::NotTls => "not_tls",
            Self::NoClientCertificate => "no_client_certificate",
            Self::BadCertificate => "bad_certificate",
            Self::Incompatible => "incompatible",
            Self::AlertReceived => "alert_received",
            Self::Io => "io",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is at the other end of a connection, as the adapter knows it; a handler reads it with
/// [`Reply::peer`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Peer {
    /// The peer's address.
    pub addr: std::net::SocketAddr,
    /// The subject of the client certificate the peer presented and the server verified
    /// (mTLS), as RFC 4514 text (`CN=alice,O=Example`); `None` without TLS or without a client
    /// certificate.
    pub tls_client_subject: Option<String>,
}

impl Peer {
    /// A peer at `addr`, with no client certificate.
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self {
            addr,
            tls_client_subject: None,
        }
    }
}

/// The broker side: answers decoded requests.
pub trait Handler: Send + Sync + 'static {
    /// Takes one request and its [`Reply`]. Answer at once, or keep the reply and answer later
    /// from any thread; a reply dropped unanswered answers `StorageError`. Called on the
    /// connection's task, so it must not block unless [`blocks`](Self::blocks) said so for this
    /// request.
    fn handle(&self, flags: Flags, request: &Request<'_>, reply: Reply);

    /// Whether handling `request` may block (directory work, an fsync). Such a request runs
    /// where blocking is allowed (tokio's and smol's blocking pools; inline on the blocking
    /// runtime) and its connection waits for it before reading on, so its order with the next
    /// requests is kept. The default is `false`.
    fn blocks(&self, request: &Request<'_>) -> bool {
        let _ = request;
        false
    }

    /// The server is stopping: answer every reply that waits for something that may not come
    /// (a long-poll fetch). Called once, after accepting stopped and before connections drain.
    fn shutdown(&self) {}

    /// Observes connection events (metrics). The default does nothing.
    fn on_event(&self, event: ConnEvent) {
        let _ = event;
    }
}

/// Settings shared by every runtime.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// Connections open at once; more are closed at once.
    pub max_connections: usize,
    /// The core connection's limits and timers (frame size, pipelining depth, read and idle
    /// timeouts).
    pub connection: ServerConfig,
    /// How long one write may take before the connection is closed (a client that never reads).
    pub write_timeout: Duration,
    /// How long graceful shutdown waits for open connections to finish.
    pub shutdown_grace: Duration,
    /// Bytes all connections together may hold in receive buffers and queued output; over it,
    /// connections stop reading instead of allocating (each may still hold 8 KiB, so small
    /// requests always flow). Default 512 MiB.
    pub max_buffered_bytes: usize,
    /// Serve TLS with this configuration (feature `tls`): each connection's handshake runs on
    /// its own task with [`ServerConfig::read_timeout`] as its deadline. `None` (the default):
    /// plaintext.
    #[cfg(feature = "tls")]
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            connection: ServerConfig::default(),
            write_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            max_buffered_bytes: 512 << 20,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl ServeOptions {
    /// Sets the connection cap.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets the core connection settings.
    pub fn connection(mut self, c: ServerConfig) -> Self {
        self.connection = c;
        self
    }

    /// Sets the write timeout.
    pub fn write_timeout(mut self, d: Duration) -> Self {
        self.write_timeout = d;
        self
    }

    /// Sets the memory budget of all connections' buffers.
    pub fn max_buffered_bytes(mut self, n: usize) -> Self {
        self.max_buffered_bytes = n;
        self
    }

    /// Sets the graceful-shutdown deadline.
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.shutdown_grace = d;
        self
    }

    /// Serves TLS with `config` (see [`tls::server_config`]).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, config: std::sync::Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }
}

/// How long a connection closing after its last reply keeps reading (and dropping) what the
/// peer still sends: closing a socket with unread bytes makes the kernel send a reset, which
/// can destroy replies the peer has not read yet. Its FIN goes out first, so a peer that reads
/// sees every reply, then the end of the stream.
pub(crate) const CLOSE_DRAIN: Duration = Duration::from_secs(1);

/// The adapters' clock: microseconds since the first call, as the core's [`Instant`].
pub fn now() -> Instant {
    Instant::from_micros(u64::try_from(epoch().elapsed().as_micros()).unwrap_or(u64::MAX))
}

/// The moment [`now`] counts from.
fn epoch() -> std::time::Instant {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// The std instant of a core [`Instant`] of [`now`]'s clock: the same deadline always gives
/// the same instant (no clock read).
#[cfg(feature = "tokio")]
pub(crate) fn std_instant(at: Instant) -> std::time::Instant {
    let since = Duration::from_micros(at.as_micros());
    epoch()
        .checked_add(since)
        .unwrap_or_else(|| epoch() + Duration::from_secs(86_400 * 365 * 30))
}

/// The sizes of a client connection's two buffers: `tx` bounds the largest request frame it
/// can send, `rx` the largest response frame it can receive (47 bytes plus a fetch's records;
/// `max_frame_len + 4` accepts anything). A `usize` gives both the same size.
///
/// ```
/// use streambus_adapters::Buffers;
/// // A consumer sends small requests and receives 1 MiB fetches.
/// let b = Buffers { tx: 4 << 10, rx: (1 << 20) + 64 };
/// assert_eq!(Buffers::from(4096), Buffers { tx: 4096, rx: 4096 });
/// # let _ = b;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Buffers {
    /// Bytes of the transmit buffer.
    pub tx: usize,
    /// Bytes of the receive buffer.
    pub rx: usize,
}

impl From<usize> for Buffers {
    fn from(len: usize) -> Self {
        Self { tx: len, rx: len }
    }
}

impl Buffers {
    /// A core connection over two zero-filled buffers of these sizes (pages are mapped as
    /// they are first written).
    #[cfg(any(feature = "tokio", feature = "smol", feature = "blocking"))]
    pub(crate) fn connection<const N: usize>(
        self,
        config: streambus_core::ClientConfig,
    ) -> streambus_core::ClientConnection<Vec<u8>, N> {
        streambus_core::ClientConnection::new(config, vec![0; self.tx], vec![0; self.rx])
    }
}

/// The time from `now()` until `deadline` (zero if past).
pub(crate) fn until(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(now())
}

/// Sends part of `chunk` to the socket `out` without copying it through user space
/// (`sendfile` on Linux; a bounded `pread` + `write` elsewhere); returns the bytes sent.
/// A range that ends early (the file shrank) is an error, never a silent short frame.
pub(crate) fn send_file(
    out: std::os::fd::BorrowedFd<'_>,
    chunk: &FileChunk,
) -> std::io::Result<usize> {
    let count = usize::try_from(chunk.len.min(1 << 30)).unwrap_or(1 << 30);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let n = {
        let mut offset = chunk.offset;
        rustix::fs::sendfile(out, &*chunk.file, Some(&mut offset), count)?
    };
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let n = {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; count.min(256 * 1024)];
        let k = chunk.file.read_at(&mut buf, chunk.offset)?;
        rustix::io::write(out, &buf[..k])?
    };
    if n == 0 && count > 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "file range ends early",
        ));
    }
    Ok(n)
}
