//! Replicated partitions as Raft logs (index format 2): entries by index, the high-water mark
//! that Fetch, its plan and GetOffset never pass, truncation, purge, reset and recovery.

use std::path::Path;

use streambus_core::{Encode, Message, MessageSet, MessageSetBuilder};
use streambus_server::storage::{
    FsyncPolicy, ProducerBatch, RaftAppend, RaftEntryKind, RaftLogId, Storage, StorageConfig,
    StorageError, TopicConfig,
};

use crate::support::decode;

fn config(dir: &Path, segment_bytes: u64) -> StorageConfig {
    let mut c = StorageConfig::new(dir);
    c.fsync = FsyncPolicy::Never;
    c.segment_bytes = segment_bytes;
    c.retention_age = None;
    c.retention_check_interval = std::time::Duration::ZERO;
    c
}

fn id(term: u64, index: u64) -> RaftLogId {
    RaftLogId {
        term,
        node_id: 1,
        index,
    }
}

/// Messages stamped as a leader does: offsets from `base`, timestamp 7.
fn stamped(base: i64, values: &[&[u8]]) -> (u32, Vec<u8>) {
    let wire: Vec<Message<'_>> = (base..)
        .zip(values)
        .map(|(offset, v)| Message {
            offset,
            timestamp: 7,
            ..Message::new(b"", v)
        })
        .collect();
    let mut buf = vec![0u8; wire.iter().map(Encode::encoded_len).sum()];
    let mut b = MessageSetBuilder::new(&mut buf);
    for m in &wire {
        b.push(m).unwrap();
    }
    (b.count(), buf)
}

/// Appends a Records entry of `values` at the log's end; returns its records.
fn put(s: &Storage, log_id: RaftLogId, values: &[&[u8]]) -> Vec<u8> {
    let base = s.raft_log_state("t", 0).unwrap().end;
    let (n, buf) = stamped(base, values);
    let (r, _) = s
        .raft_append(
            "t",
            0,
            &RaftAppend {
                log_id,
                kind: RaftEntryKind::Records,
                base_offset: base,
                messages: MessageSet::new_checked(n, &buf).unwrap(),
                append_time: 7,
                producer: None,
            },
        )
        .unwrap();
    assert_eq!((r.base_offset, r.count), (base, n));
    buf
}

fn put_empty(s: &Storage, log_id: RaftLogId, kind: RaftEntryKind) -> Result<(), StorageError> {
    let base = s.raft_log_state("t", 0).unwrap().end;
    s.raft_append(
        "t",
        0,
        &RaftAppend {
            log_id,
            kind,
            base_offset: base,
            messages: MessageSet::new_checked(0, &[]).unwrap(),
            append_time: 7,
            producer: None,
        },
    )
    .map(|_| ())
}

fn offsets_fetched(s: &Storage, from: i64) -> Vec<i64> {
    let f = s.fetch("t", 0, from, 1 << 20, u32::MAX).unwrap();
    decode(f.count, &f.records)
        .iter()
        .map(|m| m.offset)
        .collect()
}

fn raft_error(e: StorageError) -> String {
    match e {
        StorageError::RaftLog { reason, .. } => reason,
        other => panic!("want a RaftLog error, got {other:?}"),
    }
}

