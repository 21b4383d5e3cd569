//! The smol adapter (async-io reactor): one task per connection on smol's executor.

use std::future::Future;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use smol::channel::{Receiver, bounded};
use smol::future::FutureExt as _;
use smol::io::AsyncWriteExt;
use smol::{Async, Timer};

use std::os::fd::AsFd;

use crate::session::{Next, Session};
use crate::transmit::Pending;
use crate::{CLOSE_DRAIN, ConnEvent, Handler, ServeOptions, now, send_file, until};

/// What woke a connection or the accept loop.
enum Wake<T> {
    Stop,
    Io(T),
    Timer,
}

/// Accepts connections on `listener` and serves them with `handler` until `shutdown`
/// completes; then stops accepting, lets every connection finish the requests it has read,
/// and waits up to [`ServeOptions::shutdown_grace`] for them to close.
pub async fn serve<H: Handler>(
    listener: Async<TcpListener>,
    handler: Arc<H>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    // Dropping the sender closes the channel: every connection's receiver then wakes.
    let (stop_tx, stop_rx) = bounded::<()>(1);
    let mut shutdown = std::pin::pin!(async {
        shutdown.await;
        Wake::Stop
    });
    let mut tasks: Vec<smol::Task<()>> = Vec::new();
    loop {
        let accepted = async { Wake::Io(listener.accept().await) }
            .or(shutdown.as_mut())
            .await;
        let (stream, peer) = match accepted {
            Wake::Io(Ok(a)) => a,
            Wake::Io(Err(e)) => {
                tracing::warn!(error = %e, "accept failed");
                Timer::after(Duration::from_millis(10)).await;
                continue;
            }
            Wake::Stop | Wake::Timer => break,
        };
        if open.load(Ordering::SeqCst) >= options.max_connections {
            handler.on_event(ConnEvent::Refused);
            continue;
        }
        open.fetch_add(1, Ordering::SeqCst);
        handler.on_event(ConnEvent::Accepted);
        if tasks.len() >= 64 && tasks.len().is_power_of_two() {
            tasks.retain(|t| !t.is_finished());
        }
        let (h, o, stop) = (handler.clone(), open.clone(), stop_rx.clone());
        tasks.push(smol::spawn(async move {
            if let Err(e) = connection(stream, &h, &options, stop).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            o.fetch_sub(1, Ordering::SeqCst);
            h.on_event(ConnEvent::Closed);
        }));
    }
    drop(listener);
    handler.shutdown();
    drop(stop_tx);
    let deadline = std::time::Instant::now() + options.shutdown_grace;
    while open.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        Timer::after(Duration::from_millis(5)).await;
    }
    let left = tasks.iter().filter(|t| !t.is_finished()).count();
    if left > 0 {
        tracing::warn!(
            left,
            "shutdown deadline passed; closing remaining connections"
        );
    }
    // Cancel what is left and wait until each has stopped: none may acknowledge anything
    // afterwards.
    for t in tasks {
        let _ = t.cancel().await;
    }
    Ok(())
}

async fn write_pending<H: Handler>(
    stream: &mut Async<TcpStream>,
    s: &mut Session,
    h: &H,
    o: &ServeOptions,
) -> io::Result<()> {
    let flush = async {
        loop {
            let n = match s.pending() {
                Pending::None => return Some(Ok(())),
                Pending::Bytes(b) => match stream.write_all(b).await {
                    Ok(()) => b.len(),
                    Err(e) => return Some(Err(e)),
                },
                Pending::File(f) => {
                    match stream.write_with(|sock| send_file(sock.as_fd(), f)).await {
                        Ok(n) => n,
                        Err(e) => return Some(Err(e)),
                    }
                }
            };
            s.sent(n);
            h.on_event(ConnEvent::BytesOut(n));
        }
    };
    let timeout = async {
        Timer::after(o.write_timeout).await;
        None
    };
    match flush.or(timeout).await {
        Some(r) => r,
        None => Err(io::Error::new(io::ErrorKind::TimedOut, "write timeout")),
    }
}

