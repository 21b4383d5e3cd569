//! `topics …`, `offsets`, `health` and `cluster status`: one admin call each, printed as text
//! or JSON.

use serde_json::{Value, json};
use std::collections::BTreeMap;

use streambus_client::{Error, PartitionOffsets};

use crate::args::{Cluster, Health, Offsets, Topics};
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

/// Runs `cluster status`: the brokers, then every partition's leader and replicas.
pub(crate) async fn cluster(ctx: &Ctx, cmd: Cluster) -> Outcome {
    let Cluster::Status { json, metrics } = cmd;
    let meta = ctx
        .client
        .metadata(std::iter::empty::<&str>())
        .await
        .map_err(|e| ctx.err(e))?;
    let ends = if metrics.is_empty() {
        None
    } else {
        let mut ends = LogEnds::default();
        for addr in &metrics {
            ends.read(addr, &crate::raw::scrape(addr).await?)?;
        }
        Some(ends)
    };
    // Per replica, in the order of `replicas`: its lag behind the leader, when known.
    let lags = |topic: &str, p: &streambus_client::PartitionMetadata| -> Vec<Option<i64>> {
        let Some(ends) = &ends else { return Vec::new() };
        let leader = p.leader.and_then(|l| ends.end(topic, p.partition, l));
        p.replicas
            .iter()
            .map(|r| Some((leader? - ends.end(topic, p.partition, *r)?).max(0)))
            .collect()
    };
    let out = if json {
        let brokers: Vec<Value> = meta
            .brokers
            .iter()
            .map(|b| json!({ "node_id": b.node_id, "address": b.address() }))
            .collect();
        let topics: Vec<Value> = meta
            .topics
            .iter()
            .map(|t| {
                let partitions: Vec<Value> = t
                    .partitions
                    .iter()
                    .map(|p| {
                        let mut v = json!({
                            "partition": p.partition,
                            "leader": p.leader,
                            "leader_epoch": p.leader_epoch,
                            "replicas": p.replicas,
                        });
                        if ends.is_some() {
                            v["replica_lag"] = json!(lags(&t.name, p));
                        }
                        v
                    })
                    .collect();
                json!({ "name": t.name, "partitions": partitions })
            })
            .collect();
        format!("{}\n", json!({ "brokers": brokers, "topics": topics }))
    } else {
        let brokers: Vec<Vec<String>> = meta
            .brokers
            .iter()
            .map(|b| vec![b.node_id.to_string(), b.address()])
            .collect();
        let mut out = table(&["BROKER", "ADDRESS"], &brokers);
        let rows: Vec<Vec<String>> = meta
            .topics
            .iter()
            .flat_map(|t| {
                t.partitions.iter().map(|p| {
                    let replicas: Vec<String> = p.replicas.iter().map(u32::to_string).collect();
                    let mut row = vec![
                        t.name.clone(),
                        p.partition.to_string(),
                        p.leader.map_or_else(|| "none".into(), |l| l.to_string()),
                        replicas.join(","),
                    ];
                    if ends.is_some() {
                        let lag: Vec<String> = lags(&t.name, p)
                            .iter()
                            .map(|l| l.map_or_else(|| "?".into(), |l| l.to_string()))
                            .collect();
                        row.push(lag.join(","));
                    }
                    row
                })
            })
            .collect();
        if rows.is_empty() {
            out.push_str("no topics\n");
        } else {
            out.push('\n');
            let header: &[&str] = if ends.is_some() {
                &["TOPIC", "PARTITION", "LEADER", "REPLICAS", "LAG"]
            } else {
                &["TOPIC", "PARTITION", "LEADER", "REPLICAS"]
            };
            out.push_str(&table(header, &rows));
        }
        out
    };
    write_out(out.as_bytes())
}

/// Each replica's log end offset, by (topic, partition, node id), from the brokers'
/// `/metrics` (`streambus_cluster_node_id`, `streambus_partition_log_end_offset`).
#[derive(Debug, Default)]
struct LogEnds(BTreeMap<(String, u32, u32), i64>);

impl LogEnds {
    const NODE: &str = "streambus_cluster_node_id ";
    const END: &str = "streambus_partition_log_end_offset{";

    /// Adds what the metrics text of the broker at `addr` says.
    fn read(&mut self, addr: &str, text: &str) -> Result<(), Failure> {
        let node = text
            .lines()
            .find_map(|l| l.strip_prefix(Self::NODE)?.trim().parse::<u32>().ok())
            .ok_or_else(|| {
                Failure::runtime(format!(
                    "--metrics {addr}: no streambus_cluster_node_id in its /metrics (not a broker in cluster mode?)"
                ))
            })?;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(Self::END) else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let label = |key: &str| {
                labels.split(',').find_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    (k == key).then(|| v.trim_matches('"').to_owned())
                })
            };
            let (Some(topic), Some(partition), Ok(end)) = (
                label("topic"),
                label("partition").and_then(|p| p.parse().ok()),
                value.trim().parse::<i64>(),
            ) else {
                continue;
            };
            self.0.insert((topic, partition, node), end);
        }
        Ok(())
    }

    fn end(&self, topic: &str, partition: u32, node: u32) -> Option<i64> {
        self.0.get(&(topic.to_owned(), partition, node)).copied()
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
        // In a cluster the SDK asks the partition's leader (after a NotLeader, the Metadata).
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
