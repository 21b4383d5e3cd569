//! Metadata (0x11, §6.4): the exact byte layout of both payloads, and bad or cut payloads
//! rejected with a typed error.

use proptest::prelude::*;
use streambus_core::{
    BrokerInfo, BrokerList, DecodeError, Encode, ErrorCode, Malformed, MetadataRequest,
    MetadataResponse, PartitionList, PartitionMetadata, ReplicaList, Request, RequestType,
    Response, Text, Topic, TopicMetadata, TopicMetadataList, TopicNames,
};

/// A topic as (name, error code, partitions as (id, leader, epoch, replicas)).
type OwnedTopic = (String, u16, Vec<(u32, i32, i32, Vec<u32>)>);

fn t(s: &str) -> Topic<'_> {
    Topic::new(s).unwrap()
}

fn encode(v: &impl Encode) -> Vec<u8> {
    let mut buf = vec![0u8; v.encoded_len()];
    assert_eq!(v.encode(&mut buf).unwrap(), buf.len());
    buf
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// One broker (node 0 at 127.0.0.1:9092); topic "a" with two partitions led by node 0, and a
/// missing topic "b".
const REPLY_HEX: &str = "00000001 00000000 00000009 3132372e302e302e31 2384
     00000002
     00000001 61 0000 00000002
       00000000 00000000 00000000 00000001 00000000
       00000001 00000000 00000000 00000001 00000000
     00000001 62 0008 00000000";

#[test]
fn request_layout_is_count_then_names() {
    let names = [t("a"), t("bc")];
    let req = Request::Metadata(MetadataRequest {
        topics: TopicNames::from_slice(&names),
    });
    let bytes = encode(&req);
    assert_eq!(bytes, hex("00000002 00000001 61 00000002 6263"));
    let back = Request::parse_payload(RequestType::Metadata, &bytes).unwrap();
    assert_eq!(back, req);
    let Request::Metadata(m) = back else {
        unreachable!()
    };
    assert_eq!(
        m.topics.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        ["a", "bc"]
    );
    // Every topic: a zero count.
    assert_eq!(
        encode(&Request::Metadata(MetadataRequest::ALL_TOPICS)),
        hex("00000000")
    );
}

#[test]
fn reply_layout_follows_section_6_4() {
    let replicas = [0u32];
    let parts = [
        PartitionMetadata {
            partition: 0,
            leader: 0,
            leader_epoch: 0,
            replicas: ReplicaList::from_slice(&replicas),
        },
        PartitionMetadata {
            partition: 1,
            leader: 0,
            leader_epoch: 0,
            replicas: ReplicaList::from_slice(&replicas),
        },
    ];
    let topics = [
        TopicMetadata {
            name: t("a"),
            error_code: ErrorCode::NONE,
            partitions: PartitionList::from_slice(&parts),
        },
        TopicMetadata {
            name: t("b"),
            error_code: ErrorCode::TOPIC_NOT_FOUND,
            partitions: PartitionList::from_slice(&[]),
        },
    ];
    let brokers = [BrokerInfo {
        node_id: 0,
        host: Text::from("127.0.0.1"),
        port: 9092,
    }];
    let resp = Response::Metadata(MetadataResponse {
        brokers: BrokerList::from_slice(&brokers),
        topics: TopicMetadataList::from_slice(&topics),
    });
    let bytes = encode(&resp);
    assert_eq!(bytes, hex(REPLY_HEX));
    let back = Response::parse_payload(RequestType::Metadata, &bytes).unwrap();
    assert_eq!(back, resp);
    let Response::Metadata(m) = back else {
        unreachable!()
    };
    let b = m.brokers.iter().next().unwrap();
    assert_eq!(
        (b.node_id, b.host.as_str(), b.port),
        (0, Some("127.0.0.1"), 9092)
    );
    let got: Vec<OwnedTopic> = m
        .topics
        .iter()
        .map(|t| {
            (
                t.name.as_str().to_owned(),
                t.error_code.0,
                t.partitions
                    .iter()
                    .map(|p| {
                        (
                            p.partition,
                            p.leader,
                            p.leader_epoch,
                            p.replicas.iter().collect(),
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "a".to_owned(),
                0,
                vec![(0, 0, 0, vec![0]), (1, 0, 0, vec![0])]
            ),
            ("b".to_owned(), 8, vec![])
        ]
    );
}

#[test]
fn every_cut_reply_payload_is_a_typed_error() {
    let bytes = hex(REPLY_HEX);
    for cut in 0..bytes.len() {
        match Response::parse_payload(RequestType::Metadata, &bytes[..cut]) {
            Err(DecodeError::Malformed {
                reason: Malformed::Truncated { .. } | Malformed::CountTooLarge { .. },
            }) => {}
            other => panic!("prefix {cut}: {other:?}"),
        }
    }
}

#[test]
fn every_cut_request_payload_is_a_typed_error() {
    let bytes = hex("00000002 00000001 61 00000002 6263");
    for cut in 0..bytes.len() {
        match Request::parse_payload(RequestType::Metadata, &bytes[..cut]) {
            Err(DecodeError::Malformed {
                reason: Malformed::Truncated { .. } | Malformed::CountTooLarge { .. },
            }) => {}
            other => panic!("prefix {cut}: {other:?}"),
        }
    }
}

#[test]
fn counts_beyond_the_bytes_present_are_refused_before_reading() {
    // u32::MAX topics in a 4-byte payload.
    assert_eq!(
        Request::parse_payload(RequestType::Metadata, &hex("ffffffff")),
        Err(DecodeError::Malformed {
            reason: Malformed::CountTooLarge {
                field: "topic count",
                count: u32::MAX
            }
        })
    );
    // One broker, no topics, then a partition count far past the end.
    let reply = hex("00000000 00000001 00000001 61 0000 7fffffff");
    assert_eq!(
        Response::parse_payload(RequestType::Metadata, &reply),
        Err(DecodeError::Malformed {
            reason: Malformed::CountTooLarge {
                field: "partition count",
                count: 0x7fff_ffff
            }
        })
    );
}

#[test]
fn an_invalid_topic_name_in_the_request_is_malformed() {
    let bytes = hex("00000001 00000002 2e2e");
    let err = Request::parse_payload(RequestType::Metadata, &bytes);
    assert_eq!(
        err,
        Err(DecodeError::Malformed {
            reason: Malformed::InvalidTopicName { len: 2 }
        })
    );
    assert_eq!(err.unwrap_err().error_code(), ErrorCode::INVALID_REQUEST);
}

#[test]
fn trailing_bytes_after_the_request_are_ignored() {
    let bytes = hex("00000001 00000001 61 ff");
    let req = Request::parse_payload(RequestType::Metadata, &bytes);
    let names = [t("a")];
    assert_eq!(
        req,
        Ok(Request::Metadata(MetadataRequest {
            topics: TopicNames::from_slice(&names)
        }))
    );
}

proptest! {
    /// Arbitrary bytes as a Metadata payload: decoded or refused, never a panic, and what
    /// decodes re-encodes to the bytes it was read from.
    #[test]
    fn arbitrary_payloads_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(resp) = Response::parse_payload(RequestType::Metadata, &bytes) {
            let again = encode(&resp);
            prop_assert_eq!(&again[..], &bytes[..again.len()]);
        }
        if let Ok(req) = Request::parse_payload(RequestType::Metadata, &bytes) {
            let again = encode(&req);
            prop_assert_eq!(&again[..], &bytes[..again.len()]);
        }
    }
}