#[test]
fn raft_entries_are_read_back_by_index_and_fetch_stops_at_the_high_water_mark() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(config(dir.path(), 1 << 20)).unwrap();
    assert!(s.create_raft_topic("t", 1, TopicConfig::default()).unwrap());
    assert_eq!(s.is_raft_topic("t"), Some(true));
    put_empty(&s, id(1, 0), RaftEntryKind::Membership).unwrap();
    put_empty(&s, id(1, 1), RaftEntryKind::Blank).unwrap();
    let a = put(&s, id(1, 2), &[b"a", b"b", b"c"]);
    let producer = ProducerBatch {
        producer_id: 9,
        epoch: 2,
        base_sequence: 40,
    };
    let (n, b) = stamped(3, &[b"d", b"e"]);
    s.raft_append(
        "t",
        0,
        &RaftAppend {
            log_id: id(2, 3),
            kind: RaftEntryKind::Records,
            base_offset: 3,
            messages: MessageSet::new_checked(n, &b).unwrap(),
            append_time: 8,
            producer: Some(producer),
        },
    )
    .unwrap();
    put_empty(&s, id(2, 4), RaftEntryKind::Blank).unwrap();

    let st = s.raft_log_state("t", 0).unwrap();
    assert_eq!(st.last, Some(id(2, 4)));
    assert_eq!((st.next_index, st.log_start, st.end), (5, 0, 5));
    assert_eq!(st.high_water_mark, 0);
    // Nothing is committed: nothing is readable, and GetOffset's end is the high-water mark.
    assert_eq!(s.offsets("t", 0).unwrap(), (0, 0));
    assert_eq!(offsets_fetched(&s, 0), Vec::<i64>::new());
    assert!(matches!(
        s.fetch("t", 0, 1, 1 << 20, u32::MAX),
        Err(StorageError::OffsetOutOfRange {
            offset: 1,
            start: 0,
            end: 0
        })
    ));

    s.set_high_water_mark("t", 0, 3).unwrap();
    assert_eq!(offsets_fetched(&s, 0), [0, 1, 2]);
    let f = s.fetch("t", 0, 0, 1 << 20, u32::MAX).unwrap();
    assert_eq!((f.high_water_mark, f.next_offset), (3, 3));
    assert_eq!(f.records, a);
    let plan = s.fetch_plan("t", 0, 0, 1 << 20, u32::MAX).unwrap();
    assert_eq!(
        (plan.count, plan.len, plan.high_water_mark),
        (3, a.len() as u64, 3)
    );
    assert_eq!(plan.crc, f.crc);
    assert_eq!(s.offsets("t", 0).unwrap(), (0, 3));
    s.set_high_water_mark("t", 0, 5).unwrap();
    assert_eq!(offsets_fetched(&s, 0), [0, 1, 2, 3, 4]);
    assert_eq!(offsets_fetched(&s, 3), [3, 4]);
    assert!(raft_error(s.set_high_water_mark("t", 0, 4).unwrap_err()).contains("only moves up"));
    assert!(raft_error(s.set_high_water_mark("t", 0, 6).unwrap_err()).contains("5..=5"));

    let e = s.raft_entries("t", 0, 0, 100).unwrap();
    let got: Vec<_> = e
        .iter()
        .map(|e| (e.log_id, e.kind, e.base_offset, e.count, e.producer))
        .collect();
    assert_eq!(
        got,
        [
            (id(1, 0), RaftEntryKind::Membership, 0, 0, None),
            (id(1, 1), RaftEntryKind::Blank, 0, 0, None),
            (id(1, 2), RaftEntryKind::Records, 0, 3, None),
            (id(2, 3), RaftEntryKind::Records, 3, 2, Some(producer)),
            (id(2, 4), RaftEntryKind::Blank, 5, 0, None),
        ]
    );
    assert_eq!(e[2].records, a);
    assert_eq!(e[3].records, b);
    assert_eq!(e[3].append_time, 8);
    assert!(e[0].records.is_empty() && e[4].records.is_empty());
    let mid: Vec<u64> = s
        .raft_entries("t", 0, 2, 4)
        .unwrap()
        .iter()
        .map(|e| e.log_id.index)
        .collect();
    assert_eq!(mid, [2, 3]);

    // Only the next index at the log's end is taken, and nothing but Raft entries.
    let reason = raft_error(put_empty(&s, id(2, 6), RaftEntryKind::Blank).unwrap_err());
    assert!(
        reason.contains("entry 6 does not follow the log: the next index is 5"),
        "{reason}"
    );
    let (n, c) = stamped(4, &[b"x"]);
    let wrong_base = RaftAppend {
        log_id: id(2, 5),
        kind: RaftEntryKind::Records,
        base_offset: 4,
        messages: MessageSet::new_checked(n, &c).unwrap(),
        append_time: 9,
        producer: None,
    };
    let reason = raft_error(s.raft_append("t", 0, &wrong_base).unwrap_err());
    assert!(
        reason.contains("starts at offset 4, but the log ends at 5"),
        "{reason}"
    );
    let reason = raft_error(
        s.append("t", 0, &MessageSet::new_checked(n, &c).unwrap(), 9)
            .unwrap_err(),
    );
    assert!(reason.contains("through its Raft group only"), "{reason}");

    // A single broker's topic is not a Raft log.
    s.create_topic("plain", 1, TopicConfig::default()).unwrap();
    assert_eq!(s.is_raft_topic("plain"), Some(false));
    assert!(raft_error(s.raft_log_state("plain", 0).unwrap_err()).contains("index format 1"));
    assert!(matches!(
        s.create_raft_topic("plain", 1, TopicConfig::default()),
        Err(StorageError::TopicExists { partitions: 1, .. })
    ));
}

