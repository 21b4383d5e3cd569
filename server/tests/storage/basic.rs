use streambus_core::ErrorCode;
use streambus_server::storage::{FsyncPolicy, Storage, StorageError, TopicConfig};

use super::support::*;

#[test]
fn append_then_fetch_stamps_offsets_and_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(config(dir.path())).unwrap();
    assert!(s.create_topic("orders", 2, TopicConfig::default()).unwrap());
    let (n, buf) = encode(&[
        (b"k1".to_vec(), b"v1".to_vec(), 0),
        (Vec::new(), b"v2".to_vec(), -5),
        (b"k3".to_vec(), Vec::new(), 7),
    ]);
    let r = s.append("orders", 1, &set(n, &buf), 1000).unwrap();
    assert_eq!((r.base_offset, r.count, r.high_water_mark), (0, 3, 3));
    let r2 = s.append("orders", 1, &set(n, &buf), 2000).unwrap();
    assert_eq!((r2.base_offset, r2.high_water_mark), (3, 6));

    let got = fetch_all(&s, "orders", 1, 0, 1 << 20);
    let offsets: Vec<i64> = got.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, [0, 1, 2, 3, 4, 5]);
    let ts: Vec<i64> = got.iter().map(|m| m.timestamp).collect();
    assert_eq!(ts, [1000, -5, 7, 2000, -5, 7]);
    assert_eq!(got[0].key, b"k1");
    assert_eq!(got[2].value, b"");
    // From the middle of a batch.
    let mid = fetch_all(&s, "orders", 1, 4, 1 << 20);
    assert_eq!(mid, got[4..]);
    // The other partition is empty.
    assert_eq!(s.offsets("orders", 0).unwrap(), (0, 0));
}

#[test]
fn fetch_limits_and_at_least_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(config(dir.path())).unwrap();
    s.create_topic("t", 1, TopicConfig::default()).unwrap();
    // Records of 28 + 100 bytes.
    let v = [7u8; 100];
    append_values(&s, "t", 0, &[&v[..]; 10], 1);
    // A limit below one record still returns one.
    let r = s.fetch("t", 0, 0, 1, u32::MAX).unwrap();
    assert_eq!((r.count, r.records.len(), r.next_offset), (1, 128, 1));
    // Whole records within the limit, cutting the batch.
    let r = s.fetch("t", 0, 2, 3 * 128 + 127, u32::MAX).unwrap();
    assert_eq!((r.count, r.next_offset), (3, 5));
    assert_eq!(r.crc, streambus_core::checksum::checksum(&r.records));
    // The hard cap wins over max_bytes.
    let r = s.fetch("t", 0, 0, 1 << 20, 2 * 128).unwrap();
    assert_eq!(r.count, 2);
    // A single message above the hard cap is an error, not an empty answer.
    let e = s.fetch("t", 0, 0, 1, 100).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::MessageTooLarge {
                offset: 0,
                len: 128,
                limit: 100
            }
        ),
        "{e}"
    );
    // Tail poll and out of range.
    let r = s.fetch("t", 0, 10, 1000, u32::MAX).unwrap();
    assert_eq!((r.count, r.next_offset, r.high_water_mark), (0, 10, 10));
    let e = s.fetch("t", 0, 11, 1000, u32::MAX).unwrap_err();
    assert_eq!(e.error_code(), ErrorCode::OFFSET_OUT_OF_RANGE);
    assert_eq!(
        e.to_string(),
        "offset 11 is out of range: valid offsets are 0 to 10"
    );
    assert!(s.fetch("t", 0, -1, 1000, u32::MAX).is_err());
}

