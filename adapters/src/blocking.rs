//! The blocking adapter: std sockets, one thread per connection.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use std::os::fd::AsFd;

use crate::session::{Next, Pending, Session};
use crate::{ConnEvent, Handler, ServeOptions, now, send_file, until};

/// How often a blocked read wakes to check for shutdown.
const POLL: Duration = Duration::from_millis(100);

/// Stops a blocking [`serve`] from another thread.
#[derive(Debug, Clone)]
pub struct Shutdown {
    flag: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl Shutdown {
    /// Asks the server to stop: no new connections, open ones finish what they have read.
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
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
    })
}

/// Accepts and serves connections on the calling thread until `shutdown` is triggered, then
/// waits up to [`ServeOptions::shutdown_grace`] for open connections to finish.
pub fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    options: ServeOptions,
    shutdown: Shutdown,
) -> io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if shutdown.is_set() {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if open.load(Ordering::SeqCst) >= options.max_connections {
            handler.on_event(ConnEvent::Refused);
            continue;
        }
        open.fetch_add(1, Ordering::SeqCst);
        handler.on_event(ConnEvent::Accepted);
        let (h, o, stop) = (handler.clone(), open.clone(), shutdown.clone());
        let spawned = std::thread::Builder::new()
            .name("streambus-conn".into())
            .spawn(move || {
                if let Err(e) = connection(stream, &*h, &options, &stop) {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                o.fetch_sub(1, Ordering::SeqCst);
                h.on_event(ConnEvent::Closed);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start a connection thread");
            open.fetch_sub(1, Ordering::SeqCst);
            handler.on_event(ConnEvent::Closed);
        }
    }
    let deadline = std::time::Instant::now() + options.shutdown_grace;
    while open.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn write_pending<H: Handler>(stream: &mut TcpStream, s: &mut Session, h: &H) -> io::Result<()> {
    loop {
        let n = match s.pending() {
            Pending::None => return Ok(()),
            Pending::Bytes(b) => {
                stream.write_all(b)?;
                b.len()
            }
            // The socket's write timeout bounds this too.
            Pending::File(f) => send_file(stream.as_fd(), f)?,
        };
        s.sent(n);
        h.on_event(ConnEvent::BytesOut(n));
    }
}

fn connection<H: Handler>(
    mut stream: TcpStream,
    handler: &H,
    options: &ServeOptions,
    stop: &Shutdown,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(options.write_timeout))?;
    let mut s = Session::new(options.connection, now());
    // The read timeout last set: a syscall only when it changes (POLL while no deadline is near).
    let mut read_timeout = None;
    loop {
        match s.process(now(), handler) {
            Next::Close => return write_pending(&mut stream, &mut s, handler),
            Next::Flush => {
                write_pending(&mut stream, &mut s, handler)?;
                continue;
            }
            Next::Read => write_pending(&mut stream, &mut s, handler)?,
        }
        if stop.is_set() {
            return Ok(());
        }
        let wait = s
            .deadline()
            .map_or(POLL, |d| until(d).min(POLL))
            .max(Duration::from_millis(1));
        if read_timeout != Some(wait) {
            stream.set_read_timeout(Some(wait))?;
            read_timeout = Some(wait);
        }
        let buf = s.read_buf();
        match stream.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                s.filled(n);
                handler.on_event(ConnEvent::BytesIn(n));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                s.filled(0);
                // Quiet for a while: give the buffers back (a busy connection keeps them).
                s.release_idle();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => s.filled(0),
            Err(e) => return Err(e),
        }
        // After data too: bytes trickling in faster than the read timeout must not keep a
        // connection past its idle deadline.
        if s.handle_timeout(now()) {
            return Ok(());
        }
    }
}

/// A client socket whose read timeout reads as `TimedOut` (std reports `WouldBlock`), which
/// the core's blocking driver takes as "check the deadlines and read again".
#[derive(Debug)]
pub struct ClientSocket(TcpStream);

impl Read for ClientSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => io::Error::from(io::ErrorKind::TimedOut),
            _ => e,
        })
    }
}

impl Write for ClientSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
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

/// Connects a [`Client`] to `addr`; `buffer_len` as in the tokio adapter's `connect`. The
/// socket gets a short read timeout so the driver can check request deadlines while waiting.
pub fn connect<const N: usize>(
    addr: SocketAddr,
    config: streambus_core::ClientConfig,
    buffer_len: usize,
) -> io::Result<Client<N>> {
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(POLL))?;
    let conn =
        streambus_core::ClientConnection::new(config, vec![0; buffer_len], vec![0; buffer_len]);
    Ok(Client::new(
        embedded_io_adapters::std::FromStd::new(ClientSocket(stream)),
        now as fn() -> _,
        conn,
    ))
}
