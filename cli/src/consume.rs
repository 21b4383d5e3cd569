//! `consume TOPIC`: reads partitions with the SDK's long-polling consumer.

use std::collections::BTreeMap;
use std::time::Duration;

use streambus_client::{Consumer, Offset};

use crate::admin::partitions;
use crate::args::{Consume, From};
use crate::format::json;
use crate::{Ctx, Failure, Interrupt, Outcome, write_out};

/// Where one partition is: the next offset to print, and its end when the command started.
#[derive(Debug)]
struct Progress {
    next: i64,
    end: i64,
}

/// Runs `consume`.
pub(crate) async fn run(ctx: &Ctx, args: Consume) -> Outcome {
    let mut interrupt = Interrupt::new()?;
    let topic = args.topic.as_str();
    let parts = partitions(ctx, topic, args.partition).await?;
    let mut consumer = Consumer::new(&ctx.client);
    let mut progress = BTreeMap::new();
    for p in &parts {
        let start = match args.from {
            From::Earliest => p.start,
            From::Latest => p.end,
            // One partition asked for: an offset it doesn't hold is an error.
            From::At(n) if args.partition.is_some() && !(p.start..=p.end).contains(&n) => {
                let holds = if p.start == p.end {
                    format!("it is empty, its next offset is {}", p.end)
                } else {
                    format!("it holds offsets {} to {}", p.start, p.end - 1)
                };
                return Err(Failure::runtime(format!(
                    "offset {n} is out of range for partition {} of {topic}: {holds}",
                    p.partition
                )));
            }
            // Across partitions, each starts as near the offset as it can.
            From::At(n) => n.clamp(p.start, p.end),
        };
        consumer
            .assign(topic, p.partition, Offset::At(start))
            .await
            .map_err(|e| ctx.err(e))?;
        progress.insert(
            p.partition,
            Progress {
                next: start,
                end: p.end,
            },
        );
    }

    let mut left = args.count;
    let mut out = Vec::new();
    loop {
        if left == Some(0) || (!args.follow && progress.values().all(|p| p.next >= p.end)) {
            return Ok(());
        }
        let records = tokio::select! {
            r = consumer.poll(Duration::from_secs(1)) => r.map_err(|e| ctx.err(e))?,
            () = interrupt.recv() => return Ok(()),
        };
        for r in records {
            if left == Some(0) {
                break;
            }
            if let Some(p) = progress.get_mut(&r.partition) {
                p.next = r.offset + 1;
            }
            if args.json {
                out.extend_from_slice(json(&r).to_string().as_bytes());
                out.push(b'\n');
            } else {
                args.format.render(&r, &mut out);
            }
            left = left.map(|n| n - 1);
        }
        write_out(&out)?;
        out.clear();
    }
}
