//! Model-based test: random create / delete / append / fetch / restart / retention steps
//! against a plain in-memory model of the log (segments included, so retention is exact).

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use streambus_core::ErrorCode;
use streambus_server::storage::{Storage, StorageConfig, StorageError, TopicConfig};

use super::support::*;

const TOPICS: [&str; 3] = ["a", "b.c", "d-e_f"];
const SEGMENT_BYTES: u64 = 300;
const RETENTION_BYTES: u64 = 700;
const RETENTION_AGE_NS: i64 = 500;
/// Topic "a" keeps more bytes than the broker default.
const A_RETENTION_BYTES: u64 = 1500;

#[derive(Debug, Clone)]
enum Op {
    Create {
        topic: usize,
        partitions: u32,
    },
    Delete {
        topic: usize,
    },
    Append {
        topic: usize,
        partition: u32,
        msgs: Vec<(u8, u8, bool)>,
    },
    Fetch {
        topic: usize,
        partition: u32,
        pick: u16,
        max_bytes: u32,
        exact: Option<(usize, bool)>,
    },
    Restart,
    Retention {
        advance: i64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..3usize, 1..4u32).prop_map(|(topic, partitions)| Op::Create { topic, partitions }),
        1 => (0..3usize).prop_map(|topic| Op::Delete { topic }),
        10 => (0..3usize, 0..3u32, prop::collection::vec((0..4u8, 0..90u8, any::<bool>()), 0..6))
            .prop_map(|(topic, partition, msgs)| Op::Append { topic, partition, msgs }),
        6 => (0..3usize, 0..3u32, any::<u16>(), 1..700u32, proptest::option::of((1..8usize, any::<bool>())))
            .prop_map(|(topic, partition, pick, max_bytes, exact)| Op::Fetch { topic, partition, pick, max_bytes, exact }),
        1 => Just(Op::Restart),
        2 => (0..50i64).prop_map(|n| Op::Retention { advance: n * 10 }),
    ]
}

#[derive(Debug, Clone)]
struct MSeg {
    base: i64,
    bytes: u64,
    last_append: Option<i64>,
}

#[derive(Debug, Clone)]
struct MPart {
    start: i64,
    /// Every message ever appended; offset == index.
    msgs: Vec<Msg>,
    segs: Vec<MSeg>,
}

impl MPart {
    fn new() -> Self {
        Self {
            start: 0,
            msgs: Vec::new(),
            segs: vec![MSeg {
                base: 0,
                bytes: 0,
                last_append: None,
            }],
        }
    }

    fn end(&self) -> i64 {
        self.msgs.len() as i64
    }

    fn append(&mut self, batch: Vec<Msg>, now: i64) {
        if batch.is_empty() {
            return;
        }
        let len: u64 = batch.iter().map(record_len).sum::<usize>() as u64;
        let active = self.segs.last().unwrap();
        if active.bytes > 0 && active.bytes + len > SEGMENT_BYTES {
            self.segs.push(MSeg {
                base: self.end(),
                bytes: 0,
                last_append: None,
            });
        }
        let active = self.segs.last_mut().unwrap();
        active.bytes += len;
        active.last_append = Some(now);
        self.msgs.extend(batch);
    }

    fn retention(&mut self, limit: u64, now: i64) {
        let cutoff = now - RETENTION_AGE_NS;
        let mut total: u64 = self.segs.iter().map(|s| s.bytes).sum();
        while self.segs.len() > 1 {
            let s = &self.segs[0];
            if !(total > limit || s.last_append.is_none_or(|t| t <= cutoff)) {
                break;
            }
            total -= s.bytes;
            self.segs.remove(0);
            self.start = self.segs[0].base;
        }
    }
}

fn record_len(m: &Msg) -> usize {
    28 + m.key.len() + m.value.len()
}

fn storage_config(dir: &std::path::Path) -> StorageConfig {
    let mut c = config(dir);
    c.segment_bytes = SEGMENT_BYTES;
    c.retention_bytes = Some(RETENTION_BYTES);
    c.retention_age = Some(Duration::from_nanos(RETENTION_AGE_NS as u64));
    c
}

fn topic_config(topic: usize) -> TopicConfig {
    TopicConfig {
        retention_bytes: (topic == 0).then_some(A_RETENTION_BYTES),
        ..TopicConfig::default()
    }
}

