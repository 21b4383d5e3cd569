//! The broker end to end over real sockets, on each runtime: every request type, pipelining,
//! concurrency, faults, graceful shutdown and restart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use streambus_core::{
    CreateTopicRequest, DeleteTopicRequest, ErrorCode, GetOffsetRequest, Request, RequestType,
    Response, Text, Topic,
};
use streambus_server::{FsyncMode, RuntimeKind};
use streambus_tests::{RawClient, fetch, fetch_all, produce};

const RUNTIMES: [RuntimeKind; 3] = [RuntimeKind::Tokio, RuntimeKind::Smol, RuntimeKind::Blocking];

use streambus_tests::broker_config as config;
use streambus_tests::start_broker as start;

fn topic(s: &str) -> Topic<'_> {
    Topic::new(s).unwrap()
}

#[test]
fn every_request_type() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path(), rt);
        let mut c = RawClient::connect(broker.addr()).unwrap();

        let r = c.call(&Request::HealthCheck).unwrap();
        assert!(
            matches!(r.parse(RequestType::HealthCheck).unwrap(), Response::HealthCheck(h) if h.status == Text(b"healthy"))
        );

        let create = Request::CreateTopic(CreateTopicRequest {
            topic: topic("orders"),
            num_partitions: 3,
            replication_factor: 1,
        });
        let r = c.call(&create).unwrap();
        assert!(
            matches!(r.parse(RequestType::CreateTopic).unwrap(), Response::CreateTopic(t) if t.created),
            "{rt:?}"
        );
        // Same count again: success, created = false. Another count: TopicExists.
        let r = c.call(&create).unwrap();
        assert!(
            matches!(r.parse(RequestType::CreateTopic).unwrap(), Response::CreateTopic(t) if !t.created)
        );
        let r = c
            .call(&Request::CreateTopic(CreateTopicRequest {
                topic: topic("orders"),
                num_partitions: 2,
                replication_factor: 1,
            }))
            .unwrap();
        assert_eq!(r.error_code(), ErrorCode::TOPIC_EXISTS.0);
        let r = c
            .call(&Request::CreateTopic(CreateTopicRequest {
                topic: topic("x"),
                num_partitions: 0,
                replication_factor: 1,
            }))
            .unwrap();
        assert_eq!(r.error_code(), ErrorCode::INVALID_REQUEST.0);

        let r = produce(&mut c, "orders", 1, &[b"a", b"bb", b"ccc"]).unwrap();
        let Response::Produce(p) = r.parse(RequestType::Produce).unwrap() else {
            panic!("{rt:?}: {}", r.error_code())
        };
        assert_eq!(
            (p.base_offset, p.num_messages, p.high_water_mark),
            (0, 3, 3)
        );
        let r = produce(&mut c, "orders", 1, &[]).unwrap();
        let Response::Produce(p) = r.parse(RequestType::Produce).unwrap() else {
            panic!()
        };
        assert_eq!(
            (p.base_offset, p.num_messages, p.high_water_mark),
            (3, 0, 3)
        );
        assert_eq!(
            produce(&mut c, "orders", 3, &[b"x"]).unwrap().error_code(),
            ErrorCode::PARTITION_NOT_FOUND.0
        );

        let r = fetch(&mut c, "orders", 1, 1, 1 << 20).unwrap();
        let Response::Fetch(f) = r.parse(RequestType::Fetch).unwrap() else {
            panic!()
        };
        let got: Vec<_> = f
            .messages
            .iter()
            .map(|m| (m.offset, m.value.to_vec()))
            .collect();
        assert_eq!(got, vec![(1, b"bb".to_vec()), (2, b"ccc".to_vec())]);
        assert_eq!(f.high_water_mark, 3);
        let t = f.trailer.unwrap();
        assert_eq!((t.last_stable_offset, t.next_offset), (3, 3));
        assert!(
            f.messages.iter().all(|m| m.timestamp > 0),
            "timestamp 0 is stamped by the broker"
        );
        // At least one message even when it exceeds max_bytes.
        let r = fetch(&mut c, "orders", 1, 0, 1).unwrap();
        let Response::Fetch(f) = r.parse(RequestType::Fetch).unwrap() else {
            panic!()
        };
        assert_eq!(f.messages.count(), 1);
        // Tail poll and out of range.
        let r = fetch(&mut c, "orders", 1, 3, 100).unwrap();
        assert!(
            matches!(r.parse(RequestType::Fetch).unwrap(), Response::Fetch(f) if f.messages.is_empty())
        );
        assert_eq!(
            fetch(&mut c, "orders", 1, 4, 100).unwrap().error_code(),
            ErrorCode::OFFSET_OUT_OF_RANGE.0
        );
        assert_eq!(
            fetch(&mut c, "orders", 1, -1, 100).unwrap().error_code(),
            ErrorCode::OFFSET_OUT_OF_RANGE.0
        );
        assert_eq!(
            fetch(&mut c, "nope", 0, 0, 100).unwrap().error_code(),
            ErrorCode::TOPIC_NOT_FOUND.0
        );

        let r = c
            .call(&Request::GetOffset(GetOffsetRequest {
                topic: topic("orders"),
                partition: 1,
            }))
            .unwrap();
        let Response::GetOffset(g) = r.parse(RequestType::GetOffset).unwrap() else {
            panic!()
        };
        assert_eq!(
            (
                g.topic.as_str(),
                g.partition,
                g.start_offset,
                g.end_offset,
                g.high_water_mark
            ),
            ("orders", 1, 0, 3, 3)
        );

        // Produce auto-creates with one partition.
        let r = produce(&mut c, "auto", 0, &[b"hi"]).unwrap();
        assert!(matches!(
            r.parse(RequestType::Produce).unwrap(),
            Response::Produce(_)
        ));
        let r = c.call(&Request::ListTopics).unwrap();
        let Response::ListTopics(l) = r.parse(RequestType::ListTopics).unwrap() else {
            panic!()
        };
        let names: Vec<_> = l
            .topics
            .iter()
            .map(|t| (t.name.as_str().to_owned(), t.num_partitions))
            .collect();
        assert_eq!(
            names,
            vec![("auto".to_owned(), 1), ("orders".to_owned(), 3)]
        );

        let r = c
            .call(&Request::DeleteTopic(DeleteTopicRequest {
                topic: topic("auto"),
            }))
            .unwrap();
        assert!(
            matches!(r.parse(RequestType::DeleteTopic).unwrap(), Response::DeleteTopic(d) if d.deleted)
        );
        let r = c
            .call(&Request::DeleteTopic(DeleteTopicRequest {
                topic: topic("auto"),
            }))
            .unwrap();
        assert_eq!(r.error_code(), ErrorCode::TOPIC_NOT_FOUND.0);
        // Error messages say what and which value.
        let r = fetch(&mut c, "orders", 1, 99, 100).unwrap();
        let Response::Error(e) = r.parse(RequestType::Fetch).unwrap() else {
            panic!()
        };
        assert!(e.message.to_string().contains("99"), "{}", e.message);
        broker.shutdown().unwrap();
    }
}

