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
//! streambus-bench health -n 20        # fresh connection + one HealthCheck, N times
//! streambus-bench longpoll            # produce → long-polling consumer latency, beside sync
//! streambus-bench requests --kind health   # 50 connections × 64 requests in flight
//! streambus-bench handshakes --threads 2    # fresh connections (full TLS handshakes with
//!                                           # --tls-ca) + one HealthCheck each, per second
//! streambus-bench producers -n 1000000 --server-pid PID  # N idempotent producers, broker RSS
//! ```
//!
//! With `--tls-ca FILE` (the CA of a broker serving TLS, whose certificate names `localhost`),
//! `sync`, `pipelined`, `fetch`, `longpoll` and `handshakes` connect over TLS.
//!
//! A broker that is down or fails a request ends the run with one line on stderr and exit
//! status 1, not a panic.

use std::fmt::Display;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use streambus_adapters::tls::rustls;
use streambus_core::{
    CreateTopicRequest, FetchExtension, FetchRequest, FrameDecoder, LongPoll, MessageSet,
    ProduceRequest, Request, RequestType, Response, ResponseFrame, Status, Topic,
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
    /// The broker's metrics endpoint (`--metrics-listen`), read by `pipelined` for fsyncs/s.
    #[arg(long, default_value = "127.0.0.1:9100", global = true)]
    metrics: SocketAddr,
    /// Connect over TLS, trusting this CA (PEM); the broker's certificate must name
    /// `localhost`.
    #[arg(long, global = true)]
    tls_ca: Option<std::path::PathBuf>,
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
    Sync {
        /// Idempotent produce (one producer, consecutive sequences; each request encoded
        /// anew, outside the timed round trip).
        #[arg(long)]
        idempotent: bool,
        /// Encode every request anew (outside the timed round trip), plain: the baseline
        /// for `--idempotent`.
        #[arg(long)]
        encode_each: bool,
    },
    /// Pipelined Produce on one connection.
    Pipelined {
        /// Messages per request.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Requests in flight.
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// Idempotent produce (protocol §6.2): one producer, consecutive sequences. Implies
        /// `--encode-each`.
        #[arg(long)]
        idempotent: bool,
        /// Encode every request anew (as `--idempotent` must), for a plain baseline with the
        /// same client cost.
        #[arg(long)]
        encode_each: bool,
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
        /// Source addresses to spread connections over: 127.0.0.FIRST to
        /// 127.0.0.(FIRST + SOURCES - 1), each connection bound to one before connecting (one
        /// source address and port range reach ~28 000 connections to one listener).
        #[arg(long, default_value_t = 1)]
        sources: u8,
        /// The first source address's last byte (see `--sources`).
        #[arg(long, default_value_t = 1)]
        first_source: u8,
        /// After reporting, hold the connections this long (until killed, for a script that
        /// measures the broker meanwhile); "ready" is printed once every one is open.
        #[arg(long, default_value = "0s", value_parser = humantime_secs)]
        hold: Duration,
    },
    /// Fresh connections, each with one HealthCheck, from `--threads` threads for
    /// `--duration`: connections (with `--tls-ca`, full TLS handshakes: no resumption) per
    /// second.
    Handshakes {
        /// Threads opening connections.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// The broker's pid: also report connections per second of the broker's CPU time
        /// (user + system, from /proc), i.e. on one core.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// N distinct idempotent producers (ids 1..=N), each sending one 1-message batch to one
    /// partition, pipelined on one connection: the broker's memory must stay bounded by
    /// `--max-producers-per-partition`, whatever N.
    Producers {
        /// Producers.
        #[arg(short, default_value_t = 1_000_000)]
        n: u64,
        /// Requests in flight.
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// The broker's pid, to read its RSS from /proc.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Fresh connections, one HealthCheck each: connect + round trip, N times in sequence.
    Health {
        /// Connections (one request each).
        #[arg(short, default_value_t = 20)]
        n: usize,
    },
    /// Open N connections that each send the first bytes of a huge frame and never finish it
    /// (a slow or hostile peer), as fast as the broker takes them, for `--duration`; report the
    /// broker's RSS and whether a fresh connection is still answered, and how fast.
    Trickle {
        /// Connections to open.
        #[arg(short, default_value_t = 2000)]
        n: usize,
        /// The Length each frame claims.
        #[arg(long, default_value_t = 10 << 20)]
        frame: u32,
        /// Bytes of it each connection sends.
        #[arg(long, default_value_t = 9 << 20)]
        send: usize,
        /// The broker's pid, to read its RSS from /proc.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Long-poll latency: a producer sends one 100-byte message at a time (waiting for each
    /// reply), a consumer on its own connection long-polls from the next offset; time from
    /// just before the send to the consumer holding the message. Rounds alternate with a sync
    /// Produce phase on a third connection, for the ratio in the same run.
    Longpoll {
        /// MaxWaitMs of each fetch (MinBytes is 1).
        #[arg(long, default_value_t = 1000)]
        max_wait_ms: u32,
        /// Pause between the consumer sending its fetch and the producer sending, so the fetch
        /// is waiting at the broker when the message arrives.
        #[arg(long, default_value = "1ms", value_parser = humantime_secs)]
        gap: Duration,
        /// Rounds of (sync phase, long-poll phase); `--duration` is shared among them, one
        /// third sync and two thirds long-poll.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// Many connections, each keeping requests in flight: requests/s in total.
    Requests {
        /// Connections, one thread each.
        #[arg(long, default_value_t = 50)]
        connections: usize,
        /// Requests in flight per connection.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// What each request is.
        #[arg(long, value_enum, default_value_t = Kind::Health)]
        kind: Kind,
    },
}

/// The request of `requests`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Kind {
    /// HealthCheck.
    Health,
    /// Produce of one 100-byte message.
    Produce,
}

const VALUE: [u8; 100] = [b'x'; 100];

/// Ends the run on a failure of the broker or the network: one line, exit status 1.
fn die(msg: impl Display) -> ! {
    eprintln!("streambus-bench: {msg}");
    std::process::exit(1)
}

/// The value, or [`die`] with what was being done.
fn or_die<T, E: Display>(r: Result<T, E>, what: impl Display) -> T {
    r.unwrap_or_else(|e| die(format_args!("{what}: {e}")))
}

/// CPU time (user + system) process `pid` has used, in seconds (`/proc/PID/stat` counts in
/// USER_HZ = 100 ticks per second).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The TLS configuration of `--tls-ca`, if given.
static TLS: std::sync::OnceLock<Option<Arc<rustls::ClientConfig>>> = std::sync::OnceLock::new();

fn connect(addr: SocketAddr) -> RawClient {
    let client = match TLS.get().cloned().flatten() {
        Some(config) => RawClient::connect_tls(addr, config),
        None => RawClient::connect(addr),
    };
    or_die(client, format_args!("connecting to the broker at {addr}"))
}

/// Fresh connections (full TLS handshakes with `--tls-ca`), one HealthCheck each, from
/// `threads` threads until `duration` has passed.
fn handshakes(addr: SocketAddr, duration: Duration, threads: usize, server_pid: Option<u32>) {
    let cpu_before = server_pid.and_then(cpu_secs);
    // No resumption: every connection pays a full handshake.
    let tls = TLS.get().cloned().flatten().map(|c| {
        let mut c = (*c).clone();
        c.resumption = rustls::client::Resumption::disabled();
        Arc::new(c)
    });
    let end = Instant::now() + duration;
    let start = Instant::now();
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let tls = tls.clone();
            std::thread::spawn(move || {
                let mut h = Histogram::<u64>::new(3).expect("hist");
                while Instant::now() < end {
                    let t = Instant::now();
                    let c = match &tls {
                        Some(config) => RawClient::connect_tls(addr, Arc::clone(config)),
                        None => RawClient::connect(addr),
                    };
                    let mut c = or_die(c, "a fresh connection");
                    let r = or_die(c.call(&Request::HealthCheck), "a HealthCheck");
                    if r.error_code() != 0 {
                        die(format_args!(
                            "HealthCheck failed with code {}",
                            r.error_code()
                        ));
                    }
                    h.record(t.elapsed().as_nanos() as u64).expect("record");
                }
                h
            })
        })
        .collect();
    let mut h = Histogram::<u64>::new(3).expect("hist");
    for w in workers {
        h.add(w.join().unwrap_or_else(|_| die("a worker panicked")))
            .expect("add");
    }
    let secs = start.elapsed().as_secs_f64();
    let per_core = match (cpu_before, server_pid.and_then(cpu_secs)) {
        (Some(b), Some(a)) if a > b => format!(
            "; the broker used {:.2} CPU-s: {}/s per core",
            a - b,
            si(h.len() as f64 / (a - b))
        ),
        _ => String::new(),
    };
    println!(
        "{}: {} connections in {secs:.2}s = {}/s from {threads} threads{per_core}",
        if tls.is_some() {
            "TLS handshakes"
        } else {
            "plaintext connections"
        },
        h.len(),
        si(h.len() as f64 / secs)
    );
    print_hist("connect + handshake + HealthCheck", &h);
}

/// A rate with a K/M suffix.
fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.3} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.2} K", x / 1e3)
    } else {
        format!("{x:.1}")
    }
}

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
    or_die(
        ResponseFrame::new_checked(frame),
        "the broker sent a bad frame",
    )
    .error_code()
    .0
}

