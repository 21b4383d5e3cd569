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
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;

use crate::server::accept::AcceptErrors;
use crate::server::budget::Budget;
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
    let open = Arc::new(AtomicUsize::new(0));
    // Dropping the sender closes the channel: every connection's receiver then wakes.
    let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
    let mut shutdown = pin!(shutdown);
    let mut tasks: Vec<R::Task> = Vec::new();
    let budget = Arc::new(Budget::new(options.max_buffered_bytes));
    let mut accept_errors = AcceptErrors::default();
    // Offloaded requests running: a cancelled connection does not stop its job.
    let jobs = Arc::new(AtomicUsize::new(0));
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
        if open.load(Ordering::SeqCst) >= options.max_connections {
            handler.on_event(ConnEvent::Refused);
            tracing::debug!(%peer, "connection refused: at the connection cap");
            drop(socket);
            continue;
        }
        open.fetch_add(1, Ordering::SeqCst);
        handler.on_event(ConnEvent::Accepted);
        if tasks.len() >= 64 && tasks.len().is_power_of_two() {
            tasks.retain(|t| !R::is_finished(t));
        }
        let (h, o, stop, b, j) = (
            handler.clone(),
            open.clone(),
            stop_rx.clone(),
            budget.clone(),
            jobs.clone(),
        );
        let options = options.clone();
        tasks.push(R::spawn(async move {
            let who = Peer::new(peer);
            #[cfg(feature = "tls")]
            let ended = match options.tls.clone() {
                None => connection::<R, H, _>(socket, who, &h, &options, stop, b, &j).await,
                // On the heap: a TLS session is kilobytes, which a plaintext connection's task
                // must not carry (the task is as large as its largest state).
                Some(config) => {
                    Box::pin(async {
                        let deadline = options.connection.read_timeout;
                        match handshake::<R>(config, socket, deadline).await {
                            Ok((socket, subject)) => {
                                let who = Peer {
                                    tls_client_subject: subject,
                                    ..who
                                };
                                connection::<R, H, _>(socket, who, &h, &options, stop, b, &j).await
                            }
                            Err(reason) => {
                                tracing::debug!(%peer, %reason, "TLS handshake failed");
                                h.on_event(ConnEvent::TlsHandshakeFailed(reason));
                                Ok(())
                            }
                        }
                    })
                    .await
                }
            };
            #[cfg(not(feature = "tls"))]
            let ended = connection::<R, H, _>(socket, who, &h, &options, stop, b, &j).await;
            if let Err(e) = ended {
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
    while jobs.load(Ordering::SeqCst) > 0 {
        R::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
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

/// One offloaded job counted as running until it is dropped (returned or unwound).
struct JobCount(Arc<AtomicUsize>);

impl JobCount {
    fn start(jobs: &Arc<AtomicUsize>) -> Self {
        jobs.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(jobs))
    }
}

impl Drop for JobCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
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

async fn connection<R: Runtime, H: Handler, S: Socket>(
    mut socket: S,
    peer: Peer,
    shared: &Arc<H>,
    options: &ServeOptions,
    stop: async_channel::Receiver<()>,
    budget: Arc<Budget>,
    jobs: &Arc<AtomicUsize>,
) -> io::Result<()> {
    let mut stop = pin!(stop);
    let handler = &**shared;
    let mut s = Session::new(options.connection, now(), budget, peer);
    let replies = s.replies();
    // The peer sent FIN, or a fatal frame ended the stream: nothing more is read, but the
    // replies of what was read are still owed.
    let mut eof = false;
    // The socket said it has bytes: the next wait reads them (taking a buffer).
    let mut readable = false;
    loop {
        let next = s.process(now(), handler);
        write_pending::<R, H, S>(&mut socket, &mut s, handler, options).await?;
        let reading = match next {
            // A fatal frame: read no more, but answer what is in flight before closing.
            Next::Close => {
                eof = true;
                false
            }
            Next::Flush => continue,
            Next::Offload(job) => {
                let h = Arc::clone(shared);
                let running = JobCount::start(jobs);
                R::unblock(move || {
                    let _running = running;
                    job.run(&*h);
                })
                .await?;
                continue;
            }
            Next::Read => true,
            Next::Wait => false,
        };
        let stopping = stop.is_closed();
        if (stopping || eof) && s.drained() {
            // Everything read has been answered and written.
            return close::<R, S>(socket).await;
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
            if replies.poll_ready(cx).is_ready() {
                return Poll::Ready(Woke::Replies);
            }
            if !stopping && stop.as_mut().poll_next(cx).is_ready() {
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
                handler.on_event(ConnEvent::BytesIn(n));
            }
            Woke::Read(Err(e)) | Woke::Readable(Err(e)) => return Err(e),
            Woke::Readable(Ok(())) => readable = true,
            Woke::Replies | Woke::Stop | Woke::Budget => {}
            Woke::Timer => {
                if s.handle_timeout(now()) {
                    tracing::debug!("connection timed out");
                    return Ok(());
                }
                if s.holds_no_receive_buffer() {
                    socket.release_idle();
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
async fn close<R: Runtime, S: Socket>(mut socket: S) -> io::Result<()> {
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
