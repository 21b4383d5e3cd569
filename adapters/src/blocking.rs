//! The blocking adapter: std sockets, one thread per connection.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};

use crate::server::accept::AcceptErrors;
use crate::server::budget::Budget;
use crate::server::transmit::Pending;
use crate::server::{Next, Session};
use crate::{CLOSE_DRAIN, ConnEvent, Handler, Peer, ServeOptions, now, send_file, until};

/// How often a connection that the memory budget keeps from reading looks for room again; and
/// how often a client socket's read returns so its driver can check deadlines.
const POLL: Duration = Duration::from_millis(100);

/// The most connections (threads) the blocking runtime serves at once, whatever
/// [`ServeOptions::max_connections`] says; more are refused and counted. It is meant for a few
/// hundred connections, not tens of thousands: use tokio or smol for those.
pub const MAX_THREADS: usize = 2048;

/// Stops a blocking [`serve`] from another thread.
#[derive(Debug, Clone)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    addr: SocketAddr,
    /// Readable once triggered (never read): every waiting connection sees it in its `poll`.
    event: Arc<OwnedFd>,
}

impl Shutdown {
    /// Asks the server to stop: no new connections, open ones finish what they have read.
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = rustix::io::write(&*self.event, &1u64.to_ne_bytes());
        // Wake the accept call with a connection of our own (loopback, the listener's address).
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// A handle to stop `listener`'s server; create it before calling [`serve`].
pub fn shutdown_handle(listener: &TcpListener) -> io::Result<Shutdown> {
    let mut addr = listener.local_addr()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(Shutdown {
        flag: Arc::new(AtomicBool::new(false)),
        addr,
        event: Arc::new(rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?),
    })
}

/// Accepts and serves connections on the calling thread until `shutdown` is triggered, then
/// answers what waits ([`Handler::shutdown`]) and waits up to [`ServeOptions::shutdown_grace`]
/// for open connections to answer what they have read; connections still open then are shut
/// and have stopped when this returns.
pub fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    options: ServeOptions,
    shutdown: Shutdown,
) -> io::Result<()> {
    let open: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::default();
    let mut next_id = 0u64;
    let budget = Arc::new(Budget::new(options.max_buffered_bytes));
    let mut accept_errors = AcceptErrors::default();
    let cap = options.max_connections.min(MAX_THREADS);
    if cap < options.max_connections {
        tracing::warn!(
            max_connections = options.max_connections,
            cap,
            "the blocking runtime runs one thread per connection: serving at most {cap} at once"
        );
    }
    loop {
        let next = listener.accept();
        if shutdown.is_set() {
            break;
        }
        let (stream, peer) = match next {
            Ok(s) => {
                accept_errors.succeeded();
                s
            }
            Err(e) => {
                // Out of fds and the like: back off, keep serving.
                std::thread::sleep(accept_errors.failed(&e));
                continue;
            }
        };
        let id = next_id;
        next_id += 1;
        {
            let mut conns = lock(&open);
            if conns.len() >= cap {
                handler.on_event(ConnEvent::Refused);
                continue;
            }
            // A second handle on the socket, to shut it if shutdown outlasts its grace.
            match stream.try_clone() {
                Ok(c) => conns.insert(id, c),
                Err(e) => {
                    tracing::warn!(error = %e, "could not register a connection");
                    continue;
                }
            };
        }
        handler.on_event(ConnEvent::Accepted);
        let (h, o, stop, b, options) = (
            handler.clone(),
            open.clone(),
            shutdown.clone(),
            budget.clone(),
            options.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("streambus-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                if let Err(e) = accepted(stream, Peer::new(peer), &*h, &options, &stop, b) {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                lock(&o).remove(&id);
                h.on_event(ConnEvent::Closed);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start a connection thread");
            lock(&open).remove(&id);
            handler.on_event(ConnEvent::Closed);
        }
    }
    drop(listener);
    handler.shutdown();
    let deadline = std::time::Instant::now() + options.shutdown_grace;
    while !lock(&open).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let left: Vec<TcpStream> = lock(&open).drain().map(|(_, s)| s).collect();
    if !left.is_empty() {
        tracing::warn!(
            left = left.len(),
            "shutdown deadline passed; closing remaining connections"
        );
        // Shut the sockets: each thread's next read or write fails and it returns.
        for s in &left {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        while Arc::strong_count(&open) > 1 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(())
}

/// Serves one accepted connection on its thread: plaintext, or TLS after its handshake.
fn accepted<H: Handler>(
    stream: TcpStream,
    peer: Peer,
    handler: &H,
    options: &ServeOptions,
    stop: &Shutdown,
    budget: Arc<Budget>,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    #[cfg(feature = "tls")]
    if let Some(config) = &options.tls {
        return match tls::handshake(stream, config, options.connection.read_timeout) {
            Ok((tls, subject)) => {
                tls.tcp.set_write_timeout(Some(options.write_timeout))?;
                let peer = Peer {
                    tls_client_subject: subject,
                    ..peer
                };
                connection(tls, peer, handler, options, stop, budget)
            }
            Err(reason) => {
                tracing::debug!(peer = %peer.addr, %reason, "TLS handshake failed");
                handler.on_event(ConnEvent::TlsHandshakeFailed(reason));
                Ok(())
            }
        };
    }
    stream.set_write_timeout(Some(options.write_timeout))?;
    connection(stream, peer, handler, options, stop, budget)
}

/// What the connection loop needs of a stream: std's socket, or TLS over one.
trait Stream: Read + Write {
    /// The socket underneath.
    fn tcp(&self) -> &TcpStream;
    /// Sends part of a file range; gives the bytes sent.
    fn send_file(&mut self, chunk: &crate::FileChunk) -> io::Result<usize>;
    /// Whether received bytes wait above the socket (TLS plaintext): a read would not wait.
    fn buffered(&self) -> bool {
        false
    }
    /// The connection went quiet and gave its buffers back: give back the stream's too.
    fn release_idle(&mut self) {}
    /// Ends the write side after what was written.
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.tcp().shutdown(std::net::Shutdown::Write)
    }
}

impl Stream for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }

    fn send_file(&mut self, chunk: &crate::FileChunk) -> io::Result<usize> {
        send_file(self.as_fd(), chunk)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes everything pending. The write timeout runs from when the output started waiting for
/// the socket, as on the async runtimes: one deadline for the whole write, however many calls
/// it takes. (A blocking `send` returns early only when the socket's own timeout expires, with
/// part of the bytes written; restarting that timeout at every call let a peer that reads a
/// little now and then hold a connection for several timeouts.)
fn write_pending<H: Handler, S: Stream>(
    stream: &mut S,
    s: &mut Session,
    h: &H,
    timeout: Duration,
) -> io::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    // The socket's timeout was shortened to what is left of the deadline: restore it after.
    let mut shortened = false;
    let result = loop {
        let r = match s.pending() {
            // Everything is written once what a TLS layer buffers is out too.
            Pending::None => match stream.flush() {
                Ok(()) => break Ok(()),
                Err(e) => Err(e),
            },
            Pending::Bytes(b) => stream.write(b),
            Pending::File(f) => stream.send_file(f),
        };
        let stalled = match r {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                s.sent(n);
                h.on_event(ConnEvent::BytesOut(n));
                false
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                true
            }
            Err(e) => break Err(e),
        };
        if !stalled && matches!(s.pending(), Pending::None) {
            continue;
        }
        // Short: the socket stalled. Go on only within the deadline.
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break Err(io::Error::new(io::ErrorKind::TimedOut, "write timeout"));
        }
        stream.tcp().set_write_timeout(Some(left))?;
        shortened = true;
    };
    if shortened && result.is_ok() {
        stream.tcp().set_write_timeout(Some(timeout))?;
    }
    result
}

