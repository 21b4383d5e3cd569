//! The server driver: everything of a broker connection that is not I/O, written once for every
//! runtime, split by concern:
//!
//! - this file: [`Session`], the poll loop over the core's [`ServerConnection`] — it hands out
//!   requests, takes completed replies and tells the runtime what to do next ([`Next`]);
//! - `receive`: the receive buffer's sizing;
//! - `transmit`: the transmit queue, with file ranges sent by `sendfile`;
//! - `reply`: the public [`Reply`] and the outbox it writes into;
//! - `budget`: the memory budget all connections share;
//! - `runtime`: the accept and connection loops over the small `Runtime` trait that tokio and smol
//!   implement (the blocking runtime runs the same steps on a thread per connection).
//!
//! Runtimes only read into [`Session::read_buf`], write out [`Session::pending`], wait for what
//! [`Session::process`] asks, and run the timers.

pub(crate) mod accept;
pub(crate) mod budget;
pub(crate) mod connection;
mod receive;
pub(crate) mod reply;
#[cfg(any(feature = "tokio", feature = "smol"))]
pub(crate) mod runtime;
pub(crate) mod transmit;

use std::sync::Arc;

use streambus_core::broker::encode_fault_response;
use streambus_core::{
    Flags, Instant, Request, RequestFrame, ServerConfig, ServerConnection, ServerEvent,
};

use crate::{ConnEvent, Handler, Peer};
use budget::{ALLOWANCE, Budget};
use receive::RxBuf;
use reply::{OutboxCell, Reply};
use transmit::{Pending, TxBuf};
/// How long a quiet connection keeps its buffers before giving them back: long enough that a
/// request/response client (tens of µs between requests) never pays for re-allocating them.
const LINGER: core::time::Duration = core::time::Duration::from_millis(2);
/// Stop reading new requests while this much output waits (a slow reader).
const TX_HIGH_WATER: u64 = 4 * 1024 * 1024;
/// The size a fault reply is first encoded into (the encoder asks for more if needed).
const FAULT_GUESS: usize = 128;

/// What the runtime must do after [`Session::process`].
#[derive(Debug)]
pub(crate) enum Next {
    /// Write what is pending, then wait for input, a completed reply or the timer.
    Read,
    /// Write what is pending, then wait for a completed reply or the timer, reading nothing:
    /// [`ServerConfig::max_in_flight`] requests wait for their replies (back-pressure).
    Wait,
    /// Write what is pending before anything else (a slow reader), then process again.
    Flush,
    /// Run this request where blocking is allowed and wait for it before the next one (so
    /// requests on one connection keep their order), then process again. (Boxed: a `Next` is
    /// kept in the connection's future while it writes, and offloading is rare.)
    Offload(Box<Job>),
    /// Write what is pending, then close.
    Close,
}

/// A request whose handling may block (topic creation, say), with its frame copied out so it
/// can run on another thread.
#[derive(Debug)]
pub(crate) struct Job {
    frame: Vec<u8>,
    flags: Flags,
    reply: Reply,
}

impl Job {
    /// Decodes the request again from its copied frame and hands it to `handler`.
    pub(crate) fn run<H: Handler + ?Sized>(self, handler: &H) {
        let decoded = RequestFrame::new_checked(&self.frame[..])
            .and_then(|frame| Request::parse(&frame).map(|r| (r, frame)));
        match decoded {
            Ok((request, _)) => handler.handle(self.flags, &request, self.reply),
            // The connection decoded this very frame already: only a bug gets here.
            Err(e) => self.reply.error(
                streambus_core::ErrorCode::STORAGE_ERROR,
                format_args!("the request could not be decoded again: {e}"),
            ),
        }
    }
}

/// One connection's buffers and state.
#[derive(Debug)]
pub(crate) struct Session {
    conn: ServerConnection,
    /// Received bytes.
    rx: RxBuf,
    /// Output waiting to be written.
    tx: TxBuf,
    /// Where [`Reply`]s put their frames.
    outbox: Arc<OutboxCell>,
    /// When a quiet connection's buffers go back (set while it waits holding them).
    linger_until: Option<Instant>,
    /// What the transmit queue's buffer holds of the server's memory budget (the outbox's is
    /// charged by the outbox, which holds the budget).
    tx_charged: usize,
    /// The core has been told the connection authenticated.
    authenticated: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.outbox.close();
        self.budget().give(self.rx.charged() + self.tx_charged);
    }
}

impl Session {
    pub(crate) fn new(config: ServerConfig, now: Instant, budget: Arc<Budget>, peer: Peer) -> Self {
        Self {
            conn: ServerConnection::new(config, now),
            rx: RxBuf::default(),
            tx: TxBuf::default(),
            outbox: Arc::new(OutboxCell::new(budget, peer)),
            linger_until: None,
            tx_charged: 0,
            authenticated: false,
        }
    }

