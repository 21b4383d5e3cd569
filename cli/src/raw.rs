//! The raw `bench` modes speak the protocol through the core's client drivers (tokio, or a
//! thread per connection on the blocking one), with no SDK in between, so they measure the
//! broker (and the floor under it) rather than the client. They connect as the other commands
//! do: over TLS with `--tls*`, authenticated with `--token`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nohash_hasher::IntMap;
use streambus_adapters::tls::{ClientTls, rustls};
use streambus_adapters::tokio::Client as Driver;
use streambus_core::{
    ClientConfig, FetchRequest, Message, MessageSetBuilder, ProduceRequest, ProducerInfo, Request,
    Response, Topic, encode_request, request_encoded_len,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::admin::partitions;
use crate::args::Bench;
use crate::bench::{Hold, Note, Report, histogram, nanos, progress};
use crate::{Ctx, Failure};

/// Requests in flight on one raw connection at most (the broker's default window).
const WINDOW: usize = 128;
/// Bytes the `fetch` mode stores before measuring when the partition is empty.
const FETCH_FILL: usize = 64 << 20;
/// The length of a Produce reply (35 bytes of header and payload, plus the CRC).
const PRODUCE_REPLY_LEN: usize = 35;

fn failed(ctx: &Ctx, what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::runtime(format!("broker {}: {what}: {e}", ctx.broker))
}

/// How the raw modes reach the broker: its address, TLS as the command's `--tls*` options say,
/// and the `--token` each connection authenticates with.
#[derive(Clone)]
struct Dial {
    addr: SocketAddr,
    tls: Option<ClientTls>,
    token: Option<String>,
}

impl Dial {
    async fn new(ctx: &Ctx) -> Result<Self, Failure> {
        let addr = tokio::net::lookup_host(ctx.broker.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| Failure::runtime(format!("broker {}: no such address", ctx.broker)))?;
        let config = ctx.client.config();
        let tls = match &config.tls {
            Some(options) => Some(options.client_tls(&ctx.broker).map_err(|e| ctx.err(e))?),
            None => None,
        };
        let token = config.token.as_ref().map(|t| t.expose().to_owned());
        Ok(Self { addr, tls, token })
    }

    /// `handshakes`: every TLS connection pays a full handshake.
    fn without_resumption(mut self) -> Self {
        if let Some(tls) = &mut self.tls {
            let mut config = (*tls.config).clone();
            config.resumption = rustls::client::Resumption::disabled();
            tls.config = Arc::new(config);
        }
        self
    }

    /// A connection on tokio with `buffer_len`-byte buffers, from `source` (port chosen by the
    /// kernel) when given, authenticated.
    async fn open<const N: usize>(
        &self,
        ctx: &Ctx,
        what: &str,
        source: Option<std::net::IpAddr>,
        buffer_len: usize,
    ) -> Result<Driver<N>, Failure> {
        let io = |e: std::io::Error| failed(ctx, what, e);
        let stream = match source {
            None => TcpStream::connect(self.addr).await.map_err(io)?,
            Some(source) => {
                let socket = match source {
                    std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                    std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
                }
                .map_err(io)?;
                socket.bind(SocketAddr::new(source, 0)).map_err(io)?;
                socket.connect(self.addr).await.map_err(io)?
            }
        };
        let config = ClientConfig::default();
        let mut d = match &self.tls {
            None => streambus_adapters::tokio::connect_stream(stream, config, buffer_len),
            Some(tls) => {
                streambus_adapters::tokio::connect_stream_tls(stream, tls, config, buffer_len).await
            }
        }
        .map_err(io)?;
        if let Some(token) = &self.token {
            let request =
                Request::Authenticate(streambus_core::AuthenticateRequest::token(token.as_bytes()));
            let r = d
                .request(&request)
                .await
                .map_err(|e| failed(ctx, "Authenticate", e))?;
            check(ctx, "Authenticate", Some(r))?;
        }
        Ok(d)
    }

    /// A connection on the blocking driver (for a thread of its own), authenticated; the error
    /// says what failed, for the caller to name the broker.
    fn open_blocking<const N: usize>(
        &self,
        buffer_len: usize,
    ) -> Result<streambus_adapters::blocking::Client<N>, String> {
        let stream = std::net::TcpStream::connect(self.addr).map_err(|e| e.to_string())?;
        let config = ClientConfig::default();
        let mut d = match &self.tls {
            None => streambus_adapters::blocking::connect_stream(stream, config, buffer_len),
            Some(tls) => {
                streambus_adapters::blocking::connect_stream_tls(stream, tls, config, buffer_len)
            }
        }
        .map_err(|e| e.to_string())?;
        if let Some(token) = &self.token {
            let request =
                Request::Authenticate(streambus_core::AuthenticateRequest::token(token.as_bytes()));
            match d.request(&request) {
                Ok(Response::Authenticate(_)) => {}
                Ok(Response::Error(e)) => {
                    return Err(format!("Authenticate: {} ({})", e.message, e.code));
                }
                Ok(_) => return Err("Authenticate: an unexpected reply".to_string()),
                Err(e) => return Err(format!("Authenticate: {e}")),
            }
        }
        Ok(d)
    }
}

/// An encoded message set: its count and bytes.
struct Set {
    count: u32,
    bytes: Vec<u8>,
}

/// A message set of `count` messages with `size`-byte values.
fn message_set(count: usize, size: usize) -> Result<Set, Failure> {
    let bad = |e: &dyn std::fmt::Display| Failure::runtime(format!("building a message set: {e}"));
    let value = vec![b'x'; size];
    let message = Message::new(b"", &value);
    let len = streambus_core::Encode::encoded_len(&message).saturating_mul(count);
    let mut bytes = vec![0u8; len];
    let mut set = MessageSetBuilder::new(&mut bytes);
    for _ in 0..count {
        set.push(&message).map_err(|e| bad(&e))?;
    }
    let (count, used) = (set.count(), set.len());
    bytes.truncate(used);
    Ok(Set { count, bytes })
}

fn produce_request<'a>(topic: Topic<'a>, set: &'a Set) -> Result<Request<'a>, Failure> {
    let messages = streambus_core::MessageSet::new_checked(set.count, &set.bytes)
        .map_err(|e| Failure::runtime(format!("building a message set: {e}")))?;
    Ok(Request::Produce(ProduceRequest {
        topic,
        partition: 0,
        messages,
        producer: None,
    }))
}

fn topic(args: &Bench) -> Result<Topic<'_>, Failure> {
    Topic::new(&args.topic)
        .map_err(|e| Failure::usage(format!("invalid topic name {:?}: {e}", args.topic)))
}