/// Wakes a connection thread blocked in `poll` when one of its replies completes.
#[derive(Debug)]
struct EventFd(OwnedFd);

impl Wake for EventFd {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // A full counter (never, in practice) still leaves the fd readable: the wake is not lost.
        let _ = rustix::io::write(&self.0, &1u64.to_ne_bytes());
    }
}

fn connection<H: Handler, S: Stream>(
    mut stream: S,
    peer: Peer,
    handler: &H,
    options: &ServeOptions,
    stop: &Shutdown,
    budget: Arc<Budget>,
) -> io::Result<()> {
    let wake = Arc::new(EventFd(rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )?));
    let waker = Waker::from(Arc::clone(&wake));
    let mut s = Session::new(options.connection, now(), budget, peer);
    let replies = s.replies();
    // The peer sent FIN, or a fatal frame ended the stream: nothing more is read, but the
    // replies of what was read are still owed.
    let mut eof = false;
    loop {
        let reading = match s.process(now(), handler) {
            // A fatal frame: read no more, but answer what is in flight before closing.
            Next::Close => {
                eof = true;
                false
            }
            Next::Flush => {
                write_pending(&mut stream, &mut s, handler, options.write_timeout)?;
                continue;
            }
            Next::Offload(job) => {
                write_pending(&mut stream, &mut s, handler, options.write_timeout)?;
                // This thread may block: run it here, in order.
                (*job).run(handler);
                continue;
            }
            Next::Read => true,
            Next::Wait => false,
        };
        write_pending(&mut stream, &mut s, handler, options.write_timeout)?;
        let stopping = stop.is_set();
        if (stopping || eof) && s.drained() {
            // Everything read has been answered and written.
            return close(&mut stream);
        }
        // Over the memory budget: read nothing now, look again within POLL.
        let reading = reading && !stopping && !eof;
        // A connection that gave its buffers back waits for bytes without taking them back;
        // one the memory budget keeps from reading looks again within POLL.
        let idle = s.holds_no_receive_buffer();
        let can_read = reading && (idle || s.prepare_read());
        if replies
            .poll_ready(&mut Context::from_waker(&waker))
            .is_ready()
        {
            continue;
        }
        let wait = s.wait_deadline(now()).map(until);
        let wait = if reading && !can_read {
            Some(wait.map_or(POLL, |w| w.min(POLL)))
        } else {
            wait
        };
        // Bytes wait above the socket (TLS): read them without waiting.
        let wait = if can_read && stream.buffered() {
            Some(Duration::ZERO)
        } else {
            wait
        };
        let timeout = wait.map(|w| Timespec {
            tv_sec: i64::try_from(w.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(w.subsec_nanos()),
        });
        let (sock_ready, woken) = {
            let sock_events = if can_read {
                PollFlags::IN
            } else {
                PollFlags::empty()
            };
            let stop_events = if stopping {
                PollFlags::empty()
            } else {
                PollFlags::IN
            };
            let mut fds = [
                PollFd::new(stream.tcp(), sock_events),
                PollFd::new(&wake.0, PollFlags::IN),
                PollFd::new(&*stop.event, stop_events),
            ];
            match rustix::event::poll(&mut fds, timeout.as_ref()) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
            let sock = fds[0].revents();
            if !can_read && sock.intersects(PollFlags::HUP | PollFlags::ERR) {
                // Reported whatever was asked: the peer is gone and nothing more can be sent.
                return match stream.tcp().take_error()? {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
            }
            (
                can_read && (!sock.is_empty() || stream.buffered()),
                !fds[1].revents().is_empty(),
            )
        };
        if woken {
            let mut counter = [0u8; 8];
            let _ = rustix::io::read(&wake.0, &mut counter);
        }
        if sock_ready && (!idle || s.prepare_read()) {
            // Readable, hung up or failed: the read says which, without blocking.
            match stream.read(s.read_buf()) {
                Ok(0) => eof = true,
                Ok(n) => {
                    s.filled(n);
                    handler.on_event(ConnEvent::BytesIn(n));
                }
                // Interrupted, or (TLS) the bytes read held no plaintext yet.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) =>
                {
                    s.filled(0)
                }
                Err(e) => return Err(e),
            }
        }
        // After data too: bytes trickling in faster than the wait must not keep a connection
        // past its idle deadline. A quiet connection gives its buffers back here.
        if s.handle_timeout(now()) {
            return Ok(());
        }
        if s.holds_no_receive_buffer() {
            stream.release_idle();
        }
    }
}

/// Sends FIN after the replies written, then reads and drops what the peer still sends until
/// it closes too (or [`CLOSE_DRAIN`] passes), so the close is never a reset.
fn close<S: Stream>(stream: &mut S) -> io::Result<()> {
    stream.shutdown_write()?;
    let until = std::time::Instant::now() + CLOSE_DRAIN;
    let mut sink = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        stream.tcp().set_read_timeout(Some(left))?;
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => return Ok(()),
        }
    }
}