fn code(r: Result<impl std::fmt::Debug, StorageError>) -> ErrorCode {
    r.map(|_| ErrorCode::NONE)
        .unwrap_or_else(|e| e.error_code())
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Some(Storage::open(storage_config(dir.path())).unwrap());
    let mut model: BTreeMap<usize, Vec<MPart>> = BTreeMap::new();
    let mut now = 1000i64;
    let ops = std::iter::once(Op::Create {
        topic: 0,
        partitions: 2,
    })
    .chain(ops);
    for op in ops {
        now += 10;
        let st = s.as_ref().unwrap();
        match op {
            Op::Create { topic, partitions } => {
                let r = st.create_topic(TOPICS[topic], partitions, topic_config(topic));
                match model.get(&topic) {
                    Some(parts) if parts.len() as u32 == partitions => assert!(!r.unwrap()),
                    Some(_) => assert_eq!(code(r), ErrorCode::TOPIC_EXISTS),
                    None => {
                        assert!(r.unwrap());
                        model.insert(topic, (0..partitions).map(|_| MPart::new()).collect());
                    }
                }
            }
            Op::Delete { topic } => {
                let r = st.delete_topic(TOPICS[topic]);
                match model.remove(&topic) {
                    Some(_) => r.unwrap(),
                    None => assert_eq!(code(r), ErrorCode::TOPIC_NOT_FOUND),
                }
            }
            Op::Append {
                topic,
                partition,
                msgs,
            } => {
                let wire: Vec<_> = msgs
                    .iter()
                    .enumerate()
                    .map(|(i, &(k, v, zero))| {
                        (
                            vec![k; usize::from(k)],
                            vec![v; usize::from(v)],
                            if zero { 0 } else { -(i as i64) - 1 },
                        )
                    })
                    .collect();
                let (n, buf) = encode(&wire);
                let r = st.append(TOPICS[topic], partition, &set(n, &buf), now);
                let Some(part) = model
                    .get_mut(&topic)
                    .and_then(|p| p.get_mut(partition as usize))
                else {
                    let want = if model.contains_key(&topic) {
                        ErrorCode::PARTITION_NOT_FOUND
                    } else {
                        ErrorCode::TOPIC_NOT_FOUND
                    };
                    assert_eq!(code(r), want);
                    continue;
                };
                let r = r.unwrap();
                let base = part.end();
                assert_eq!(
                    (r.base_offset, r.count, r.high_water_mark),
                    (base, n, base + i64::from(n))
                );
                let batch = wire
                    .into_iter()
                    .zip(base..)
                    .map(|((key, value, ts), offset)| Msg {
                        offset,
                        timestamp: if ts == 0 { now } else { ts },
                        key,
                        value,
                    })
                    .collect();
                part.append(batch, now);
            }
            Op::Fetch {
                topic,
                partition,
                pick,
                mut max_bytes,
                exact,
            } => {
                let Some(part) = model.get(&topic).and_then(|p| p.get(partition as usize)) else {
                    assert_ne!(
                        code(st.fetch(TOPICS[topic], partition, 0, max_bytes, u32::MAX)),
                        ErrorCode::NONE
                    );
                    continue;
                };
                let (start, end) = (part.start, part.end());
                let offset = start - 1 + i64::from(pick) % (end - start + 3);
                if let Some((k, minus_one)) = exact {
                    // A limit exactly at (or one below) the size of the next k records.
                    let from = offset.clamp(0, end) as usize;
                    let sum: usize = part.msgs[from..].iter().take(k).map(record_len).sum();
                    max_bytes = (sum.max(1) - usize::from(minus_one)).max(1) as u32;
                }
                let r = st.fetch(TOPICS[topic], partition, offset, max_bytes, u32::MAX);
                if offset < start || offset > end {
                    assert_eq!(
                        code(r),
                        ErrorCode::OFFSET_OUT_OF_RANGE,
                        "offset {offset} of {start}..{end}"
                    );
                    continue;
                }
                let r = r.unwrap();
                let mut want = Vec::new();
                let mut size = 0;
                for m in &part.msgs[offset as usize..] {
                    size += record_len(m);
                    if size > max_bytes as usize && !want.is_empty() {
                        break;
                    }
                    want.push(m.clone());
                }
                assert_eq!(
                    decode(r.count, &r.records),
                    want,
                    "fetch {offset} max {max_bytes}"
                );
                assert_eq!(r.next_offset, offset + want.len() as i64);
                assert_eq!((r.high_water_mark, r.log_start), (end, start));
                assert_eq!(r.crc, streambus_core::checksum::checksum(&r.records));
            }
            Op::Restart => {
                drop(s.take());
                s = Some(Storage::open(storage_config(dir.path())).unwrap());
            }
            Op::Retention { advance } => {
                now += advance;
                st.enforce_retention(now).unwrap();
                for (&topic, parts) in &mut model {
                    let limit = if topic == 0 {
                        A_RETENTION_BYTES
                    } else {
                        RETENTION_BYTES
                    };
                    parts.iter_mut().for_each(|p| p.retention(limit, now));
                }
            }
        }
        let st = s.as_ref().unwrap();
        let want: Vec<(String, u32)> = model
            .iter()
            .map(|(&t, p)| (TOPICS[t].to_string(), p.len() as u32))
            .collect();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(st.list_topics(), want_sorted);
        for (&t, parts) in &model {
            for (p, part) in parts.iter().enumerate() {
                assert_eq!(
                    st.offsets(TOPICS[t], p as u32).unwrap(),
                    (part.start, part.end()),
                    "{} {p}",
                    TOPICS[t]
                );
            }
        }
    }
    assert_eq!(s.unwrap().stats().recovery_truncations, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn storage_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
