//! The three adapters over real sockets with a minimal handler (no storage): framing faults,
//! pipelining, limits and shutdown behave the same on every runtime.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use streambus_adapters::{ConnEvent, Handler, Reply, ServeOptions};
use streambus_core::{
    CreateTopicRequest, CreateTopicResponse, ErrorCode, Flags, HealthCheckResponse, Request,
    RequestType, Response, ServerConfig, Text, Topic,
};
use streambus_tests::{RUNTIMES, RawClient, Runtime, serve};

#[derive(Default)]
struct Ping {
    refused: AtomicUsize,
    accepted: AtomicUsize,
    closed: AtomicUsize,
}

impl Handler for Ping {
    fn handle(&self, _flags: Flags, request: &Request<'_>, reply: Reply) {
        match request {
            Request::HealthCheck => reply.respond(&Response::HealthCheck(HealthCheckResponse {
                status: Text(b"healthy"),
                uptime_secs: 0,
            })),
            Request::CreateTopic(c) => reply.respond(&Response::CreateTopic(CreateTopicResponse {
                topic: c.topic,
                created: true,
            })),
            other => reply.error(
                ErrorCode::INVALID_REQUEST,
                format_args!("not here: {:?}", other.request_type()),
            ),
        }
    }

    fn on_event(&self, event: ConnEvent) {
        match event {
            ConnEvent::Refused => {
                self.refused.fetch_add(1, Ordering::SeqCst);
            }
            ConnEvent::Accepted => {
                self.accepted.fetch_add(1, Ordering::SeqCst);
            }
            ConnEvent::Closed => {
                self.closed.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

fn options() -> ServeOptions {
    let mut c = ServerConfig::default();
    c.max_frame_len(64 * 1024)
        .read_timeout(Duration::from_millis(300));
    ServeOptions::default()
        .connection(c)
        .max_connections(8)
        .shutdown_grace(Duration::from_secs(2))
}

fn healthy(c: &mut RawClient) {
    let r = c.call(&Request::HealthCheck).unwrap();
    assert!(
        matches!(r.parse(RequestType::HealthCheck).unwrap(), Response::HealthCheck(h) if h.status == Text(b"healthy"))
    );
}

fn each_runtime(test: impl Fn(Runtime)) {
    for rt in RUNTIMES {
        test(rt);
    }
}

#[test]
fn health_check_and_pipelining() {
    each_runtime(|rt| {
        let server = serve(rt, Arc::new(Ping::default()), options());
        let mut c = RawClient::connect(server.addr).unwrap();
        healthy(&mut c);
        // 1000 pipelined requests in one write, answered once each.
        let mut batch = Vec::new();
        let mut ids = Vec::new();
        for i in 0..1000 {
            let name = format!("t{i}");
            let req = Request::CreateTopic(CreateTopicRequest {
                topic: Topic::new(&name).unwrap(),
                num_partitions: 1,
                replication_factor: 1,
            });
            let (id, bytes) = c.encode(&req);
            ids.push(id);
            batch.extend_from_slice(&bytes);
        }
        c.send_raw(&batch).unwrap();
        let mut got: Vec<u64> = (0..1000).map(|_| c.recv().unwrap().request_id()).collect();
        got.sort_unstable();
        assert_eq!(got, ids, "{rt:?}");
        healthy(&mut c);
    });
}

#[test]
fn bad_crc_is_answered_and_the_connection_survives() {
    each_runtime(|rt| {
        let server = serve(rt, Arc::new(Ping::default()), options());
        let mut c = RawClient::connect(server.addr).unwrap();
        let (id, mut bytes) = c.encode(&Request::HealthCheck);
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        c.send_raw(&bytes).unwrap();
        let r = c.recv().unwrap();
        assert_eq!(
            (r.request_id(), r.error_code()),
            (id, ErrorCode::CHECKSUM_MISMATCH.0),
            "{rt:?}"
        );
        healthy(&mut c);
    });
}

#[test]
fn three_crc_faults_in_a_row_close_the_connection() {
    each_runtime(|rt| {
        let server = serve(rt, Arc::new(Ping::default()), options());
        let mut c = RawClient::connect(server.addr).unwrap();
        for _ in 0..3 {
            let (_, mut bytes) = c.encode(&Request::HealthCheck);
            bytes[5] ^= 1;
            c.send_raw(&bytes).unwrap();
            assert_eq!(
                c.recv().unwrap().error_code(),
                ErrorCode::CHECKSUM_MISMATCH.0
            );
        }
        assert!(c.is_closed_by_peer(), "{rt:?}");
    });
}

#[test]
fn oversized_frame_gets_an_error_then_close() {
    each_runtime(|rt| {
        let server = serve(rt, Arc::new(Ping::default()), options());
        let mut c = RawClient::connect(server.addr).unwrap();
        let mut header = (64 * 1024 + 1u32).to_be_bytes().to_vec();
        header.extend_from_slice(&42u64.to_be_bytes());
        c.send_raw(&header).unwrap();
        let r = c.recv().unwrap();
        assert_eq!(
            (r.request_id(), r.error_code()),
            (42, ErrorCode::MESSAGE_TOO_LARGE.0),
            "{rt:?}"
        );
        assert!(c.is_closed_by_peer());
        // Other connections are unaffected.
        healthy(&mut RawClient::connect(server.addr).unwrap());
    });
}

#[test]
fn garbage_unknown_type_and_short_length() {
    each_runtime(|rt| {
        let server = serve(rt, Arc::new(Ping::default()), options());
        // Unknown type in an intact frame: answered, connection stays.
        let mut c = RawClient::connect(server.addr).unwrap();
        let (_, mut bytes) = c.encode(&Request::HealthCheck);
        bytes[12] = 0x42;
        // Fix the CRC for the changed type byte.
        let crc = streambus_core::checksum::checksum(&bytes[4..bytes.len() - 4]);
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&crc.to_be_bytes());
        c.send_raw(&bytes).unwrap();
        assert_eq!(
            c.recv().unwrap().error_code(),
            ErrorCode::UNKNOWN_REQUEST.0,
            "{rt:?}"
        );
        healthy(&mut c);
        // Length below 16: InvalidProtocol with id 0, then close.
        let mut g = RawClient::connect(server.addr).unwrap();
        g.send_raw(&[0, 0, 0, 3, 0xde, 0xad, 0xbe, 0xef]).unwrap();
        let r = g.recv().unwrap();
        assert_eq!(
            (r.request_id(), r.error_code()),
            (0, ErrorCode::INVALID_PROTOCOL.0)
        );
        assert!(g.is_closed_by_peer());
        // A truncated frame, then silence: closed at the read timeout (300 ms here).
        let mut t = RawClient::connect(server.addr).unwrap();
        t.send_raw(&bytes[..10]).unwrap();
        assert!(t.is_closed_by_peer(), "{rt:?}");
        healthy(&mut c);
    });
}

#[test]
fn over_the_connection_cap_is_closed_at_once() {
    each_runtime(|rt| {
        let ping = Arc::new(Ping::default());
        let server = serve(rt, ping.clone(), options());
        let mut held: Vec<RawClient> = (0..8)
            .map(|_| RawClient::connect(server.addr).unwrap())
            .collect();
        for c in &mut held {
            healthy(c);
        }
        let mut extra = RawClient::connect(server.addr).unwrap();
        let _ = extra.send_raw(&[0]);
        assert!(extra.is_closed_by_peer(), "{rt:?}");
        assert!(ping.refused.load(Ordering::SeqCst) >= 1);
        drop(held);
    });
}

#[test]
fn shutdown_answers_what_was_read() {
    each_runtime(|rt| {
        let server = serve(rt, Arc::new(Ping::default()), options());
        let mut c = RawClient::connect(server.addr).unwrap();
        healthy(&mut c);
        server.stop();
        // The connection is closed after shutdown.
        assert!(
            c.is_closed_by_peer() || c.send(&Request::HealthCheck).is_err() || c.recv().is_err(),
            "{rt:?}"
        );
        let _ = std::io::stdout().flush();
    });
}

/// Stopping wakes the connections that wait with nothing to do (accepted, nothing sent: no
/// timer but the 10-minute idle one runs): each closes with a FIN and is counted closed by the
/// time the server has stopped. A connection left waiting would be cancelled at the grace
/// period instead, and never counted closed.
#[test]
fn stopping_closes_every_idle_connection_itself() {
    each_runtime(|rt| {
        let ping = Arc::new(Ping::default());
        let server = serve(rt, Arc::clone(&ping), options());
        let mut conns: Vec<RawClient> = (0..5)
            .map(|_| RawClient::connect(server.addr).unwrap())
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ping.accepted.load(Ordering::SeqCst) < 5 {
            assert!(std::time::Instant::now() < deadline, "{rt:?}: not accepted");
            std::thread::yield_now();
        }
        server.stop();
        assert_eq!(ping.closed.load(Ordering::SeqCst), 5, "{rt:?}");
        for c in &mut conns {
            assert!(c.is_closed_by_peer(), "{rt:?}");
        }
    });
}

/// Answers every HealthCheck with a 1 MiB status, to fill socket buffers quickly.
#[derive(Default)]
struct Big {
    closed: AtomicUsize,
    /// When the first connection closed.
    closed_at: std::sync::OnceLock<std::time::Instant>,
    /// When bytes were last written.
    last_out: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Handler for Big {
    fn handle(&self, _flags: Flags, _request: &Request<'_>, reply: Reply) {
        static STATUS: [u8; 1 << 20] = [b'x'; 1 << 20];
        reply.respond(&Response::HealthCheck(HealthCheckResponse {
            status: Text(&STATUS),
            uptime_secs: 0,
        }));
    }

    fn on_event(&self, event: ConnEvent) {
        match event {
            ConnEvent::Closed => {
                let _ = self.closed_at.set(std::time::Instant::now());
                self.closed.fetch_add(1, Ordering::SeqCst);
            }
            ConnEvent::BytesOut(_) => {
                *self.last_out.lock().unwrap() = Some(std::time::Instant::now());
            }
            _ => {}
        }
    }
}

#[test]
fn a_client_that_never_reads_is_closed_at_the_write_timeout() {
    each_runtime(|rt| {
        let big = Arc::new(Big::default());
        let timeout = Duration::from_secs(1);
        let server = serve(rt, big.clone(), options().write_timeout(timeout));
        let mut c = RawClient::connect(server.addr).unwrap();
        // 64 requests = 64 MiB of replies, far beyond what socket buffers and the 4 MiB
        // transmit high-water mark hold; the client never reads.
        let mut burst = Vec::new();
        for _ in 0..64 {
            burst.extend_from_slice(&c.encode(&Request::HealthCheck).1);
        }
        let sent = std::time::Instant::now();
        c.send_raw(&burst).unwrap();
        let deadline = sent + Duration::from_secs(10);
        while big.closed.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{rt:?}: connection still open"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // One deadline for the stalled write, not one per write call: the connection closes
        // at most one timeout after its last progress (a deadline per call closed it 3.3
        // timeouts after, on blocking), and never before one timeout.
        let closed_at = *big.closed_at.get().unwrap();
        let last_out = big.last_out.lock().unwrap().expect("some bytes went out");
        let stalled = closed_at.duration_since(last_out);
        assert!(
            closed_at.duration_since(sent) >= timeout
                && stalled <= timeout + Duration::from_millis(500),
            "{rt:?}: closed {:?} after the burst, {stalled:?} after the last bytes out; write timeout {timeout:?}",
            closed_at.duration_since(sent)
        );
        // The server is still fine for others.
        let ping = RawClient::connect(server.addr);
        assert!(ping.is_ok());
    });
}

#[test]
fn bytes_trickling_in_do_not_outlast_the_idle_timeout() {
    each_runtime(|rt| {
        let mut c = ServerConfig::default();
        c.max_frame_len(64 * 1024)
            .read_timeout(Duration::from_secs(5))
            .idle_timeout(Duration::from_secs(1));
        let server = serve(rt, Arc::new(Ping::default()), options().connection(c));
        let mut s = std::net::TcpStream::connect(server.addr).unwrap();
        s.set_nodelay(true).unwrap();
        // A 60 000-byte frame, one byte every 200 µs: new bytes keep arriving well within the
        // read timeout, but the frame would take 12 s, past the 1 s idle timeout.
        s.write_all(&60_000u32.to_be_bytes()).unwrap();
        let start = std::time::Instant::now();
        let closed = loop {
            let t = std::time::Instant::now();
            while t.elapsed() < Duration::from_micros(200) {
                std::hint::spin_loop();
            }
            if s.write_all(&[0]).is_err() {
                break start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(6),
                "{rt:?}: still open"
            );
        };
        assert!(
            closed >= Duration::from_millis(900),
            "{rt:?}: closed at {closed:?}"
        );
    });
}