/// A client socket, plaintext or TLS (feature `tls`), whose read timeout reads as `TimedOut`
/// (std reports `WouldBlock`), which the core's blocking driver takes as "check the deadlines
/// and read again".
#[derive(Debug)]
pub struct ClientSocket(ClientStream);

#[derive(Debug)]
enum ClientStream {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for ClientSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = match &mut self.0 {
            ClientStream::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            ClientStream::Tls(s) => s.read(buf),
        };
        r.map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => io::Error::from(io::ErrorKind::TimedOut),
            _ => e,
        })
    }
}

impl Write for ClientSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            ClientStream::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            ClientStream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.0 {
            ClientStream::Plain(s) => s.flush(),
            #[cfg(feature = "tls")]
            ClientStream::Tls(s) => s.flush(),
        }
    }
}

/// A client connection over a std socket: the core's one blocking driver, with up to `N`
/// requests in flight and the adapters' clock.
pub type Client<const N: usize = 64> = streambus_core::io::blocking::Driver<
    embedded_io_adapters::std::FromStd<ClientSocket>,
    fn() -> streambus_core::Instant,
    Vec<u8>,
    N,
>;

fn client<const N: usize>(
    stream: ClientStream,
    config: streambus_core::ClientConfig,
    buffers: crate::Buffers,
) -> Client<N> {
    let conn = buffers.connection(config);
    Client::new(
        embedded_io_adapters::std::FromStd::new(ClientSocket(stream)),
        now as fn() -> _,
        conn,
    )
}

