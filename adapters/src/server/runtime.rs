//! The accept loop and the connection loop of the async runtimes, written once over a small
//! [`Runtime`] trait (the shape of quinn's `Runtime`): tokio and smol each implement it in a few
//! dozen lines (`tokio.rs`, `smol.rs`). The blocking runtime keeps its thread-per-connection
//! shape (`blocking.rs`) with the same semantics.
//!
//! One connection's life: [`Session::process`] hands out the requests received and takes the
//! replies completed; what is pending is written (bounded by the write timeout); then the
//! connection waits for whichever comes first — a completed reply, bytes to read (unless its
//! in-flight table is full or it is stopping), the server stopping, or its timer. Stopping, it
//! reads no more, answers and writes everything it has read, then closes with a FIN.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::server::accept::AcceptErrors;
use crate::server::budget::Budget;
use crate::server::reply::OutboxCell;
use crate::server::transmit::Pending;
use crate::server::{Next, Session};
use crate::{CLOSE_DRAIN, ConnEvent, FileChunk, Handler, Peer, ServeOptions, now, until};

/// A connected socket, as the connection loop needs it.
pub(crate) trait Socket: Send + 'static {
    /// Reads into `buf` (`Ok(0)`: the peer sent FIN).
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    /// Ready when a read would not wait; reads nothing (an idle connection holds no buffer).
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Writes from `buf`.
    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>>;
    /// Sends part of a file range with `sendfile`.
    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &FileChunk,
    ) -> Poll<io::Result<usize>>;
    /// Pushes out what a layer above the socket still buffers (TLS records).
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = cx;
        Poll::Ready(Ok(()))
    }
    /// Shuts the write side (FIN after what was written).
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// The connection went quiet and gave its buffers back: give back the socket's too.
    fn release_idle(&mut self) {}
}