#[test]
fn auto_create_off_gives_topic_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), RuntimeKind::Tokio);
    cfg.auto_create_topics = false;
    let broker = streambus_server::start(cfg).unwrap();
    let mut c = RawClient::connect(broker.addr()).unwrap();
    assert_eq!(
        produce(&mut c, "missing", 0, &[b"x"]).unwrap().error_code(),
        ErrorCode::TOPIC_NOT_FOUND.0
    );
}

#[test]
fn a_thousand_pipelined_produces_on_one_connection() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path(), rt);
        let mut c = RawClient::connect(broker.addr()).unwrap();
        let (count, set) = streambus_tests::message_set(&[b"payload"]);
        let messages = streambus_core::MessageSet::new_checked(count, &set).unwrap();
        let req = Request::Produce(streambus_core::ProduceRequest {
            topic: topic("pipe"),
            partition: 0,
            messages,
            producer: None,
        });
        let mut stream = Vec::new();
        for _ in 0..1000 {
            stream.extend_from_slice(&c.encode(&req).1);
        }
        c.send_raw(&stream).unwrap();
        let mut offsets: Vec<i64> = (0..1000)
            .map(
                |_| match c.recv().unwrap().parse(RequestType::Produce).unwrap() {
                    Response::Produce(p) => p.base_offset,
                    other => panic!("{rt:?}: {other:?}"),
                },
            )
            .collect();
        offsets.sort_unstable();
        assert_eq!(offsets, (0..1000).collect::<Vec<_>>(), "{rt:?}");
        assert_eq!(fetch_all(&mut c, "pipe", 0, 0).unwrap().len(), 1000);
    }
}

