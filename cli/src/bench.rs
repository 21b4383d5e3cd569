//! `bench produce|consume`: throughput and latency percentiles through the SDK.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use streambus_client::{Consumer, Delivery, Error, Offset, Producer, ProducerConfig, Record};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::admin::{partitions, plural};
use crate::args::{Bench, BenchMode};
use crate::{Ctx, Failure, Interrupt, Outcome, write_out};

/// Records produced when neither `--messages` nor `--duration` is given.
const DEFAULT_MESSAGES: u64 = 1_000_000;

/// What one run measured.
#[derive(Debug)]
struct Report {
    mode: &'static str,
    /// What the latency is of.
    latency_of: &'static str,
    messages: u64,
    /// Bytes of record values.
    bytes: u64,
    elapsed: Duration,
    /// Latencies in ns.
    latency: Histogram<u64>,
}

/// Runs `bench`.
pub(crate) async fn run(ctx: &Ctx, args: Bench) -> Outcome {
    // Ctrl-C ends the measurement early; the results so far are still printed.
    let stop = Arc::new(AtomicBool::new(false));
    let mut interrupt = Interrupt::new()?;
    let flag = stop.clone();
    tokio::spawn(async move {
        interrupt.recv().await;
        flag.store(true, Ordering::Relaxed);
    });
    let report = match args.mode {
        BenchMode::Produce => produce(ctx, &args, &stop).await?,
        BenchMode::Consume => consume(ctx, &args, &stop).await?,
    };
    write_out(render(&report, &args).as_bytes())
}

fn histogram() -> Result<Histogram<u64>, Failure> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| Failure::runtime(format!("creating the latency histogram: {e}")))
}

/// A bar on a terminal (stderr), nothing otherwise.
fn progress(total: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match total {
        Some(n) => (
            ProgressBar::new(n),
            format!(
                "{{elapsed_precise}} [{{bar:40}}] {{human_pos}}/{{human_len}} {what} {{per_sec}}"
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

async fn produce(ctx: &Ctx, args: &Bench, stop: &AtomicBool) -> Result<Report, Failure> {
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
    let config = ProducerConfig::default()
        .linger(args.linger)
        .batch_max_bytes(args.batch_bytes)
        .buffer_max_bytes(args.batch_bytes.saturating_mul(4).max(32 << 20));
    let producer = Producer::with_config(client, config).map_err(|e| ctx.err(e))?;
    let limit = match (args.messages, args.duration) {
        (Some(n), _) => n,
        (None, Some(_)) => u64::MAX,
        (None, None) => DEFAULT_MESSAGES,
    };
    let bar = progress((limit != u64::MAX).then_some(limit), "acked");
    let mut latency = histogram()?;

    // Acknowledgements are awaited in order by their own task.
    let (tx, mut rx) = mpsc::channel::<(Instant, Delivery)>(1 << 16);
    let acks_bar = bar.clone();
    let acks = tokio::spawn(async move {
        let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None::<Error>);
        while let Some((sent, d)) = rx.recv().await {
            match d.await {
                Ok(_) => {
                    latency.saturating_record(nanos(sent.elapsed()));
                    ok += 1;
                    acks_bar.inc(1);
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        (latency, ok, failed, first_error)
    });

    let value = vec![b'x'; args.size];
    let start = Instant::now();
    let deadline = args.duration.map(|d| start + d);
    let mut sent = 0u64;
    while sent < limit && !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        let d = producer
            .enqueue(Record::new(topic, value.clone()))
            .await
            .map_err(|e| ctx.err(e))?;
        if tx.send((now, d)).await.is_err() {
            break;
        }
        sent += 1;
    }
    drop(tx);
    let _ = producer.close().await;
    let (latency, ok, failed, first_error) = acks
        .await
        .map_err(|e| Failure::runtime(format!("collecting acknowledgements: {e}")))?;
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    if let Some(e) = first_error {
        return Err(Failure::runtime(format!(
            "{failed} of {} failed; the first: {}",
            plural(failed + ok, "record"),
            ctx.err(e).message
        )));
    }
    Ok(Report {
        mode: "produce",
        latency_of: "enqueue to acknowledgement",
        messages: ok,
        bytes: ok * args.size as u64,
        elapsed,
        latency,
    })
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
        latency_of: "each poll",
        messages: got,
        bytes,
        elapsed,
        latency,
    })
}

fn nanos(d: Duration) -> u64 {
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
        return format!(
            "{}\n",
            json!({
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
            })
        );
    }
    let mut pcts: Vec<String> = PERCENTILES
        .iter()
        .map(|(label, _, q)| format!("{label} {}", human(h.value_at_percentile(*q))))
        .collect();
    pcts.push(format!("max {}", human(h.max())));
    format!(
        "{}: {} in {secs:.2} s: {rate:.0} msg/s, {mb:.1} MB/s\nlatency ({}, {} samples): {}\n",
        r.mode,
        plural(r.messages, "message"),
        r.latency_of,
        h.len(),
        pcts.join(", ")
    )
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
