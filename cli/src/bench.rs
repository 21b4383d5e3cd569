//! `bench produce|consume`: throughput and latency percentiles through the SDK.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use streambus_client::{
    Client, Consumer, Delivery, Error, Offset, Producer, ProducerConfig, Record,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::admin::{partitions, plural};
use crate::args::{Bench, BenchMode, RequestKind};
use crate::{Ctx, Failure, Interrupt, Outcome, plot, raw, write_out};

/// Records produced when neither `--messages` nor `--duration` is given.
const DEFAULT_MESSAGES: u64 = 1_000_000;
/// Records sent one at a time when neither `--messages` nor `--duration` is given.
const DEFAULT_ROUNDTRIPS: u64 = 100_000;

/// What one run measured.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) mode: &'static str,
    /// What is counted (`message`, `request`).
    pub(crate) unit: &'static str,
    /// What the latency is of.
    pub(crate) latency_of: &'static str,
    pub(crate) messages: u64,
    /// Bytes of record values.
    pub(crate) bytes: u64,
    pub(crate) elapsed: Duration,
    /// Latencies in ns.
    pub(crate) latency: Histogram<u64>,
    /// What else the mode measured.
    pub(crate) notes: Vec<Note>,
    /// What to keep open after the report (`connections --hold`).
    pub(crate) hold: Option<Hold>,
}

/// Something held open for a while after the report is printed.
pub(crate) struct Hold {
    pub(crate) how_long: Duration,
    /// What is held, for the "ready" line.
    pub(crate) what: String,
    /// Dropped when the time is up (or on Ctrl-C).
    pub(crate) guard: Box<dyn Send>,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("how_long", &self.how_long)
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

/// One more figure of a run: a JSON field and a line of text.
#[derive(Debug)]
pub(crate) struct Note {
    key: &'static str,
    value: serde_json::Value,
    text: String,
}

impl Note {
    pub(crate) fn new(key: &'static str, value: serde_json::Value, text: String) -> Self {
        Self { key, value, text }
    }
}

/// Refuses settings `bench` cannot run with, before anything is dialled: `trickle` with TLS.
pub(crate) fn check(args: &Bench, tls: bool) -> Outcome {
    if args.mode == BenchMode::Trickle && tls {
        return Err(Failure::usage(
            "bench trickle writes raw bytes on plaintext connections: it does not take --tls",
        ));
    }
    Ok(())
}

/// Runs `bench`.
pub(crate) async fn run(ctx: &Ctx, args: Bench) -> Outcome {
    check(&args, ctx.client.config().tls.is_some())?;
    // Ctrl-C ends the measurement early; the results so far are still printed.
    let stop = Arc::new(AtomicBool::new(false));
    let mut interrupt = Interrupt::new()?;
    let flag = stop.clone();
    tokio::spawn(async move {
        interrupt.recv().await;
        flag.store(true, Ordering::Relaxed);
    });
    let report = match args.mode {
        BenchMode::Produce => produce(ctx, &args, &stop, false).await?,
        BenchMode::Roundtrip => produce(ctx, &args, &stop, true).await?,
        BenchMode::Consume => consume(ctx, &args, &stop).await?,
        BenchMode::Requests => {
            let load = match args.request {
                RequestKind::Health => raw::Load::Health,
                RequestKind::Produce => raw::Load::Produce {
                    batch: 1,
                    idempotent: args.idempotence.unwrap_or(false),
                },
            };
            raw::pipelined(ctx, &args, &stop, load).await?
        }
        BenchMode::Pingpong => raw::pingpong(&args, &stop).await?,
        BenchMode::Pipeline => {
            let load = raw::Load::Produce {
                batch: args.batch,
                idempotent: args.idempotence.unwrap_or(false),
            };
            raw::pipelined(ctx, &args, &stop, load).await?
        }
        BenchMode::Producers => raw::pipelined(ctx, &args, &stop, raw::Load::Producers).await?,
        BenchMode::Handshakes => raw::handshakes(ctx, &args, &stop).await?,
        BenchMode::Fetch => raw::fetch(ctx, &args, &stop).await?,
        BenchMode::Connections => raw::connections(ctx, &args, &stop).await?,
        BenchMode::Longpoll => raw::longpoll(ctx, &args, &stop).await?,
        BenchMode::Trickle => raw::trickle(ctx, &args, &stop).await?,
    };
    if let Some(path) = &args.plot {
        let chart = plot::Chart {
            title: format!("streambus bench {}", report.mode),
            latency_of: report.latency_of,
            latency: &report.latency,
        };
        plot::write(path, &chart)?;
    }
    write_out(render(&report, &args).as_bytes())?;
    if let Some(hold) = report.hold {
        // A script waiting for this line measures the broker while the connections stay.
        write_out(format!("ready: holding {} for {:?}\n", hold.what, hold.how_long).as_bytes())?;
        let until = Instant::now() + hold.how_long;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(
                Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())),
            )
            .await;
        }
        drop(hold.guard);
    }
    Ok(())
}