#[test]
fn two_hundred_concurrent_connections_lose_and_duplicate_nothing() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path(), rt);
        let addr = broker.addr();
        let mut c = RawClient::connect(addr).unwrap();
        c.call(&Request::CreateTopic(CreateTopicRequest {
            topic: topic("many"),
            num_partitions: 4,
            replication_factor: 1,
        }))
        .unwrap();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..200)
            .map(|i| {
                let acked = acked.clone();
                std::thread::spawn(move || {
                    let mut c = RawClient::connect(addr).unwrap();
                    for j in 0..5 {
                        let value = format!("c{i}-m{j}");
                        let r = produce(&mut c, "many", i % 4, &[value.as_bytes()]).unwrap();
                        let Response::Produce(p) = r.parse(RequestType::Produce).unwrap() else {
                            panic!()
                        };
                        acked
                            .lock()
                            .unwrap()
                            .push((i % 4, p.base_offset, value.into_bytes()));
                    }
                    // Each connection also reads back.
                    assert!(!fetch_all(&mut c, "many", i % 4, 0).unwrap().is_empty());
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut acked = acked.lock().unwrap().clone();
        acked.sort();
        let mut stored = Vec::new();
        for p in 0..4 {
            for (off, v) in fetch_all(&mut c, "many", p, 0).unwrap() {
                stored.push((p, off, v));
            }
        }
        stored.sort();
        assert_eq!(stored.len(), 1000, "{rt:?}");
        assert_eq!(stored, acked, "{rt:?}");
    }
}

#[test]
fn graceful_shutdown_with_producers_running_loses_no_acknowledged_message() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path(), rt);
        let addr = broker.addr();
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let producers: Vec<_> = (0..4)
            .map(|i| {
                let (stop, acked) = (stop.clone(), acked.clone());
                std::thread::spawn(move || {
                    let Ok(mut c) = RawClient::connect(addr) else {
                        return;
                    };
                    let mut j = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let value = format!("p{i}-{j}");
                        j += 1;
                        // Any error (the broker is going away) ends this producer; only acks count.
                        let Ok(r) = produce(&mut c, "durable", 0, &[value.as_bytes()]) else {
                            return;
                        };
                        match r.parse(RequestType::Produce) {
                            Ok(Response::Produce(p)) => acked
                                .lock()
                                .unwrap()
                                .push((p.base_offset, value.into_bytes())),
                            _ => return,
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        broker.shutdown().unwrap();
        stop.store(true, Ordering::SeqCst);
        for p in producers {
            p.join().unwrap();
        }
        let acked = acked.lock().unwrap().clone();
        assert!(!acked.is_empty(), "{rt:?}: producers made progress");
        let broker = start(dir.path(), rt);
        streambus_tests::assert_stored(broker.addr(), "durable", 0, &acked, &format!("{rt:?}"));
    }
}

#[test]
fn restart_serves_everything_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), RuntimeKind::Tokio);
    let mut c = RawClient::connect(broker.addr()).unwrap();
    c.call(&Request::CreateTopic(CreateTopicRequest {
        topic: topic("keep"),
        num_partitions: 2,
        replication_factor: 0,
    }))
    .unwrap();
    for i in 0..50u32 {
        let v = i.to_be_bytes();
        produce(&mut c, "keep", i % 2, &[&v]).unwrap();
    }
    drop(c);
    broker.shutdown().unwrap();
    for rt in RUNTIMES {
        let broker = start(dir.path(), rt);
        let mut c = RawClient::connect(broker.addr()).unwrap();
        for p in 0..2 {
            let got = fetch_all(&mut c, "keep", p, 0).unwrap();
            let want: Vec<_> = (0..50u32)
                .filter(|i| i % 2 == p)
                .enumerate()
                .map(|(o, i)| (o as i64, i.to_be_bytes().to_vec()))
                .collect();
            assert_eq!(got, want, "{rt:?}");
        }
        let r = c.call(&Request::ListTopics).unwrap();
        let Response::ListTopics(l) = r.parse(RequestType::ListTopics).unwrap() else {
            panic!()
        };
        assert_eq!(l.topics.len(), 1);
    }
}

#[test]
fn message_larger_than_the_frame_allows_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), RuntimeKind::Tokio);
    cfg.max_frame_bytes = 4096;
    let broker = streambus_server::start(cfg).unwrap();
    let mut c = RawClient::connect(broker.addr()).unwrap();
    // A 4 030-byte value: the frame fits (Length 4 089 <= 4 096) but the record
    // (28 + 4 030 = 4 058) is over 4 096 - 43 = 4 053, so it could never be fetched alone.
    let big = vec![7u8; 4030];
    let r = produce(&mut c, "big", 0, &[&big]).unwrap();
    assert_eq!(r.error_code(), ErrorCode::MESSAGE_TOO_LARGE.0);
    let ok = vec![7u8; 4096 - 43 - 28];
    let r = produce(&mut c, "big", 0, &[&ok]).unwrap();
    assert!(
        matches!(r.parse(RequestType::Produce).unwrap(), Response::Produce(_)),
        "code {}",
        r.error_code()
    );
    let got = fetch_all(&mut c, "big", 0, 0).unwrap();
    assert_eq!(got.len(), 1);
}

