//! The tokio adapter: the `Runtime` of the shared loops on tokio,
//! one task per connection, and the client side.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::server::runtime::{self, Runtime, Socket};
use crate::{FileChunk, Handler, ServeOptions, now, send_file};

/// Accepts connections on `listener` and serves them with `handler` until `shutdown`
/// completes; then stops accepting, answers what waits ([`Handler::shutdown`]), lets every
/// connection answer and write what it has read, and waits up to
/// [`ServeOptions::shutdown_grace`] for them to close; those still open are aborted, and have
/// stopped when this returns.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    runtime::serve::<Tokio, H>(listener, handler, options, shutdown).await
}

/// Tokio as the shared loops' runtime.
struct Tokio;

impl Runtime for Tokio {
    type Listener = TcpListener;
    type Socket = TcpStream;
    type Sleep = tokio::time::Sleep;
    type Task = tokio::task::JoinHandle<()>;

    fn poll_accept(
        listener: &mut TcpListener,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(TcpStream, SocketAddr)>> {
        let (stream, peer) = ready!(listener.poll_accept(cx))?;
        stream.set_nodelay(true)?;
        Poll::Ready(Ok((stream, peer)))
    }

    fn sleep(d: Duration) -> tokio::time::Sleep {
        tokio::time::sleep(d)
    }

    fn spawn(f: impl Future<Output = ()> + Send + 'static) -> Self::Task {
        tokio::spawn(f)
    }

    fn is_finished(task: &Self::Task) -> bool {
        task.is_finished()
    }

    async fn cancel(task: Self::Task) {
        task.abort();
        let _ = task.await;
    }

    async fn unblock(f: impl FnOnce() + Send + 'static) -> io::Result<()> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(io::Error::other)
    }
}

impl Socket for TcpStream {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        // Unlike `try_read`, `poll_read` marks the socket not-ready after a short read, so a
        // request/response connection skips the `recv` that would only say `EAGAIN`.
        let mut rb = ReadBuf::new(buf);
        ready!(Pin::new(self).poll_read(cx, &mut rb))?;
        Poll::Ready(Ok(rb.filled().len()))
    }

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self).poll_write(cx, buf)
    }

    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &FileChunk,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.poll_write_ready(cx))?;
            match self.try_io(Interest::WRITABLE, || send_file(self.as_fd(), chunk)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_shutdown(cx)
    }
}

/// The core's clock and sleep for its async driver, on tokio.
///
/// One timer is kept and moved to each new deadline: the driver waits on the earliest
/// request deadline at every step, and a later deadline moves a registered tokio timer without
/// taking the timer wheel's lock, where a fresh `sleep` per step registered and removed an
/// entry each time.
#[derive(Debug, Default)]
pub struct TokioTimer {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl streambus_core::io::Clock for TokioTimer {
    fn now(&mut self) -> streambus_core::Instant {
        now()
    }
}

impl streambus_core::io::asynch::Timer for TokioTimer {
    fn sleep_until(&mut self, deadline: streambus_core::Instant) -> impl Future<Output = ()> {
        // Derived from the deadline alone: an unchanged deadline leaves the timer as it is.
        let at = tokio::time::Instant::from_std(crate::std_instant(deadline));
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if sleep.deadline() != at {
            sleep.as_mut().reset(at);
        }
        sleep.as_mut()
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

/// Connects a [`Client`] to `addr` with buffers of `buffers` bytes (a `usize` for both, or
/// [`Buffers`](crate::Buffers) for separate transmit and receive sizes).
pub async fn connect<const N: usize>(
    addr: std::net::SocketAddr,
    config: streambus_core::ClientConfig,
    buffers: impl Into<crate::Buffers>,
) -> io::Result<Client<N>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let conn = buffers.into().connection(config);
    Ok(Client::new(
        embedded_io_adapters::tokio_1::FromTokio::new(stream),
        TokioTimer::default(),
        conn,
    ))
}