async fn connection<H: Handler>(
    mut stream: Async<TcpStream>,
    shared: &Arc<H>,
    options: &ServeOptions,
    stop: Receiver<()>,
) -> io::Result<()> {
    stream.get_ref().set_nodelay(true)?;
    let handler = &**shared;
    let mut s = Session::new(options.connection, now());
    let replies = s.replies();
    let mut timer_woke = false;
    loop {
        let next = s.process(now(), handler);
        write_pending(&mut stream, &mut s, handler, options).await?;
        let reading = match next {
            Next::Close => return close(stream).await,
            Next::Flush => continue,
            Next::Offload(job) => {
                let h = Arc::clone(shared);
                smol::unblock(move || job.run(&*h)).await;
                continue;
            }
            Next::Read => true,
            Next::Wait => false,
        };
        let stopping = stop.is_closed();
        if stopping && s.drained() {
            // Everything read has been answered and written.
            return close(stream).await;
        }
        let reading = reading && !stopping;
        // Try the socket first: a busy connection skips a wake-up. Not after a timer: nothing
        // came, and a read would take back the buffers that were just given back.
        if reading && !std::mem::take(&mut timer_woke) {
            match stream.get_ref().read_nonblocking(s.read_buf()) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    s.filled(n);
                    handler.on_event(ConnEvent::BytesIn(n));
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.filled(0),
                Err(e) => return Err(e),
            }
        }
        let deadline = s.wait_deadline(now());
        let readable = async {
            if reading {
                Wake::Io(stream.readable().await)
            } else {
                std::future::pending().await
            }
        };
        let replied = async {
            std::future::poll_fn(|cx| replies.poll_ready(cx)).await;
            Wake::Io(Ok(()))
        };
        let stopped = async {
            if stopping {
                std::future::pending::<()>().await;
            }
            let _ = stop.recv().await;
            Wake::Stop
        };
        let timer = async {
            match deadline {
                Some(d) => Timer::after(until(d)).await,
                None => Timer::never().await,
            };
            Wake::Timer
        };
        match readable.or(replied).or(stopped).or(timer).await {
            Wake::Io(r) => r?,
            Wake::Stop => {}
            Wake::Timer => {
                if s.handle_timeout(now()) {
                    return Ok(());
                }
                timer_woke = true;
            }
        }
    }
}

/// Sends FIN after the replies written, then reads and drops what the peer still sends until
/// it closes too (or [`CLOSE_DRAIN`] passes), so the close is never a reset.
async fn close(mut stream: Async<TcpStream>) -> io::Result<()> {
    use smol::io::AsyncReadExt;
    stream.get_ref().shutdown(std::net::Shutdown::Write)?;
    let mut sink = [0u8; 4096];
    let drain = async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
    drain
        .or(async {
            Timer::after(CLOSE_DRAIN).await;
        })
        .await;
    Ok(())
}

/// Non-blocking read on a socket registered with async-io (which set it non-blocking).
trait ReadNonBlocking {
    fn read_nonblocking(&self, buf: &mut [u8]) -> io::Result<usize>;
}

impl ReadNonBlocking for TcpStream {
    fn read_nonblocking(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::io::Read;
        (&*self).read(buf)
    }
}

/// The core's clock and sleep for its async driver, on smol's reactor.
#[derive(Debug, Clone, Copy, Default)]
pub struct SmolTimer;

impl streambus_core::io::Clock for SmolTimer {
    fn now(&mut self) -> streambus_core::Instant {
        now()
    }
}

impl streambus_core::io::asynch::Timer for SmolTimer {
    fn sleep_until(&mut self, deadline: streambus_core::Instant) -> impl Future<Output = ()> {
        let timer = Timer::after(until(deadline));
        async {
            timer.await;
        }
    }
}

/// A client connection on smol: the core's one async driver over an async-io socket, with up
/// to `N` requests in flight.
pub type Client<const N: usize = 64> = streambus_core::io::asynch::Driver<
    embedded_io_adapters::futures_03::FromFutures<Async<TcpStream>>,
    SmolTimer,
    Vec<u8>,
    N,
>;

/// Connects a [`Client`] to `addr`; `buffer_len` as in the tokio adapter's `connect`.
pub async fn connect<const N: usize>(
    addr: std::net::SocketAddr,
    config: streambus_core::ClientConfig,
    buffer_len: usize,
) -> io::Result<Client<N>> {
    let stream = Async::<TcpStream>::connect(addr).await?;
    stream.get_ref().set_nodelay(true)?;
    let conn =
        streambus_core::ClientConnection::new(config, vec![0; buffer_len], vec![0; buffer_len]);
    Ok(Client::new(
        embedded_io_adapters::futures_03::FromFutures::new(stream),
        SmolTimer,
        conn,
    ))
}