#[test]
fn a_topic_list_over_the_maximum_frame_is_refused_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), RuntimeKind::Tokio);
    cfg.max_frame_bytes = 1024;
    let broker = streambus_server::start(cfg).unwrap();
    let mut c = RawClient::connect(broker.addr()).unwrap();
    // Each entry is 4 + 249 + 4 bytes: three fit in 1 024, five don't.
    for i in 0..5u8 {
        let name = String::from_utf8(vec![b'a' + i; 249]).unwrap();
        let r = c
            .call(&Request::CreateTopic(CreateTopicRequest {
                topic: topic(&name),
                num_partitions: 1,
                replication_factor: 1,
            }))
            .unwrap();
        assert_eq!(r.error_code(), 0);
    }
    let r = c.call(&Request::ListTopics).unwrap();
    assert!(r.0.len() - 4 <= 1024, "reply Length {}", r.0.len() - 4);
    assert_eq!(r.error_code(), ErrorCode::MESSAGE_TOO_LARGE.0);
    let Response::Error(e) = r.parse(RequestType::ListTopics).unwrap() else {
        panic!("not an error reply");
    };
    assert!(e.message.to_string().contains("5 topics"), "{}", e.message);
    // The connection goes on.
    assert_eq!(c.call(&Request::HealthCheck).unwrap().error_code(), 0);
}

