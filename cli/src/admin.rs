//! `topics …`, `offsets` and `health`: one admin call each, printed as text or JSON.

use serde_json::{Value, json};
use streambus_client::{Error, PartitionOffsets};

use crate::args::{Health, Offsets, Topics};
use crate::format::table;
use crate::{Ctx, Failure, Outcome, write_out};

/// Runs `topics create|delete|list|describe`.
pub(crate) async fn topics(ctx: &Ctx, cmd: Topics) -> Outcome {
    let client = &ctx.client;
    match cmd {
        Topics::Create {
            name,
            partitions,
            replication_factor,
        } => {
            let created = client
                .create_topic_replicated(&name, partitions, replication_factor)
                .await
                .map_err(|e| ctx.err(e))?;
            let s = plural(partitions, "partition");
            let line = if created {
                format!("created topic {name} with {s}\n")
            } else {
                format!("topic {name} already exists with {s}\n")
            };
            write_out(line.as_bytes())
        }
        Topics::Delete { name } => {
            client.delete_topic(&name).await.map_err(|e| ctx.err(e))?;
            write_out(format!("deleted topic {name}\n").as_bytes())
        }
        Topics::List { json } => {
            let topics = client.list_topics().await.map_err(|e| ctx.err(e))?;
            let out = if json {
                let list: Vec<Value> = topics
                    .iter()
                    .map(|t| json!({ "name": t.name, "partitions": t.partitions }))
                    .collect();
                format!("{}\n", Value::Array(list))
            } else {
                let rows: Vec<Vec<String>> = topics
                    .iter()
                    .map(|t| vec![t.name.clone(), t.partitions.to_string()])
                    .collect();
                table(&["TOPIC", "PARTITIONS"], &rows)
            };
            write_out(out.as_bytes())
        }
        Topics::Describe { name, json } => {
            let parts = partitions(ctx, &name, None).await?;
            let meta = client
                .metadata([name.as_str()])
                .await
                .map_err(|e| ctx.err(e))?;
            let placement = |p: u32| {
                meta.topic(&name)
                    .and_then(|t| t.partitions.iter().find(|m| m.partition == p))
            };
            let leader = |p: u32| placement(p).and_then(|m| m.leader);
            let replicas = |p: u32| placement(p).map(|m| m.replicas.clone()).unwrap_or_default();
            let out = if json {
                let list: Vec<Value> = parts
                    .iter()
                    .map(|p| {
                        let mut fields = offset_fields(p);
                        fields.insert("leader".into(), json!(leader(p.partition)));
                        fields.insert("replicas".into(), json!(replicas(p.partition)));
                        Value::Object(fields)
                    })
                    .collect();
                let brokers: Vec<Value> = meta
                    .brokers
                    .iter()
                    .map(|b| json!({ "node_id": b.node_id, "address": b.address() }))
                    .collect();
                format!(
                    "{}\n",
                    json!({ "name": name, "partitions": list, "brokers": brokers })
                )
            } else {
                let records: i64 = parts.iter().map(|p| p.end - p.start).sum();
                let mut out = format!(
                    "topic {name}: {}, {} stored\n",
                    plural(parts.len(), "partition"),
                    plural(records, "record")
                );
                let rows: Vec<Vec<String>> = parts
                    .iter()
                    .map(|p| {
                        let replicas: Vec<String> =
                            replicas(p.partition).iter().map(u32::to_string).collect();
                        let mut row = offset_cells(p);
                        row.extend([
                            (p.end - p.start).to_string(),
                            leader(p.partition).map_or_else(|| "none".into(), |l| l.to_string()),
                            replicas.join(","),
                        ]);
                        row
                    })
                    .collect();
                out.push_str(&table(
                    &[&OFFSET_COLUMNS[..], &["RECORDS", "LEADER", "REPLICAS"]].concat(),
                    &rows,
                ));
                for b in &meta.brokers {
                    out.push_str(&format!("broker {} at {}\n", b.node_id, b.address()));
                }
                out
            };
            write_out(out.as_bytes())
        }
    }
}