#[test]
fn raft_truncate_removes_the_uncommitted_tail_across_segments_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    // 1-byte segments: every batch starts a new segment.
    let s = Storage::open(config(dir.path(), 1)).unwrap();
    s.create_raft_topic("t", 1, TopicConfig::default()).unwrap();
    for i in 0..10u64 {
        put(&s, id(1, i), &[format!("v{i}").as_bytes()]);
    }
    s.set_high_water_mark("t", 0, 4).unwrap();
    let reason = raft_error(s.raft_truncate("t", 0, 3).unwrap_err());
    assert!(
        reason.contains("entry 3 at offset 3: the high-water mark is 4"),
        "{reason}"
    );
    s.raft_truncate("t", 0, 6).unwrap();
    let st = s.raft_log_state("t", 0).unwrap();
    assert_eq!((st.next_index, st.end, st.last), (6, 6, Some(id(1, 5))));
    // Segments 0..=5: the one entry 6 started is gone with it (segment 5 is active again).
    assert_eq!(count_files(dir.path(), "log"), 6);
    // The new leader's entries follow.
    put(&s, id(2, 6), &[b"w6"]);
    put(&s, id(2, 7), &[b"w7"]);
    // Truncating past the end does nothing.
    s.raft_truncate("t", 0, 8).unwrap();
    drop(s);

    let s = Storage::open(config(dir.path(), 1)).unwrap();
    let st = s.raft_log_state("t", 0).unwrap();
    assert_eq!((st.next_index, st.end, st.last), (8, 8, Some(id(2, 7))));
    // The high-water mark is not persisted: it starts at the log start, and the group moves it.
    assert_eq!(st.high_water_mark, 0);
    s.set_high_water_mark("t", 0, 8).unwrap();
    let f = s.fetch("t", 0, 0, 1 << 20, u32::MAX).unwrap();
    let values: Vec<Vec<u8>> = decode(f.count, &f.records)
        .into_iter()
        .map(|m| m.value)
        .collect();
    let want: Vec<Vec<u8>> = ["v0", "v1", "v2", "v3", "v4", "v5", "w6", "w7"]
        .iter()
        .map(|v| v.as_bytes().to_vec())
        .collect();
    assert_eq!(values, want);
    let terms: Vec<(u64, u64)> = s
        .raft_entries("t", 0, 0, 8)
        .unwrap()
        .iter()
        .map(|e| (e.log_id.term, e.log_id.index))
        .collect();
    assert_eq!(
        terms,
        [
            (1, 0),
            (1, 1),
            (1, 2),
            (1, 3),
            (1, 4),
            (1, 5),
            (2, 6),
            (2, 7)
        ]
    );
}

#[test]
fn raft_truncate_within_a_segment_keeps_its_head() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(config(dir.path(), 1 << 20)).unwrap();
    s.create_raft_topic("t", 1, TopicConfig::default()).unwrap();
    put_empty(&s, id(1, 0), RaftEntryKind::Blank).unwrap();
    put(&s, id(1, 1), &[b"a", b"b"]);
    put(&s, id(1, 2), &[b"c"]);
    put_empty(&s, id(1, 3), RaftEntryKind::Blank).unwrap();
    s.raft_truncate("t", 0, 2).unwrap();
    let st = s.raft_log_state("t", 0).unwrap();
    assert_eq!((st.next_index, st.end, st.last), (2, 2, Some(id(1, 1))));
    s.raft_truncate("t", 0, 0).unwrap();
    let st = s.raft_log_state("t", 0).unwrap();
    assert_eq!((st.next_index, st.end, st.last), (0, 0, None));
    put(&s, id(3, 0), &[b"z"]);
    drop(s);
    let s = Storage::open(config(dir.path(), 1 << 20)).unwrap();
    let st = s.raft_log_state("t", 0).unwrap();
    assert_eq!((st.next_index, st.end, st.last), (1, 1, Some(id(3, 0))));
}

fn count_files(dir: &Path, ext: &str) -> usize {
    std::fs::read_dir(dir.join("topics/t/0"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == ext)
        })
        .count()
}

fn only_file(dir: &Path, ext: &str) -> std::path::PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("topics/t/0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    assert_eq!(files.len(), 1);
    files.pop().unwrap()
}