/// A Produce that auto-creates its topic while a CreateTopic of the same name (3 partitions)
/// runs: whoever wins, the Produce to partition 0 is appended, never answered TopicExists.
#[test]
fn auto_create_racing_create_topic_still_appends() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), RuntimeKind::Tokio);
    let addr = broker.addr();
    for i in 0..100 {
        let name = format!("race{i}");
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let (b, n) = (barrier.clone(), name.clone());
        let creator = std::thread::spawn(move || {
            let mut c = RawClient::connect(addr).unwrap();
            b.wait();
            c.call(&Request::CreateTopic(CreateTopicRequest {
                topic: topic(&n),
                num_partitions: 3,
                replication_factor: 1,
            }))
            .unwrap()
            .error_code()
        });
        let mut p = RawClient::connect(addr).unwrap();
        barrier.wait();
        let r = produce(&mut p, &name, 0, &[b"v"]).unwrap();
        let created = creator.join().unwrap();
        assert_eq!(r.error_code(), 0, "produce to {name}");
        // The CreateTopic loses only to the auto-create (1 partition): TopicExists.
        assert!(
            created == 0 || created == ErrorCode::TOPIC_EXISTS.0,
            "{created}"
        );
        assert_eq!(fetch_all(&mut p, &name, 0, 0).unwrap().len(), 1);
    }
}

#[test]
fn metrics_are_served_in_prometheus_text_format() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), RuntimeKind::Tokio);
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let broker = streambus_server::start(cfg).unwrap();
    let mut c = RawClient::connect(broker.addr()).unwrap();
    produce(&mut c, "m", 0, &[b"x"]).unwrap();
    fetch(&mut c, "nope", 0, 0, 10).unwrap();
    let body = streambus_tests::metrics_text(broker.metrics_addr().unwrap());
    assert!(
        body.starts_with("HTTP/1.1 200") || body.starts_with("HTTP/1.0 200"),
        "{body}"
    );
    for needle in [
        "streambus_connections_open 1",
        "streambus_connections_accepted_total 1",
        r#"streambus_requests_total{type="produce",status="ok"} 1"#,
        r#"streambus_requests_total{type="fetch",status="TopicNotFound"} 1"#,
        "streambus_request_latency_seconds_count 2",
        "streambus_storage_appends_total 1",
        "streambus_bytes_in_total",
    ] {
        assert!(body.contains(needle), "missing {needle:?} in\n{body}");
    }
    // The process metrics under their standard names: this test process's own memory and
    // descriptors (the broker runs in it), read from /proc at the scrape.
    let value = |name: &str| -> i64 {
        let v = streambus_tests::metric(broker.metrics_addr().unwrap(), name)
            .unwrap_or_else(|| panic!("no {name} in /metrics"));
        v.parse().unwrap()
    };
    let rss = value("process_resident_memory_bytes");
    assert!(rss > 1 << 20 && rss % 1024 == 0, "{rss}");
    // At least the listener, the metrics listener, the client connection and stdio.
    assert!(value("process_open_fds") >= 5);
}

