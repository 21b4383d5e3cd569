//! Deferred replies on every runtime, with a handler that keeps its replies: they go out in the
//! order they complete with the right RequestIDs, a full in-flight table stops reading, a
//! dropped reply still answers, and shutdown answers what waits before connections close.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use streambus_adapters::{Handler, Reply, ServeOptions};
use streambus_core::{
    CreateTopicRequest, ErrorCode, Flags, HealthCheckResponse, Request, RequestType, Response,
    ServerConfig, Text, Topic,
};
use streambus_tests::{RUNTIMES, RawClient, Runtime, serve};

/// Keeps every HealthCheck's reply until the test completes it; drops a CreateTopic's reply
/// unanswered; answers on shutdown whatever it still holds.
#[derive(Default)]
struct Keeper {
    held: Mutex<Vec<Reply>>,
    /// Requests handed in, and the most that waited at once.
    handled: AtomicUsize,
    answered: AtomicUsize,
    max_waiting: AtomicUsize,
}

impl Keeper {
    fn answer(reply: Reply, uptime: i64) {
        reply.respond(&Response::HealthCheck(HealthCheckResponse {
            status: Text(b"later"),
            uptime_secs: uptime,
        }));
    }

    /// Waits until `n` replies are held (the connection read that many requests).
    fn wait_held(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.held.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "{} requests reached the handler, expected {n}",
                self.held.lock().unwrap().len()
            );
            std::thread::yield_now();
        }
    }

    /// Completes the held reply at `index` (its uptime field carries `index` back).
    fn complete(&self, index: usize) {
        let reply = self.held.lock().unwrap().remove(index);
        self.answered.fetch_add(1, Ordering::SeqCst);
        Self::answer(reply, index as i64);
    }
}

impl Handler for Keeper {
    fn handle(&self, _flags: Flags, request: &Request<'_>, reply: Reply) {
        let handled = self.handled.fetch_add(1, Ordering::SeqCst) + 1;
        let waiting = handled - self.answered.load(Ordering::SeqCst);
        self.max_waiting.fetch_max(waiting, Ordering::SeqCst);
        match request {
            Request::CreateTopic(_) => {
                self.answered.fetch_add(1, Ordering::SeqCst);
                drop(reply);
            }
            _ => self.held.lock().unwrap().push(reply),
        }
    }

    fn shutdown(&self) {
        for r in self.held.lock().unwrap().drain(..) {
            self.answered.fetch_add(1, Ordering::SeqCst);
            Self::answer(r, -1);
        }
    }
}

fn options(max_in_flight: usize) -> ServeOptions {
    let mut c = ServerConfig::default();
    c.max_in_flight(max_in_flight);
    ServeOptions::default()
        .connection(c)
        .max_connections(8)
        .shutdown_grace(Duration::from_secs(5))
}

fn each_runtime(f: impl Fn(Runtime)) {
    for rt in RUNTIMES {
        f(rt);
    }
}

/// The id and uptime of a HealthCheck reply.
fn health(c: &mut RawClient) -> (u64, i64) {
    let r = c.recv().unwrap();
    let Response::HealthCheck(h) = r.parse(RequestType::HealthCheck).unwrap() else {
        panic!("not a HealthCheck reply: code {}", r.error_code());
    };
    (r.request_id(), h.uptime_secs)
}

#[test]
fn replies_completed_out_of_order_go_out_in_completion_order_with_their_ids() {
    each_runtime(|rt| {
        let keeper = Arc::new(Keeper::default());
        let server = serve(rt, keeper.clone(), options(128));
        let mut c = RawClient::connect(server.addr).unwrap();
        let ids: Vec<u64> = (0..8)
            .map(|_| c.send(&Request::HealthCheck).unwrap())
            .collect();
        keeper.wait_held(8);
        // Complete the last one first, then the first, then the rest from the back.
        let order = [7usize, 0, 6, 5, 4, 3, 2, 1];
        for &k in &order {
            // Positions shift as replies leave `held`: find request k by its index among
            // those still held (they stay in arrival order).
            let still: Vec<usize> = (0..8).filter(|i| !done_before(&order, k, *i)).collect();
            let pos = still.iter().position(|&i| i == k).unwrap();
            keeper.complete(pos);
            let (id, _) = health(&mut c);
            assert_eq!(id, ids[k], "{rt:?}: reply for request #{k}");
        }
        assert_eq!(keeper.handled.load(Ordering::SeqCst), 8);
    });
}