/// Dies unless `frame` is a success.
fn check_ok(frame: &[u8], what: &str) {
    let code = error_code(frame);
    if code != 0 {
        die(format_args!("{what} failed with error code {code}"));
    }
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

/// A connection that produces one 100-byte message at a time to `bench-sync`.
struct SyncProducer {
    c: RawClient,
    frame: Vec<u8>,
    /// How each request's frame is made (`Once`: the same frame every time).
    encode: Encode,
    producer_id: i64,
    sequence: i32,
}

impl SyncProducer {
    /// Connects and warms up (which auto-creates the topic).
    fn new(addr: SocketAddr) -> Self {
        let mut c = connect(addr);
        let frame = produce_frame(&mut c, "bench-sync", &[&VALUE]);
        let producer_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| i64::try_from(d.as_nanos() >> 1).unwrap_or(1));
        let mut p = Self {
            c,
            frame,
            encode: Encode::Once,
            producer_id,
            sequence: 0,
        };
        for _ in 0..100 {
            p.round_trip();
        }
        p
    }

    fn round_trip(&mut self) -> Duration {
        if self.encode != Encode::Once {
            let (count, bytes) = message_set(&[&VALUE]);
            let producer = (self.encode == Encode::Idempotent).then(|| {
                let s = self.sequence;
                self.sequence = (s + 1) & i32::MAX;
                streambus_core::ProducerInfo {
                    producer_id: self.producer_id,
                    producer_epoch: 0,
                    base_sequence: Some(s),
                }
            });
            let req = Request::Produce(ProduceRequest {
                topic: Topic::new("bench-sync").expect("topic"),
                partition: 0,
                messages: MessageSet::new_checked(count, &bytes).expect("set"),
                producer,
            });
            self.frame = self.c.encode(&req).1;
        }
        let t = Instant::now();
        or_die(self.c.send_raw(&self.frame), "sending a Produce");
        let r = or_die(self.c.recv_frame(), "reading a Produce reply");
        let elapsed = t.elapsed();
        check_ok(r, "produce");
        elapsed
    }

    /// Records round trips into `h` until `end`, pausing `pause` before each.
    fn run_until(&mut self, end: Instant, pause: Duration, h: &mut Histogram<u64>) {
        while Instant::now() < end {
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
            let rt = self.round_trip();
            h.record(rt.as_nanos() as u64).expect("record");
        }
    }
}