/// Checks a completed request's response: an error response is a runtime error.
fn check(ctx: &Ctx, what: &str, r: Option<Response<'_>>) -> Result<(), Failure> {
    match r {
        Some(Response::Error(e)) => Err(failed(ctx, what, format!("{} ({})", e.message, e.code))),
        Some(_) => Ok(()),
        None => Err(failed(ctx, what, "the reply could not be decoded")),
    }
}

/// Creates the topic (one partition) unless it exists.
async fn ensure_topic(ctx: &Ctx, args: &Bench) -> Result<(), Failure> {
    ctx.client
        .create_topic(&args.topic, args.partitions)
        .await
        .map(|_| ())
        .map_err(|e| ctx.err(e))
}

/// `pingpong`: a TCP echo between two tasks of this process with the byte sizes of a
/// one-message Produce and its reply: the floor under `roundtrip`.
pub(crate) async fn pingpong(args: &Bench, stop: &Arc<AtomicBool>) -> Result<Report, Failure> {
    let frame = produce_frame(args, args.size)?;
    let req_len = frame.len();
    let io = |e: std::io::Error| Failure::runtime(format!("pingpong on 127.0.0.1: {e}"));
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(io)?;
    let addr = listener.local_addr().map_err(io)?;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; req_len];
        let reply = [0u8; PRODUCE_REPLY_LEN];
        while s.read_exact(&mut buf).await.is_ok() {
            s.write_all(&reply).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut c = TcpStream::connect(addr).await.map_err(io)?;
    c.set_nodelay(true).map_err(io)?;
    let mut reply = [0u8; PRODUCE_REPLY_LEN];
    let limit = args.messages.unwrap_or(100_000);
    let bar = progress(Some(limit), "round trips");
    let mut latency = histogram()?;
    let start = Instant::now();
    let deadline = args.duration.map(|d| start + d);
    let mut done = 0u64;
    while done < limit
        && !stop.load(Ordering::Relaxed)
        && deadline.is_none_or(|d| Instant::now() < d)
    {
        let t = Instant::now();
        c.write_all(&frame).await.map_err(io)?;
        c.read_exact(&mut reply).await.map_err(io)?;
        latency.saturating_record(nanos(t.elapsed()));
        done += 1;
        bar.inc(1);
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    drop(c);
    let _ = server.await;
    Ok(Report {
        mode: "pingpong",
        unit: "round trip",
        latency_of: "each TCP round trip of a Produce's and its reply's sizes",
        messages: done,
        bytes: done * args.size as u64,
        elapsed,
        latency,
        hold: None,
        notes: vec![Note::new(
            "frame_bytes",
            serde_json::json!({"request": req_len, "reply": PRODUCE_REPLY_LEN}),
            format!("frames: {req_len} B out, {PRODUCE_REPLY_LEN} B back"),
        )],
    })
}

/// What `pipeline`, `requests` and `producers` keep in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Load {
    /// Produce requests of `--batch` records of `--size` bytes (`pipeline`), or of one record
    /// (`requests --request produce`); idempotent: one producer per connection.
    Produce { batch: u32, idempotent: bool },
    /// HealthCheck requests (`requests`).
    Health,
    /// One one-record idempotent batch from each of many producers (`producers`).
    Producers,
}

/// Producers of `producers` when `--messages` is not given.
const DEFAULT_PRODUCERS: u64 = 1_000_000;

/// The idempotent-produce fields (protocol §6.2) each request of one connection carries.
#[derive(Debug)]
enum Producing {
    /// Plain produce (and HealthCheck).
    Plain,
    /// One producer: consecutive sequences; a new random producer when they would pass
    /// `i32::MAX`.
    One { id: i64, sequence: i32 },
    /// A new producer per request (sequence 0): `next`, then `next + step`, ….
    Each { next: i64, step: i64 },
}

impl Producing {
    /// The fields of the next request of `count` records.
    fn next(&mut self, count: i32) -> Option<ProducerInfo> {
        match self {
            Self::Plain => None,
            Self::One { id, sequence } => {
                let base = match sequence.checked_add(count) {
                    Some(end) => std::mem::replace(sequence, end),
                    None => {
                        *id = random_producer_id();
                        *sequence = count;
                        0
                    }
                };
                Some(ProducerInfo {
                    producer_id: *id,
                    producer_epoch: 0,
                    base_sequence: Some(base),
                })
            }
            Self::Each { next, step } => {
                let id = *next;
                *next = next.wrapping_add(*step).max(1);
                Some(ProducerInfo {
                    producer_id: id,
                    producer_epoch: 0,
                    base_sequence: Some(0),
                })
            }
        }
    }
}