/// Latencies from 1 ns to an hour, 3 significant digits.
pub(crate) fn histogram() -> Result<Histogram<u64>, Failure> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| Failure::runtime(format!("creating the latency histogram: {e}")))
}

/// A bar on a terminal (stderr), nothing otherwise.
pub(crate) fn progress(total: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(n) => (
            ProgressBar::new(n),
            format!(
                "{{elapsed_precise}} [{{bar:40}}] {{human_pos}}/{{human_len}} {what}, eta {{eta}}"
            ),
        ),
        None => (
            ProgressBar::new_spinner(),
            format!("{{elapsed_precise}} {{spinner}} {{human_pos}} {what}"),
        ),
    };
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// One producing client's counts.
#[derive(Debug)]
struct Tally {
    latency: Histogram<u64>,
    ok: u64,
    failed: u64,
    first_error: Option<Error>,
}

/// What each producing client does.
#[derive(Debug, Clone)]
struct Job {
    /// Shared by every record (a record costs no allocation of its own).
    topic: std::sync::Arc<str>,
    value: streambus_client::Bytes,
    config: ProducerConfig,
    /// Records to send at most.
    limit: u64,
    deadline: Option<Instant>,
    stop: Arc<AtomicBool>,
    bar: ProgressBar,
    /// An empty histogram to fill.
    latency: Histogram<u64>,
}

impl Job {
    fn go_on(&self, sent: u64) -> bool {
        sent < self.limit
            && !self.stop.load(Ordering::Relaxed)
            && self.deadline.is_none_or(|d| Instant::now() < d)
    }
}