/// What the loops need of an async runtime.
pub(crate) trait Runtime: 'static {
    /// A listening socket.
    type Listener: Send;
    /// A connected socket.
    type Socket: Socket;
    /// A timer.
    type Sleep: Future + Send;
    /// A spawned connection task.
    type Task: Send;

    /// Accepts a connection.
    fn poll_accept(
        listener: &mut Self::Listener,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(Self::Socket, SocketAddr)>>;
    /// Completes after `d`.
    fn sleep(d: Duration) -> Self::Sleep;
    /// Runs `f` as a task of its own.
    fn spawn(f: impl Future<Output = ()> + Send + 'static) -> Self::Task;
    /// Whether the task has completed.
    fn is_finished(task: &Self::Task) -> bool;
    /// Stops the task and completes once it has stopped running.
    fn cancel(task: Self::Task) -> impl Future<Output = ()> + Send;
    /// Runs `f` where blocking is allowed and completes when it returns.
    fn unblock(f: impl FnOnce() + Send + 'static) -> impl Future<Output = io::Result<()>> + Send;

    /// A TLS connection over [`Self::Socket`].
    #[cfg(feature = "tls")]
    type TlsSocket: Socket;
    /// Runs the server side of a TLS handshake on `socket`; gives the connection and the
    /// verified client certificate's subject, if any.
    #[cfg(feature = "tls")]
    fn tls_accept(
        config: Arc<rustls::ServerConfig>,
        socket: Self::Socket,
    ) -> impl Future<Output = io::Result<(Self::TlsSocket, Option<String>)>> + Send;
}

/// Accepts connections on `listener` and serves them until `shutdown` completes; then stops
/// accepting, calls [`Handler::shutdown`], lets every connection answer and write what it has
/// read, waits up to the grace period, and cancels (and waits for) what is left.
pub(crate) async fn serve<R: Runtime, H: Handler>(
    mut listener: R::Listener,
    handler: Arc<H>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    enum Step<T> {
        Stop,
        Accepted(io::Result<T>),
    }
    let shared = Arc::new(Shared::new(handler, options));
    let mut shutdown = pin!(shutdown);
    let mut tasks: Vec<R::Task> = Vec::new();
    let mut accept_errors = AcceptErrors::default();
    loop {
        let step = poll_fn(|cx| {
            if shutdown.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Step::Stop);
            }
            R::poll_accept(&mut listener, cx).map(Step::Accepted)
        })
        .await;
        let (socket, peer) = match step {
            Step::Stop => break,
            Step::Accepted(Ok(a)) => {
                accept_errors.succeeded();
                a
            }
            Step::Accepted(Err(e)) => {
                // Out of fds and the like: back off, keep serving.
                R::sleep(accept_errors.failed(&e)).await;
                continue;
            }
        };
        if shared.open.load(Ordering::SeqCst) >= shared.options.max_connections {
            shared.handler.on_event(ConnEvent::Refused);
            tracing::debug!(%peer, "connection refused: at the connection cap");
            drop(socket);
            continue;
        }
        shared.open.fetch_add(1, Ordering::SeqCst);
        shared.handler.on_event(ConnEvent::Accepted);
        if tasks.len() >= 64 && tasks.len().is_power_of_two() {
            tasks.retain(|t| !R::is_finished(t));
        }
        tasks.push(R::spawn(connection_task::<R, H>(
            socket,
            peer,
            Arc::clone(&shared),
        )));
    }
    drop(listener);
    shared.handler.shutdown();
    shared.stop();
    let deadline = std::time::Instant::now() + shared.options.shutdown_grace;
    while shared.open.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        R::sleep(Duration::from_millis(5)).await;
    }
    let left: Vec<R::Task> = tasks.into_iter().filter(|t| !R::is_finished(t)).collect();
    if !left.is_empty() {
        tracing::warn!(
            left = left.len(),
            "shutdown deadline passed; closing remaining connections"
        );
    }
    // Wait until each cancelled task has stopped, and every job it offloaded has returned:
    // nothing may touch the broker after this returns (its logs get their final fsync then).
    for t in left {
        R::cancel(t).await;
    }
    while shared.jobs.load(Ordering::SeqCst) > 0 {
        R::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// What every connection of one server shares, behind one `Arc`: a connection's task holds
/// one pointer to it, not a copy of the options and a handle to each part (the task is
/// allocated for every connection, so each byte of it counts ten thousand times).
pub(crate) struct Shared<H> {
    handler: Arc<H>,
    options: ServeOptions,
    /// The server's memory budget.
    budget: Arc<Budget>,
    /// Connections open.
    open: AtomicUsize,
    /// Offloaded requests running: a cancelled connection does not stop its job.
    jobs: AtomicUsize,
    /// The server is stopping: connections read no more, answer what they read, and close.
    stopping: AtomicBool,
    /// The outbox of every connection running, to wake them when the server stops: a waiting
    /// connection's waker is in its outbox already, so stopping needs no listener of its own
    /// per connection.
    connections: Mutex<slab::Slab<Arc<OutboxCell>>>,
}

impl<H> Shared<H> {
    fn new(handler: Arc<H>, options: ServeOptions) -> Self {
        Self {
            budget: Arc::new(Budget::new(options.max_buffered_bytes)),
            handler,
            options,
            open: AtomicUsize::new(0),
            jobs: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            connections: Mutex::new(slab::Slab::new()),
        }
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, slab::Slab<Arc<OutboxCell>>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells every connection the server stops, waking those that wait. A connection that
    /// registers its outbox after this sees [`is_stopping`](Self::is_stopping) before it
    /// waits; one that registered its waker before this is woken (the outbox's lock orders
    /// the two).
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for (_, outbox) in self.connections().iter() {
            outbox.wake();
        }
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

impl<H: Handler> Shared<H> {
    /// Counts a connection closed.
    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        self.handler.on_event(ConnEvent::Closed);
    }
}

/// A connection's place in [`Shared::connections`], given up when the connection ends (or
/// its task is cancelled).
struct Registered<'a, H> {
    shared: &'a Shared<H>,
    key: usize,
}

impl<'a, H> Registered<'a, H> {
    fn new(shared: &'a Shared<H>, outbox: Arc<OutboxCell>) -> Self {
        let key = shared.connections().insert(outbox);
        Self { shared, key }
    }
}

impl<H> Drop for Registered<'_, H> {
    fn drop(&mut self) {
        let mut connections = self.shared.connections();
        connections.try_remove(self.key);
        // Give the memory back once nobody is left (after a burst of connections; a slab
        // cannot move its entries, so it cannot shrink below its highest key while in use).
        if connections.is_empty() && connections.capacity() > 64 {
            *connections = slab::Slab::new();
        }
    }
}

