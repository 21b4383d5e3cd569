//! What an idle connection costs the broker on the heap, counted exactly by a heap profiler
//! (dhat, in testing mode) instead of read from the resident size: the live bytes and
//! allocations before and after opening connections that each made one HealthCheck and went
//! quiet. The clients keep only their sockets, so what stays allocated is the broker's.
//!
//! The profiler counts every allocation of the process, so this binary holds this one test.

use std::time::{Duration, Instant};

use streambus_core::{Request, RequestType, Response};
use streambus_server::RuntimeKind;
use streambus_tests::RawClient;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Connections opened per runtime.
const CONNS: usize = 1000;

/// Opens `n` connections to `addr`, each answering one HealthCheck, and keeps their sockets.
fn idle_connections(addr: std::net::SocketAddr, n: usize) -> Vec<streambus_tests::tls::Conn> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = RawClient::connect(addr).unwrap();
        let reply = c.call(&Request::HealthCheck).unwrap();
        assert!(matches!(
            reply.parse(RequestType::HealthCheck),
            Ok(Response::HealthCheck(_))
        ));
        held.push(c.into_conn().unwrap());
    }
    held
}

/// The broker's live heap bytes and allocations per idle connection on `rt`, once every
/// connection has given its buffers back (within `bytes_bound`: waits up to 5 s for that).
fn per_connection(rt: RuntimeKind, bytes_bound: usize) -> (usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let broker = streambus_tests::start_broker(dir.path(), rt);
    // What the runtime and broker make on their first connections is not per connection.
    let warm = idle_connections(broker.addr(), 10);
    let mut conns = Vec::with_capacity(CONNS);
    let before = dhat::HeapStats::get();
    conns.extend(idle_connections(broker.addr(), CONNS));
    // A connection keeps its buffers for 2 ms after its reply, then gives them back.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (bytes, allocs) = loop {
        let now = dhat::HeapStats::get();
        let bytes = now.curr_bytes.saturating_sub(before.curr_bytes) / CONNS;
        // To the nearest whole allocation: a few of the broker's other blocks come and go.
        let allocs = (now.curr_blocks.saturating_sub(before.curr_blocks) + CONNS / 2) / CONNS;
        if bytes <= bytes_bound || Instant::now() > deadline {
            break (bytes, allocs);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("{rt:?}: {bytes} B in {allocs} allocations per idle connection");
    drop(conns);
    drop(warm);
    drop(broker);
    (bytes, allocs)
}

/// An idle connection holds three allocations of the broker: its task (whose future holds
/// the socket and the session), the reactor's registration of its socket, and the outbox its
/// replies write into. No buffer stays: the receive and transmit buffers go back once the
/// connection is quiet. (Measured in a release build: tokio 1 334 B, smol 1 195 B, including
/// the server's lists of connections; a debug build's futures are slightly larger.)
#[test]
fn an_idle_connection_holds_three_allocations_and_no_buffer() {
    let _profiler = dhat::Profiler::builder().testing().build();
    for (rt, bytes_bound) in [(RuntimeKind::Tokio, 1400), (RuntimeKind::Smol, 1300)] {
        let (bytes, allocs) = per_connection(rt, bytes_bound);
        assert!(
            bytes <= bytes_bound,
            "{rt:?}: {bytes} B per idle connection"
        );
        assert_eq!(allocs, 3, "{rt:?}: allocations per idle connection");
    }
}
