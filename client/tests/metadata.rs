//! `Client::metadata` against the real broker, and the producer's NotLeader path against a
//! fake broker built on the adapters' server side (a single broker never sends NotLeader).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use streambus_adapters::{Handler, Reply, ServeOptions};
use streambus_client::{Client, ErrorCode, Producer, ProducerConfig, Record};
use streambus_core::{
    BrokerInfo, BrokerList, Flags, MetadataResponse, PartitionList, PartitionMetadata,
    ProduceResponse, ReplicaList, Request, RequestType, Response, Text, TopicMetadata,
    TopicMetadataList,
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
                let topics = [TopicMetadata {
                    name: streambus_core::Topic::new("t").unwrap(),
                    error_code: streambus_core::ErrorCode::NONE,
                    partitions: PartitionList::from_slice(&parts),
                }];
                let brokers = [BrokerInfo {
                    node_id: 0,
                    host: Text::from("127.0.0.1"),
                    port: 1,
                }];
                reply.respond(&Response::Metadata(MetadataResponse {
                    brokers: BrokerList::from_slice(&brokers),
                    topics: TopicMetadataList::from_slice(&topics),
                }));
            }
            Request::Produce(p) if produces == 1 => reply.error(
                streambus_core::ErrorCode::NOT_LEADER,
                format_args!("partition {} is led by node 1 now", p.partition),
            ),
            Request::Produce(p) => reply.respond(&Response::Produce(ProduceResponse {
                base_offset: 41,
                num_messages: p.messages.count(),
                high_water_mark: 41 + i64::from(p.messages.count()),
            })),
            other => reply.error(
                streambus_core::ErrorCode::UNKNOWN_REQUEST,
                format_args!("not here: {:?}", other.request_type()),
            ),
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
    assert_eq!(
        *fake.seen.lock().unwrap(),
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