    /// Who the connection is with.
    #[cfg_attr(not(any(feature = "tokio", feature = "smol")), allow(dead_code))]
    pub(crate) fn peer(&self) -> &Peer {
        self.outbox.peer()
    }

    /// Passes on what the handler asked of the connection ([`crate::Connection`]): it
    /// authenticated (the core's authentication deadline ends), or it must close (the core
    /// hands out no further request).
    fn follow_handler(&mut self) {
        let asked = &self.outbox.connection;
        if !self.authenticated && asked.is_authenticated() {
            self.authenticated = true;
            self.conn.authenticated();
        }
        if asked.close_requested() && !self.conn.is_closed() {
            tracing::debug!("closing the connection at the handler's request");
            self.conn.close_after_replies();
        }
    }

    /// Makes room at the end of the receive buffer to read into; `false` when there is none
    /// because the server's memory budget is spent (or the allocation failed): then read
    /// nothing, and try again when the budget has room.
    pub(crate) fn prepare_read(&mut self) -> bool {
        self.rx.prepare(self.outbox.budget())
    }

    /// The room [`prepare_read`](Self::prepare_read) made (empty if it returned `false`).
    pub(crate) fn read_buf(&mut self) -> &mut [u8] {
        self.rx.spare()
    }

    /// Records that `n` bytes were read into the last [`read_buf`](Self::read_buf).
    pub(crate) fn filled(&mut self, n: usize) {
        if n > 0 {
            self.linger_until = None;
        }
        self.rx.filled(n);
    }