#[test]
fn topics_create_list_delete_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(config(dir.path())).unwrap();
    assert!(s.create_topic("b", 3, TopicConfig::default()).unwrap());
    assert!(s.create_topic("a", 1, TopicConfig::default()).unwrap());
    assert!(s.create_topic("B", 1, TopicConfig::default()).unwrap());
    assert!(!s.create_topic("b", 3, TopicConfig::default()).unwrap());
    let e = s.create_topic("b", 4, TopicConfig::default()).unwrap_err();
    assert_eq!(e.error_code(), ErrorCode::TOPIC_EXISTS);
    assert_eq!(e.to_string(), "topic b already exists with 3 partitions");
    assert_eq!(
        s.list_topics(),
        [
            ("B".to_string(), 1),
            ("a".to_string(), 1),
            ("b".to_string(), 3)
        ]
    );
    assert_eq!(s.partition_count("b"), Some(3));
    for bad in ["", ".", "..", "../x", "a/b", "é", &"x".repeat(250)] {
        let e = s.create_topic(bad, 1, TopicConfig::default()).unwrap_err();
        assert_eq!(e.error_code(), ErrorCode::INVALID_REQUEST, "{bad:?}");
        assert_eq!(
            s.fetch(bad, 0, 0, 1, 1).unwrap_err().error_code(),
            ErrorCode::INVALID_REQUEST
        );
    }
    for count in [0, 1025] {
        let e = s
            .create_topic("c", count, TopicConfig::default())
            .unwrap_err();
        assert_eq!(e.error_code(), ErrorCode::INVALID_REQUEST);
    }
    let e = s.offsets("b", 3).unwrap_err();
    assert_eq!(e.error_code(), ErrorCode::PARTITION_NOT_FOUND);
    assert_eq!(
        e.to_string(),
        "partition 3 does not exist: topic b has 3 partitions"
    );
    let e = s.offsets("zz", 0).unwrap_err();
    assert_eq!(e.error_code(), ErrorCode::TOPIC_NOT_FOUND);
    assert_eq!(e.to_string(), "topic zz does not exist");

    append_values(&s, "a", 0, &[b"x"], 1);
    s.delete_topic("a").unwrap();
    assert_eq!(s.partition_count("a"), None);
    assert_eq!(
        s.delete_topic("a").unwrap_err().error_code(),
        ErrorCode::TOPIC_NOT_FOUND
    );
    // Recreated empty.
    s.create_topic("a", 1, TopicConfig::default()).unwrap();
    assert_eq!(s.offsets("a", 0).unwrap(), (0, 0));
    drop(s);
    let s = Storage::open(config(dir.path())).unwrap();
    assert_eq!(s.list_topics().len(), 3);
    assert_eq!(s.offsets("a", 0).unwrap(), (0, 0));
}

#[test]
fn zero_messages_returns_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(config(dir.path())).unwrap();
    s.create_topic("t", 1, TopicConfig::default()).unwrap();
    append_values(&s, "t", 0, &[b"a", b"b"], 1);
    let r = s
        .append("t", 0, &streambus_core::MessageSet::EMPTY, 5)
        .unwrap();
    assert_eq!((r.base_offset, r.count, r.high_water_mark), (2, 0, 2));
}

#[test]
fn restart_keeps_topics_offsets_and_log_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes = 1000;
    let topic_cfg = TopicConfig {
        retention_bytes: Some(2500),
        fsync: Some(FsyncPolicy::Always),
        ..TopicConfig::default()
    };
    let before = {
        let s = Storage::open(cfg.clone()).unwrap();
        s.create_topic("logs", 2, topic_cfg).unwrap();
        s.create_topic("other", 1, TopicConfig::default()).unwrap();
        let v = [1u8; 172]; // 200-byte records: 5 per segment
        for i in 0..40 {
            append_values(&s, "logs", 1, &[&v], i);
        }
        append_values(&s, "logs", 0, &[b"x"], 1);
        assert!(s.stats().fsyncs >= 40, "Always fsyncs every lone append");
        assert_eq!(
            s.enforce_retention(100).unwrap(),
            6,
            "8 segments of 1000 B: keep 2000 B"
        );
        assert_eq!(s.offsets("logs", 1).unwrap(), (30, 40));
        (s.list_topics(), fetch_all(&s, "logs", 1, 30, 1 << 20))
    };
    let s = Storage::open(cfg).unwrap();
    assert_eq!(s.list_topics(), before.0);
    assert_eq!(s.offsets("logs", 1).unwrap(), (30, 40));
    assert_eq!(s.offsets("logs", 0).unwrap(), (0, 1));
    assert_eq!(fetch_all(&s, "logs", 1, 30, 1 << 20), before.1);
    assert_eq!(
        s.fetch("logs", 1, 29, 1, 1000).unwrap_err().error_code(),
        ErrorCode::OFFSET_OUT_OF_RANGE
    );
    assert_eq!(s.stats().recovery_truncations, 0);
    // Appends continue at the old end.
    assert_eq!(append_values(&s, "logs", 1, &[b"y"], 1), 40);
}