fn sync(addr: SocketAddr, duration: Duration, encode: Encode) {
    let mut p = SyncProducer::new(addr);
    p.encode = encode;
    let mut h = Histogram::<u64>::new(3).expect("hist");
    p.run_until(Instant::now() + duration, Duration::ZERO, &mut h);
    print_hist(&format!("sync produce (1 × 100 B, {encode:?})"), &h);
}

/// How `pipelined` makes its Produce frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encode {
    /// One frame, sent again and again.
    Once,
    /// Each frame encoded anew, plain.
    Each,
    /// Each frame encoded anew, idempotent (one producer, consecutive sequences).
    Idempotent,
}

fn pipelined(
    addr: SocketAddr,
    metrics: SocketAddr,
    duration: Duration,
    batch: usize,
    window: usize,
    encode: Encode,
) {
    let mut c = connect(addr);
    let values: Vec<&[u8]> = vec![&VALUE; batch];
    let (count, bytes) = message_set(&values);
    // A producer id of this run (ids need only differ between runs).
    let producer_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| i64::try_from(d.as_nanos() >> 1).unwrap_or(1));
    let mut sequence = 0i32;
    let topic = if encode == Encode::Idempotent {
        "bench-pipe-idem"
    } else {
        "bench-pipe"
    };
    let mut next_frame = |c: &mut RawClient| {
        let producer = (encode == Encode::Idempotent).then(|| {
            let s = sequence;
            sequence = ((i64::from(s) + i64::from(count)) % (1 << 31)) as i32;
            streambus_core::ProducerInfo {
                producer_id: producer_id.max(1),
                producer_epoch: 0,
                base_sequence: Some(s),
            }
        });
        let req = Request::Produce(ProduceRequest {
            topic: Topic::new(topic).expect("topic"),
            partition: 0,
            messages: MessageSet::new_checked(count, &bytes).expect("set"),
            producer,
        });
        c.encode(&req).1
    };
    let mut frame = next_frame(&mut c);
    or_die(c.send_raw(&frame), "sending a Produce");
    check_ok(or_die(c.recv_frame(), "reading a Produce reply"), "produce");
    let fsyncs_before = scrape_counter(metrics, FSYNCS);
    let mut in_flight = 0;
    let mut acked = 0u64;
    let start = Instant::now();
    let end = start + duration;
    let mut burst = Vec::new();
    for _ in 0..window {
        if encode != Encode::Once {
            frame = next_frame(&mut c);
        }
        burst.extend_from_slice(&frame);
    }
    or_die(c.send_raw(&burst), "sending Produces");
    in_flight += window;
    while in_flight > 0 {
        let r = or_die(c.recv_frame(), "reading a Produce reply");
        check_ok(r, "produce");
        acked += batch as u64;
        in_flight -= 1;
        if Instant::now() < end {
            if encode != Encode::Once {
                frame = next_frame(&mut c);
            }
            or_die(c.send_raw(&frame), "sending a Produce");
            in_flight += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let requests = acked / batch as u64;
    let fsyncs = match (fsyncs_before, scrape_counter(metrics, FSYNCS)) {
        (Ok(b), Ok(a)) => {
            let n = a.saturating_sub(b);
            if n == 0 {
                "; no fsync".to_owned()
            } else {
                format!(
                    "; {n} fsyncs = {} fsyncs/s, {:.1} requests per fsync",
                    si(n as f64 / secs),
                    requests as f64 / n as f64
                )
            }
        }
        (Err(e), _) | (_, Err(e)) => format!("; fsyncs/s unknown ({e})"),
    };
    println!(
        "pipelined produce ({encode:?}): {acked} messages acknowledged in {secs:.2}s = {} msg/s ({:.0} MB/s of values), batch {batch}, window {window}{fsyncs}",
        si(acked as f64 / secs),
        acked as f64 * 100.0 / secs / 1e6
    );
}

/// The broker's fsync counter on its metrics endpoint (`server/src/metrics.rs`).
const FSYNCS: &str = "streambus_storage_fsyncs_total";

/// Reads one counter from the Prometheus text at `GET /metrics`.
fn scrape_counter(metrics: SocketAddr, name: &str) -> Result<u64, String> {
    let fail = |e: io::Error| format!("metrics at {metrics}: {e}");
    let mut s = TcpStream::connect_timeout(&metrics, Duration::from_secs(2)).map_err(fail)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(fail)?;
    // HTTP/1.0: the body is not chunked and the server closes after it.
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {metrics}\r\n\r\n").map_err(fail)?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(fail)?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| format!("no {name} at http://{metrics}/metrics"))
}

fn fetch_mode(addr: SocketAddr, duration: Duration, max_bytes: u32, fill_batch: usize) {
    let mut c = connect(addr);
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
        or_die(c.send_raw(&frame), "sending a Produce");
        check_ok(or_die(c.recv_frame(), "reading a Produce reply"), "produce");
    }
    let mut h = Histogram::<u64>::new(3).expect("hist");
    let (mut bytes, mut offset) = (0u64, 0i64);
    let start = Instant::now();
    let end = start + duration;
    while Instant::now() < end {
        let t = Instant::now();
        let sent = c.send(&Request::Fetch(FetchRequest {
            topic: Topic::new(topic).expect("t"),
            partition: 0,
            offset,
            max_bytes,
            extension: None,
        }));
        or_die(sent, "sending a Fetch");
        let r = or_die(c.recv_frame(), "reading a Fetch reply");
        h.record(t.elapsed().as_nanos() as u64).expect("record");
        bytes += r.len() as u64;
        let frame = or_die(ResponseFrame::new_checked(r), "the broker sent a bad frame");
        match or_die(
            Response::parse(&frame, RequestType::Fetch),
            "parsing a Fetch reply",
        ) {
            Response::Fetch(f) => {
                let next = f.trailer.map_or(offset, |t| t.next_offset);
                offset = if next >= f.high_water_mark { 0 } else { next };
            }
            other => die(format_args!("fetch failed: {other:?}")),
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

/// The producer and the long-polling consumer of `longpoll`.
struct LongPollPair {
    producer: RawClient,
    consumer: RawClient,
    frame: Vec<u8>,
    /// The next offset to fetch (the high-water mark after the last produce).
    next: i64,
    max_wait_ms: u32,
    gap: Duration,
    /// Fetches answered with no message (the wait ended first, or the broker has no long-poll).
    empty: u64,
    /// Fetches that brought the message only after half their MaxWaitMs: the produce did not
    /// wake them (they are in the histogram too).
    late: u64,
}

const LONGPOLL_TOPIC: &str = "bench-longpoll";

impl LongPollPair {
    /// Connects both and produces once (auto-creates the topic, learns the next offset).
    fn new(addr: SocketAddr, max_wait_ms: u32, gap: Duration) -> Self {
        let mut producer = connect(addr);
        let consumer = connect(addr);
        let frame = produce_frame(&mut producer, LONGPOLL_TOPIC, &[&VALUE]);
        let mut p = Self {
            producer,
            consumer,
            frame,
            next: 0,
            max_wait_ms,
            gap,
            empty: 0,
            late: 0,
        };
        or_die(p.producer.send_raw(&p.frame), "sending a Produce");
        p.next = p.read_produce_reply();
        p
    }

    /// Reads the producer's reply; returns the high-water mark after it.
    fn read_produce_reply(&mut self) -> i64 {
        let r = or_die(self.producer.recv_frame(), "reading a Produce reply");
        let frame = or_die(ResponseFrame::new_checked(r), "the broker sent a bad frame");
        match or_die(
            Response::parse(&frame, RequestType::Produce),
            "parsing a Produce reply",
        ) {
            Response::Produce(p) => p.high_water_mark,
            other => die(format_args!("produce failed: {other:?}")),
        }
    }

    /// One message: the consumer's fetch waits, the producer sends, the consumer receives.
    /// Returns the time from just before the send to the consumer holding the message, or
    /// `None` if the fetch came back empty.
    fn one(&mut self) -> Option<Duration> {
        let fetch = Request::Fetch(FetchRequest {
            topic: Topic::new(LONGPOLL_TOPIC).expect("topic"),
            partition: 0,
            offset: self.next,
            max_bytes: 1 << 20,
            extension: Some(FetchExtension {
                isolation_level: 0,
                long_poll: Some(LongPoll {
                    max_wait_ms: self.max_wait_ms,
                    min_bytes: 1,
                }),
            }),
        });
        or_die(self.consumer.send(&fetch), "sending a Fetch");
        std::thread::sleep(self.gap);
        let t = Instant::now();
        or_die(self.producer.send_raw(&self.frame), "sending a Produce");
        // The fetch reply first: the produce reply, if it comes earlier, waits in its socket.
        let r = or_die(self.consumer.recv_frame(), "reading a Fetch reply");
        let held = t.elapsed();
        let frame = or_die(ResponseFrame::new_checked(r), "the broker sent a bad frame");
        let got = match or_die(
            Response::parse(&frame, RequestType::Fetch),
            "parsing a Fetch reply",
        ) {
            Response::Fetch(f) => f.messages.count(),
            other => die(format_args!("fetch failed: {other:?}")),
        };
        self.next = self.read_produce_reply();
        if got == 0 {
            self.empty += 1;
            return None;
        }
        if held.as_millis() >= u128::from(self.max_wait_ms / 2) {
            self.late += 1;
        }
        Some(held)
    }
}

fn longpoll(addr: SocketAddr, duration: Duration, max_wait_ms: u32, gap: Duration, rounds: u32) {
    let rounds = rounds.max(1);
    let mut sync = SyncProducer::new(addr);
    let mut lp = LongPollPair::new(addr, max_wait_ms, gap);
    for _ in 0..50 {
        lp.one();
    }
    (lp.empty, lp.late) = (0, 0);
    let hist = || Histogram::<u64>::new(3).expect("hist");
    let p50 = |h: &Histogram<u64>| h.value_at_quantile(0.5) as f64 / 1e3;
    // Each round: back-to-back sync Produce, sync Produce after the same pause as the
    // long-poll's gap (a machine that has just idled wakes slower), then long-poll.
    let slice = duration / (4 * rounds);
    let (mut hs, mut hp, mut hl) = (hist(), hist(), hist());
    for round in 1..=rounds {
        let (mut rs, mut rp, mut rl) = (hist(), hist(), hist());
        sync.run_until(Instant::now() + slice, Duration::ZERO, &mut rs);
        sync.run_until(Instant::now() + slice, gap, &mut rp);
        let end = Instant::now() + 2 * slice;
        while Instant::now() < end {
            if let Some(d) = lp.one() {
                rl.record(d.as_nanos() as u64).expect("record");
            }
        }
        println!(
            "round {round}: sync produce p50 {:.1} µs (after a {gap:?} pause {:.1} µs), long-poll p50 {:.1} µs, ratio {:.2} ({:.2})",
            p50(&rs),
            p50(&rp),
            p50(&rl),
            p50(&rl) / p50(&rs),
            p50(&rl) / p50(&rp)
        );
        hs.add(&rs).expect("merge");
        hp.add(&rp).expect("merge");
        hl.add(&rl).expect("merge");
    }
    print_hist("sync produce (1 × 100 B)", &hs);
    print_hist(&format!("sync produce after a {gap:?} pause"), &hp);
    print_hist(
        &format!("long-poll produce → consumer (MaxWaitMs {max_wait_ms}, MinBytes 1, gap {gap:?})"),
        &hl,
    );
    println!(
        "long-poll p50 ÷ sync produce p50 = {:.2} (target ≤ 2.00); ÷ sync after the same pause = {:.2}; {} fetches came back empty, {} held past half MaxWaitMs though their message was produced",
        p50(&hl) / p50(&hs),
        p50(&hl) / p50(&hp),
        lp.empty,
        lp.late
    );
}

/// One connection of `requests`: keeps `window` requests in flight until `end`, then drains.
/// Returns the replies received, the error replies among them, and when it finished.
fn requests_conn(
    mut s: TcpStream,
    burst: &[u8],
    frame_len: usize,
    window: usize,
    start: &Barrier,
    end: Instant,
) -> io::Result<(u64, u64, Instant)> {
    let decoder = FrameDecoder::responses();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut lo, mut hi) = (0, 0);
    let (mut done, mut errors) = (0u64, 0u64);
    start.wait();
    s.write_all(&burst[..window * frame_len])?;
    let mut in_flight = window;
    while in_flight > 0 {
        if lo == hi {
            (lo, hi) = (0, 0);
        } else if buf.len() - hi < 4096 {
            buf.copy_within(lo..hi, 0);
            (lo, hi) = (0, hi - lo);
        }
        let n = s.read(&mut buf[hi..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        hi += n;
        let mut k = 0;
        loop {
            match decoder.next_frame(&buf[lo..hi]) {
                Ok(Status::Complete(len)) => {
                    let frame = ResponseFrame::new_checked(&buf[lo..lo + len])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                    if frame.error_code().0 != 0 {
                        errors += 1;
                    }
                    lo += len;
                    k += 1;
                }
                Ok(Status::Partial(need)) => {
                    if need > buf.len() - hi {
                        buf.resize(hi + need.max(4096), 0);
                    }
                    break;
                }
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
        }
        in_flight -= k;
        done += k as u64;
        if k > 0 && Instant::now() < end {
            s.write_all(&burst[..k * frame_len])?;
            in_flight += k;
        }
    }
    Ok((done, errors, Instant::now()))
}

fn requests(addr: SocketAddr, duration: Duration, connections: usize, window: usize, kind: Kind) {
    let window = window.max(1);
    let mut encoder = RawClient::connect_lazy();
    let frame = match kind {
        Kind::Health => encoder.encode(&Request::HealthCheck).1,
        Kind::Produce => produce_frame(&mut encoder, "bench-requests", &[&VALUE]),
    };
    let mut conns = Vec::with_capacity(connections);
    for i in 0..connections {
        let what = format_args!("connection {i} to {addr}");
        let stream = or_die(TcpStream::connect(addr), what);
        or_die(stream.set_nodelay(true), what);
        // One request each first, through a second handle on the same socket: checks the
        // broker and auto-creates the topic.
        let mut c = RawClient::from_stream(or_die(stream.try_clone(), what));
        or_die(c.send_raw(&frame), what);
        check_ok(or_die(c.recv_frame(), what), "the first request");
        conns.push(stream);
    }
    let burst: Arc<Vec<u8>> = Arc::new(frame.repeat(window));
    let frame_len = frame.len();
    let start = Arc::new(Barrier::new(connections + 1));
    let mut threads = Vec::with_capacity(connections);
    // The clock starts when every thread is ready; each ends its pipeline by `end`.
    let end = Instant::now() + duration + Duration::from_millis(100);
    for stream in conns {
        let (burst, start) = (Arc::clone(&burst), Arc::clone(&start));
        threads.push(std::thread::spawn(move || {
            requests_conn(stream, &burst, frame_len, window, &start, end)
        }));
    }
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    start.wait();
    let (mut done, mut errors, mut last) = (0u64, 0u64, t0);
    for (i, t) in threads.into_iter().enumerate() {
        let r = t
            .join()
            .unwrap_or_else(|_| die("a connection thread panicked"));
        let (d, e, at) = or_die(r, format_args!("connection {i}"));
        done += d;
        errors += e;
        last = last.max(at);
    }
    let secs = last.duration_since(t0).as_secs_f64();
    let what = match kind {
        Kind::Health => "HealthCheck",
        Kind::Produce => "Produce 1 × 100 B",
    };
    println!(
        "requests ({what}): {connections} connections × {window} in flight: {done} replies in {secs:.2}s = {} requests/s, {errors} errors",
        si(done as f64 / secs)
    );
    if errors > 0 {
        std::process::exit(1);
    }
}

fn producers(addr: SocketAddr, n: u64, window: usize, server_pid: Option<u32>) {
    let mut c = connect(addr);
    let (count, bytes) = message_set(&[&VALUE]);
    let frame = |c: &mut RawClient, id: u64| {
        let req = Request::Produce(ProduceRequest {
            topic: Topic::new("bench-producers").expect("topic"),
            partition: 0,
            messages: MessageSet::new_checked(count, &bytes).expect("set"),
            producer: Some(streambus_core::ProducerInfo {
                producer_id: i64::try_from(id).unwrap_or(i64::MAX),
                producer_epoch: 0,
                base_sequence: Some(0),
            }),
        });
        c.encode(&req).1
    };
    let first = frame(&mut c, 1);
    or_die(c.send_raw(&first), "sending a Produce");
    check_ok(or_die(c.recv_frame(), "reading a Produce reply"), "produce");
    let before = server_pid.and_then(rss_kib);
    let start = Instant::now();
    let (mut next, mut in_flight, mut done) = (2u64, 0usize, 1u64);
    let mut report_at = 100_000;
    while done < n {
        let mut burst = Vec::new();
        while in_flight < window && next <= n {
            burst.extend_from_slice(&frame(&mut c, next));
            next += 1;
            in_flight += 1;
        }
        or_die(c.send_raw(&burst), "sending Produces");
        let r = or_die(c.recv_frame(), "reading a Produce reply");
        check_ok(r, "produce");
        in_flight -= 1;
        done += 1;
        if done >= report_at {
            report_at += 100_000;
            let rss = server_pid
                .and_then(rss_kib)
                .map_or("?".into(), |k| k.to_string());
            println!("{done} producers: broker RSS {rss} KiB");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let after = server_pid.and_then(rss_kib);
    println!(
        "{n} distinct producers on one partition in {secs:.1} s ({}/s); broker RSS {} -> {} KiB",
        si((n - 1) as f64 / secs),
        before.map_or("?".into(), |k| k.to_string()),
        after.map_or("?".into(), |k| k.to_string()),
    );
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn trickle(
    addr: SocketAddr,
    duration: Duration,
    n: usize,
    frame: u32,
    send: usize,
    server_pid: Option<u32>,
) {
    let before = server_pid.and_then(rss_kib);
    let mut head = vec![0u8; send];
    if let Some(len) = head.get_mut(..4) {
        len.copy_from_slice(&frame.to_be_bytes());
    }
    let mut peers = Vec::with_capacity(n);
    for i in 0..n {
        let sock = or_die(
            TcpStream::connect(addr),
            format_args!("connection {i} to {addr}"),
        );
        or_die(sock.set_nonblocking(true), "set_nonblocking");
        peers.push((sock, 0usize));
    }
    let start = Instant::now();
    let mut peak = before.unwrap_or(0);
    while start.elapsed() < duration {
        let mut progress = false;
        for (sock, at) in &mut peers {
            if let Some(rest) = head.get(*at..).filter(|r| !r.is_empty())
                && let Ok(k) = sock.write(rest)
            {
                *at += k;
                progress |= k > 0;
            }
        }
        if let Some(r) = server_pid.and_then(rss_kib) {
            peak = peak.max(r);
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let sent: usize = peers.iter().map(|(_, at)| at).sum();
    println!(
        "trickle: {n} connections sent {:.1} MiB of {:.1} MiB-frames ({:.1} MiB each at most) in {:.1}s",
        sent as f64 / (1 << 20) as f64,
        f64::from(frame) / (1 << 20) as f64,
        send as f64 / (1 << 20) as f64,
        start.elapsed().as_secs_f64()
    );
    if let Some(b) = before {
        println!(
            "server RSS: {b} KiB before, peak {peak} KiB ({:.1} MiB more)",
            peak.saturating_sub(b) as f64 / 1024.0
        );
    }
    let t = Instant::now();
    let mut c = RawClient::from_stream(or_die(TcpStream::connect(addr), "a fresh connection"));
    or_die(
        c.call(&Request::HealthCheck),
        "HealthCheck on a fresh connection",
    );
    println!(
        "a fresh connection's HealthCheck answered in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
}

/// Connects to `addr` from `src` (port chosen by the kernel).
fn connect_from(src: std::net::Ipv4Addr, addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.bind(&SocketAddr::from((src, 0)).into())?;
    sock.connect(&addr.into())?;
    Ok(sock.into())
}

/// One HealthCheck on a bare socket with a small buffer (a [`RawClient`] reserves 64 KiB to
/// read, too much for 20 000 held connections per process).
fn health_check(s: &mut TcpStream) -> io::Result<()> {
    let (_, frame) = RawClient::connect_lazy().encode(&Request::HealthCheck);
    s.write_all(&frame)?;
    let decoder = FrameDecoder::responses();
    let mut buf = [0u8; 512];
    let mut have = 0;
    loop {
        let n = s.read(&mut buf[have..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
        match decoder.next_frame(&buf[..have]) {
            Ok(Status::Complete(len)) => {
                return match error_code(&buf[..len]) {
                    0 => Ok(()),
                    code => Err(io::Error::other(format!(
                        "HealthCheck failed with code {code}"
                    ))),
                };
            }
            Ok(Status::Partial(_)) if have < buf.len() => {}
            Ok(Status::Partial(_)) => return Err(io::Error::other("HealthCheck reply too long")),
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
    }
}

fn connections(
    addr: SocketAddr,
    n: usize,
    server_pid: Option<u32>,
    sources: u8,
    first_source: u8,
    hold: Duration,
) {
    let before = server_pid.and_then(rss_kib);
    let mut held = Vec::with_capacity(n);
    let start = Instant::now();
    let bind = sources > 1 || first_source != 1;
    for i in 0..n {
        let last = usize::from(first_source) + i % usize::from(sources.max(1));
        let src = std::net::Ipv4Addr::new(127, 0, 0, last.min(255) as u8);
        let sock = if bind {
            connect_from(src, addr)
        } else {
            TcpStream::connect(addr)
        };
        let what = format_args!("connection {i} to {addr} from {src}");
        let mut sock = or_die(sock, what);
        or_die(sock.set_read_timeout(Some(Duration::from_secs(30))), what);
        or_die(health_check(&mut sock), what);
        held.push(sock);
    }
    let opened = start.elapsed();
    if server_pid.is_some() {
        std::thread::sleep(Duration::from_millis(500));
    }
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
    if !hold.is_zero() {
        println!(
            "ready: holding {n} connections for up to {}s",
            hold.as_secs()
        );
        let _ = io::stdout().flush();
        std::thread::sleep(hold);
    }
    drop(held);
}

fn health(addr: SocketAddr, n: usize) {
    let mut h = Histogram::<u64>::new(3).expect("hist");
    for i in 0..n.max(1) {
        let t = Instant::now();
        let mut s = or_die(
            TcpStream::connect(addr),
            format_args!("fresh connection {i}"),
        );
        or_die(s.set_nodelay(true), "nodelay");
        or_die(s.set_read_timeout(Some(Duration::from_secs(10))), "timeout");
        or_die(health_check(&mut s), format_args!("HealthCheck {i}"));
        h.record(t.elapsed().as_nanos() as u64).expect("record");
    }
    print_hist("fresh connection + HealthCheck", &h);
}

fn main() {
    let args = Args::parse();
    let tls = args.tls_ca.as_ref().map(|ca| {
        or_die(
            streambus_adapters::tls::client_config(Some(ca), None),
            "--tls-ca",
        )
    });
    let _ = TLS.set(tls);
    match args.mode {
        Mode::Handshakes {
            threads,
            server_pid,
        } => handshakes(args.addr, args.duration, threads, server_pid),
        Mode::Pingpong => pingpong(args.duration),
        Mode::Sync {
            idempotent,
            encode_each,
        } => {
            let encode = match (idempotent, encode_each) {
                (true, _) => Encode::Idempotent,
                (false, true) => Encode::Each,
                (false, false) => Encode::Once,
            };
            sync(args.addr, args.duration, encode);
        }
        Mode::Pipelined {
            batch,
            window,
            idempotent,
            encode_each,
        } => {
            let each = match (idempotent, encode_each) {
                (true, _) => Encode::Idempotent,
                (false, true) => Encode::Each,
                (false, false) => Encode::Once,
            };
            pipelined(args.addr, args.metrics, args.duration, batch, window, each);
        }
        Mode::Fetch {
            max_bytes,
            fill_batch,
        } => fetch_mode(args.addr, args.duration, max_bytes, fill_batch),
        Mode::Connections {
            n,
            server_pid,
            sources,
            first_source,
            hold,
        } => connections(args.addr, n, server_pid, sources, first_source, hold),
        Mode::Health { n } => health(args.addr, n),
        Mode::Producers {
            n,
            window,
            server_pid,
        } => producers(args.addr, n, window, server_pid),
        Mode::Trickle {
            n,
            frame,
            send,
            server_pid,
        } => trickle(args.addr, args.duration, n, frame, send, server_pid),
        Mode::Longpoll {
            max_wait_ms,
            gap,
            rounds,
        } => longpoll(args.addr, args.duration, max_wait_ms, gap, rounds),
        Mode::Requests {
            connections,
            in_flight,
            kind,
        } => requests(args.addr, args.duration, connections, in_flight, kind),
    }
}