/// Connects a [`Client`] to `addr`; `buffers` as in the tokio adapter's `connect`. The
/// socket gets a short read timeout so the driver can check request deadlines while waiting.
pub fn connect<const N: usize>(
    addr: SocketAddr,
    config: streambus_core::ClientConfig,
    buffers: impl Into<crate::Buffers>,
) -> io::Result<Client<N>> {
    connect_stream(TcpStream::connect(addr)?, config, buffers)
}

/// Wraps a socket already connected (say, bound to a chosen source address first) in a
/// [`Client`]; as [`connect`] otherwise.
pub fn connect_stream<const N: usize>(
    stream: TcpStream,
    config: streambus_core::ClientConfig,
    buffers: impl Into<crate::Buffers>,
) -> io::Result<Client<N>> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(POLL))?;
    Ok(client(ClientStream::Plain(stream), config, buffers.into()))
}

/// Connects a [`Client`] to `addr` over TLS (feature `tls`) and completes the handshake within
/// the request timeout of `config`; a refused certificate is an [`io::Error`] whose inner
/// error is the [`rustls::Error`].
#[cfg(feature = "tls")]
pub fn connect_tls<const N: usize>(
    addr: SocketAddr,
    tls: &crate::tls::ClientTls,
    config: streambus_core::ClientConfig,
    buffers: impl Into<crate::Buffers>,
) -> io::Result<Client<N>> {
    connect_stream_tls(TcpStream::connect(addr)?, tls, config, buffers)
}

/// [`connect_stream`] over TLS (feature `tls`): the handshake runs on `stream`, already
/// connected; as [`connect_tls`] otherwise.
#[cfg(feature = "tls")]
pub fn connect_stream_tls<const N: usize>(
    mut stream: TcpStream,
    tls: &crate::tls::ClientTls,
    config: streambus_core::ClientConfig,
    buffers: impl Into<crate::Buffers>,
) -> io::Result<Client<N>> {
    stream.set_nodelay(true)?;
    let mut conn = rustls::ClientConnection::new(Arc::clone(&tls.config), tls.server_name.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let deadline = std::time::Instant::now() + config.request_timeout;
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the TLS handshake did not complete",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        conn.complete_io(&mut stream)?;
    }
    stream.set_read_timeout(Some(POLL))?;
    let tls = rustls::StreamOwned::new(conn, stream);
    Ok(client(
        ClientStream::Tls(Box::new(tls)),
        config,
        buffers.into(),
    ))
}

