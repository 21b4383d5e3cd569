//! Metadata (0x11, §6.4) end to end on each runtime: a single broker lists itself at its
//! advertised address as leader (epoch 0) and only replica of every partition; the reply's
//! payload is compared byte for byte with the core's encoding of the expected reply.

use streambus_core::{
    BrokerInfo, BrokerList, CreateTopicRequest, Encode, ErrorCode, MetadataRequest,
    MetadataResponse, PartitionList, PartitionMetadata, ReplicaList, Request, RequestType,
    Response, Text, Topic, TopicMetadata, TopicMetadataList, TopicNames,
};
use streambus_server::{Advertised, RuntimeKind};
use streambus_tests::{RawClient, broker_config};

const RUNTIMES: [RuntimeKind; 3] = [RuntimeKind::Tokio, RuntimeKind::Smol, RuntimeKind::Blocking];

fn topic(s: &str) -> Topic<'_> {
    Topic::new(s).unwrap()
}

fn create(c: &mut RawClient, name: &str, partitions: u32) {
    let r = c
        .call(&Request::CreateTopic(CreateTopicRequest {
            topic: topic(name),
            num_partitions: partitions,
            replication_factor: 1,
        }))
        .unwrap();
    assert_eq!(r.error_code(), 0, "create {name}");
}

fn metadata(c: &mut RawClient, names: &[&str]) -> streambus_tests::Reply {
    let names: Vec<Topic<'_>> = names.iter().map(|n| topic(n)).collect();
    c.call(&Request::Metadata(MetadataRequest {
        topics: TopicNames::from_slice(&names),
    }))
    .unwrap()
}

/// The payload a single broker `node` at `host:port` sends for `topics` (name, partition
/// count or `None` when missing), in the order given.
fn expected(node: u32, host: &str, port: u16, topics: &[(&str, Option<u32>)]) -> Vec<u8> {
    let replicas = [node];
    let parts: Vec<Vec<PartitionMetadata<'_>>> = topics
        .iter()
        .map(|(_, n)| {
            (0..n.unwrap_or(0))
                .map(|partition| PartitionMetadata {
                    partition,
                    leader: node as i32,
                    leader_epoch: 0,
                    replicas: ReplicaList::from_slice(&replicas),
                })
                .collect()
        })
        .collect();
    let entries: Vec<TopicMetadata<'_>> = topics
        .iter()
        .zip(&parts)
        .map(|((name, n), ps)| TopicMetadata {
            name: topic(name),
            error_code: if n.is_some() {
                ErrorCode::NONE
            } else {
                ErrorCode::TOPIC_NOT_FOUND
            },
            partitions: PartitionList::from_slice(ps),
        })
        .collect();
    let brokers = [BrokerInfo {
        node_id: node,
        host: Text(host.as_bytes()),
        port,
    }];
    let resp = Response::Metadata(MetadataResponse {
        brokers: BrokerList::from_slice(&brokers),
        topics: TopicMetadataList::from_slice(&entries),
    });
    let mut buf = vec![0u8; resp.encoded_len()];
    resp.encode(&mut buf).unwrap();
    buf
}

#[test]
fn a_single_broker_leads_every_partition_at_its_listen_address() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let broker = streambus_server::start(broker_config(dir.path(), rt)).unwrap();
        let port = broker.addr().port();
        let mut c = RawClient::connect(broker.addr()).unwrap();

        // No topics yet: the broker and an empty list.
        let r = metadata(&mut c, &[]);
        assert_eq!(r.error_code(), 0, "{rt:?}");
        assert_eq!(r.frame().payload(), expected(0, "127.0.0.1", port, &[]));

        create(&mut c, "orders", 3);
        create(&mut c, "Zeta", 1);
        create(&mut c, "alpha", 2);

        // Every topic, in byte order of the names ('Z' < 'a').
        let r = metadata(&mut c, &[]);
        assert_eq!(
            r.frame().payload(),
            expected(
                0,
                "127.0.0.1",
                port,
                &[("Zeta", Some(1)), ("alpha", Some(2)), ("orders", Some(3))]
            ),
            "{rt:?}"
        );

        // Named topics: sorted, each once, a missing one with TopicNotFound and no partitions.
        let r = metadata(&mut c, &["orders", "missing", "alpha", "orders"]);
        assert_eq!(r.error_code(), 0);
        assert_eq!(
            r.frame().payload(),
            expected(
                0,
                "127.0.0.1",
                port,
                &[("alpha", Some(2)), ("missing", None), ("orders", Some(3))]
            ),
            "{rt:?}"
        );
        // The same reply read back through the core's views.
        let Response::Metadata(m) = r.parse(RequestType::Metadata).unwrap() else {
            panic!("{rt:?}: not a Metadata reply")
        };
        let missing = m.topics.iter().nth(1).unwrap();
        assert_eq!(
            (
                missing.name.as_str(),
                missing.error_code,
                missing.partitions.len()
            ),
            ("missing", ErrorCode::TOPIC_NOT_FOUND, 0)
        );
        broker.shutdown().unwrap();
    }
}

#[test]
fn advertise_and_node_id_settings_are_what_metadata_reports() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = broker_config(dir.path(), RuntimeKind::Tokio);
    cfg.advertise = Some(Advertised {
        host: "broker7.example.com".into(),
        port: 19092,
    });
    cfg.node_id = 7;
    let broker = streambus_server::start(cfg).unwrap();
    let mut c = RawClient::connect(broker.addr()).unwrap();
    create(&mut c, "t", 2);
    let r = metadata(&mut c, &["t"]);
    assert_eq!(
        r.frame().payload(),
        expected(7, "broker7.example.com", 19092, &[("t", Some(2))])
    );
}

#[test]
fn a_metadata_reply_over_the_maximum_frame_is_refused_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = broker_config(dir.path(), RuntimeKind::Tokio);
    cfg.max_frame_bytes = 1024;
    let broker = streambus_server::start(cfg).unwrap();
    let mut c = RawClient::connect(broker.addr()).unwrap();
    // 100 partitions of 20 bytes each: over 1 024 bytes.
    create(&mut c, "wide", 100);
    let r = metadata(&mut c, &[]);
    assert!(r.0.len() - 4 <= 1024, "reply Length {}", r.0.len() - 4);
    assert_eq!(r.error_code(), ErrorCode::MESSAGE_TOO_LARGE.0);
    let Response::Error(e) = r.parse(RequestType::Metadata).unwrap() else {
        panic!("not an error reply");
    };
    assert!(e.message.to_string().contains("1 topics"), "{}", e.message);
    // The connection goes on.
    assert_eq!(c.call(&Request::HealthCheck).unwrap().error_code(), 0);
}