    /// What to write next.
    pub(crate) fn pending(&self) -> Pending<'_> {
        self.tx.pending()
    }

    /// Records that `n` bytes of what [`pending`](Self::pending) gave were written.
    pub(crate) fn sent(&mut self, n: usize) {
        self.tx.sent(n);
    }

    /// Drops buffers that are empty (the receive buffer, both transmit buffers), so an idle
    /// connection holds no buffer at all.
    pub(crate) fn release_idle(&mut self) {
        self.rx.release(self.outbox.budget());
        if self.tx.waiting() == 0 {
            self.tx = TxBuf::default();
        }
        {
            let mut ob = self.outbox.lock();
            if ob.tx.waiting() == 0 && ob.tx.capacity() > 0 {
                ob.tx = TxBuf::default();
                self.outbox.note_queued(&mut ob);
            }
        }
        self.outbox
            .budget()
            .recharge(&mut self.tx_charged, self.tx.capacity());
    }

    /// The server's memory budget (to wait for room in it).
    pub(crate) fn budget(&self) -> &Arc<Budget> {
        self.outbox.budget()
    }

    /// The core's next deadline.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.conn.poll_timeout()
    }

    /// Whether the receive buffer was given back (or never taken): waiting for input then needs
    /// no buffer.
    pub(crate) fn holds_no_receive_buffer(&self) -> bool {
        self.rx.is_released()
    }

    /// Whether a buffer holds memory and nothing waiting in it. (The outbox holds a transmit
    /// buffer only after one was swapped out of the queue, which then holds one too.)
    fn holds_idle_buffers(&self) -> bool {
        self.rx.is_idle() || (self.tx.waiting() == 0 && self.tx.capacity() > 0)
    }

    /// The deadline to wait for input until, for the async runtimes: the core's, or earlier
    /// the moment a quiet connection gives its buffers back ([`LINGER`] after it started
    /// waiting), so a busy connection keeps them and an idle one holds almost no memory.
    pub(crate) fn wait_deadline(&mut self, now: Instant) -> Option<Instant> {
        let core = self.deadline();
        if !self.holds_idle_buffers() {
            self.linger_until = None;
            return core;
        }
        let linger = *self.linger_until.get_or_insert(now.saturating_add(LINGER));
        Some(core.map_or(linger, |d| d.min(linger)))
    }

    /// Fires the timers due at `now`: gives back lingering buffers, then the core's; `true`
    /// means close.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> bool {
        if self.linger_until.is_some_and(|t| t <= now) {
            self.linger_until = None;
            self.release_idle();
        }
        self.deadline().is_some_and(|d| d <= now) && self.conn.handle_timeout(now)
    }

    /// Whether everything read has been answered and written: a stopping connection may close.
    pub(crate) fn drained(&self) -> bool {
        self.conn.in_flight() == 0 && self.tx.waiting() == 0
    }

    /// A handle that polls for completed replies without borrowing the session.
    pub(crate) fn replies(&self) -> Arc<OutboxCell> {
        Arc::clone(&self.outbox)
    }

    /// Moves completed replies from the outbox to the transmit queue.
    /// Moves completed replies from the outbox to the transmit queue; `false` if there were
    /// none.
    fn collect(&mut self) -> bool {
        let answered = {
            let mut ob = self.outbox.lock();
            // The connection is running: a reply completed from now on (most often right away,
            // inside `handle`) needs no wake; it registers again before it waits.
            ob.waker = None;
            if ob.answered == 0 {
                return false;
            }
            self.tx.take_from(&mut ob.tx);
            self.outbox.note_queued(&mut ob);
            std::mem::take(&mut ob.answered)
        };
        // Replies are owed whatever the budget says; what they take counts against reading.
        self.outbox
            .budget()
            .recharge(&mut self.tx_charged, self.tx.capacity());
        for _ in 0..answered {
            self.conn.complete(0);
        }
        true
    }

    /// Takes completed replies, then decodes and hands out every whole request in the receive
    /// buffer, and says what the runtime must do next. Replies are taken from the outbox before
    /// and after (one lock each), not per request: the core counts a reply completed inside
    /// `handle` as in flight until then, which at worst stops the loop at `max_in_flight` for
    /// one more collection.
    pub(crate) fn process<H: Handler + ?Sized>(&mut self, now: Instant, handler: &H) -> Next {
        self.collect();
        let next = self.process_requests(now, handler);
        self.collect();
        next
    }

    fn process_requests<H: Handler + ?Sized>(&mut self, now: Instant, handler: &H) -> Next {
        loop {
            self.follow_handler();
            // Output waits: write it before taking more requests, past 4 MiB a connection, or
            // past its 8 KiB allowance once the server's memory budget is spent (replies are
            // owed whatever the budget says, so they bound what a connection may start).
            let cap = if self.budget().is_spent() {
                ALLOWANCE as u64
            } else {
                TX_HIGH_WATER
            };
            if self.tx.waiting() + self.outbox.queued() > cap {
                self.collect();
                return Next::Flush;
            }
            let Self {
                conn,
                rx,
                tx,
                outbox,
                ..
            } = self;
            let unread = rx.unread();
            match conn.poll_request(now, unread) {
                ServerEvent::Request {
                    consumed,
                    request_id,
                    flags,
                    request,
                } => {
                    let reply = Reply::new(request_id, Arc::clone(outbox));
                    if handler.blocks(&request) {
                        let frame = unread[..consumed].to_vec();
                        rx.consume(consumed);
                        return Next::Offload(Box::new(Job {
                            frame,
                            flags,
                            reply,
                        }));
                    }
                    handler.handle(flags, &request, reply);
                    rx.consume(consumed);
                }
                ServerEvent::Reply {
                    consumed,
                    request_id,
                    error,
                } => {
                    tracing::debug!(request_id, %error, "answering a bad frame");
                    handler.on_event(ConnEvent::Fault(error.error_code()));
                    let sent = tx.append(FAULT_GUESS, |buf| {
                        encode_fault_response(request_id, &error, buf)
                    });
                    if sent.is_ok() {
                        conn.complete(request_id);
                    }
                    rx.consume(consumed);
                }
                ServerEvent::NeedMore { frame_len, .. } => {
                    rx.expect(frame_len.unwrap_or(0));
                    return Next::Read;
                }
                ServerEvent::Blocked => {
                    if !self.collect() {
                        return Next::Wait;
                    }
                }
                ServerEvent::Close { reply } => {
                    if let Some((request_id, error)) = reply {
                        tracing::debug!(request_id, %error, "closing after a fatal frame error");
                        handler.on_event(ConnEvent::Fault(error.error_code()));
                        let _ = tx.append(FAULT_GUESS, |buf| {
                            encode_fault_response(request_id, &error, buf)
                        });
                    }
                    return Next::Close;
                }
                _ => return Next::Close,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::receive::FIRST_CHUNK;
    use super::*;

    struct Nobody;

    impl Handler for Nobody {
        fn handle(&self, _: Flags, _: &Request<'_>, reply: Reply) {
            reply.error(
                streambus_core::ErrorCode::INVALID_REQUEST,
                format_args!("no"),
            );
        }
    }

    /// A quiet connection keeps its buffers for [`LINGER`], then gives them back and waits
    /// for the core's deadline alone.
    /// A Produce frame of one message of `value_len` bytes, encoded by the core.
    fn produce_frame(value_len: usize) -> Vec<u8> {
        use streambus_core::{
            Encode, Message, MessageSetBuilder, ProduceRequest, Topic, encode_request,
            request_encoded_len,
        };
        let value = vec![7u8; value_len];
        let message = Message::new(b"", &value);
        let mut set = vec![0u8; message.encoded_len()];
        let mut b = MessageSetBuilder::new(&mut set);
        b.push(&message).unwrap();
        let request = Request::Produce(ProduceRequest {
            topic: Topic::new("t").unwrap(),
            partition: 0,
            messages: b.finish(),
            producer: None,
        });
        let mut frame = vec![0u8; request_encoded_len(&request)];
        encode_request(1, Flags::NONE, &request, &mut frame).unwrap();
        frame
    }

    fn peer() -> Peer {
        Peer::new(std::net::SocketAddr::from(([127, 0, 0, 1], 1)))
    }

    #[test]
    fn buffers_linger_then_go_back() {
        let t0 = Instant::from_millis(0);
        let mut s = Session::new(
            ServerConfig::default(),
            t0,
            Arc::new(Budget::new(usize::MAX)),
            peer(),
        );
        let idle = s.deadline().expect("the idle timer runs");
        assert!(s.prepare_read());
        assert!(s.read_buf().len() >= FIRST_CHUNK);
        s.filled(0);
        let linger = t0.saturating_add(LINGER);
        assert_eq!(s.wait_deadline(t0), Some(linger));
        // Woken early (not by the timer): the same linger deadline stands.
        let t1 = Instant::from_micros(500);
        assert_eq!(s.wait_deadline(t1), Some(linger));
        assert!(!s.handle_timeout(t1));
        assert!(!s.rx.is_released(), "released before the linger ran out");
        assert!(!s.handle_timeout(linger));
        assert!(s.rx.is_released(), "buffers kept past the linger");
        assert_eq!(s.wait_deadline(linger), Some(idle));
        // A buffer holding part of a frame is never given back: the core's timers rule.
        assert!(s.prepare_read());
        s.read_buf()[0] = 0;
        s.filled(1);
        let t2 = Instant::from_millis(10);
        assert_eq!(s.wait_deadline(t2), s.deadline());
        assert!(!s.handle_timeout(t2.saturating_add(LINGER)));
        assert!(!s.rx.is_released());
    }

    /// A peer that sends only the first 16 bytes of a 10 MB frame gets a buffer sized by what
    /// it sent, not by what the Length claims; real bytes grow it.
    #[test]
    fn a_length_alone_does_not_buy_its_frame_buffer() {
        let frame = produce_frame(9_999_000);
        let t = Instant::from_millis(0);
        let mut s = Session::new(
            ServerConfig::default(),
            t,
            Arc::new(Budget::new(usize::MAX)),
            peer(),
        );
        assert!(s.prepare_read());
        s.read_buf()[..16].copy_from_slice(&frame[..16]);
        s.filled(16);
        assert!(matches!(s.process(t, &Nobody), Next::Read));
        assert!(s.prepare_read());
        let first = s.read_buf().len();
        assert!(
            first <= 2 * FIRST_CHUNK,
            "offered {first} bytes for 16 received"
        );
        // As the body arrives, the offers grow with it.
        let mut received = 16;
        while received < 1 << 20 {
            assert!(s.prepare_read());
            let buf = s.read_buf();
            let n = buf.len();
            buf.copy_from_slice(&frame[received..received + n]);
            received += n;
            s.filled(n);
            assert!(matches!(s.process(t, &Nobody), Next::Read));
        }
        assert!(s.prepare_read());
        assert!(s.read_buf().len() >= 1 << 20, "reads stay small");
        assert!(
            s.rx.len() <= 4 << 20,
            "buffer {} for {received} bytes",
            s.rx.len()
        );
    }

    /// A spent budget stops a connection growing its receive buffer (it reads no more), while
    /// another connection's small requests still get their allowance; everything is given back
    /// when the connections go.
    #[test]
    fn a_spent_budget_stops_growth_but_not_small_requests() {
        let budget = Arc::new(Budget::new(64 * 1024));
        let t = Instant::from_millis(0);
        let mut big = Session::new(ServerConfig::default(), t, budget.clone(), peer());
        // A 1 MiB frame arriving: the buffer grows with what arrives until the budget is spent.
        let frame = produce_frame(1 << 20);
        let mut received = 0;
        let mut starved = false;
        for _ in 0..64 {
            if !big.prepare_read() {
                starved = true;
                break;
            }
            let buf = big.read_buf();
            let n = buf.len().min(frame.len() - received);
            buf[..n].copy_from_slice(&frame[received..received + n]);
            received += n;
            big.filled(n);
            assert!(matches!(big.process(t, &Nobody), Next::Read));
        }
        assert!(starved, "read {received} bytes past a 64 KiB budget");
        assert!(budget.used() <= 64 * 1024, "{} bytes taken", budget.used());
        let mut small = Session::new(ServerConfig::default(), t, budget.clone(), peer());
        assert!(small.prepare_read(), "a new connection gets its allowance");
        drop(big);
        drop(small);
        assert_eq!(budget.used(), 0);
    }
}
