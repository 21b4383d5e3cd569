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

use smol::io::{AsyncRead, AsyncWrite};
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
pub(crate) struct Smol;

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

    #[cfg(feature = "tls")]
    type TlsSocket = TlsSocket;

    #[cfg(feature = "tls")]
    async fn tls_accept(
        config: Arc<rustls::ServerConfig>,
        socket: Async<TcpStream>,
    ) -> io::Result<(TlsSocket, Option<String>)> {
        let stream = futures_rustls::TlsAcceptor::from(config)
            .accept(socket)
            .await?;
        let subject = crate::tls::client_subject(stream.get_ref().1);
        Ok((
            TlsSocket {
                stream,
                file: crate::tls::FileReader::default(),
            },
            subject,
        ))
    }
}

/// A server connection over TLS: file ranges are read into a buffer and written through it.
#[cfg(feature = "tls")]
pub(crate) struct TlsSocket {
    stream: futures_rustls::server::TlsStream<Async<TcpStream>>,
    file: crate::tls::FileReader,
}

#[cfg(feature = "tls")]
impl Socket for TlsSocket {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        smol::io::AsyncRead::poll_read(Pin::new(&mut self.stream), cx, buf)
    }

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, tls) = self.stream.get_ref();
        if !tls.wants_read() {
            // Plaintext waits in rustls (or the peer closed): a read would not wait.
            return Poll::Ready(Ok(()));
        }
        tcp.poll_readable(cx)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.stream), cx, buf)
    }

    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &FileChunk,
    ) -> Poll<io::Result<usize>> {
        let bytes = self.file.bytes(chunk)?;
        let n = ready!(AsyncWrite::poll_write(
            Pin::new(&mut self.stream),
            cx,
            bytes
        ))?;
        self.file.consumed(n);
        Poll::Ready(Ok(n))
    }

    fn release_idle(&mut self) {
        self.file.release();
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.stream), cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_close(Pin::new(&mut self.stream), cx)
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

/// A client's socket: plaintext, or TLS (feature `tls`).
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientStream {
    /// Plaintext.
    Plain(Async<TcpStream>),
    /// TLS over TCP.
    #[cfg(feature = "tls")]
    Tls(Box<futures_rustls::client::TlsStream<Async<TcpStream>>>),
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            #[cfg(feature = "tls")]
            Self::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            #[cfg(feature = "tls")]
            Self::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            #[cfg(feature = "tls")]
            Self::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_close(cx),
            #[cfg(feature = "tls")]
            Self::Tls(s) => Pin::new(&mut **s).poll_close(cx),
        }
    }
}

/// A client connection on smol: the core's one async driver over an async-io socket, with up
/// to `N` requests in flight.
pub type Client<const N: usize = 64> = streambus_core::io::asynch::Driver<
    embedded_io_adapters::futures_03::FromFutures<ClientStream>,
    SmolTimer,
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
        embedded_io_adapters::futures_03::FromFutures::new(stream),
        SmolTimer,
        conn,
    )
}

/// Connects a [`Client`] to `addr`; `buffers` as in the tokio adapter's `connect`.
pub async fn connect<const N: usize>(
    addr: std::net::SocketAddr,
    config: streambus_core::ClientConfig,
    buffers: impl Into<crate::Buffers>,
) -> io::Result<Client<N>> {
    let stream = Async::<TcpStream>::connect(addr).await?;
    stream.get_ref().set_nodelay(true)?;
    Ok(client(ClientStream::Plain(stream), config, buffers.into()))
}

/// Connects a [`Client`] to `addr` over TLS (feature `tls`) and completes the handshake; a
/// refused certificate is an [`io::Error`] whose inner error is the [`rustls::Error`].
#[cfg(feature = "tls")]
pub async fn connect_tls<const N: usize>(
    addr: std::net::SocketAddr,
    tls: &crate::tls::ClientTls,
    config: streambus_core::ClientConfig,
    buffers: impl Into<crate::Buffers>,
) -> io::Result<Client<N>> {
    let stream = Async::<TcpStream>::connect(addr).await?;
    stream.get_ref().set_nodelay(true)?;
    let stream = futures_rustls::TlsConnector::from(Arc::clone(&tls.config))
        .connect(tls.server_name.clone(), stream)
        .await?;
    Ok(client(
        ClientStream::Tls(Box::new(stream)),
        config,
        buffers.into(),
    ))
}
