//! `streambus-bench`: a load generator for a running broker, printing `hdrhistogram`
//! percentiles. Each mode opens its own connections on 127.0.0.1 (or the given address), runs
//! for a bounded time or count, and stops by itself.
//!
//! ```text
//! streambus-bench pingpong            # raw TCP ping-pong with Produce-sized frames (the floor)
//! streambus-bench sync                # one Produce of one 100-byte message in flight
//! streambus-bench pipelined           # many Produces of 100 × 100 B in flight on one connection
//! streambus-bench fetch               # 1 MiB fetches on one connection
//! streambus-bench connections -n 1000 --server-pid PID   # hold N connections, report RSS/conn
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use streambus_core::{
    CreateTopicRequest, FetchRequest, MessageSet, ProduceRequest, Request, RequestType, Response,
    ResponseFrame, Topic,
};
use streambus_tests::{RawClient, message_set};

#[derive(Parser)]
#[command(about = "StreamBus load generator")]
struct Args {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:9092", global = true)]
    addr: SocketAddr,
    /// How long each timed mode runs.
    #[arg(long, default_value = "5s", value_parser = humantime_secs, global = true)]
    duration: Duration,
    #[command(subcommand)]
    mode: Mode,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration unit in {s:?}")),
    }
}

#[derive(Subcommand)]
enum Mode {
    /// Raw TCP ping-pong between two threads of this process, with the byte sizes of a
    /// one-message Produce and its reply: the floor for `sync`.
    Pingpong,
    /// Produce one 100-byte message at a time, one request in flight.
    Sync,
    /// Pipelined Produce on one connection.
    Pipelined {
        /// Messages per request.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Requests in flight.
        #[arg(long, default_value_t = 64)]
        window: usize,
    },
    /// Fetch on one connection (fills the topic first with 64 MiB of 1 KiB values).
    Fetch {
        /// MaxBytes per fetch.
        #[arg(long, default_value_t = 1 << 20)]
        max_bytes: u32,
        /// Values per Produce batch when filling (stored batches keep this size).
        #[arg(long, default_value_t = 100)]
        fill_batch: usize,
    },
    /// Open N connections, one request each, hold them, and report the server's RSS.
    Connections {
        /// Connections to open.
        #[arg(short, default_value_t = 1000)]
        n: usize,
        /// The broker's pid, to read its RSS from /proc.
        #[arg(long)]
        server_pid: Option<u32>,
        /// Source addresses to spread connections over (127.0.0.x), for more than ~20 000.
        #[arg(long, default_value_t = 1)]
        sources: u8,
    },
}

const VALUE: [u8; 100] = [b'x'; 100];

fn print_hist(name: &str, h: &Histogram<u64>) {
    println!(
        "{name}: n={} p50={:.1}µs p90={:.1}µs p99={:.1}µs p99.9={:.1}µs max={:.1}µs",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.9) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.value_at_quantile(0.999) as f64 / 1e3,
        h.max() as f64 / 1e3
    );
}

fn produce_frame(c: &mut RawClient, topic: &str, values: &[&[u8]]) -> Vec<u8> {
    let (count, bytes) = message_set(values);
    let messages = MessageSet::new_checked(count, &bytes).expect("set");
    let req = Request::Produce(ProduceRequest {
        topic: Topic::new(topic).expect("topic"),
        partition: 0,
        messages,
        producer: None,
    });
    c.encode(&req).1
}

/// The error code of a response frame (0 on success).
fn error_code(frame: &[u8]) -> u16 {
    ResponseFrame::new_checked(frame)
        .expect("the broker sent a bad frame")
        .error_code()
        .0
}

fn pingpong(duration: Duration) {
    // Same sizes as `sync`: request frame of a 1 × 100 B Produce to "bench", reply of 35 B.
    let mut probe = RawClient::connect_lazy();
    let req_len = produce_frame(&mut probe, "bench", &[&VALUE]).len();
    let resp_len = 35;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut buf = vec![0u8; req_len];
        let reply = vec![0u8; resp_len];
        while s.read_exact(&mut buf).is_ok() {
            if s.write_all(&reply).is_err() {
                break;
            }
        }
    });
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let req = vec![1u8; req_len];
    let mut resp = vec![0u8; resp_len];
    let mut h = Histogram::<u64>::new(3).expect("hist");
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let t = Instant::now();
        c.write_all(&req).expect("write");
        c.read_exact(&mut resp).expect("read");
        h.record(t.elapsed().as_nanos() as u64).expect("record");
    }
    drop(c);
    server.join().expect("server");
    print_hist(&format!("pingpong ({req_len} B / {resp_len} B)"), &h);
}

fn sync(addr: SocketAddr, duration: Duration) {
    let mut c = RawClient::connect(addr).expect("connect");
    let frame = produce_frame(&mut c, "bench-sync", &[&VALUE]);
    let mut h = Histogram::<u64>::new(3).expect("hist");
    // Warm up (auto-creates the topic).
    for _ in 0..100 {
        c.send_raw(&frame).expect("send");
        c.recv().expect("recv");
    }
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let t = Instant::now();
        c.send_raw(&frame).expect("send");
        let r = c.recv_frame().expect("recv");
        h.record(t.elapsed().as_nanos() as u64).expect("record");
        assert_eq!(error_code(r), 0, "produce failed");
    }
    print_hist("sync produce (1 × 100 B)", &h);
}