#[test]
fn data_dir_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _s = Storage::open(config(dir.path())).unwrap();
    let e = Storage::open(config(dir.path())).unwrap_err();
    assert!(matches!(e, StorageError::DataDirLocked { .. }), "{e}");
}

#[test]
fn concurrent_appenders_and_readers_with_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.fsync = FsyncPolicy::Always;
    cfg.segment_bytes = 64 * 1024;
    let s = std::sync::Arc::new(Storage::open(cfg).unwrap());
    s.create_topic("t", 1, TopicConfig::default()).unwrap();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..50u32 {
                    let v = format!("w{w}-{i}");
                    append_values(&s, "t", 0, &[v.as_bytes(), v.as_bytes()], 1);
                }
            })
        })
        .collect();
    let reader = {
        let s = s.clone();
        std::thread::spawn(move || {
            // Every fetch sees whole batches: each writer's pair is adjacent and equal.
            for _ in 0..200 {
                let got = fetch_all(&s, "t", 0, 0, 4096);
                assert_eq!(got.len() % 2, 0);
                for pair in got.chunks(2) {
                    assert_eq!(pair[0].value, pair[1].value);
                }
            }
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    reader.join().unwrap();
    assert_eq!(s.offsets("t", 0).unwrap(), (0, 800));
    let stats = s.stats();
    assert_eq!(stats.appends, 400);
    assert!(stats.fsyncs <= stats.appends);
}

#[test]
fn interval_policy_fsyncs_in_the_background_and_never_only_on_sync_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.fsync = FsyncPolicy::Interval(std::time::Duration::from_millis(5));
    let s = Storage::open(cfg).unwrap();
    let never = TopicConfig {
        fsync: Some(FsyncPolicy::Never),
        ..TopicConfig::default()
    };
    s.create_topic("never", 1, never).unwrap();
    append_values(&s, "never", 0, &[b"x"], 1);
    s.create_topic("interval", 1, TopicConfig::default())
        .unwrap();
    append_values(&s, "interval", 0, &[b"x"], 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.stats().fsyncs == 0 {
        assert!(std::time::Instant::now() < deadline, "no background fsync");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Only the interval partition was synced, once: nothing new since.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(s.stats().fsyncs, 1);
    s.sync_all().unwrap();
    assert_eq!(s.stats().fsyncs, 2, "sync_all syncs the `never` partition");
}

#[test]
fn storage_is_shareable() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Storage>();
    assert_send_sync::<StorageError>();
}

#[test]
fn the_largest_topic_opens_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(config(dir.path())).unwrap();
    assert!(
        s.create_topic("wide", 1024, TopicConfig::default())
            .unwrap()
    );
    append_values(&s, "wide", 1023, &[b"last"], 1);
    drop(s);
    let s = Storage::open(config(dir.path())).unwrap();
    assert_eq!(s.partition_count("wide"), Some(1024));
    assert_eq!(s.offsets("wide", 1023).unwrap(), (0, 1));
}

#[test]
fn retention_runs_concurrently_with_appends_and_fetches() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes = 2000;
    cfg.retention_bytes = Some(6000);
    let s = std::sync::Arc::new(Storage::open(cfg).unwrap());
    s.create_topic("t", 1, TopicConfig::default()).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = || stop.load(std::sync::atomic::Ordering::Relaxed);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done() {
                s.enforce_retention(0).unwrap();
            }
        });
        scope.spawn(|| {
            while !done() {
                let (start, _) = s.offsets("t", 0).unwrap();
                match s.fetch("t", 0, start, 3000, u32::MAX) {
                    Ok(r) => {
                        let got = decode(r.count, &r.records);
                        assert!(got.iter().zip(start..).all(|(m, o)| m.offset == o));
                        assert_eq!(r.crc, streambus_core::checksum::checksum(&r.records));
                    }
                    Err(e) => assert!(matches!(e, StorageError::OffsetOutOfRange { .. }), "{e}"),
                }
            }
        });
        let v = [3u8; 72]; // 100-byte records
        for _ in 0..2000 {
            append_values(&s, "t", 0, &[&v[..], &v[..]], 1);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let (start, end) = s.offsets("t", 0).unwrap();
    assert_eq!(end, 4000);
    s.enforce_retention(0).unwrap();
    let (start2, _) = s.offsets("t", 0).unwrap();
    assert!(
        start2 >= start && (end - start2) * 100 <= 6000 + 2000,
        "{start2}"
    );
    assert_eq!(
        fetch_all(&s, "t", 0, start2, 1 << 20).len() as i64,
        end - start2
    );
}

