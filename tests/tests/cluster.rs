//! Cluster mode with three brokers as real processes on 127.0.0.1 (serving clients on tokio,
//! smol and blocking respectively): a topic with 6 partitions
//! and RF 3 created through broker 2 is listed by brokers 1 and 3, and Metadata on each
//! returns the same brokers and placement; with the metadata leader SIGKILLed, the other two
//! elect a new one and a CreateTopic still works; restarted, the killed broker catches up. A
//! DeleteTopic through one broker answers the fetches waiting on it on another. Partitions are
//! replicated: with a partition's leader SIGKILLed, another replica is elected and serves,
//! every acknowledged record is there exactly once, and the restarted broker catches up until
//! every replica's segment files are the same bytes.
//!
//! Each broker is this test binary started again in `child_cluster_broker`, which parses its
//! command line exactly as `streambus-server` does and serves until killed; the metadata
//! leader is read from each broker's `/metrics`. Its cluster port is
//! chosen by binding port 0 first (the peers must know it before it starts); its client port
//! is port 0, read back from the child.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser as _;
use streambus_core::{
    CreateTopicRequest, DeleteTopicRequest, ErrorCode, FetchExtension, FetchRequest,
    GetOffsetRequest, LongPoll, MetadataRequest, Request, RequestType, Response, Topic, TopicNames,
};
use streambus_tests::RawClient;

const DEADLINE: Duration = Duration::from_secs(30);

/// A broker process: its command line in `CLUSTER_BROKER_ARGS` (one argument a line). Prints
/// `READY <client addr> <metrics addr>` and serves until killed or its stdin closes.
#[test]
#[ignore = "runs only as a child process of three_brokers_share_topics_and_placement_and_survive_the_metadata_leader"]
fn child_cluster_broker() {
    let args = std::env::var("CLUSTER_BROKER_ARGS").unwrap();
    let cli = streambus_server::Cli::try_parse_from(
        std::iter::once("streambus-server").chain(args.lines()),
    )
    .unwrap();
    let config = streambus_server::Config::from_cli(cli).unwrap();
    let broker = streambus_server::start(config).unwrap();
    println!("READY {} {}", broker.addr(), broker.metrics_addr().unwrap());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    std::process::abort();
}

struct Broker {
    child: Child,
    addr: SocketAddr,
    metrics: String,
}