fn pipelined(addr: SocketAddr, duration: Duration, batch: usize, window: usize) {
    let mut c = RawClient::connect(addr).expect("connect");
    let values: Vec<&[u8]> = vec![&VALUE; batch];
    let frame = produce_frame(&mut c, "bench-pipe", &values);
    c.send_raw(&frame).expect("send");
    c.recv().expect("recv");
    let mut in_flight = 0;
    let mut acked = 0u64;
    let start = Instant::now();
    let end = start + duration;
    let mut burst = Vec::new();
    for _ in 0..window {
        burst.extend_from_slice(&frame);
    }
    c.send_raw(&burst).expect("send");
    in_flight += window;
    while in_flight > 0 {
        let r = c.recv_frame().expect("recv");
        assert_eq!(error_code(r), 0, "produce failed");
        acked += batch as u64;
        in_flight -= 1;
        if Instant::now() < end {
            c.send_raw(&frame).expect("send");
            in_flight += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "pipelined produce: {acked} messages acknowledged in {secs:.2}s = {:.2} M msg/s ({:.0} MB/s of values), batch {batch}, window {window}",
        acked as f64 / secs / 1e6,
        acked as f64 * 100.0 / secs / 1e6
    );
}

fn fetch_mode(addr: SocketAddr, duration: Duration, max_bytes: u32, fill_batch: usize) {
    let mut c = RawClient::connect(addr).expect("connect");
    let topic = "bench-fetch";
    let _ = c.call(&Request::CreateTopic(CreateTopicRequest {
        topic: Topic::new(topic).expect("t"),
        num_partitions: 1,
        replication_factor: 1,
    }));
    // Fill 64 MiB of 1 KiB values, `fill_batch` per Produce.
    let value = [b'v'; 1024];
    let fill_batch = fill_batch.clamp(1, 8000);
    let values: Vec<&[u8]> = vec![&value; fill_batch];
    let frame = produce_frame(&mut c, topic, &values);
    for _ in 0..(64 * 1024usize).div_ceil(fill_batch) {
        c.send_raw(&frame).expect("send");
        c.recv_frame().expect("recv");
    }
    let mut h = Histogram::<u64>::new(3).expect("hist");
    let (mut bytes, mut offset) = (0u64, 0i64);
    let start = Instant::now();
    let end = start + duration;
    while Instant::now() < end {
        let t = Instant::now();
        c.send(&Request::Fetch(FetchRequest {
            topic: Topic::new(topic).expect("t"),
            partition: 0,
            offset,
            max_bytes,
            extension: None,
        }))
        .expect("send");
        let r = c.recv_frame().expect("fetch");
        h.record(t.elapsed().as_nanos() as u64).expect("record");
        bytes += r.len() as u64;
        let frame = ResponseFrame::new_checked(r).expect("frame");
        match Response::parse(&frame, RequestType::Fetch).expect("parse") {
            Response::Fetch(f) => {
                let next = f.trailer.map_or(offset, |t| t.next_offset);
                offset = if next >= f.high_water_mark { 0 } else { next };
            }
            other => panic!("fetch failed: {other:?}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fetch: {:.2} GB/s ({} fetches of up to {max_bytes} B)",
        bytes as f64 / secs / 1e9,
        h.len()
    );
    print_hist("fetch latency", &h);
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn connections(addr: SocketAddr, n: usize, server_pid: Option<u32>, sources: u8) {
    let before = server_pid.and_then(rss_kib);
    let mut held = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let src = std::net::Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(sources.max(1))) as u8);
        let sock = std::net::TcpStream::connect(addr)
            .or_else(|_| std::net::TcpStream::connect((src, addr.port())));
        let mut c = RawClient::from_stream(sock.expect("connect"));
        c.call(&Request::HealthCheck).expect("health");
        held.push(c);
    }
    let opened = start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let after = server_pid.and_then(rss_kib);
    println!(
        "connections: {n} open, each made one request, in {:.2}s",
        opened.as_secs_f64()
    );
    if let (Some(b), Some(a)) = (before, after) {
        println!(
            "server RSS: {b} KiB before, {a} KiB with {n} connections: {:.2} KiB ({:.0} B) per connection",
            (a.saturating_sub(b)) as f64 / n as f64,
            (a.saturating_sub(b)) as f64 * 1024.0 / n as f64
        );
    }
    drop(held);
}

fn main() {
    let args = Args::parse();
    match args.mode {
        Mode::Pingpong => pingpong(args.duration),
        Mode::Sync => sync(args.addr, args.duration),
        Mode::Pipelined { batch, window } => pipelined(args.addr, args.duration, batch, window),
        Mode::Fetch {
            max_bytes,
            fill_batch,
        } => fetch_mode(args.addr, args.duration, max_bytes, fill_batch),
        Mode::Connections {
            n,
            server_pid,
            sources,
        } => connections(args.addr, n, server_pid, sources),
    }
}