#[test]
fn fsync_always_with_concurrent_producers() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), rt);
        cfg.fsync = FsyncMode::Always;
        let broker = streambus_server::start(cfg).unwrap();
        let addr = broker.addr();
        let mut c = RawClient::connect(addr).unwrap();
        produce(&mut c, "sync", 0, &[b"first"]).unwrap();
        let threads: Vec<_> = (0..16)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut c = RawClient::connect(addr).unwrap();
                    (0..10)
                        .map(|j| {
                            let v = format!("{i}-{j}");
                            match produce(&mut c, "sync", 0, &[v.as_bytes()])
                                .unwrap()
                                .parse(RequestType::Produce)
                                .unwrap()
                            {
                                Response::Produce(p) => (p.base_offset, v.into_bytes()),
                                other => panic!("{other:?}"),
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut acked: Vec<_> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        acked.sort();
        let stats = broker.storage_stats();
        assert!(
            stats.fsyncs >= 1 && stats.fsyncs <= stats.appends,
            "{rt:?}: {stats:?}"
        );
        let stored: Vec<_> = fetch_all(&mut c, "sync", 0, 1).unwrap();
        assert_eq!(stored, acked, "{rt:?}");
    }
}

#[test]
fn large_fetches_go_out_with_sendfile_intact_and_in_order() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path(), rt);
        let mut c = RawClient::connect(broker.addr()).unwrap();
        // 4 batches of 50 values of 1 000 bytes: 200 KB of records, above the sendfile threshold.
        let mut want = Vec::new();
        for b in 0..4u8 {
            let values: Vec<Vec<u8>> = (0..50u8)
                .map(|i| vec![b.wrapping_mul(50).wrapping_add(i); 1000])
                .collect();
            let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
            produce(&mut c, "big", 0, &refs).unwrap();
            want.extend(values);
        }
        // Pipelined: large fetch, health check, large fetch from the middle of a batch, small fetch.
        let t = topic("big");
        let fetch_req = |offset, max_bytes| {
            Request::Fetch(streambus_core::FetchRequest {
                topic: t,
                partition: 0,
                offset,
                max_bytes,
                extension: None,
            })
        };
        let reqs = [
            fetch_req(0, 1 << 20),
            Request::HealthCheck,
            fetch_req(75, 1 << 20),
            fetch_req(3, 2500),
        ];
        let mut burst = Vec::new();
        let ids: Vec<u64> = reqs
            .iter()
            .map(|r| {
                let (id, bytes) = c.encode(r);
                burst.extend_from_slice(&bytes);
                id
            })
            .collect();
        c.send_raw(&burst).unwrap();
        let replies: Vec<_> = (0..4).map(|_| c.recv().unwrap()).collect();
        assert_eq!(
            replies.iter().map(|r| r.request_id()).collect::<Vec<_>>(),
            ids,
            "{rt:?}"
        );
        for (reply, (from, n)) in [
            (&replies[0], (0usize, 200usize)),
            (&replies[2], (75, 125)),
            (&replies[3], (3, 2)),
        ] {
            let Response::Fetch(f) = reply.parse(RequestType::Fetch).unwrap() else {
                panic!("{rt:?}")
            };
            let got: Vec<(i64, Vec<u8>)> = f
                .messages
                .iter()
                .map(|m| (m.offset, m.value.to_vec()))
                .collect();
            let expect: Vec<(i64, Vec<u8>)> = (from..from + n)
                .map(|i| (i as i64, want[i].clone()))
                .collect();
            assert_eq!(got, expect, "{rt:?} from {from}");
            assert_eq!(f.trailer.unwrap().next_offset, (from + n) as i64);
        }
        assert!(matches!(
            replies[1].parse(RequestType::HealthCheck).unwrap(),
            Response::HealthCheck(_)
        ));
    }
}

/// What one pipelining producer saw: the values acknowledged (with their offsets) and how its
/// connection ended.
struct Pipelined {
    acked: Vec<(i64, Vec<u8>)>,
    end: std::io::ErrorKind,
}

/// Keeps `window` produces of one message in flight until the connection ends.
fn pipelining_producer(
    addr: std::net::SocketAddr,
    name: usize,
    window: usize,
    progress: &std::sync::atomic::AtomicUsize,
) -> Pipelined {
    use streambus_core::{MessageSet, ProduceRequest};
    let mut c = RawClient::connect(addr).unwrap();
    let mut values = std::collections::HashMap::new();
    let mut acked = Vec::new();
    let mut sending = true;
    let mut j = 0;
    let mut send = |c: &mut RawClient, values: &mut std::collections::HashMap<u64, Vec<u8>>| {
        let value = format!("p{name}-{j}").into_bytes();
        j += 1;
        let (count, bytes) = streambus_tests::message_set(&[&value]);
        let req = Request::Produce(ProduceRequest {
            topic: topic("piped"),
            partition: 0,
            messages: MessageSet::new_checked(count, &bytes).unwrap(),
            producer: None,
        });
        c.send(&req).map(|id| values.insert(id, value)).is_ok()
    };
    for _ in 0..window {
        sending = sending && send(&mut c, &mut values);
    }
    loop {
        let r = match c.recv() {
            Ok(r) => r,
            Err(e) => {
                return Pipelined {
                    acked,
                    end: e.kind(),
                };
            }
        };
        let value = values
            .remove(&r.request_id())
            .expect("a reply to a request sent");
        let Response::Produce(p) = r.parse(RequestType::Produce).unwrap() else {
            panic!("produce failed with code {}", r.error_code());
        };
        acked.push((p.base_offset, value));
        progress.fetch_add(1, Ordering::SeqCst);
        if sending {
            sending = send(&mut c, &mut values);
        }
    }
}