impl Broker {
    fn start(id: u32, cluster_port: u16, peers: &str, runtime: &str, dir: &Path) -> Self {
        let args = [
            "--node-id".to_owned(),
            id.to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--cluster-listen".into(),
            format!("127.0.0.1:{cluster_port}"),
            "--peers".into(),
            peers.to_owned(),
            "--runtime".into(),
            runtime.to_owned(),
        ];
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_cluster_broker",
                "--ignored",
                "--nocapture",
            ])
            .env("CLUSTER_BROKER_ARGS", args.join("\n"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let (addr, metrics) = loop {
            let line = out.next().expect("child broker exited").unwrap();
            if let Some(rest) = line.strip_prefix("READY ") {
                let (a, m) = rest.split_once(' ').unwrap();
                break (a.parse().unwrap(), m.to_owned());
            }
        };
        Self {
            child,
            addr,
            metrics,
        }
    }

    /// The metadata leader this broker knows, from its `/metrics` (`None`: none now).
    fn leader(&self) -> Option<u32> {
        let leader: i64 =
            streambus_tests::metric(self.metrics.as_str(), "streambus_cluster_metadata_leader")
                .expect("the metadata leader gauge in /metrics")
                .parse()
                .unwrap();
        u32::try_from(leader).ok()
    }

    fn client(&self) -> RawClient {
        RawClient::connect(self.addr).unwrap()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ports free now, for the cluster listeners.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Polls `f` until it returns `Some`, failing the test after [`DEADLINE`].
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CreateTopic: the error code (0: created or already there).
fn create(c: &mut RawClient, name: &str, partitions: u32, rf: u16) -> (u16, bool) {
    let r = c
        .call(&Request::CreateTopic(CreateTopicRequest {
            topic: Topic::new(name).unwrap(),
            num_partitions: partitions,
            replication_factor: rf,
        }))
        .unwrap();
    match r.parse(RequestType::CreateTopic) {
        Ok(Response::CreateTopic(c)) => (0, c.created),
        _ => (r.error_code(), false),
    }
}

/// A long-poll Fetch of `topic` partition `partition` from `offset`.
fn long_poll(topic: &str, partition: u32, offset: i64, wait_ms: u32) -> Request<'_> {
    Request::Fetch(FetchRequest {
        topic: Topic::new(topic).unwrap(),
        partition,
        offset,
        max_bytes: 1 << 20,
        extension: Some(FetchExtension {
            isolation_level: 0,
            long_poll: Some(LongPoll {
                max_wait_ms: wait_ms,
                min_bytes: 1,
            }),
        }),
    })
}

/// Every broker's Metadata once they agree and every partition's Raft group has a leader
/// (just after a CreateTopic the groups are electing: LeaderID −1, LeaderEpoch 0).
fn settled(clients: &mut [RawClient]) -> Vec<(Brokers, Placement)> {
    eventually("every partition led, and every broker agreeing", || {
        let views: Vec<(Brokers, Placement)> = clients.iter_mut().map(metadata).collect();
        let led = views.iter().all(|(_, p)| {
            !p.is_empty()
                && p.iter()
                    .all(|(_, _, parts)| parts.iter().all(|(_, leader, _)| *leader >= 0))
        });
        (led && views.iter().all(|v| v == &views[0])).then_some(views)
    })
}

fn list(c: &mut RawClient) -> Vec<(String, u32)> {
    let r = c.call(&Request::ListTopics).unwrap();
    let Ok(Response::ListTopics(l)) = r.parse(RequestType::ListTopics) else {
        panic!("ListTopics failed with {}", r.error_code());
    };
    l.topics
        .iter()
        .map(|t| (t.name.as_str().to_owned(), t.num_partitions))
        .collect()
}

type Brokers = Vec<(u32, String, u16)>;
type Placement = Vec<(String, u16, Vec<(u32, i32, Vec<u32>)>)>;

/// Metadata of every topic: the brokers and each partition's (id, leader, replicas).
fn metadata(c: &mut RawClient) -> (Brokers, Placement) {
    let r = c
        .call(&Request::Metadata(MetadataRequest {
            topics: TopicNames::from_slice(&[]),
        }))
        .unwrap();
    let Ok(Response::Metadata(m)) = r.parse(RequestType::Metadata) else {
        panic!("Metadata failed with {}", r.error_code());
    };
    let brokers = m
        .brokers
        .iter()
        .map(|b| {
            (
                b.node_id,
                String::from_utf8_lossy(b.host.0).into_owned(),
                b.port,
            )
        })
        .collect();
    let topics = m
        .topics
        .iter()
        .map(|t| {
            (
                t.name.as_str().to_owned(),
                t.error_code.0,
                t.partitions
                    .iter()
                    .map(|p| (p.partition, p.leader, p.replicas.iter().collect()))
                    .collect(),
            )
        })
        .collect();
    (brokers, topics)
}

#[test]
fn three_brokers_share_topics_and_placement_and_survive_the_metadata_leader() {
    let ports = free_ports(3);
    let peers = format!(
        "1=127.0.0.1:{},2=127.0.0.1:{},3=127.0.0.1:{}",
        ports[0], ports[1], ports[2]
    );
    // One client runtime each: the cluster side runs on its own tokio runtime under all three.
    let runtimes = ["tokio", "smol", "blocking"];
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let start =
        |i: usize| Broker::start(i as u32 + 1, ports[i], &peers, runtimes[i], dirs[i].path());
    let mut brokers: Vec<Option<Broker>> = (0..3).map(|i| Some(start(i))).collect();
    let addrs: Vec<SocketAddr> = brokers.iter().flatten().map(|b| b.addr).collect();

    // Every broker registered its client address.
    let want_brokers: Brokers = (1..=3u32)
        .zip(&addrs)
        .map(|(id, a)| (id, "127.0.0.1".to_owned(), a.port()))
        .collect();
    for b in brokers.iter().flatten() {
        let mut c = b.client();
        eventually("all three brokers registered", || {
            (metadata(&mut c).0 == want_brokers).then_some(())
        });
    }

    // Through broker 2; RF above the broker count is refused with a message.
    let mut c2 = brokers[1].as_ref().unwrap().client();
    assert_eq!(
        create(&mut c2, "orders", 6, 3),
        (0, true),
        "created through broker 2"
    );
    assert_eq!(create(&mut c2, "orders", 6, 3), (0, false));
    assert_eq!(
        create(&mut c2, "too-wide", 1, 4).0,
        ErrorCode::INVALID_REQUEST.0
    );
    for b in brokers.iter().flatten() {
        let mut c = b.client();
        eventually("the topic listed on every broker", || {
            list(&mut c)
                .contains(&("orders".to_owned(), 6))
                .then_some(())
        });
    }
    let mut clients: Vec<RawClient> = brokers.iter().flatten().map(Broker::client).collect();
    let views = settled(&mut clients);
    let (got_brokers, placement) = &views[0];
    assert_eq!(got_brokers, &want_brokers);
    assert!(views.iter().all(|v| v == &views[0]), "{views:?}");
    let [(name, code, partitions)] = &placement[..] else {
        panic!("one topic expected: {placement:?}");
    };
    assert_eq!((name.as_str(), *code), ("orders", 0));
    // Three replicas each, leaders rotating over the brokers: each leads two partitions.
    let mut leads = [0; 3];
    for (i, (id, leader, replicas)) in partitions.iter().enumerate() {
        assert_eq!(*id as usize, i);
        assert_eq!(replicas.len(), 3);
        assert_eq!(i64::from(*leader), i64::from(replicas[0]));
        leads[usize::try_from(*leader).unwrap() - 1] += 1;
    }
    assert_eq!(leads, [2, 2, 2]);
    // Partition 5 is led by broker 3 (placement above), which stores a produce to it.
    assert_eq!(partitions[5].1, 3);
    let r = streambus_tests::produce(
        &mut brokers[2].as_ref().unwrap().client(),
        "orders",
        5,
        &[b"x"],
    )
    .unwrap();
    assert_eq!(r.error_code(), 0);

    // Deleted through broker 2: a long-poll fetch waiting on broker 3 is answered TopicNotFound
    // at once (well before its 20 s wait, and the client's 10 s read timeout).
    let mut consumer = brokers[2].as_ref().unwrap().client();
    let id = consumer.send(&long_poll("orders", 5, 1, 20_000)).unwrap();
    let barrier = consumer.send(&Request::HealthCheck).unwrap();
    assert_eq!(consumer.recv().unwrap().request_id(), barrier);
    let r = c2
        .call(&Request::DeleteTopic(DeleteTopicRequest {
            topic: Topic::new("orders").unwrap(),
        }))
        .unwrap();
    assert_eq!(r.error_code(), 0);
    let r = consumer.recv().unwrap();
    assert_eq!(
        (r.request_id(), r.error_code()),
        (id, ErrorCode::TOPIC_NOT_FOUND.0)
    );
    for b in brokers.iter().flatten() {
        let mut c = b.client();
        eventually("the topic gone from every broker", || {
            list(&mut c).is_empty().then_some(())
        });
    }

    // SIGKILL the metadata leader: the other two elect another, and writes go on.
    let leader = eventually("a metadata leader", || {
        brokers[0].as_ref().unwrap().leader()
    });
    let idx = leader as usize - 1;
    drop(brokers[idx].take());
    let survivor = brokers.iter().flatten().next().unwrap();
    let new_leader = eventually("a new metadata leader", || {
        survivor.leader().filter(|l| *l != leader)
    });
    assert_ne!(new_leader, leader);
    for b in brokers.iter().flatten() {
        let mut c = b.client();
        let name = format!("after-{}", b.addr.port());
        let (code, created) = eventually("CreateTopic after the failover", || {
            let r = create(&mut c, &name, 2, 0);
            // NotLeader while the survivors have not yet settled on the new leader.
            (r.0 != ErrorCode::NOT_LEADER.0).then_some(r)
        });
        assert_eq!((code, created), (0, true), "{name}");
        let topics = list(&mut c);
        assert!(topics.contains(&(name.clone(), 2)), "{topics:?}");
    }

    // The killed broker restarted from its data directory (on a new client port): it catches
    // up with the topics created while it was down, makes their directories, and registers its
    // new address.
    let back = start(idx);
    let mut c = back.client();
    let want: Vec<(String, u32)> = {
        let mut c = brokers.iter().flatten().next().unwrap().client();
        list(&mut c)
    };
    assert_eq!(want.len(), 2, "{want:?}");
    eventually("the restarted broker caught up", || {
        (list(&mut c) == want).then_some(())
    });
    // Every partition is served by the leader its Raft group elected (the restarted broker
    // rejoined its groups as a follower: their leaders may have moved while it was down), and
    // the restarted broker holds what the others committed.
    let mut all: Vec<RawClient> = brokers
        .iter()
        .flatten()
        .chain(std::iter::once(&back))
        .map(Broker::client)
        .collect();
    let port_to_client: Vec<u16> = brokers
        .iter()
        .flatten()
        .chain(std::iter::once(&back))
        .map(|b| b.addr.port())
        .collect();
    let (view_brokers, view) = settled(&mut all).remove(0);
    for (name, _, parts) in view {
        for (p, leader, _) in parts {
            let port = view_brokers
                .iter()
                .find(|(id, _, _)| i64::from(*id) == i64::from(leader))
                .map(|(_, _, port)| *port)
                .unwrap();
            let k = port_to_client.iter().position(|x| *x == port).unwrap();
            let r = streambus_tests::produce(&mut all[k], &name, p, &[b"y"]).unwrap();
            assert_eq!(r.error_code(), 0, "{name}/{p} at broker {leader}");
        }
    }
    let port = back.addr.port();
    eventually("the restarted broker's new address registered", || {
        metadata(&mut c)
            .0
            .iter()
            .any(|(id, _, p)| *id as usize == idx + 1 && *p == port)
            .then_some(())
    });
    // (Its return may itself cause an election: compare with a survivor's view.)
    let survivor = brokers.iter().flatten().next().unwrap();
    eventually("the restarted broker agrees on the leader", || {
        let l = back.leader()?;
        (survivor.leader() == Some(l)).then_some(())
    });
}

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

#[test]
fn without_peers_a_broker_runs_no_cluster_side() {
    let dir = tempfile::tempdir().unwrap();
    let broker = streambus_tests::start_broker(dir.path(), streambus_server::RuntimeKind::Tokio);
    assert_eq!(broker.cluster_addr(), None);
    assert!(broker.cluster().is_none());
    // No thread of the cluster runtime (their names are cut to 15 bytes).
    let names = thread_names();
    assert!(
        !names.iter().any(|n| n.starts_with("streambus-clus")),
        "{names:?}"
    );
    assert!(!dir.path().join("cluster").exists());
    let metrics = broker.metrics().encode();
    assert!(!metrics.contains("cluster"), "{metrics}");
    broker.shutdown().unwrap();
}

/// The NotLeader reply §6.4 asks for: the code and the message naming the leader's node id and
/// advertised address.
fn not_leader(here: u32, topic: &str, partition: u32, leader: u32, port: u16) -> (u16, String) {
    (
        ErrorCode::NOT_LEADER.0,
        format!(
            "broker {here} does not lead partition {partition} of topic {topic:?}: broker {leader} at 127.0.0.1:{port} does; refresh Metadata and retry there"
        ),
    )
}

/// A reply's error code and message ((0, "") on success).
fn outcome(r: &streambus_tests::Reply, ty: RequestType) -> (u16, String) {
    match r.parse(ty).unwrap() {
        Response::Error(e) => (e.code.0, e.message.to_string()),
        _ => (0, String::new()),
    }
}

#[test]
fn partition_requests_are_served_by_the_leader_only_and_others_answer_not_leader() {
    let ports = free_ports(3);
    let peers = format!(
        "1=127.0.0.1:{},2=127.0.0.1:{},3=127.0.0.1:{}",
        ports[0], ports[1], ports[2]
    );
    let runtimes = ["blocking", "tokio", "smol"];
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let brokers: Vec<Broker> = (0..3)
        .map(|i| Broker::start(i as u32 + 1, ports[i], &peers, runtimes[i], dirs[i].path()))
        .collect();
    let port_of = |id: u32| brokers[id as usize - 1].addr.port();
    let mut clients: Vec<RawClient> = brokers.iter().map(Broker::client).collect();
    for c in &mut clients {
        eventually("all three brokers registered", || {
            (metadata(c).0.len() == 3).then_some(())
        });
    }
    assert_eq!(create(&mut clients[0], "routed", 6, 3), (0, true));
    let views: Vec<Placement> = settled(&mut clients).into_iter().map(|(_, p)| p).collect();
    assert!(views.iter().all(|v| v == &views[0]), "{views:?}");
    let leaders: Vec<u32> = views[0][0]
        .2
        .iter()
        .map(|(_, l, _)| u32::try_from(*l).unwrap())
        .collect();
    assert_eq!(leaders, [1, 2, 3, 1, 2, 3]);

    // A Produce to each partition through each broker: 18 cases.
    for (i, c) in clients.iter_mut().enumerate() {
        let here = i as u32 + 1;
        for (p, &leader) in (0u32..).zip(&leaders) {
            let value = format!("p{p} via {here}");
            let r = streambus_tests::produce(c, "routed", p, &[value.as_bytes()]).unwrap();
            let want = if leader == here {
                (0, String::new())
            } else {
                not_leader(here, "routed", p, leader, port_of(leader))
            };
            assert_eq!(
                outcome(&r, RequestType::Produce),
                want,
                "produce {p} via {here}"
            );
            if leader == here {
                let Ok(Response::Produce(ok)) = r.parse(RequestType::Produce) else {
                    unreachable!()
                };
                assert_eq!((ok.base_offset, ok.high_water_mark), (0, 1));
            }
        }
    }

    // Fetch and GetOffset likewise: the leader has exactly its own record, the others refuse.
    for (i, c) in clients.iter_mut().enumerate() {
        let here = i as u32 + 1;
        for (p, &leader) in (0u32..).zip(&leaders) {
            if leader == here {
                let got = streambus_tests::fetch_all(c, "routed", p, 0).unwrap();
                assert_eq!(got, [(0, format!("p{p} via {here}").into_bytes())]);
                let r = c
                    .call(&Request::GetOffset(GetOffsetRequest {
                        topic: Topic::new("routed").unwrap(),
                        partition: p,
                    }))
                    .unwrap();
                let Ok(Response::GetOffset(o)) = r.parse(RequestType::GetOffset) else {
                    panic!("GetOffset {p} via {here}: {}", r.error_code());
                };
                assert_eq!((o.start_offset, o.end_offset, o.high_water_mark), (0, 1, 1));
                continue;
            }
            let want = not_leader(here, "routed", p, leader, port_of(leader));
            let r = streambus_tests::fetch(c, "routed", p, 0, 1 << 20).unwrap();
            assert_eq!(
                outcome(&r, RequestType::Fetch),
                want,
                "fetch {p} via {here}"
            );
            // A long poll is refused at once, not after its 20 s wait.
            let r = c.call(&long_poll("routed", p, 1, 20_000)).unwrap();
            assert_eq!(
                outcome(&r, RequestType::Fetch),
                want,
                "long poll {p} via {here}"
            );
            let r = c
                .call(&Request::GetOffset(GetOffsetRequest {
                    topic: Topic::new("routed").unwrap(),
                    partition: p,
                }))
                .unwrap();
            assert_eq!(
                outcome(&r, RequestType::GetOffset),
                want,
                "offsets {p} via {here}"
            );
        }
    }

    // Unknown topics and partitions keep their own errors on every broker.
    for c in &mut clients {
        let r = streambus_tests::produce(c, "routed", 6, &[b"x"]).unwrap();
        assert_eq!(r.error_code(), ErrorCode::PARTITION_NOT_FOUND.0);
        let r = streambus_tests::fetch(c, "nowhere", 0, 0, 1024).unwrap();
        assert_eq!(r.error_code(), ErrorCode::TOPIC_NOT_FOUND.0);
    }

    // The SDK pointed at partition 0's leader (broker 1) produces and consumes it normally.
    let client = streambus_client::blocking::Client::connect(brokers[0].addr.to_string()).unwrap();
    let producer = streambus_client::blocking::Producer::new(&client);
    let sent = producer
        .send(streambus_client::Record::new("routed", b"from the sdk".to_vec()).partition(0))
        .unwrap();
    assert_eq!((sent.partition, sent.offset), (0, 1));
    let mut consumer = streambus_client::blocking::Consumer::new(&client);
    consumer
        .assign("routed", 0, streambus_client::Offset::Earliest)
        .unwrap();
    let mut got = Vec::new();
    let end = Instant::now() + DEADLINE;
    while got.len() < 2 && Instant::now() < end {
        for r in consumer.poll(Duration::from_secs(5)).unwrap() {
            got.push((r.offset, r.value().to_vec()));
        }
    }
    assert_eq!(
        got,
        [(0, b"p0 via 1".to_vec()), (1, b"from the sdk".to_vec())]
    );
}

/// The segment files (`.log` and `.idx`) of a partition in a broker's data directory.
fn segment_files(dir: &Path, topic: &str, partition: u32) -> Vec<(String, Vec<u8>)> {
    let p = dir.join("topics").join(topic).join(partition.to_string());
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&p)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|f| f.extension().is_some_and(|x| x == "log" || x == "idx"))
                .map(|f| {
                    let name = f.file_name().unwrap().to_string_lossy().into_owned();
                    (name, std::fs::read(&f).unwrap_or_default())
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn a_killed_partition_leader_is_replaced_without_losing_an_acknowledged_record() {
    let ports = free_ports(3);
    let peers = format!(
        "1=127.0.0.1:{},2=127.0.0.1:{},3=127.0.0.1:{}",
        ports[0], ports[1], ports[2]
    );
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let start = |i: usize| Broker::start(i as u32 + 1, ports[i], &peers, "tokio", dirs[i].path());
    let mut brokers: Vec<Option<Broker>> = (0..3).map(|i| Some(start(i))).collect();
    let mut clients: Vec<RawClient> = brokers.iter().flatten().map(Broker::client).collect();
    for c in &mut clients {
        eventually("all three brokers registered", || {
            (metadata(c).0.len() == 3).then_some(())
        });
    }
    assert_eq!(create(&mut clients[0], "ledger", 1, 3), (0, true));
    let (_, view) = settled(&mut clients).remove(0);
    let old = usize::try_from(view[0].2[0].1).unwrap();
    // Twenty records acknowledged one by one by the leader, at offsets 0 to 19.
    let mut leader = brokers[old - 1].as_ref().unwrap().client();
    let mut sent = Vec::new();
    for i in 0..20 {
        let value = format!("record {i}");
        let r = streambus_tests::produce(&mut leader, "ledger", 0, &[value.as_bytes()]).unwrap();
        let Ok(Response::Produce(ok)) = r.parse(RequestType::Produce) else {
            panic!("produce {i}: {}", r.error_code());
        };
        assert_eq!((ok.base_offset, ok.num_messages), (i, 1));
        sent.push((i, value.into_bytes()));
    }
    // SIGKILL the leader: another replica is elected and serves.
    drop(leader);
    drop(clients);
    drop(brokers[old - 1].take());
    let mut survivors: Vec<RawClient> = brokers.iter().flatten().map(Broker::client).collect();
    // (Until their election timeout the survivors still name the dead leader.)
    let (brokers_view, new) = eventually("the survivors agreeing on a new leader", || {
        let views: Vec<(Brokers, Placement)> = survivors.iter_mut().map(metadata).collect();
        let leaders: Vec<i32> = views.iter().map(|(_, p)| p[0].2[0].1).collect();
        let new = leaders[0];
        (new >= 0 && usize::try_from(new).ok() != Some(old) && leaders.iter().all(|l| *l == new))
            .then(|| (views[0].0.clone(), new))
    });
    let port = brokers_view
        .iter()
        .find(|(id, _, _)| i64::from(*id) == i64::from(new))
        .unwrap()
        .2;
    let b = brokers
        .iter()
        .flatten()
        .find(|b| b.addr.port() == port)
        .unwrap();
    let mut leader = b.client();
    for i in 20..25 {
        let value = format!("record {i}");
        let r = eventually("a produce acknowledged by the new leader", || {
            let r =
                streambus_tests::produce(&mut leader, "ledger", 0, &[value.as_bytes()]).unwrap();
            (r.error_code() != ErrorCode::NOT_LEADER.0).then_some(r)
        });
        let Ok(Response::Produce(ok)) = r.parse(RequestType::Produce) else {
            panic!("produce {i}: {}", r.error_code());
        };
        assert_eq!((ok.base_offset, ok.num_messages), (i, 1));
        sent.push((i, value.into_bytes()));
    }
    // Every acknowledged record, exactly once, in order.
    assert_eq!(
        streambus_tests::fetch_all(&mut leader, "ledger", 0, 0).unwrap(),
        sent
    );
    // Restarted, the killed broker catches up: every replica's segment files are the same
    // bytes.
    brokers[old - 1] = Some(start(old - 1));
    eventually("every replica's log byte-identical", || {
        let files: Vec<_> = dirs
            .iter()
            .map(|d| segment_files(d.path(), "ledger", 0))
            .collect();
        let full = files[0].iter().map(|(_, b)| b.len()).sum::<usize>() > 0;
        (full && files.iter().all(|f| f == &files[0])).then_some(())
    });
}