/// Whether request `i` was completed before request `k` in `order`.
fn done_before(order: &[usize], k: usize, i: usize) -> bool {
    let at = |x| order.iter().position(|&o| o == x).unwrap();
    at(i) < at(k)
}

#[test]
fn a_full_in_flight_table_stops_reading_until_a_reply_completes() {
    each_runtime(|rt| {
        let keeper = Arc::new(Keeper::default());
        let server = serve(rt, keeper.clone(), options(4));
        let mut c = RawClient::connect(server.addr).unwrap();
        let ids: Vec<u64> = (0..10)
            .map(|_| c.send(&Request::HealthCheck).unwrap())
            .collect();
        keeper.wait_held(4);
        // One reply out: exactly one more request comes in, each time.
        for (k, &want) in ids.iter().enumerate().take(6) {
            keeper.complete(0);
            let (id, _) = health(&mut c);
            assert_eq!(id, want, "{rt:?}");
            keeper.wait_held(4);
            assert_eq!(keeper.handled.load(Ordering::SeqCst), 5 + k, "{rt:?}");
        }
        for &want in &ids[6..] {
            keeper.complete(0);
            assert_eq!(health(&mut c).0, want, "{rt:?}");
        }
        assert_eq!(keeper.handled.load(Ordering::SeqCst), 10);
        assert_eq!(
            keeper.max_waiting.load(Ordering::SeqCst),
            4,
            "{rt:?}: more than max_in_flight requests waited at once"
        );
    });
}

#[test]
fn a_reply_dropped_unanswered_answers_storage_error() {
    each_runtime(|rt| {
        let keeper = Arc::new(Keeper::default());
        let server = serve(rt, keeper.clone(), options(128));
        let mut c = RawClient::connect(server.addr).unwrap();
        let r = c
            .call(&Request::CreateTopic(CreateTopicRequest {
                topic: Topic::new("t").unwrap(),
                num_partitions: 1,
                replication_factor: 1,
            }))
            .unwrap();
        assert_eq!(r.error_code(), ErrorCode::STORAGE_ERROR.0, "{rt:?}");
        // The connection goes on.
        let id = c.send(&Request::HealthCheck).unwrap();
        keeper.wait_held(1);
        keeper.complete(0);
        assert_eq!(health(&mut c).0, id, "{rt:?}");
    });
}

#[test]
fn shutdown_answers_waiting_replies_then_closes_cleanly() {
    each_runtime(|rt| {
        let keeper = Arc::new(Keeper::default());
        let server = serve(rt, keeper.clone(), options(128));
        let mut c = RawClient::connect(server.addr).unwrap();
        let ids: Vec<u64> = (0..3)
            .map(|_| c.send(&Request::HealthCheck).unwrap())
            .collect();
        keeper.wait_held(3);
        let started = Instant::now();
        let stopper = std::thread::spawn(move || server.stop());
        let mut got: Vec<(u64, i64)> = (0..3).map(|_| health(&mut c)).collect();
        got.sort_unstable();
        assert_eq!(
            got,
            ids.iter().map(|&id| (id, -1)).collect::<Vec<_>>(),
            "{rt:?}: every waiting request answered by Handler::shutdown"
        );
        // Then a clean close (EOF), not a reset, well before the 5 s grace.
        assert!(c.is_closed_by_peer(), "{rt:?}");
        stopper.join().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{rt:?}: shutdown took {:?}",
            started.elapsed()
        );
    });
}
