//! `produce TOPIC`: one record per input line, batched by the SDK's producer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal as _;

use streambus_client::{Bytes, Delivery, Error, Producer, ProducerConfig, Record};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::args::Produce;
use crate::{Ctx, Failure, Interrupt, Outcome, admin::plural, out_err};

/// What the acknowledgements said, in input order.
#[derive(Debug, Default)]
struct Acks {
    /// Per partition: the first and last offset acknowledged.
    offsets: BTreeMap<u32, (i64, i64)>,
    ok: u64,
    failed: u64,
    first_error: Option<Error>,
}

/// Runs `produce`.
pub(crate) async fn run(ctx: &Ctx, args: Produce) -> Outcome {
    let mut interrupt = Interrupt::new()?;
    let (source, mut input): (String, Box<dyn AsyncBufRead + Unpin>) = match &args.file {
        Some(path) => {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| Failure::runtime(format!("cannot open {}: {e}", path.display())))?;
            (path.display().to_string(), Box::new(BufReader::new(file)))
        }
        None => {
            if std::io::stdin().is_terminal() {
                eprintln!(
                    "reading records for {}, one per line; Ctrl-D ends, Ctrl-C stops",
                    args.topic
                );
            }
            (
                "standard input".to_owned(),
                Box::new(BufReader::new(tokio::io::stdin())),
            )
        }
    };
    // Records may retry within three request timeouts.
    let config =
        ProducerConfig::default().delivery_timeout(ctx.client.config().request_timeout * 3);
    let producer = Producer::with_config(&ctx.client, config).map_err(|e| ctx.err(e))?;

    // Acknowledgements are awaited in input order by their own task, so reading and
    // batching go on meanwhile.
    let (tx, rx) = mpsc::channel::<Delivery>(1 << 16);
    let acks = tokio::spawn(collect(rx, args.verbose));

    // Shared by every record (no copy per record).
    let topic: std::sync::Arc<str> = args.topic.as_str().into();
    let key = args
        .key
        .as_deref()
        .map(|k| Bytes::copy_from_slice(k.as_bytes()));
    let headers: Vec<(Bytes, Bytes)> = args
        .headers
        .iter()
        .map(|(k, v)| {
            (
                Bytes::copy_from_slice(k.as_bytes()),
                Bytes::copy_from_slice(v.as_bytes()),
            )
        })
        .collect();
    let mut line = Vec::new();
    let mut taken = 0u64;
    let mut stopped = None;
    loop {
        line.clear();
        let read = tokio::select! {
            r = input.read_until(b'\n', &mut line) => r,
            () = interrupt.recv() => break,
        };
        match read {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                stopped = Some(Failure::runtime(format!("reading {source}: {e}")));
                break;
            }
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        let mut record = Record::new(topic.clone(), Bytes::copy_from_slice(&line));
        if let Some(k) = &key {
            record = record.key(k.clone());
        }
        for (k, v) in &headers {
            record = record.header(k.clone(), v.clone());
        }
        if let Some(p) = args.partition {
            record = record.partition(p);
        }
        match producer.enqueue(record).await {
            Ok(d) => {
                taken += 1;
                if tx.send(d).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                let mut f = ctx.err(e);
                // Only a refusal before anything was sent is a usage error.
                if taken > 0 {
                    f.code = 1;
                }
                f.message = format!("line {}: {}", taken + 1, f.message);
                stopped = Some(f);
                break;
            }
        }
    }
    drop(tx);
    tokio::select! {
        _ = producer.close() => {}
        () = interrupt.recv() => {
            return Err(Failure::runtime(format!(
                "interrupted with {} not acknowledged",
                plural(producer.outstanding() as u64, "record")
            )));
        }
    }
    let acks = acks
        .await
        .map_err(|e| Failure::runtime(format!("collecting acknowledgements: {e}")))??;

    if let Some(e) = &acks.first_error {
        return Err(Failure::runtime(format!(
            "{} of {} failed; the first: {}",
            acks.failed,
            plural(acks.failed + acks.ok, "record"),
            ctx.err(e.clone()).message
        )));
    }
    let mut summary = format!("produced {} to {}", plural(acks.ok, "record"), args.topic);
    if !acks.offsets.is_empty() && acks.offsets.len() <= 8 {
        let parts: Vec<String> = acks
            .offsets
            .iter()
            .map(|(p, (first, last))| {
                let mut s = format!("partition {p}: offset");
                let _ = if first == last {
                    write!(s, " {first}")
                } else {
                    write!(s, "s {first}-{last}")
                };
                s
            })
            .collect();
        let _ = write!(summary, " ({})", parts.join(", "));
    } else if !acks.offsets.is_empty() {
        let _ = write!(
            summary,
            " ({})",
            plural(acks.offsets.len() as u64, "partition")
        );
    }
    match stopped {
        // One line: what stopped it, and what was produced before.
        Some(mut f) => {
            f.message = format!("{} ({summary} before it)", f.message);
            Err(f)
        }
        None => {
            eprintln!("{summary}");
            Ok(())
        }
    }
}

/// Awaits each delivery in order; with `verbose`, prints `PARTITION OFFSET` for each.
async fn collect(mut rx: mpsc::Receiver<Delivery>, verbose: bool) -> Result<Acks, Failure> {
    use std::io::Write as _;
    let mut acks = Acks::default();
    let mut out = Vec::new();
    while let Some(d) = rx.recv().await {
        match d.await {
            Ok(meta) => {
                acks.ok += 1;
                let e = acks
                    .offsets
                    .entry(meta.partition)
                    .or_insert((meta.offset, meta.offset));
                e.0 = e.0.min(meta.offset);
                e.1 = e.1.max(meta.offset);
                if verbose {
                    let _ = writeln!(out, "{} {}", meta.partition, meta.offset);
                }
            }
            Err(e) => {
                acks.failed += 1;
                acks.first_error.get_or_insert(e);
            }
        }
        if !out.is_empty() && (rx.is_empty() || out.len() > 1 << 16) {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(&out)
                .and_then(|()| stdout.flush())
                .map_err(out_err)?;
            out.clear();
        }
    }
    Ok(acks)
}