#[test]
fn raft_recovery_cuts_a_torn_last_entry_of_the_index_or_the_log() {
    // The last index entry is 80 bytes: cut it at its first, middle and last byte; then cut
    // the last batch's records instead.
    for (file, cut) in [("idx", 1u64), ("idx", 40), ("idx", 79), ("log", 1)] {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(config(dir.path(), 1 << 20)).unwrap();
        s.create_raft_topic("t", 1, TopicConfig::default()).unwrap();
        put_empty(&s, id(1, 0), RaftEntryKind::Blank).unwrap();
        put(&s, id(1, 1), &[b"a", b"b"]);
        put(&s, id(1, 2), &[b"c"]);
        drop(s);
        let path = only_file(dir.path(), file);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - cut).unwrap();
        drop(f);
        let s = Storage::open(config(dir.path(), 1 << 20)).unwrap();
        let st = s.raft_log_state("t", 0).unwrap();
        assert_eq!(
            (st.next_index, st.end, st.last),
            (2, 2, Some(id(1, 1))),
            "{file} cut by {cut}"
        );
        assert_eq!(s.stats().recovery_truncations, 1, "{file} cut by {cut}");
        assert_eq!(
            std::fs::metadata(only_file(dir.path(), "idx"))
                .unwrap()
                .len(),
            160
        );
        // The log goes on from the recovered end.
        put(&s, id(2, 2), &[b"d"]);
        s.set_high_water_mark("t", 0, 3).unwrap();
        assert_eq!(offsets_fetched(&s, 0), [0, 1, 2]);
    }
}

#[test]
fn raft_purge_moves_the_log_start_and_reset_restarts_the_log_after_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(config(dir.path(), 1)).unwrap();
    s.create_raft_topic("t", 1, TopicConfig::default()).unwrap();
    for i in 0..6u64 {
        put(&s, id(1, i), &[b"v"]);
    }
    s.set_high_water_mark("t", 0, 3).unwrap();
    let reason = raft_error(s.raft_purge("t", 0, id(2, 3)).unwrap_err());
    assert!(reason.contains("holds"), "{reason}");
    // A purge up to entry 3 (offset 3) moves the high-water mark from 3 to 4 with the log
    // start: purged entries are committed.
    s.raft_purge("t", 0, id(1, 3)).unwrap();
    let st = s.raft_log_state("t", 0).unwrap();
    assert_eq!(
        (st.log_start, st.high_water_mark, st.last_purged),
        (4, 4, Some(id(1, 3)))
    );
    // One batch per segment: the four purged ones are gone.
    assert_eq!(count_files(dir.path(), "log"), 2);
    assert_eq!(s.offsets("t", 0).unwrap(), (4, 4));
    assert!(raft_error(s.raft_entries("t", 0, 3, 6).unwrap_err()).contains("from 4 on"));
    let kept: Vec<u64> = s
        .raft_entries("t", 0, 4, 6)
        .unwrap()
        .iter()
        .map(|e| e.log_id.index)
        .collect();
    assert_eq!(kept, [4, 5]);
    drop(s);

    let s = Storage::open(config(dir.path(), 1)).unwrap();
    let st = s.raft_log_state("t", 0).unwrap();
    assert_eq!(
        (st.log_start, st.last_purged, st.last, st.next_index, st.end),
        (4, Some(id(1, 3)), Some(id(1, 5)), 6, 6)
    );
    // A snapshot past the log: everything goes, the log restarts at its end.
    s.raft_reset("t", 0, id(3, 20), 100).unwrap();
    let st = s.raft_log_state("t", 0).unwrap();
    assert_eq!(
        (
            st.log_start,
            st.end,
            st.high_water_mark,
            st.next_index,
            st.last
        ),
        (100, 100, 100, 21, Some(id(3, 20)))
    );
    assert_eq!(count_files(dir.path(), "log"), 1);
    put(&s, id(3, 21), &[b"after"]);
    drop(s);
    let s = Storage::open(config(dir.path(), 1)).unwrap();
    let st = s.raft_log_state("t", 0).unwrap();
    assert_eq!(
        (st.log_start, st.end, st.next_index, st.last, st.last_purged),
        (100, 101, 22, Some(id(3, 21)), Some(id(3, 20)))
    );
    s.set_high_water_mark("t", 0, 101).unwrap();
    assert_eq!(offsets_fetched(&s, 100), [100]);
}
