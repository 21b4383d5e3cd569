//! `Client::metadata` against the real broker; against fake brokers built on the adapters'
//! server side, what a single real broker never does: NotLeader, a cluster whose leader dies
//! or hangs, a record at the largest offset.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use streambus_adapters::{Handler, Reply, ServeOptions};
use streambus_client::{Client, ErrorCode, Producer, ProducerConfig, Record};
use streambus_core::{
    BrokerInfo, BrokerList, Flags, GetOffsetResponse, MetadataResponse, PartitionList,
    PartitionMetadata, ProduceResponse, ReplicaList, Request, RequestType, Response, Text,
    TopicMetadata, TopicMetadataList,
};
use streambus_server::{Config, FsyncMode, RuntimeKind};

fn broker(dir: &std::path::Path) -> streambus_server::Running {
    let mut c = Config::default();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.data_dir = dir.to_owned();
    c.metrics_listen = None;
    c.runtime = RuntimeKind::Tokio;
    c.fsync = FsyncMode::Never;
    streambus_server::start(c).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_names_the_broker_and_every_partition_leader() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path());
    let c = Client::connect(b.addr().to_string()).await.unwrap();
    c.create_topic("orders", 3).await.unwrap();
    c.create_topic("audit", 1).await.unwrap();

    let m = c.metadata(["orders", "missing"]).await.unwrap();
    assert_eq!(m.brokers.len(), 1);
    let me = &m.brokers[0];
    assert_eq!(
        (me.node_id, me.address()),
        (0, b.addr().to_string()),
        "a single broker advertises its listen address"
    );
    let names: Vec<&str> = m.topics.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["missing", "orders"]);
    let missing = m.topic("missing").unwrap();
    assert_eq!(missing.error_code, ErrorCode::TOPIC_NOT_FOUND);
    assert!(!missing.exists() && missing.partitions.is_empty());
    let orders = m.topic("orders").unwrap();
    assert!(orders.exists());
    let got: Vec<(u32, Option<u32>, i32, Vec<u32>)> = orders
        .partitions
        .iter()
        .map(|p| (p.partition, p.leader, p.leader_epoch, p.replicas.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (0, Some(0), 0, vec![0]),
            (1, Some(0), 0, vec![0]),
            (2, Some(0), 0, vec![0])
        ]
    );

    // No names: every topic.
    let all = c.metadata(Vec::<String>::new()).await.unwrap();
    let names: Vec<&str> = all.topics.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["audit", "orders"]);
    assert_eq!(c.partition_count("orders").await.unwrap(), Some(3));
    assert_eq!(c.partition_count("missing").await.unwrap(), None);

    // A bad name is refused before anything is sent.
    let e = c.metadata(["ok", "no/slash"]).await.unwrap_err();
    assert!(
        matches!(e, streambus_client::Error::InvalidInput { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("no/slash"), "{e}");
}

/// The fake brokers' answer to a Metadata request: topic "t" with `parts`, and `brokers`.
fn metadata_of_t(reply: Reply, parts: &[PartitionMetadata<'_>], brokers: &[BrokerInfo<'_>]) {
    let topics = [TopicMetadata {
        name: streambus_core::Topic::new("t").unwrap(),
        error_code: streambus_core::ErrorCode::NONE,
        partitions: PartitionList::from_slice(parts),
    }];
    reply.respond(&Response::Metadata(MetadataResponse {
        brokers: BrokerList::from_slice(brokers),
        topics: TopicMetadataList::from_slice(&topics),
    }));
}

/// The fake brokers' acknowledgement of `p`, stored from `base` on.
fn acknowledge(reply: Reply, p: &streambus_core::ProduceRequest<'_>, base: i64) {
    reply.respond(&Response::Produce(ProduceResponse {
        base_offset: base,
        num_messages: p.messages.count(),
        high_water_mark: base + i64::from(p.messages.count()),
    }));
}

/// The fake brokers' answer to anything else.
fn refuse(reply: Reply, other: &Request<'_>) {
    reply.error(
        streambus_core::ErrorCode::UNKNOWN_REQUEST,
        format_args!("not here: {:?}", other.request_type()),
    );
}

/// A fake broker: topic "t" has 2 partitions led by node 0; the first Produce is answered
/// NotLeader, later ones succeed at offset 41. Records the request types it saw.
#[derive(Default)]
struct MovingLeader {
    seen: Mutex<Vec<RequestType>>,
}

impl Handler for MovingLeader {
    fn handle(&self, _flags: Flags, request: &Request<'_>, reply: Reply) {
        let produces = {
            let mut seen = self.seen.lock().unwrap();
            seen.push(request.request_type());
            seen.iter().filter(|t| **t == RequestType::Produce).count()
        };
        match request {
            Request::Metadata(_) => {
                let replicas = [0u32];
                let parts: Vec<PartitionMetadata<'_>> = (0..2)
                    .map(|partition| PartitionMetadata {
                        partition,
                        leader: 0,
                        leader_epoch: 1,
                        replicas: ReplicaList::from_slice(&replicas),
                    })
                    .collect();
                let brokers = [BrokerInfo {
                    node_id: 0,
                    host: Text::from("127.0.0.1"),
                    port: 1,
                }];
                metadata_of_t(reply, &parts, &brokers);
            }
            Request::Produce(p) if produces == 1 => reply.error(
                streambus_core::ErrorCode::NOT_LEADER,
                format_args!("partition {} is led by node 1 now", p.partition),
            ),
            Request::Produce(p) => acknowledge(reply, p, 41),
            other => refuse(reply, other),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_leader_refreshes_metadata_then_retries_the_batch() {
    let fake = Arc::new(MovingLeader::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(streambus_adapters::tokio::serve(
        listener,
        fake.clone(),
        ServeOptions::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));

    let c = Client::connect(addr.to_string()).await.unwrap();
    let p = Producer::with_config(
        &c,
        ProducerConfig::default().retry_backoff(Duration::from_millis(1)),
    )
    .unwrap();
    let at = p
        .send(Record::new("t", "v").partition(1))
        .await
        .expect("the retry after NotLeader succeeds");
    assert_eq!((at.partition, at.offset), (1, 41));
    // The Metadata is read again at once after the NotLeader, then every `retry_backoff`
    // until the backoff is over (this fake names the same leader): one read or a few.
    let mut seen = fake.seen.lock().unwrap().clone();
    seen.dedup();
    assert_eq!(
        seen,
        [
            RequestType::Metadata, // the partition count, first record of "t"
            RequestType::Produce,  // answered NotLeader
            RequestType::Metadata, // refreshed before the retry
            RequestType::Produce,  // the retry
        ]
    );
    assert!(p.close().await.is_ok(), "no record failed");
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

/// A fake cluster's surviving broker: Metadata lists broker 1 at `dead` and itself as broker
/// 2, and names broker 1 the leader of "t"'s one partition until `moved` is set or it has
/// answered `switch_after` Metadata requests, then itself. Produce succeeds at offset 7.
/// Records the request types it saw.
struct Survivor {
    dead: std::net::SocketAddr,
    me: std::net::SocketAddr,
    moved: Arc<std::sync::atomic::AtomicBool>,
    switch_after: usize,
    seen: Mutex<Vec<RequestType>>,
}

impl Handler for Survivor {
    fn handle(&self, _flags: Flags, request: &Request<'_>, reply: Reply) {
        let reads = {
            let mut seen = self.seen.lock().unwrap();
            seen.push(request.request_type());
            seen.iter().filter(|t| **t == RequestType::Metadata).count()
        };
        match request {
            Request::Metadata(_) => {
                let moved = self.moved.load(std::sync::atomic::Ordering::SeqCst);
                let leader = if moved || reads > self.switch_after {
                    2
                } else {
                    1
                };
                let replicas = [1u32, 2];
                let parts = [PartitionMetadata {
                    partition: 0,
                    leader,
                    leader_epoch: leader,
                    replicas: ReplicaList::from_slice(&replicas),
                }];
                let (dead_host, me_host) = (self.dead.ip().to_string(), self.me.ip().to_string());
                let brokers = [
                    BrokerInfo {
                        node_id: 1,
                        host: Text::from(dead_host.as_str()),
                        port: self.dead.port(),
                    },
                    BrokerInfo {
                        node_id: 2,
                        host: Text::from(me_host.as_str()),
                        port: self.me.port(),
                    },
                ];
                metadata_of_t(reply, &parts, &brokers);
            }
            Request::Produce(p) => acknowledge(reply, p, 7),
            Request::GetOffset(g) => reply.respond(&Response::GetOffset(GetOffsetResponse {
                topic: g.topic,
                partition: g.partition,
                start_offset: 0,
                end_offset: 7,
                high_water_mark: 7,
            })),
            other => refuse(reply, other),
        }
    }
}

/// A [`Survivor`] served: its address, itself (for the requests it saw), what stops it, and
/// its server task.
type Served = (
    std::net::SocketAddr,
    Arc<Survivor>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
);

/// Starts a [`Survivor`] beside broker 1 at `dead` (see there for `moved` and
/// `switch_after`); returns its address, the survivor (for the requests it saw), and what stops
/// it.
async fn serve_survivor(
    dead: std::net::SocketAddr,
    moved: Arc<std::sync::atomic::AtomicBool>,
    switch_after: usize,
) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let me = listener.local_addr().unwrap();
    let fake = Arc::new(Survivor {
        dead,
        me,
        moved,
        switch_after,
        seen: Mutex::default(),
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(streambus_adapters::tokio::serve(
        listener,
        fake.clone(),
        ServeOptions::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    (me, fake, stop_tx, server)
}

/// Sends one record to "t" partition 0 through `p`, which must land within 10 s (`late` says
/// what a later one means) at the survivor's offset 7, in one Produce there; returns the
/// request types the survivor saw.
async fn send_lands_once_at_the_survivor(
    p: &Producer,
    fake: &Survivor,
    late: &str,
) -> Vec<RequestType> {
    let at = tokio::time::timeout(
        Duration::from_secs(10),
        p.send(Record::new("t", "v").partition(0)),
    )
    .await
    .expect(late)
    .expect("the retry at the new leader succeeds");
    assert_eq!((at.partition, at.offset), (0, 7));
    let seen = fake.seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().filter(|t| **t == RequestType::Produce).count(),
        1,
        "one produce at broker 2: {seen:?}"
    );
    seen
}

/// A partition's leader dies under a produce (its connection closes): the producer reads the
/// Metadata at once, and as soon as it names another leader retries there, instead of first
/// waiting out its retry backoff (30 s here, so the send would outlast the 10 s bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_whose_leader_died_goes_to_the_new_leader_without_waiting_out_the_backoff() {
    use std::sync::atomic::{AtomicBool, Ordering};
    // The dying leader: takes each connection and closes it once a request arrived on it;
    // from the first one on, the survivor's Metadata names the new leader (as survivors do
    // once they elected one).
    let dying = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let moved = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let dead = dying.local_addr().unwrap();
    let dying_task = tokio::spawn({
        let (moved, accepted) = (moved.clone(), accepted.clone());
        async move {
            while let Ok((mut conn, _)) = dying.accept().await {
                moved.store(true, Ordering::SeqCst);
                accepted.fetch_add(1, Ordering::SeqCst);
                let mut first = [0u8; 1];
                let _ = tokio::io::AsyncReadExt::read(&mut conn, &mut first).await;
                drop(conn);
            }
        }
    });
    let (me, fake, stop_tx, server) = serve_survivor(dead, moved.clone(), usize::MAX).await;

    let c = Client::connect(me.to_string()).await.unwrap();
    let p = Producer::with_config(
        &c,
        ProducerConfig::default().retry_backoff(Duration::from_secs(30)),
    )
    .unwrap();
    let seen =
        send_lands_once_at_the_survivor(&p, &fake, "the retry did not wait out the 30 s backoff")
            .await;
    assert!(
        moved.load(Ordering::SeqCst),
        "the first attempt went to broker 1"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one connection to broker 1, which the produce went on"
    );
    assert_eq!(seen.last(), Some(&RequestType::Produce), "{seen:?}");
    assert!(p.close().await.is_ok(), "no record failed");
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
    dying_task.abort();
}

/// A partition's leader is gone (its port refuses connections) and stays named for a while:
/// a produce attempt meeting its pool in reconnect backoff (30 s here) fails at once, so the
/// producer goes on reading the Metadata and retries at the new leader as soon as it is named,
/// instead of waiting out the reconnect backoff against the dead broker (the 10 s bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_meeting_a_dead_leaders_reconnect_backoff_fails_over_without_waiting_it_out() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // Named until 20 Metadata reads: the producer meets the dead leader more than once.
    let (me, fake, stop_tx, server) = serve_survivor(dead, Arc::default(), 20).await;

    let c = Client::builder()
        .reconnect_backoff(Duration::from_secs(30), Duration::from_secs(60))
        .connect(me.to_string())
        .await
        .unwrap();
    let p = Producer::with_config(
        &c,
        ProducerConfig::default().retry_backoff(Duration::from_millis(1)),
    )
    .unwrap();
    let seen = send_lands_once_at_the_survivor(
        &p,
        &fake,
        "the produce did not wait out the dead leader's 30 s reconnect backoff",
    )
    .await;
    assert!(
        seen.iter().filter(|t| **t == RequestType::Metadata).count() > 20,
        "{seen:?}"
    );
    assert!(p.close().await.is_ok(), "no record failed");
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

/// A fake cluster of two whose broker 1 hangs: it takes connections and reads requests, and
/// answers nothing (set `moved` once it took a connection). Broker 2 is a [`Survivor`] that
/// names broker 1 the leader of "t"'s partition until `moved` is set or it answered
/// `switch_after` Metadata requests. Returns broker 2's address, its record of requests, and
/// what stops it.
async fn hung_leader_beside_survivor(switch_after: usize) -> Served {
    use std::sync::atomic::{AtomicBool, Ordering};
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = hung.local_addr().unwrap();
    let moved = Arc::new(AtomicBool::new(false));
    let hung_moved = if switch_after == usize::MAX {
        Some(moved.clone())
    } else {
        None
    };
    // Ends with the test's runtime.
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = hung.accept().await {
            if let Some(m) = &hung_moved {
                m.store(true, Ordering::SeqCst);
            }
            tokio::spawn(async move {
                let mut sink = [0u8; 4096];
                while let Ok(n) = tokio::io::AsyncReadExt::read(&mut conn, &mut sink).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    serve_survivor(dead, moved, switch_after).await
}

/// A partition's leader hangs (it takes the produce and answers nothing): in a cluster the
/// attempt that timed out there counts as a lost leader, so the producer reads the Metadata
/// and retries at the leader it names, instead of waiting out its 30 s retry backoff and
/// going back to the hung one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_whose_leader_hangs_goes_to_the_new_leader_once_it_times_out() {
    let (me, fake, stop, server) = hung_leader_beside_survivor(usize::MAX).await;
    let c = Client::builder()
        .request_timeout(Duration::from_secs(1))
        .connect(me.to_string())
        .await
        .unwrap();
    let p = Producer::with_config(
        &c,
        ProducerConfig::default().retry_backoff(Duration::from_secs(30)),
    )
    .unwrap();
    send_lands_once_at_the_survivor(&p, &fake, "the retry did not wait out the 30 s backoff").await;
    assert!(p.close().await.is_ok(), "no record failed");
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// A read of a partition whose leader hangs uses its whole timeout there and fails with
/// TimedOut; the Metadata is read again in the background, so the reads after it go to the
/// leader it names now (before, every read went to the hung leader until the periodic
/// refresh, 5 min by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_timed_out_at_a_hung_leader_reads_the_metadata_again_for_the_next() {
    // The survivor names the hung broker in its first Metadata answer, itself after.
    let (me, fake, stop, server) = hung_leader_beside_survivor(1).await;
    let c = Client::builder()
        .request_timeout(Duration::from_secs(1))
        .connect(me.to_string())
        .await
        .unwrap();
    let metadata_reads = || {
        let seen = fake.seen.lock().unwrap();
        seen.iter().filter(|t| **t == RequestType::Metadata).count()
    };
    c.metadata(&["t"]).await.unwrap();
    assert_eq!(metadata_reads(), 1);
    let e = c.offsets("t", 0).await.unwrap_err();
    assert!(matches!(e, streambus_client::Error::TimedOut { .. }), "{e}");
    // The refresh the timeout asked for (an event, waited on with a bound).
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while metadata_reads() < 2 {
        assert!(
            std::time::Instant::now() < until,
            "no Metadata read after the timeout"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The answer is learnt right after it is sent: its call returns first.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let offsets = loop {
        match c.offsets("t", 0).await {
            Ok(o) => break o,
            Err(e) => assert!(std::time::Instant::now() < until, "{e}"),
        }
    };
    assert_eq!((offsets.start, offsets.end), (0, 7));
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// A fake broker whose every Fetch answer holds one record, at offset `i64::MAX` (the largest
/// there is: no offset follows it).
struct LastOffset;

impl Handler for LastOffset {
    fn handle(&self, _flags: Flags, request: &Request<'_>, reply: Reply) {
        match request {
            Request::Fetch(_) => {
                let mut buf = [0u8; 256];
                let mut set = streambus_core::MessageSetBuilder::new(&mut buf);
                let mut m = streambus_core::Message::new(b"", b"last");
                m.offset = i64::MAX;
                set.push(&m).unwrap();
                reply.respond(&Response::Fetch(streambus_core::FetchResponse {
                    high_water_mark: i64::MAX,
                    messages: set.finish(),
                    trailer: None,
                }));
            }
            other => refuse(reply, other),
        }
    }
}

/// A record at offset `i64::MAX` has no next offset to fetch from: `poll` returns a protocol
/// error naming it. Before, the next offset overflowed: a debug build's fetcher panicked (and
/// `poll` returned nothing, forever, with no error), a release build fetched the same record
/// again, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_at_the_largest_offset_is_a_protocol_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(streambus_adapters::tokio::serve(
        listener,
        Arc::new(LastOffset),
        ServeOptions::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let c = Client::connect(addr.to_string()).await.unwrap();
    let mut consumer = streambus_client::Consumer::new(&c);
    consumer
        .assign("t", 0, streambus_client::Offset::At(i64::MAX - 1))
        .await
        .unwrap();
    let e = consumer.poll(Duration::from_secs(10)).await.unwrap_err();
    assert!(matches!(e, streambus_client::Error::Protocol { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "fetch on topic \"t\" partition 0: protocol violation by the broker: a record at \
         offset 9223372036854775807, the largest there is (no next offset to fetch)"
    );
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