/// TLS on the blocking runtime: rustls driven by hand over the std socket, so a read after
/// `poll` said readable reads the socket once and never blocks on a partial record.
#[cfg(feature = "tls")]
mod tls {
    use std::io::{self, Read, Write};
    use std::net::TcpStream;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::HandshakeFailure;
    use crate::tls::{FileReader, classify, client_subject};

    /// A server connection over TLS.
    pub(super) struct TlsStream {
        conn: rustls::ServerConnection,
        pub(super) tcp: TcpStream,
        file: FileReader,
    }

    /// Runs the server side of a handshake on `tcp` within `timeout`.
    pub(super) fn handshake(
        mut tcp: TcpStream,
        config: &Arc<rustls::ServerConfig>,
        timeout: Duration,
    ) -> Result<(TlsStream, Option<String>), HandshakeFailure> {
        let mut conn = rustls::ServerConnection::new(Arc::clone(config))
            .map_err(|e| classify(&io::Error::new(io::ErrorKind::InvalidData, e)))?;
        let deadline = Instant::now() + timeout;
        while conn.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HandshakeFailure::Timeout);
            }
            let timeouts = tcp
                .set_read_timeout(Some(left))
                .and_then(|()| tcp.set_write_timeout(Some(left)));
            if let Err(e) = timeouts.and_then(|()| conn.complete_io(&mut tcp).map(drop)) {
                return Err(classify(&e));
            }
        }
        if let Err(e) = tcp.set_read_timeout(None) {
            return Err(classify(&e));
        }
        let subject = client_subject(&conn);
        Ok((
            TlsStream {
                conn,
                tcp,
                file: FileReader::default(),
            },
            subject,
        ))
    }

    impl TlsStream {
        /// Writes what rustls holds to the socket (blocking, within the socket's timeout).
        fn flush_tls(&mut self) -> io::Result<()> {
            while self.conn.wants_write() {
                if self.conn.write_tls(&mut self.tcp)? == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
            }
            Ok(())
        }
    }

    impl Read for TlsStream {
        /// Plaintext if some waits; else reads the socket once: `WouldBlock` if what came held
        /// no plaintext (part of a record), `Ok(0)` at the peer's close.
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
            let n = self.conn.read_tls(&mut self.tcp)?;
            let processed = self.conn.process_new_packets();
            // An alert to send, or a key update to answer.
            let flushed = self.flush_tls();
            if let Err(e) = processed {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            flushed?;
            match self.conn.reader().read(buf) {
                // The socket ended without TLS's close_notify.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && n == 0 => Ok(0),
                r => r,
            }
        }
    }

    impl Write for TlsStream {
        /// Takes what rustls accepts (it seals it into records at once) and writes the records
        /// out; `WouldBlock`/`TimedOut` only when nothing was taken.
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            loop {
                let n = self.conn.writer().write(buf)?;
                if n > 0 || buf.is_empty() {
                    return match self.flush_tls() {
                        Err(e) if !super::stalled(&e) => Err(e),
                        _ => Ok(n),
                    };
                }
                // rustls's buffer is full: write it out first.
                self.flush_tls()?;
            }
        }

        fn flush(&mut self) -> io::Result<()> {
            self.flush_tls()
        }
    }

    impl super::Stream for TlsStream {
        fn tcp(&self) -> &TcpStream {
            &self.tcp
        }

        fn send_file(&mut self, chunk: &crate::FileChunk) -> io::Result<usize> {
            let n = loop {
                let bytes = self.file.bytes(chunk)?;
                let n = self.conn.writer().write(bytes)?;
                if n > 0 || bytes.is_empty() {
                    break n;
                }
                // rustls's buffer is full: write it out first.
                self.flush_tls()?;
            };
            self.file.consumed(n);
            match self.flush_tls() {
                Err(e) if !super::stalled(&e) => Err(e),
                _ => Ok(n),
            }
        }

        fn buffered(&self) -> bool {
            !self.conn.wants_read()
        }

        fn release_idle(&mut self) {
            self.file.release();
        }

        fn shutdown_write(&mut self) -> io::Result<()> {
            self.conn.send_close_notify();
            self.flush_tls()?;
            self.tcp.shutdown(std::net::Shutdown::Write)
        }
    }
}

/// A write that made no progress within the socket's timeout (try again within the deadline).
#[cfg(feature = "tls")]
fn stalled(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}
