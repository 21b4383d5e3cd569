//! The smol adapter (async-io reactor): the `Runtime` of the shared
//! loops on smol, one task per connection on smol's executor, and the client side.

use std::future::Future;
use std::io::{self, Read as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use smol::io::AsyncWrite;
use smol::{Async, Timer};

use crate::server::runtime::{self, Runtime, Socket};
use crate::{FileChunk, Handler, ServeOptions, now, send_file, until};

/// Accepts connections on `listener` and serves them with `handler` until `shutdown`
/// completes; then stops accepting, answers what waits ([`Handler::shutdown`]), lets every
/// connection answer and write what it has read, and waits up to
/// [`ServeOptions::shutdown_grace`] for them to close; those still open are cancelled, and
/// have stopped when this returns.
pub async fn serve<H: Handler>(
    listener: Async<TcpListener>,
    handler: Arc<H>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    runtime::serve::<Smol, H>(listener, handler, options, shutdown).await
}

/// smol as the shared loops' runtime.
struct Smol;

impl Runtime for Smol {
    type Listener = Async<TcpListener>;
    type Socket = Async<TcpStream>;
    type Sleep = Timer;
    type Task = smol::Task<()>;

    fn poll_accept(
        listener: &mut Async<TcpListener>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(Async<TcpStream>, SocketAddr)>> {
        loop {
            match listener.get_ref().accept() {
                Ok((stream, peer)) => {
                    stream.set_nodelay(true)?;
                    return Poll::Ready(Ok((Async::new(stream)?, peer)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(listener.poll_readable(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn sleep(d: Duration) -> Timer {
        Timer::after(d)
    }

    fn spawn(f: impl Future<Output = ()> + Send + 'static) -> Self::Task {
        smol::spawn(f)
    }

    fn is_finished(task: &Self::Task) -> bool {
        task.is_finished()
    }

    async fn cancel(task: Self::Task) {
        let _ = task.cancel().await;
    }

    async fn unblock(f: impl FnOnce() + Send + 'static) -> io::Result<()> {
        smol::unblock(f).await;
        Ok(())
    }
}

impl Socket for Async<TcpStream> {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        // A plain read first: the reactor is asked only when the socket has nothing.
        loop {
            match self.get_ref().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.poll_readable(cx))?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Async::poll_readable(self, cx)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(self), cx, buf)
    }

    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &FileChunk,
    ) -> Poll<io::Result<usize>> {
        loop {
            match send_file(self.as_fd(), chunk) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.poll_writable(cx))?;
                }
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_shutdown(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_ref().shutdown(std::net::Shutdown::Write))
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

/// Connects a [`Client`] to `addr`; `buffers` as in the tokio adapter's `connect`.
pub async fn connect<const N: usize>(
    addr: std::net::SocketAddr,
    config: streambus_core::ClientConfig,
    buffers: impl Into<crate::Buffers>,
) -> io::Result<Client<N>> {
    let stream = Async::<TcpStream>::connect(addr).await?;
    stream.get_ref().set_nodelay(true)?;
    let conn = buffers.into().connection(config);
    Ok(Client::new(
        embedded_io_adapters::futures_03::FromFutures::new(stream),
        SmolTimer,
        conn,
    ))
}