#[test]
fn shutdown_under_pipelining_producers_answers_all_it_stored_and_never_resets() {
    use std::sync::atomic::AtomicUsize;
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = start(dir.path(), rt);
        let addr = broker.addr();
        // Each producer counts its own acknowledgements: all four are running before the stop.
        let progress: Arc<[AtomicUsize; 4]> = Arc::default();
        let producers: Vec<_> = (0..4)
            .map(|i| {
                let progress = progress.clone();
                std::thread::spawn(move || pipelining_producer(addr, i, 16, &progress[i]))
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while progress.iter().any(|p| p.load(Ordering::SeqCst) < 100) {
            assert!(std::time::Instant::now() < deadline, "{rt:?}: no progress");
            std::thread::yield_now();
        }
        broker.shutdown().unwrap();
        let mut acked = std::collections::HashMap::new();
        for p in producers {
            let p = p.join().unwrap();
            // The broker's FIN came after every reply: no reset.
            assert_eq!(p.end, std::io::ErrorKind::UnexpectedEof, "{rt:?}");
            acked.extend(p.acked);
        }
        let broker = start(dir.path(), rt);
        let mut c = RawClient::connect(broker.addr()).unwrap();
        let stored: std::collections::HashMap<i64, Vec<u8>> = fetch_all(&mut c, "piped", 0, 0)
            .unwrap()
            .into_iter()
            .collect();
        // Exactly what was acknowledged: nothing lost, nothing stored unanswered.
        assert_eq!(stored.len(), acked.len(), "{rt:?}: stored vs acknowledged");
        assert_eq!(stored, acked, "{rt:?}");
    }
}

#[test]
fn a_fatal_frame_behind_a_deferred_produce_closes_only_after_answering_it() {
    use streambus_core::{MessageSet, ProduceRequest};
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), rt);
        // The produce's reply waits for its fsync: deferred.
        cfg.fsync = FsyncMode::Always;
        let broker = streambus_server::start(cfg).unwrap();
        let mut c = RawClient::connect(broker.addr()).unwrap();
        // The topic first, so the next produce is not the auto-creating (offloaded) one.
        assert_eq!(
            produce(&mut c, "t", 0, &[b"first"]).unwrap().error_code(),
            0
        );
        let (count, bytes) = streambus_tests::message_set(&[b"second"]);
        let (id, mut wire) = c.encode(&Request::Produce(ProduceRequest {
            topic: topic("t"),
            partition: 0,
            messages: MessageSet::new_checked(count, &bytes).unwrap(),
            producer: None,
        }));
        // Then a Length of 8 (< 16): answered InvalidProtocol, and the stream ends.
        wire.extend_from_slice(&8u32.to_be_bytes());
        wire.extend_from_slice(&[0u8; 8]);
        c.send_raw(&wire).unwrap();
        let mut replies = std::collections::BTreeMap::new();
        let end = loop {
            match c.recv() {
                Ok(r) => {
                    let outcome = match r.parse(RequestType::Produce) {
                        Ok(Response::Produce(p)) => Ok(p.base_offset),
                        _ => Err(r.error_code()),
                    };
                    replies.insert(r.request_id(), outcome);
                }
                Err(e) => break e.kind(),
            }
        };
        assert_eq!(
            replies,
            [(0, Err(ErrorCode::INVALID_PROTOCOL.0)), (id, Ok(1))].into(),
            "{rt:?}"
        );
        assert_eq!(
            end,
            std::io::ErrorKind::UnexpectedEof,
            "{rt:?}: closed with FIN"
        );
        broker.shutdown().unwrap();
    }
}