/// One accepted connection's task: the TLS handshake if the server serves TLS, then the
/// connection.
///
/// A plaintext connection's task is [`connection`]'s future itself (with the `tls` feature,
/// beside a pointer to the boxed TLS case in an `Either`): the task is allocated for every
/// connection, and a wrapping future would carry a second copy of the socket and the peer's
/// address.
pub(crate) fn connection_task<R: Runtime, H: Handler>(
    socket: R::Socket,
    peer: SocketAddr,
    shared: Arc<Shared<H>>,
) -> impl Future<Output = ()> + Send + 'static {
    #[cfg(feature = "tls")]
    {
        let Some(config) = shared.options.tls.clone() else {
            return either::Either::Left(connection::<R, H, _>(socket, Peer::new(peer), shared));
        };
        // On the heap: a TLS session is kilobytes, which a plaintext connection's task must
        // not carry (a future is as large as its largest state).
        either::Either::Right(Box::pin(async move {
            let deadline = shared.options.connection.read_timeout;
            match handshake::<R>(config, socket, deadline).await {
                Ok((socket, subject)) => {
                    let who = Peer {
                        tls_client_subject: subject,
                        ..Peer::new(peer)
                    };
                    connection::<R, H, _>(socket, who, shared).await;
                }
                Err(reason) => {
                    tracing::debug!(%peer, %reason, "TLS handshake failed");
                    shared
                        .handler
                        .on_event(ConnEvent::TlsHandshakeFailed(reason));
                    shared.closed();
                }
            }
        }))
    }
    #[cfg(not(feature = "tls"))]
    connection::<R, H, _>(socket, Peer::new(peer), shared)
}