/// A random producer id in `1..2^62`: runs against the same broker do not meet each other's
/// producers (and ids spaced by connection count stay positive).
fn random_producer_id() -> i64 {
    let r = getrandom::u64().unwrap_or_else(|_| {
        // No OS randomness: the clock is still unlikely to repeat between runs.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    i64::try_from(r >> 2).unwrap_or(1).max(1)
}

/// `pipeline` and `requests`: `--in-flight` requests at a time on each of `--connections`
/// connections, one task each.
pub(crate) async fn pipelined(
    ctx: &Ctx,
    args: &Bench,
    stop: &Arc<AtomicBool>,
    load: Load,
) -> Result<Report, Failure> {
    let dial = Dial::new(ctx).await?;
    let (batch, what) = match load {
        Load::Produce { batch, .. } => {
            ensure_topic(ctx, args).await?;
            (batch, "Produce")
        }
        Load::Producers => {
            ensure_topic(ctx, args).await?;
            (1, "Produce")
        }
        Load::Health => (1, "HealthCheck"),
    };
    let set = Arc::new(message_set(batch as usize, args.size)?);
    let frame_len = match load {
        Load::Produce { .. } | Load::Producers => {
            let mut request = produce_request(topic(args)?, &set)?;
            if let Request::Produce(p) = &mut request {
                // The longest form: with the idempotent fields.
                p.producer = Some(ProducerInfo::default());
            }
            request_encoded_len(&request)
        }
        Load::Health => request_encoded_len(&Request::HealthCheck),
    };
    if load == Load::Producers
        && let Some(pid) = args.server_pid
        && rss_kib(pid).is_none()
    {
        return Err(no_such_process(pid));
    }
    let rss_before = match load {
        Load::Producers => server_rss_kib(args).await?,
        _ => None,
    };
    let window = (args.in_flight as usize).min(WINDOW);
    let per_request = u64::from(batch);
    // Whole requests: --messages rounded up to a multiple of --batch.
    let requests = args
        .messages
        .unwrap_or(if load == Load::Producers {
            DEFAULT_PRODUCERS
        } else if args.duration.is_some() {
            u64::MAX
        } else {
            10_000_000
        })
        .div_ceil(per_request);
    let total = (requests != u64::MAX).then(|| requests * per_request);
    let bar = progress(total, "acknowledged");
    let connections = u64::from(args.connections);
    let mut drivers = Vec::new();
    for i in 0..connections {
        // A blocking socket per connection, driven by its own thread: the load generator
        // must not be what limits the broker's figure (a tokio task per connection reached
        // about half of it on 2 cores).
        let dial = dial.clone();
        let d = tokio::task::spawn_blocking(move || {
            dial.open_blocking::<WINDOW>((frame_len * window + 4096).max(1024))
        })
        .await
        .map_err(|e| Failure::runtime(format!("a connecting thread failed: {e}")))?
        .map_err(|e| failed(ctx, &format!("connection {}", i + 1), e))?;
        drivers.push(d);
    }
    // Producer ids of `producers`: connection i sends first + i, first + i + connections, ….
    let first_producer = random_producer_id() >> 1;
    let fsyncs_before = match &args.metrics {
        Some(m) => Some(scrape_counter(m, FSYNCS).await?),
        None => None,
    };
    let start = Instant::now();
    let deadline = args.duration.map(|t| start + t).map(Instant::into_std);
    let mut threads = Vec::new();
    for (i, d) in drivers.into_iter().enumerate() {
        let share = if requests == u64::MAX {
            requests
        } else {
            requests / connections + u64::from((i as u64) < requests % connections)
        };
        let producing = match load {
            Load::Produce {
                idempotent: true, ..
            } => Producing::One {
                id: random_producer_id(),
                sequence: 0,
            },
            Load::Producers => Producing::Each {
                next: first_producer.saturating_add(i as i64),
                step: connections as i64,
            },
            Load::Produce { .. } | Load::Health => Producing::Plain,
        };
        let job = Pipelined {
            producing,
            set: set.clone(),
            topic: args.topic.clone(),
            stop: stop.clone(),
            bar: bar.clone(),
            deadline,
            share,
            window,
            per_request,
            load,
            what,
            latency: histogram()?,
        };
        let thread = std::thread::Builder::new()
            .name(format!("bench-conn-{i}"))
            .spawn(move || job.run(d))
            .map_err(|e| Failure::runtime(format!("starting a connection's thread: {e}")))?;
        threads.push(thread);
    }
    let results = tokio::task::spawn_blocking(move || {
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| "a connection's thread panicked".to_string())
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| Failure::runtime(format!("waiting for the connections' threads: {e}")))?;
    let mut latency = histogram()?;
    let mut acked = 0u64;
    for r in results {
        let (h, n) = r
            .map_err(Failure::runtime)?
            .map_err(|e| failed(ctx, what, e))?;
        let _ = latency.add(&h);
        acked += n;
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    let mut notes = Vec::new();
    if let (Some(m), Some(before)) = (&args.metrics, fsyncs_before) {
        let n = scrape_counter(m, FSYNCS).await?.saturating_sub(before);
        let reqs = acked / per_request;
        #[allow(clippy::cast_precision_loss)]
        let (rate, per) = (
            n as f64 / elapsed.as_secs_f64().max(1e-9),
            reqs as f64 / n.max(1) as f64,
        );
        notes.push(Note::new(
            "fsyncs",
            serde_json::json!({"count": n, "per_sec": rate, "requests_per_fsync": per}),
            format!("broker fsyncs: {n} ({rate:.0}/s, {per:.1} requests per fsync)"),
        ));
    }
    if let Some(b) = rss_before {
        let after = server_rss_kib(args).await?.unwrap_or(b);
        notes.push(Note::new(
            "server_rss",
            serde_json::json!({"before_kib": b, "after_kib": after}),
            format!(
                "server RSS: {b} KiB before, {after} KiB after {acked} producers ({:.1} MiB more)",
                mib(after.saturating_sub(b) * 1024)
            ),
        ));
    }
    let idempotent = matches!(
        load,
        Load::Produce {
            idempotent: true,
            ..
        } | Load::Producers
    );
    let shape = serde_json::json!({"batch": batch, "in_flight": window, "connections": connections, "idempotent": idempotent});
    let how = if idempotent && load != Load::Producers {
        " idempotent"
    } else {
        ""
    };
    let (mode, unit, latency_of, text) = match load {
        Load::Produce { .. } if args.mode == crate::args::BenchMode::Pipeline => (
            "pipeline",
            "message",
            "each Produce request, send to reply",
            format!(
                "{batch} messages per{how} Produce, {window} in flight on each of {connections} connection(s)"
            ),
        ),
        Load::Produce { .. } => (
            "requests",
            "request",
            "each one-record Produce, send to reply",
            format!(
                "one-record{how} Produces, {window} in flight on each of {connections} connection(s)"
            ),
        ),
        Load::Producers => (
            "producers",
            "producer",
            "each producer's one-record batch, send to reply",
            format!(
                "one batch from each of {acked} distinct idempotent producers, {window} in flight on each of {connections} connection(s)"
            ),
        ),
        Load::Health => (
            "requests",
            "request",
            "each HealthCheck, send to reply",
            format!("HealthChecks, {window} in flight on each of {connections} connection(s)"),
        ),
    };
    Ok(Report {
        mode,
        unit,
        latency_of,
        messages: acked,
        bytes: match load {
            Load::Produce { .. } | Load::Producers => acked * args.size as u64,
            Load::Health => 0,
        },
        elapsed,
        latency,
        notes: {
            notes.insert(0, Note::new("shape", shape, text));
            notes
        },
        hold: None,
    })
}

/// One connection's share of `pipeline` or `requests`, run on its own thread.
struct Pipelined {
    /// The idempotent-produce fields of each request.
    producing: Producing,
    set: Arc<Set>,
    topic: String,
    stop: Arc<AtomicBool>,
    bar: indicatif::ProgressBar,
    deadline: Option<std::time::Instant>,
    /// Requests to send.
    share: u64,
    window: usize,
    /// Records per request.
    per_request: u64,
    load: Load,
    what: &'static str,
    latency: hdrhistogram::Histogram<u64>,
}

impl Pipelined {
    /// Keeps `window` requests in flight until the share is sent (or the deadline or Ctrl-C);
    /// returns the latencies and the records acknowledged.
    fn run(
        mut self,
        mut d: streambus_adapters::blocking::Client<WINDOW>,
    ) -> Result<(hdrhistogram::Histogram<u64>, u64), String> {
        let what = self.what;
        let mut request = match self.load {
            Load::Produce { .. } | Load::Producers => {
                let topic = Topic::new(&self.topic).map_err(|e| e.to_string())?;
                produce_request(topic, &self.set).map_err(|e| e.message)?
            }
            Load::Health => Request::HealthCheck,
        };
        let ty = request.request_type();
        let count = i32::try_from(self.per_request).unwrap_or(i32::MAX);
        // Request ids are small consecutive integers: no need to hash them.
        let mut sent_at: IntMap<u64, std::time::Instant> = IntMap::default();
        sent_at.reserve(self.window);
        let (mut sent, mut acked) = (0u64, 0u64);
        loop {
            // One clock reading per refill and one per wake-up: reading the clock per
            // request costs more than the rest of this loop.
            let now = std::time::Instant::now();
            let more = !self.stop.load(Ordering::Relaxed) && self.deadline.is_none_or(|d| now < d);
            while more && sent < self.share && sent_at.len() < self.window {
                if let Request::Produce(p) = &mut request {
                    p.producer = self.producing.next(count);
                }
                let id = d
                    .queue(&request)
                    .map_err(|e| format!("sending a {what}: {e}"))?;
                sent_at.insert(id, now);
                sent += 1;
            }
            if sent_at.is_empty() {
                break;
            }
            d.flush().map_err(|e| format!("sending a {what}: {e}"))?;
            // Wait for one reply, then take every reply already received before queueing
            // more: the next flush writes the new requests in one go.
            let mut done = Some(
                d.next_completion()
                    .map_err(|e| format!("reading a {what} reply: {e}"))?,
            );
            let now = std::time::Instant::now();
            let mut replies = 0u64;
            while let Some(c) = done {
                if c.timed_out {
                    return Err(format!("a {what} timed out"));
                }
                if let Some(t) = sent_at.remove(&c.request_id) {
                    self.latency
                        .saturating_record(nanos(now.saturating_duration_since(t)));
                }
                match d.response(ty) {
                    Some(Response::Error(e)) => {
                        return Err(format!("{what} failed: {} ({})", e.message, e.code));
                    }
                    Some(_) => {}
                    None => return Err(format!("a {what} reply could not be decoded")),
                }
                replies += self.per_request;
                done = d.poll_completion();
            }
            acked += replies;
            self.bar.inc(replies);
        }
        Ok((self.latency, acked))
    }
}

/// `fetch`: Fetches of `--max-bytes` from partition 0, one at a time, from its start to its
/// end and around again (64 MiB of `--size` values are stored first if it is empty).
pub(crate) async fn fetch(
    ctx: &Ctx,
    args: &Bench,
    stop: &Arc<AtomicBool>,
) -> Result<Report, Failure> {
    ensure_topic(ctx, args).await?;
    let dial = Dial::new(ctx).await?;
    let max_bytes = args.max_bytes;
    let buffer = usize::try_from(max_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(64 << 10)
        .max(1 << 20);
    let mut d: Driver<1> = dial.open(ctx, "connect", None, buffer).await?;
    let topic = topic(args)?;
    let mut range = partitions(ctx, &args.topic, Some(0)).await?;
    let first = range
        .pop()
        .ok_or_else(|| failed(ctx, "fetch", "partition 0 is missing"))?;
    if first.end == first.start {
        // Fill in batches of about 256 KiB.
        let per = (256usize << 10) / args.size.max(1) + 1;
        let set = message_set(per, args.size)?;
        let request = produce_request(topic, &set)?;
        for _ in 0..FETCH_FILL.div_ceil(per * args.size.max(1)) {
            let r = d
                .request(&request)
                .await
                .map_err(|e| failed(ctx, "filling the topic", e))?;
            check(ctx, "filling the topic", Some(r))?;
        }
    }
    let start_offset = ctx
        .client
        .offsets(&args.topic, 0)
        .await
        .map_err(|e| ctx.err(e))?
        .start;
    let limit = args.messages.unwrap_or(u64::MAX);
    let bar = progress((limit != u64::MAX).then_some(limit), "messages read");
    let mut latency = histogram()?;
    let (mut messages, mut bytes, mut offset) = (0u64, 0u64, start_offset);
    let start = Instant::now();
    let deadline = match (args.messages, args.duration) {
        (_, Some(d)) => Some(start + d),
        (Some(_), None) => None,
        (None, None) => Some(start + Duration::from_secs(5)),
    };
    while messages < limit
        && !stop.load(Ordering::Relaxed)
        && deadline.is_none_or(|d| Instant::now() < d)
    {
        let t = Instant::now();
        let r = d
            .request(&Request::Fetch(FetchRequest {
                topic,
                partition: 0,
                offset,
                max_bytes,
                extension: None,
            }))
            .await
            .map_err(|e| failed(ctx, "fetch", e))?;
        latency.saturating_record(nanos(t.elapsed()));
        match r {
            Response::Fetch(f) => {
                // Counted up to --messages exactly.
                let mut n = 0u64;
                let take = usize::try_from(limit - messages).unwrap_or(usize::MAX);
                for m in f.messages.iter().take(take) {
                    n += 1;
                    bytes += m.value.len() as u64;
                }
                messages += n;
                bar.inc(n);
                let next = f.trailer.map_or(offset, |t| t.next_offset);
                offset = if next >= f.high_water_mark || n == 0 {
                    start_offset
                } else {
                    next
                };
            }
            other => check(ctx, "fetch", Some(other))?,
        }
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    Ok(Report {
        mode: "fetch",
        unit: "message",
        latency_of: "each Fetch, one in flight",
        messages,
        bytes,
        elapsed,
        latency,
        hold: None,
        notes: vec![Note::new(
            "max_bytes",
            serde_json::json!(max_bytes),
            format!("Fetch MaxBytes {max_bytes}"),
        )],
    })
}

/// The resident set of process `pid` in KiB (Linux `/proc`).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The broker's resident memory in KiB: from `/proc` with `--server-pid`, else from its
/// metrics endpoint (`--metrics`, `process_resident_memory_bytes`), else `None`.
async fn server_rss_kib(args: &Bench) -> Result<Option<u64>, Failure> {
    match (args.server_pid, &args.metrics) {
        (Some(pid), _) => Ok(rss_kib(pid)),
        (None, Some(m)) => Ok(Some(scrape_counter(m, RSS_BYTES).await? / 1024)),
        (None, None) => Ok(None),
    }
}

/// The broker's resident memory on its metrics endpoint (Prometheus' standard name).
const RSS_BYTES: &str = "process_resident_memory_bytes";

fn no_such_process(pid: u32) -> Failure {
    Failure::usage(format!(
        "--server-pid {pid}: no such process (its /proc/{pid}/status cannot be read)"
    ))
}

/// `connections`: opens `--connections` connections (spread over `--sources` source
/// addresses), each answering one HealthCheck; with `--server-pid` reports the broker's RSS per
/// connection; with `--hold` keeps them open after the report.
pub(crate) async fn connections(
    ctx: &Ctx,
    args: &Bench,
    stop: &Arc<AtomicBool>,
) -> Result<Report, Failure> {
    let dial = Dial::new(ctx).await?;
    let n = u64::from(args.connections);
    if let Some(pid) = args.server_pid
        && rss_kib(pid).is_none()
    {
        return Err(no_such_process(pid));
    }
    let sources: Vec<std::net::IpAddr> = match args.sources {
        0 | 1 if args.first_source == 1 => Vec::new(),
        k => (0..k.max(1))
            .map(|i| {
                let last = args.first_source.saturating_add(i);
                std::net::IpAddr::from([127, 0, 0, last])
            })
            .collect(),
    };
    let before = server_rss_kib(args).await?;
    let bar = progress(Some(n), "connections");
    let mut latency = histogram()?;
    let mut held: Vec<Driver<1>> = Vec::with_capacity(args.connections as usize);
    let start = Instant::now();
    for i in 0..n {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let source = sources
            .get(usize::try_from(i).unwrap_or(0) % sources.len().max(1))
            .copied();
        let which = || match source {
            Some(s) => format!("connection {} from {s}", i + 1),
            None => format!("connection {}", i + 1),
        };
        let t = Instant::now();
        // A HealthCheck reply is small: 512-byte buffers keep many connections cheap here.
        let mut d = dial.open::<1>(ctx, &which(), source, 512).await?;
        let r = d
            .request(&Request::HealthCheck)
            .await
            .map_err(|e| failed(ctx, &format!("HealthCheck on {}", which()), e))?;
        check(ctx, "HealthCheck", Some(r))?;
        latency.saturating_record(nanos(t.elapsed()));
        held.push(d);
        bar.inc(1);
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    let opened = held.len() as u64;
    let mut notes = Vec::new();
    if let Some(b) = before {
        // Every connection has been answered: the broker holds its state for each.
        let after = server_rss_kib(args).await?.unwrap_or(b);
        #[allow(clippy::cast_precision_loss)]
        let per = after.saturating_sub(b) as f64 * 1024.0 / opened.max(1) as f64;
        notes.push(Note::new(
            "server_rss",
            serde_json::json!({"before_kib": b, "after_kib": after, "bytes_per_connection": per}),
            format!("server RSS: {b} KiB before, {after} KiB with {opened} connections: {per:.0} B per connection"),
        ));
    }
    Ok(Report {
        mode: "connections",
        unit: "connection",
        latency_of: "connect + one HealthCheck",
        messages: opened,
        bytes: 0,
        elapsed,
        latency,
        notes,
        hold: args.hold.map(|d| Hold {
            how_long: d,
            what: format!("{opened} connections"),
            guard: Box::new(held),
        }),
    })
}

/// The `--size`-byte Produce of one record to `topic`, as one frame.
fn produce_frame(args: &Bench, size: usize) -> Result<Vec<u8>, Failure> {
    let set = message_set(1, size)?;
    let request = produce_request(topic(args)?, &set)?;
    let mut frame = vec![0u8; request_encoded_len(&request)];
    encode_request(1, streambus_core::Flags::REQUIRE_ACK, &request, &mut frame)
        .map_err(|e| Failure::runtime(format!("encoding a Produce: {e}")))?;
    Ok(frame)
}

/// One sync Produce of a `--size` record on `d`; returns its round trip and the high-water
/// mark after it.
async fn produce_one<const N: usize>(
    ctx: &Ctx,
    d: &mut Driver<N>,
    request: &Request<'_>,
) -> Result<(Duration, i64), Failure> {
    let t = Instant::now();
    let r = d
        .request(request)
        .await
        .map_err(|e| failed(ctx, "Produce", e))?;
    let took = t.elapsed();
    match r {
        Response::Produce(p) => Ok((took, p.high_water_mark)),
        other => Err(check(ctx, "Produce", Some(other))
            .err()
            .unwrap_or_else(|| failed(ctx, "Produce", "an unexpected reply"))),
    }
}

/// `longpoll`: a consumer long-polls from the end of partition 0 while a producer on another
/// connection sends one `--size` record at a time; the latency is from just before the send to
/// the consumer holding the record. Rounds alternate with sync Produce phases on a third
/// connection (back to back, and after the same `--gap` pause), for the ratio in one run.
pub(crate) async fn longpoll(
    ctx: &Ctx,
    args: &Bench,
    stop: &Arc<AtomicBool>,
) -> Result<Report, Failure> {
    ensure_topic(ctx, args).await?;
    let dial = Dial::new(ctx).await?;
    let set = message_set(1, args.size)?;
    let produce = produce_request(topic(args)?, &set)?;
    let buffer = request_encoded_len(&produce) + (64 << 10);
    let (mut sync, mut producer, mut consumer) = (
        dial.open::<2>(ctx, "the sync producer's connection", None, buffer)
            .await?,
        dial.open::<2>(ctx, "the producer's connection", None, buffer)
            .await?,
        dial.open::<2>(ctx, "the consumer's connection", None, buffer)
            .await?,
    );
    let (_, mut next) = produce_one(ctx, &mut producer, &produce).await?;
    let max_wait_ms = args.max_wait_ms;
    let gap = args.gap;
    let duration = args.duration.unwrap_or(Duration::from_secs(6));
    let rounds = args.rounds.max(1);
    let slice = duration / (4 * rounds);
    let (mut hs, mut hp, mut hl) = (histogram()?, histogram()?, histogram()?);
    let (mut empty, mut late) = (0u64, 0u64);
    let bar = progress(None, "records");
    let start = Instant::now();
    for _ in 0..rounds {
        for (h, pause) in [(&mut hs, Duration::ZERO), (&mut hp, gap)] {
            let end = Instant::now() + slice;
            while Instant::now() < end && !stop.load(Ordering::Relaxed) {
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                let (took, end) = produce_one(ctx, &mut sync, &produce).await?;
                h.saturating_record(nanos(took));
                // The consumer starts after the sync producer's records.
                next = end;
            }
        }
        let end = Instant::now() + 2 * slice;
        while Instant::now() < end && !stop.load(Ordering::Relaxed) {
            let fetch = Request::Fetch(FetchRequest {
                topic: topic(args)?,
                partition: 0,
                offset: next,
                max_bytes: 64 << 10,
                extension: Some(streambus_core::FetchExtension {
                    isolation_level: 0,
                    long_poll: Some(streambus_core::LongPoll {
                        max_wait_ms,
                        min_bytes: 1,
                    }),
                }),
            });
            consumer
                .send(&fetch)
                .await
                .map_err(|e| failed(ctx, "sending a Fetch", e))?;
            // The benchmark's design: the fetch is waiting at the broker when the record comes.
            tokio::time::sleep(gap).await;
            let t = Instant::now();
            producer
                .send(&produce)
                .await
                .map_err(|e| failed(ctx, "sending a Produce", e))?;
            let done = consumer
                .next_completion()
                .await
                .map_err(|e| failed(ctx, "reading a Fetch reply", e))?;
            let held = t.elapsed();
            let got = match (
                done.timed_out,
                consumer.response(streambus_core::RequestType::Fetch),
            ) {
                (false, Some(Response::Fetch(f))) => f.messages.count(),
                (true, _) => return Err(failed(ctx, "Fetch", "timed out")),
                (false, other) => {
                    check(ctx, "Fetch", other)?;
                    0
                }
            };
            let done = producer
                .next_completion()
                .await
                .map_err(|e| failed(ctx, "reading a Produce reply", e))?;
            match (
                done.timed_out,
                producer.response(streambus_core::RequestType::Produce),
            ) {
                (false, Some(Response::Produce(p))) => next = p.high_water_mark,
                (true, _) => return Err(failed(ctx, "Produce", "timed out")),
                (false, other) => check(ctx, "Produce", other)?,
            }
            if got == 0 {
                empty += 1;
                continue;
            }
            if held.as_millis() >= u128::from(max_wait_ms / 2) {
                late += 1;
            }
            hl.saturating_record(nanos(held));
            bar.inc(1);
        }
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    #[allow(clippy::cast_precision_loss)]
    let p50 = |h: &hdrhistogram::Histogram<u64>| h.value_at_quantile(0.5) as f64 / 1e3;
    let (sync_p50, paused_p50, lp_p50) = (p50(&hs), p50(&hp), p50(&hl));
    let messages = hl.len();
    Ok(Report {
        mode: "longpoll",
        unit: "message",
        latency_of: "send to the long-polling consumer holding the record",
        messages,
        bytes: messages * args.size as u64,
        elapsed,
        latency: hl,
        notes: vec![Note::new(
            "sync_produce",
            serde_json::json!({
                "p50_us": sync_p50,
                "after_pause_p50_us": paused_p50,
                "longpoll_ratio": lp_p50 / sync_p50.max(1e-9),
                "longpoll_ratio_after_pause": lp_p50 / paused_p50.max(1e-9),
                "empty_fetches": empty,
                "late_fetches": late,
            }),
            format!(
                "sync Produce p50 {sync_p50:.1} µs ({paused_p50:.1} µs after a {gap:?} pause): long-poll p50 ÷ sync p50 = {:.2} ({:.2} after the pause); {empty} fetches came back empty, {late} were answered after half of MaxWaitMs {max_wait_ms}",
                lp_p50 / sync_p50.max(1e-9),
                lp_p50 / paused_p50.max(1e-9)
            ),
        )],
        hold: None,
    })
}

/// `trickle`: `--connections` connections each send the first `--send-bytes` of a
/// `--frame-bytes` Produce frame and never finish it (a slow or hostile peer), as fast as the
/// broker takes them, for `--duration` (10 s); then reports the broker's peak RSS (with
/// `--server-pid`) and times a fresh connection's HealthCheck (the latency).
pub(crate) async fn trickle(
    ctx: &Ctx,
    args: &Bench,
    stop: &Arc<AtomicBool>,
) -> Result<Report, Failure> {
    let dial = Dial::new(ctx).await?;
    let addr = dial.addr;
    let overhead = produce_frame(args, 0)?.len();
    let frame = Arc::new(produce_frame(
        args,
        args.frame_bytes.saturating_sub(overhead),
    )?);
    let send = args.send_bytes.min(frame.len());
    let before = server_rss_kib(args).await?;
    let mut peak = before.unwrap_or(0);
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| failed(ctx, &format!("connection {}", i + 1), e))?;
        let (frame, sent) = (frame.clone(), sent.clone());
        tasks.spawn(async move {
            let mut at = 0;
            while let Some(rest) = frame.get(at..send).filter(|r| !r.is_empty()) {
                match s.write(rest).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        at += k;
                        sent.fetch_add(k as u64, Ordering::Relaxed);
                    }
                }
            }
            // Holds the half-sent frame until the broker closes or the run ends.
            let mut b = [0u8; 64];
            while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
        });
    }
    let start = Instant::now();
    let end = start + args.duration.unwrap_or(Duration::from_secs(10));
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(r) = server_rss_kib(args).await? {
            peak = peak.max(r);
        }
    }
    let elapsed = start.elapsed();
    let mut latency = histogram()?;
    let t = Instant::now();
    let mut fresh: Driver<1> = dial.open(ctx, "a fresh connection", None, 512).await?;
    let r = fresh
        .request(&Request::HealthCheck)
        .await
        .map_err(|e| failed(ctx, "HealthCheck on a fresh connection", e))?;
    check(ctx, "HealthCheck on a fresh connection", Some(r))?;
    latency.saturating_record(nanos(t.elapsed()));
    tasks.abort_all();
    let sent = sent.load(Ordering::Relaxed);
    let mut notes = vec![Note::new(
        "trickle",
        serde_json::json!({"bytes_sent": sent, "frame_bytes": frame.len(), "send_bytes": send}),
        format!(
            "{} connections sent {:.1} MiB of {:.1} MiB frames ({:.1} MiB each at most)",
            args.connections,
            mib(sent),
            mib(frame.len() as u64),
            mib(send as u64)
        ),
    )];
    if let Some(b) = before {
        notes.push(Note::new(
            "server_rss",
            serde_json::json!({"before_kib": b, "peak_kib": peak}),
            format!(
                "server RSS: {b} KiB before, peak {peak} KiB ({:.1} MiB more)",
                mib(peak.saturating_sub(b) * 1024)
            ),
        ));
    }
    Ok(Report {
        mode: "trickle",
        unit: "connection",
        latency_of: "a fresh connection's connect + HealthCheck afterwards",
        messages: u64::from(args.connections),
        bytes: 0,
        elapsed,
        latency,
        notes,
        hold: None,
    })
}

/// CPU time (user + system) process `pid` has used, in seconds (`/proc/PID/stat` counts in
/// USER_HZ = 100 ticks per second).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which may hold spaces, in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    #[allow(clippy::cast_precision_loss)]
    Some((utime + stime) as f64 / 100.0)
}

/// `handshakes`: fresh connections, one HealthCheck each, from `--connections` threads for
/// `--duration` (5 s) or `--messages` connections; over TLS every one is a full handshake (no
/// resumption). With `--server-pid`, also connections per second of the broker's CPU time.
pub(crate) async fn handshakes(
    ctx: &Ctx,
    args: &Bench,
    stop: &Arc<AtomicBool>,
) -> Result<Report, Failure> {
    let dial = Dial::new(ctx).await?.without_resumption();
    if let Some(pid) = args.server_pid
        && cpu_secs(pid).is_none()
    {
        return Err(no_such_process(pid));
    }
    let threads = args.connections;
    let limit = args.messages.unwrap_or(u64::MAX);
    let bar = progress((limit != u64::MAX).then_some(limit), "connections");
    let cpu_before = args.server_pid.and_then(cpu_secs);
    let start = Instant::now();
    let end = start.into_std()
        + match (args.messages, args.duration) {
            (_, Some(d)) => d,
            (Some(_), None) => Duration::MAX / 4,
            (None, None) => Duration::from_secs(5),
        };
    let opened = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    for i in 0..threads {
        let (dial, stop, bar, opened) = (dial.clone(), stop.clone(), bar.clone(), opened.clone());
        let mut latency = histogram()?;
        let worker = std::thread::Builder::new()
            .name(format!("bench-handshakes-{i}"))
            .spawn(move || {
                while std::time::Instant::now() < end
                    && !stop.load(Ordering::Relaxed)
                    && opened.fetch_add(1, Ordering::Relaxed) < limit
                {
                    let t = std::time::Instant::now();
                    let mut d = dial.open_blocking::<1>(512)?;
                    match d.request(&Request::HealthCheck) {
                        Ok(Response::HealthCheck(_)) => {}
                        Ok(Response::Error(e)) => {
                            return Err(format!("HealthCheck: {} ({})", e.message, e.code));
                        }
                        Ok(_) => return Err("HealthCheck: an unexpected reply".to_string()),
                        Err(e) => return Err(format!("HealthCheck: {e}")),
                    }
                    latency.saturating_record(nanos(t.elapsed()));
                    bar.inc(1);
                }
                Ok(latency)
            })
            .map_err(|e| Failure::runtime(format!("starting a thread: {e}")))?;
        workers.push(worker);
    }
    let results = tokio::task::spawn_blocking(move || {
        workers
            .into_iter()
            .map(|t| t.join().map_err(|_| "a thread panicked".to_string()))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| Failure::runtime(format!("waiting for the threads: {e}")))?;
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    let mut latency = histogram()?;
    for r in results {
        let h = r
            .map_err(Failure::runtime)?
            .map_err(|e| failed(ctx, "a fresh connection", e))?;
        let _ = latency.add(&h);
    }
    let n = latency.len();
    let tls = dial.tls.is_some();
    let mut notes = vec![Note::new(
        "tls",
        serde_json::json!(tls),
        format!(
            "{threads} thread(s) opening {}",
            if tls {
                "TLS connections, a full handshake each (no resumption)"
            } else {
                "plaintext connections"
            }
        ),
    )];
    if let (Some(b), Some(a)) = (cpu_before, args.server_pid.and_then(cpu_secs)) {
        let used = a - b;
        #[allow(clippy::cast_precision_loss)]
        let per_core = if used > 0.0 { n as f64 / used } else { 0.0 };
        notes.push(Note::new(
            "server_cpu",
            serde_json::json!({"cpu_secs": used, "connections_per_cpu_sec": per_core}),
            format!("the broker used {used:.2} CPU-s: {per_core:.0} connections per CPU-second"),
        ));
    }
    Ok(Report {
        mode: "handshakes",
        unit: "connection",
        latency_of: "connect + handshake + one HealthCheck",
        messages: n,
        bytes: 0,
        elapsed,
        latency,
        notes,
        hold: None,
    })
}

#[allow(clippy::cast_precision_loss)]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// The broker's fsync counter on its metrics endpoint.
const FSYNCS: &str = "streambus_storage_fsyncs_total";

/// The broker's Prometheus text at `GET http://ADDR/metrics` (`--metrics ADDR`).
pub(crate) async fn scrape(addr: &str) -> Result<String, Failure> {
    let fail = |e: &dyn std::fmt::Display| Failure::runtime(format!("--metrics {addr}: {e}"));
    let read = async {
        let mut s = TcpStream::connect(addr).await?;
        // HTTP/1.0: no chunking, and the server closes after the body.
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|e| fail(&e))?
        .map_err(|e| fail(&e))
}

/// Reads one counter from the broker's Prometheus text at `GET http://ADDR/metrics`.
async fn scrape_counter(addr: &str, name: &str) -> Result<u64, Failure> {
    let text = scrape(addr).await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .ok_or_else(|| Failure::runtime(format!("--metrics {addr}: no {name} in its /metrics")))
}