/// Runs `offsets TOPIC`.
pub(crate) async fn offsets(ctx: &Ctx, args: Offsets) -> Outcome {
    let parts = partitions(ctx, &args.topic, args.partition).await?;
    let out = if args.json {
        format!("{}\n", offsets_json(&parts))
    } else {
        let rows: Vec<Vec<String>> = parts.iter().map(offset_cells).collect();
        table(&OFFSET_COLUMNS, &rows)
    };
    write_out(out.as_bytes())
}

/// Runs `health`: exit status 1 unless the broker says it is healthy.
pub(crate) async fn health(ctx: &Ctx, args: Health) -> Outcome {
    let h = ctx.client.health().await.map_err(|e| ctx.err(e))?;
    let healthy = h.status.eq_ignore_ascii_case("healthy");
    let out = if args.json {
        format!(
            "{}\n",
            json!({ "broker": ctx.broker, "status": h.status, "healthy": healthy, "uptime_secs": h.uptime_secs })
        )
    } else if healthy {
        format!(
            "broker {} is healthy (up {})\n",
            ctx.broker,
            uptime(h.uptime_secs)
        )
    } else {
        String::new()
    };
    write_out(out.as_bytes())?;
    if healthy {
        Ok(())
    } else {
        Err(Failure::runtime(format!(
            "broker {} is unhealthy: status {:?}",
            ctx.broker, h.status
        )))
    }
}

/// The offsets of `topic`'s partitions (or of `only`), with a clear error for a topic or
/// partition that does not exist.
pub(crate) async fn partitions(
    ctx: &Ctx,
    topic: &str,
    only: Option<u32>,
) -> Result<Vec<PartitionOffsets>, Failure> {
    let client = &ctx.client;
    let count = client
        .partition_count(topic)
        .await
        .map_err(|e| ctx.err(e))?;
    let Some(count) = count else {
        // The SDK checks the name (a usage error when invalid); otherwise it is missing.
        return Err(match client.offsets(topic, 0).await {
            Err(e @ Error::InvalidInput { .. }) => ctx.err(e),
            _ => Failure::runtime(format!("topic {topic} does not exist")),
        });
    };
    let range = match only {
        Some(p) if p >= count => {
            return Err(Failure::runtime(format!(
                "topic {topic} has no partition {p} (it has {})",
                plural(count, "partition")
            )));
        }
        Some(p) => p..p + 1,
        None => 0..count,
    };
    let mut out = Vec::with_capacity(range.len());
    for p in range {
        out.push(client.offsets(topic, p).await.map_err(|e| ctx.err(e))?);
    }
    Ok(out)
}

fn offsets_json(parts: &[PartitionOffsets]) -> Value {
    parts
        .iter()
        .map(|p| Value::Object(offset_fields(p)))
        .collect()
}

/// The columns of [`offset_cells`], first in `offsets` and `topics describe`.
const OFFSET_COLUMNS: [&str; 3] = ["PARTITION", "START", "END"];

/// A partition's cells under [`OFFSET_COLUMNS`].
fn offset_cells(p: &PartitionOffsets) -> Vec<String> {
    vec![
        p.partition.to_string(),
        p.start.to_string(),
        p.end.to_string(),
    ]
}

/// A partition's offsets as JSON fields, first in `offsets --json` and `topics describe
/// --json`.
fn offset_fields(p: &PartitionOffsets) -> serde_json::Map<String, Value> {
    let mut fields = serde_json::Map::new();
    fields.insert("partition".into(), json!(p.partition));
    fields.insert("start".into(), json!(p.start));
    fields.insert("end".into(), json!(p.end));
    fields
}

/// `1 partition`, `3 partitions`.
pub(crate) fn plural(n: impl TryInto<i64>, what: &str) -> String {
    let n = n.try_into().unwrap_or(i64::MAX);
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn uptime(secs: i64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}