/// A fetch plan's file ranges hold exactly the bytes a fetch reads, with the same CRC and
/// counts, for every start offset and several limits, across rolled segments.
#[test]
fn fetch_plan_ranges_equal_fetch_records() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes = 2048;
    let s = Storage::open(cfg).unwrap();
    s.create_topic("t", 1, TopicConfig::default()).unwrap();
    for i in 0..20u8 {
        let v = vec![i; 50 + usize::from(i) * 7];
        append_values(&s, "t", 0, &[&v[..], &v[..3], &v[..]], 1);
    }
    let (_, end) = s.offsets("t", 0).unwrap();
    for offset in 0..=end {
        for max_bytes in [1, 100, 700, 5000, 1 << 20] {
            let r = s.fetch("t", 0, offset, max_bytes, u32::MAX).unwrap();
            let p = s.fetch_plan("t", 0, offset, max_bytes, u32::MAX).unwrap();
            let mut bytes = Vec::new();
            for range in &p.ranges {
                let mut b = vec![0u8; range.len as usize];
                range.file.read_exact_at(&mut b, range.offset).unwrap();
                bytes.extend_from_slice(&b);
            }
            assert_eq!(bytes, r.records, "offset {offset} max {max_bytes}");
            assert_eq!(
                (p.count, p.next_offset, p.crc, p.len),
                (r.count, r.next_offset, r.crc, r.records.len() as u64)
            );
            assert_eq!(
                (p.high_water_mark, p.log_start),
                (r.high_water_mark, r.log_start)
            );
        }
    }
    assert!(s.fetch_plan("t", 0, end + 1, 10, u32::MAX).is_err());
}

#[test]
fn a_partition_whose_retention_fails_does_not_spare_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_bytes = 1000;
    cfg.retention_bytes = Some(1000);
    let s = Storage::open(cfg).unwrap();
    let v = [7u8; 172]; // 200-byte records: 5 per segment
    for t in ["a", "z"] {
        s.create_topic(t, 1, TopicConfig::default()).unwrap();
        for _ in 0..20 {
            append_values(&s, t, 0, &[&v], 1);
        }
    }
    // "a" (visited first) can't persist its new log start: a directory is in the way.
    std::fs::create_dir(dir.path().join("topics/a/0/partition.toml.tmp")).unwrap();
    let e = s.enforce_retention(1).unwrap_err();
    assert!(matches!(e, StorageError::Io { .. }), "{e:?}");
    assert_eq!(s.offsets("a", 0).unwrap().0, 0, "a kept everything");
    assert_eq!(
        s.offsets("z", 0).unwrap().0,
        15,
        "z was trimmed all the same"
    );
}
