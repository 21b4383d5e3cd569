//! The tokio adapter: one task per connection.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use std::os::fd::AsFd;

use tokio::io::Interest;

use crate::session::{Next, Session};
use crate::transmit::Pending;
use crate::{CLOSE_DRAIN, ConnEvent, Handler, ServeOptions, now, send_file, until};

/// Accepts connections on `listener` and serves them with `handler` until `shutdown`
/// completes; then stops accepting, lets every connection finish the requests it has read,
/// and waits up to [`ServeOptions::shutdown_grace`] for them to close.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let open = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of fds and the like: log, back off briefly, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if open.load(Ordering::Relaxed) >= options.max_connections {
                    handler.on_event(ConnEvent::Refused);
                    tracing::debug!(%peer, "connection refused: at the connection cap");
                    drop(stream);
                    continue;
                }
                open.fetch_add(1, Ordering::Relaxed);
                handler.on_event(ConnEvent::Accepted);
                let (h, o, stop) = (handler.clone(), open.clone(), stop_rx.clone());
                tasks.spawn(async move {
                    if let Err(e) = connection(stream, &h, &options, stop).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    o.fetch_sub(1, Ordering::Relaxed);
                    h.on_event(ConnEvent::Closed);
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(listener);
    handler.shutdown();
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(options.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "shutdown deadline passed; closing remaining connections"
        );
        tasks.abort_all();
        // Wait until every aborted task has stopped: none may acknowledge anything afterwards.
        while tasks.join_next().await.is_some() {}
    }
    Ok(())
}

async fn write_pending<H: Handler>(
    stream: &mut TcpStream,
    s: &mut Session,
    h: &H,
    o: &ServeOptions,
) -> io::Result<()> {
    let flush = async {
        loop {
            let n = match s.pending() {
                Pending::None => return Ok(()),
                Pending::Bytes(b) => {
                    stream.write_all(b).await?;
                    b.len()
                }
                Pending::File(f) => {
                    stream.writable().await?;
                    match stream.try_io(Interest::WRITABLE, || send_file(stream.as_fd(), f)) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e),
                    }
                }
            };
            s.sent(n);
            h.on_event(ConnEvent::BytesOut(n));
        }
    };
    match tokio::time::timeout(o.write_timeout, flush).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "write timeout")),
    }
}

async fn connection<H: Handler>(
    mut stream: TcpStream,
    shared: &Arc<H>,
    options: &ServeOptions,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
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
                tokio::task::spawn_blocking(move || job.run(&*h))
                    .await
                    .map_err(io::Error::other)?;
                continue;
            }
            Next::Read => true,
            Next::Wait => false,
        };
        let stopping = *stop.borrow();
        if stopping && s.drained() {
            // Everything read has been answered and written.
            return close(stream).await;
        }
        let reading = reading && !stopping;
        // Try the socket first: a busy connection skips a wake-up. Not after a timer: nothing
        // came, and a read would take back the buffers that were just given back.
        if reading && !std::mem::take(&mut timer_woke) {
            match read_now(&mut stream, s.read_buf()).await {
                Some(Ok(0)) => return Ok(()),
                Some(Ok(n)) => {
                    s.filled(n);
                    handler.on_event(ConnEvent::BytesIn(n));
                    continue;
                }
                None => s.filled(0),
                Some(Err(e)) => return Err(e),
            }
        }
        let deadline = s.wait_deadline(now());
        tokio::select! {
            ready = stream.readable(), if reading => ready?,
            () = std::future::poll_fn(|cx| replies.poll_ready(cx)) => {}
            _ = stop.changed(), if !stopping => {}
            () = async {
                match deadline {
                    Some(d) => tokio::time::sleep(until(d)).await,
                    None => std::future::pending().await,
                }
            } => {
                if s.handle_timeout(now()) {
                    tracing::debug!("connection timed out");
                    return Ok(());
                }
                timer_woke = true;
            }
        }
    }
}

/// Sends FIN after the replies written, then reads and drops what the peer still sends until
/// it closes too (or [`CLOSE_DRAIN`] passes), so the close is never a reset.
async fn close(mut stream: TcpStream) -> io::Result<()> {
    use tokio::io::AsyncReadExt;
    stream.shutdown().await?;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(CLOSE_DRAIN, async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    Ok(())
}

/// One read attempt that never waits: `None` when the socket has nothing now. Unlike
/// `try_read`, tokio's `poll_read` marks the socket not-ready after a short read, so a
/// request/response connection skips the `recv` that would only say `EAGAIN`.
async fn read_now(stream: &mut TcpStream, buf: &mut [u8]) -> Option<io::Result<usize>> {
    use std::pin::Pin;
    use std::task::Poll;
    use tokio::io::{AsyncRead, ReadBuf};
    std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(buf);
        let r = match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
            Poll::Ready(r) => Some(r.map(|()| rb.filled().len())),
            Poll::Pending => None,
        };
        Poll::Ready(r)
    })
    .await
}

/// The core's clock and sleep for its async driver, on tokio.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioTimer;

impl streambus_core::io::Clock for TokioTimer {
    fn now(&mut self) -> streambus_core::Instant {
        now()
    }
}

impl streambus_core::io::asynch::Timer for TokioTimer {
    fn sleep_until(&mut self, deadline: streambus_core::Instant) -> impl Future<Output = ()> {
        tokio::time::sleep(until(deadline))
    }
}

/// A client connection on tokio: the core's one async driver over a tokio socket, with up to
/// `N` requests in flight.
pub type Client<const N: usize = 64> = streambus_core::io::asynch::Driver<
    embedded_io_adapters::tokio_1::FromTokio<TcpStream>,
    TokioTimer,
    Vec<u8>,
    N,
>;

/// Connects a [`Client`] to `addr`. `buffer_len` sizes each of its two buffers: the largest
/// request frame it can send and response frame it can receive (47 bytes plus a fetch's
/// records; `max_frame_len + 4` accepts anything).
pub async fn connect<const N: usize>(
    addr: std::net::SocketAddr,
    config: streambus_core::ClientConfig,
    buffer_len: usize,
) -> io::Result<Client<N>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let conn =
        streambus_core::ClientConnection::new(config, vec![0; buffer_len], vec![0; buffer_len]);
    Ok(Client::new(
        embedded_io_adapters::tokio_1::FromTokio::new(stream),
        TokioTimer,
        conn,
    ))
}