/// The server side of a TLS handshake, within `deadline`.
#[cfg(feature = "tls")]
async fn handshake<R: Runtime>(
    config: Arc<rustls::ServerConfig>,
    socket: R::Socket,
    deadline: Duration,
) -> Result<(R::TlsSocket, Option<String>), crate::HandshakeFailure> {
    let mut accept = pin!(R::tls_accept(config, socket));
    let mut timer = pin!(R::sleep(deadline));
    poll_fn(|cx| {
        if let Poll::Ready(r) = accept.as_mut().poll(cx) {
            return Poll::Ready(r.map_err(|e| crate::tls::classify(&e)));
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(_) => Poll::Ready(Err(crate::HandshakeFailure::Timeout)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// One offloaded job counted as running until it is dropped (returned or unwound); it holds
/// the server's shared state (the handler) as long.
struct JobCount<H>(Arc<Shared<H>>);

impl<H> JobCount<H> {
    fn start(shared: Arc<Shared<H>>) -> Self {
        shared.jobs.fetch_add(1, Ordering::SeqCst);
        Self(shared)
    }
}

impl<H> Drop for JobCount<H> {
    fn drop(&mut self) {
        self.0.jobs.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What ended a connection's wait.
enum Woke {
    Replies,
    Budget,
    Stop,
    Read(io::Result<usize>),
    Readable(io::Result<()>),
    Timer,
}

/// One connection, from its session's start to its close; counts it closed at the end.
///
/// The session is made here, before the future, so the peer's address moves into it instead
/// of staying in the future's captures; the future owns the socket, the session and the shared
/// state once, and [`serve_connection`] works on them by reference.
fn connection<R: Runtime, H: Handler, S: Socket>(
    mut socket: S,
    peer: Peer,
    shared: Arc<Shared<H>>,
) -> impl Future<Output = ()> + Send + 'static {
    let mut s = Session::new(
        shared.options.connection,
        now(),
        Arc::clone(&shared.budget),
        peer,
    );
    async move {
        let registered = Registered::new(&shared, s.replies());
        let ended = serve_connection::<R, H, S>(&mut socket, &mut s, &shared).await;
        drop(registered);
        let peer = s.peer().addr;
        // The session's buffers go back before the close drains the socket.
        drop(s);
        let ended = match ended {
            Ok(true) => close::<R, S>(&mut socket).await,
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = ended {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        shared.closed();
    }
}

/// Serves one connection until it ends; `Ok(true)`: everything read was answered and
/// written, close it with a FIN. (A function returning a block rather than an `async fn`: an
/// `async fn` keeps a second copy of its arguments in its future.)
#[allow(clippy::manual_async_fn)]
fn serve_connection<'a, R: Runtime, H: Handler, S: Socket>(
    socket: &'a mut S,
    s: &'a mut Session,
    shared: &'a Arc<Shared<H>>,
) -> impl Future<Output = io::Result<bool>> + Send + 'a {
    async move {
        let replies = s.replies();
        // The peer sent FIN, or a fatal frame ended the stream: nothing more is read, but the
        // replies of what was read are still owed.
        let mut eof = false;
        // The socket said it has bytes: the next wait reads them (taking a buffer).
        let mut readable = false;
        loop {
            // `next` lives in this block only: it is not kept across the wait below.
            let reading = {
                let next = s.process(now(), &*shared.handler);
                write_pending::<R, H, S>(socket, s, &*shared.handler, &shared.options).await?;
                match next {
                    // A fatal frame: read no more, but answer what is in flight before closing.
                    Next::Close => {
                        eof = true;
                        false
                    }
                    Next::Flush => continue,
                    Next::Offload(job) => {
                        let running = JobCount::start(Arc::clone(shared));
                        R::unblock(move || {
                            (*job).run(&*running.0.handler);
                            drop(running);
                        })
                        .await?;
                        continue;
                    }
                    Next::Read => true,
                    Next::Wait => false,
                }
            };
            let stopping = shared.is_stopping();
            if (stopping || eof) && s.drained() {
                // Everything read has been answered and written.
                return Ok(true);
            }
            let reading = reading && !stopping && !eof;
            let mut timer = pin!(s.wait_deadline(now()).map(|d| R::sleep(until(d))));
            // A connection that gave its buffers back waits for bytes without taking them back.
            let idle = s.holds_no_receive_buffer() && !std::mem::take(&mut readable);
            // Room to read into, or (the memory budget spent) a wake when some is given back:
            // listening first, then checking again, so no give-back is missed.
            let mut starved = None;
            let can_read = reading
                && (idle || s.prepare_read() || {
                    let listener = s.budget().listen();
                    let ready = s.prepare_read();
                    if !ready {
                        starved = Some(listener);
                    }
                    ready
                });
            let mut starved = pin!(starved);
            let woke = poll_fn(|cx| {
                // Registers the waker that a reply, or the server stopping, wakes.
                if replies.poll_ready(cx).is_ready() {
                    return Poll::Ready(Woke::Replies);
                }
                if !stopping && shared.is_stopping() {
                    return Poll::Ready(Woke::Stop);
                }
                if can_read {
                    if idle {
                        if let Poll::Ready(r) = socket.poll_readable(cx) {
                            return Poll::Ready(Woke::Readable(r));
                        }
                    } else if let Poll::Ready(r) = socket.poll_read(cx, s.read_buf()) {
                        return Poll::Ready(Woke::Read(r));
                    }
                }
                if let Some(l) = starved.as_mut().as_pin_mut()
                    && l.poll(cx).is_ready()
                {
                    return Poll::Ready(Woke::Budget);
                }
                match timer.as_mut().as_pin_mut().map(|t| t.poll(cx).is_ready()) {
                    Some(true) => Poll::Ready(Woke::Timer),
                    _ => Poll::Pending,
                }
            })
            .await;
            match woke {
                Woke::Read(Ok(0)) => eof = true,
                Woke::Read(Ok(n)) => {
                    s.filled(n);
                    shared.handler.on_event(ConnEvent::BytesIn(n));
                }
                Woke::Read(Err(e)) | Woke::Readable(Err(e)) => return Err(e),
                Woke::Readable(Ok(())) => readable = true,
                Woke::Replies | Woke::Stop | Woke::Budget => {}
                Woke::Timer => {
                    if s.handle_timeout(now()) {
                        tracing::debug!("connection timed out");
                        return Ok(false);
                    }
                    if s.holds_no_receive_buffer() {
                        socket.release_idle();
                    }
                }
            }
        }
    }
}

/// Writes everything pending; a write that makes no progress for the write timeout fails.
async fn write_pending<R: Runtime, H: Handler, S: Socket>(
    socket: &mut S,
    s: &mut Session,
    h: &H,
    o: &ServeOptions,
) -> io::Result<()> {
    if matches!(s.pending(), Pending::None) {
        return Ok(());
    }
    let mut timeout = pin!(R::sleep(o.write_timeout));
    poll_fn(|cx| {
        loop {
            let r = match s.pending() {
                Pending::None => match socket.poll_flush(cx) {
                    Poll::Ready(r) => return Poll::Ready(r),
                    Poll::Pending => Poll::Pending,
                },
                Pending::Bytes(b) => socket.poll_write(cx, b),
                Pending::File(f) => socket.poll_send_file(cx, f),
            };
            match r {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    s.sent(n);
                    h.on_event(ConnEvent::BytesOut(n));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    return match timeout.as_mut().poll(cx) {
                        Poll::Ready(_) => Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "write timeout",
                        ))),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    })
    .await
}

/// Sends FIN after the replies written, then reads and drops what the peer still sends until
/// it closes too (or [`CLOSE_DRAIN`] passes), so the close is never a reset.
async fn close<R: Runtime, S: Socket>(socket: &mut S) -> io::Result<()> {
    poll_fn(|cx| socket.poll_shutdown(cx)).await?;
    // On the heap, and only now: an array here would be part of every connection's future.
    let mut sink = vec![0u8; 4096];
    let mut timer = pin!(R::sleep(CLOSE_DRAIN));
    poll_fn(|cx| {
        loop {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            match socket.poll_read(cx, &mut sink) {
                Poll::Ready(Ok(n)) if n > 0 => {}
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nobody;

    impl Handler for Nobody {
        fn handle(
            &self,
            _: streambus_core::Flags,
            _: &streambus_core::Request<'_>,
            reply: crate::Reply,
        ) {
            reply.error(
                streambus_core::ErrorCode::INVALID_REQUEST,
                format_args!("no"),
            );
        }
    }

    /// The size of one connection's task (its future, as spawned) over `socket`.
    fn task_bytes<R: Runtime>(socket: R::Socket) -> usize {
        let shared = Arc::new(Shared::new(Arc::new(Nobody), ServeOptions::default()));
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        size_of_val(&connection_task::<R, Nobody>(socket, peer, shared))
    }

    fn socket_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server)
    }

    /// tokio allocates a task as its future plus 104 bytes of header and trailer, rounded up
    /// to 128 bytes (the cell is 128-byte aligned): a future of at most 664 bytes makes a
    /// 768-byte task. (Measured: 656 bytes in a release build, 664 in a debug build; before
    /// the server's shared state was one `Arc` and the session was made outside the future,
    /// 904 bytes, a 1 024-byte task.)
    #[cfg(feature = "tokio")]
    #[test]
    fn a_tokio_connection_task_fits_768_bytes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (_client, server) = socket_pair();
        let bytes = rt.block_on(async {
            let socket = tokio::net::TcpStream::from_std(server).unwrap();
            task_bytes::<crate::tokio::Tokio>(socket)
        });
        assert!(bytes <= 664, "a tokio connection's future is {bytes} bytes");
    }

    /// smol (async-task) allocates a task as its future plus a small header. (Measured: 584
    /// bytes in release and debug builds; 784 before.)
    #[cfg(feature = "smol")]
    #[test]
    fn a_smol_connection_task_is_at_most_600_bytes() {
        let (_client, server) = socket_pair();
        let socket = smol::Async::new(server).unwrap();
        let bytes = task_bytes::<crate::smol::Smol>(socket);
        assert!(bytes <= 600, "a smol connection's future is {bytes} bytes");
    }
}