/// `produce` (batching, `one_at_a_time` false) and `roundtrip` (each record awaited before
/// the next), over `--clients` clients.
async fn produce(
    ctx: &Ctx,
    args: &Bench,
    stop: &Arc<AtomicBool>,
    one_at_a_time: bool,
) -> Result<Report, Failure> {
    let client = &ctx.client;
    let topic = args.topic.as_str();
    if client
        .partition_count(topic)
        .await
        .map_err(|e| ctx.err(e))?
        .is_none()
    {
        client
            .create_topic(topic, args.partitions)
            .await
            .map_err(|e| ctx.err(e))?;
    }
    let limit = match (args.messages, args.duration) {
        (Some(n), _) => n,
        (None, Some(_)) => u64::MAX,
        (None, None) if one_at_a_time => DEFAULT_ROUNDTRIPS,
        (None, None) => DEFAULT_MESSAGES,
    };
    let bar = progress((limit != u64::MAX).then_some(limit), "acked");
    let config = ProducerConfig::default()
        .linger(args.linger)
        .batch_max_bytes(args.batch_bytes)
        .idempotence(args.idempotence.unwrap_or(true))
        .buffer_max_bytes(args.batch_bytes.saturating_mul(4).max(32 << 20));
    let clients = u64::from(args.clients);
    // Every client connects before the clock starts.
    let mut jobs = Vec::new();
    for i in 0..clients {
        let c = if i == 0 {
            client.clone()
        } else {
            let cfg = client.config();
            same_token(ctx.builder(), cfg)
                .connect(ctx.broker.as_str())
                .await
                .map_err(|e| ctx.err(e))?
        };
        let share = if limit == u64::MAX {
            limit
        } else {
            limit / clients + u64::from(i < limit % clients)
        };
        jobs.push((c, share));
    }
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for (c, share) in jobs {
        let job = Job {
            topic: args.topic.as_str().into(),
            value: vec![b'x'; args.size].into(),
            config: config.clone(),
            limit: share,
            deadline: args.duration.map(|d| start + d),
            stop: stop.clone(),
            bar: bar.clone(),
            latency: histogram()?,
        };
        if one_at_a_time {
            tasks.spawn(roundtrips(c, job));
        } else {
            tasks.spawn(batching(c, job));
        }
    }
    let mut total = Tally {
        latency: histogram()?,
        ok: 0,
        failed: 0,
        first_error: None,
    };
    while let Some(t) = tasks.join_next().await {
        let t = t
            .map_err(|e| Failure::runtime(format!("a producing task failed: {e}")))?
            .map_err(|e| ctx.err(e))?;
        let _ = total.latency.add(&t.latency);
        total.ok += t.ok;
        total.failed += t.failed;
        if total.first_error.is_none() {
            total.first_error = t.first_error;
        }
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    if let Some(e) = total.first_error {
        return Err(Failure::runtime(format!(
            "{} of {} failed; the first: {}",
            total.failed,
            plural(total.failed + total.ok, "record"),
            ctx.err(e).message
        )));
    }
    Ok(Report {
        mode: if one_at_a_time {
            "roundtrip"
        } else {
            "produce"
        },
        unit: "message",
        latency_of: if one_at_a_time {
            "send to acknowledgement, one in flight per client"
        } else {
            "enqueue to acknowledgement"
        },
        messages: total.ok,
        bytes: total.ok * args.size as u64,
        elapsed,
        latency: total.latency,
        notes: Vec::new(),
        hold: None,
    })
}

/// Enqueues records as fast as the producer takes them; a task awaits the deliveries in
/// order and times each from its enqueue.
async fn batching(client: Client, job: Job) -> Result<Tally, Error> {
    let producer = Producer::with_config(&client, job.config.clone())?;
    let (tx, mut rx) = mpsc::channel::<(Instant, Delivery)>(1 << 16);
    let mut tally = Tally {
        latency: job.latency.clone(),
        ok: 0,
        failed: 0,
        first_error: None,
    };
    let bar = job.bar.clone();
    let acks = tokio::spawn(async move {
        while let Some((sent, d)) = rx.recv().await {
            match d.await {
                Ok(_) => {
                    tally.latency.saturating_record(nanos(sent.elapsed()));
                    tally.ok += 1;
                    bar.inc(1);
                }
                Err(e) => {
                    tally.failed += 1;
                    tally.first_error.get_or_insert(e);
                }
            }
        }
        tally
    });
    let mut sent = 0u64;
    while job.go_on(sent) {
        let now = Instant::now();
        let d = producer
            .enqueue(Record::new(job.topic.clone(), job.value.clone()))
            .await?;
        if tx.send((now, d)).await.is_err() {
            break;
        }
        sent += 1;
    }
    drop(tx);
    let _ = producer.close().await;
    // The task only ends when its channel closes: an error here is a bug.
    acks.await.map_err(|_| Error::Closed {
        context: streambus_client::Context::default(),
        what: "acknowledgement task",
    })
}

/// Sends one record at a time and times each from send to acknowledgement.
async fn roundtrips(client: Client, job: Job) -> Result<Tally, Error> {
    let producer = Producer::with_config(&client, job.config.clone())?;
    let mut tally = Tally {
        latency: job.latency.clone(),
        ok: 0,
        failed: 0,
        first_error: None,
    };
    while job.go_on(tally.ok) {
        let t = Instant::now();
        producer
            .send(Record::new(job.topic.clone(), job.value.clone()))
            .await?;
        tally.latency.saturating_record(nanos(t.elapsed()));
        tally.ok += 1;
        job.bar.inc(1);
    }
    let _ = producer.close().await;
    Ok(tally)
}

async fn consume(ctx: &Ctx, args: &Bench, stop: &AtomicBool) -> Result<Report, Failure> {
    let topic = args.topic.as_str();
    let parts = partitions(ctx, topic, None).await?;
    let stored: i64 = parts.iter().map(|p| p.end - p.start).sum();
    let stored = u64::try_from(stored).unwrap_or(0);
    if stored == 0 {
        return Err(Failure::runtime(format!(
            "topic {topic} holds no records: run `streambus bench produce` first"
        )));
    }
    let target = args.messages.map_or(stored, |n| n.min(stored));
    let mut consumer = Consumer::new(&ctx.client);
    for p in &parts {
        consumer
            .assign(topic, p.partition, Offset::At(p.start))
            .await
            .map_err(|e| ctx.err(e))?;
    }
    let bar = progress(Some(target), "read");
    let mut latency = histogram()?;
    let (mut got, mut bytes) = (0u64, 0u64);
    let start = Instant::now();
    let deadline = args.duration.map(|d| start + d);
    while got < target && !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        let records = consumer
            .poll(Duration::from_millis(200))
            .await
            .map_err(|e| ctx.err(e))?;
        if records.is_empty() {
            continue;
        }
        latency.saturating_record(nanos(now.elapsed()));
        let take = records
            .len()
            .min(usize::try_from(target - got).unwrap_or(usize::MAX));
        for r in records.iter().take(take) {
            bytes += r.value().len() as u64;
        }
        got += take as u64;
        bar.inc(take as u64);
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    Ok(Report {
        mode: "consume",
        unit: "message",
        latency_of: "each poll",
        messages: got,
        bytes,
        elapsed,
        latency,
        notes: Vec::new(),
        hold: None,
    })
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The percentiles reported, with their JSON names.
const PERCENTILES: [(&str, &str, f64); 4] = [
    ("p50", "p50", 50.0),
    ("p90", "p90", 90.0),
    ("p99", "p99", 99.0),
    ("p99.9", "p99_9", 99.9),
];

fn render(r: &Report, args: &Bench) -> String {
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    #[allow(clippy::cast_precision_loss)]
    let (rate, mb) = (r.messages as f64 / secs, r.bytes as f64 / secs / 1e6);
    let h = &r.latency;
    if args.json {
        let mut lat = serde_json::Map::new();
        for (_, name, q) in PERCENTILES {
            lat.insert(name.into(), json!(h.value_at_percentile(q)));
        }
        lat.insert("max".into(), json!(h.max()));
        let mut v = json!({
            "mode": r.mode,
            "topic": args.topic,
            "messages": r.messages,
            "bytes": r.bytes,
            "seconds": secs,
            "messages_per_sec": rate,
            "mb_per_sec": mb,
            "latency_of": r.latency_of,
            "latency_samples": h.len(),
            "latency_ns": lat,
        });
        if let Some(obj) = v.as_object_mut() {
            for n in &r.notes {
                obj.insert(n.key.into(), n.value.clone());
            }
        }
        return format!("{v}\n");
    }
    let mut pcts: Vec<String> = PERCENTILES
        .iter()
        .map(|(label, _, q)| format!("{label} {}", human(h.value_at_percentile(*q))))
        .collect();
    pcts.push(format!("max {}", human(h.max())));
    let mut out = format!(
        "{}: {} in {secs:.2} s: {rate:.0} {}/s, {mb:.1} MB/s\nlatency ({}, {} samples): {}\n",
        r.mode,
        plural(r.messages, r.unit),
        match r.unit {
            "message" => "msg",
            "request" => "req",
            other => other,
        },
        r.latency_of,
        h.len(),
        pcts.join(", ")
    );
    for n in &r.notes {
        out.push_str(&n.text);
        out.push('\n');
    }
    out
}

/// `850 ns`, `4.1 µs`, `4.1 ms`, `1.20 s`.
fn human(ns: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let f = ns as f64;
    match ns {
        0..1_000 => format!("{ns} ns"),
        1_000..1_000_000 => format!("{:.1} µs", f / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} ms", f / 1e6),
        _ => format!("{:.2} s", f / 1e9),
    }
}

/// `builder` with the token of the command's client, if it has one.
fn same_token(
    builder: streambus_client::ClientBuilder,
    config: &streambus_client::ClientConfig,
) -> streambus_client::ClientBuilder {
    match &config.token {
        Some(t) => builder.token(t.expose()),
        None => builder,
    }
}
