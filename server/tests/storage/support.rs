//! Builders for storage tests.

use std::path::Path;

use streambus_core::{Encode, Message, MessageSet, MessageSetBuilder};
use streambus_server::storage::{FsyncPolicy, Storage, StorageConfig};

/// One message as the tests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Msg {
    pub(crate) offset: i64,
    pub(crate) timestamp: i64,
    pub(crate) key: Vec<u8>,
    pub(crate) value: Vec<u8>,
}

/// Encodes messages (offsets 0) into a buffer; `MessageSet::new_checked` gives the set.
pub(crate) fn encode(msgs: &[(Vec<u8>, Vec<u8>, i64)]) -> (u32, Vec<u8>) {
    let wire: Vec<Message<'_>> = msgs
        .iter()
        .map(|(k, v, ts)| Message {
            offset: 0,
            timestamp: *ts,
            ..Message::new(k, v)
        })
        .collect();
    let mut buf = vec![0u8; wire.iter().map(Encode::encoded_len).sum()];
    let mut b = MessageSetBuilder::new(&mut buf);
    for m in &wire {
        b.push(m).unwrap();
    }
    let n = b.count();
    (n, buf)
}

pub(crate) fn set(count: u32, bytes: &[u8]) -> MessageSet<'_> {
    MessageSet::new_checked(count, bytes).unwrap()
}

/// Appends values (no keys, timestamp 0) and returns the base offset.
pub(crate) fn append_values(s: &Storage, topic: &str, p: u32, values: &[&[u8]], now: i64) -> i64 {
    let msgs: Vec<_> = values.iter().map(|v| (Vec::new(), v.to_vec(), 0)).collect();
    let (n, buf) = encode(&msgs);
    s.append(topic, p, &set(n, &buf), now).unwrap().base_offset
}

/// Decodes fetched records.
pub(crate) fn decode(count: u32, bytes: &[u8]) -> Vec<Msg> {
    MessageSet::new_checked(count, bytes)
        .unwrap()
        .iter()
        .map(|m| Msg {
            offset: m.offset,
            timestamp: m.timestamp,
            key: m.key.to_vec(),
            value: m.value.to_vec(),
        })
        .collect()
}

/// Fetches everything from `from` to the end, in fetches of at most `max_bytes`.
pub(crate) fn fetch_all(s: &Storage, topic: &str, p: u32, from: i64, max_bytes: u32) -> Vec<Msg> {
    let mut out = Vec::new();
    let mut at = from;
    loop {
        let r = s.fetch(topic, p, at, max_bytes, u32::MAX).unwrap();
        assert_eq!(
            r.crc,
            streambus_core::checksum::checksum(&r.records),
            "combined CRC"
        );
        if r.count == 0 {
            assert_eq!(r.next_offset, at);
            assert_eq!(at, r.high_water_mark);
            return out;
        }
        let msgs = decode(r.count, &r.records);
        assert_eq!(msgs.last().unwrap().offset + 1, r.next_offset);
        at = r.next_offset;
        out.extend(msgs);
    }
}

pub(crate) fn config(dir: &Path) -> StorageConfig {
    let mut c = StorageConfig::new(dir);
    c.fsync = FsyncPolicy::Never;
    c.retention_age = None;
    c.retention_check_interval = std::time::Duration::ZERO;
    c
}
