//! Property tests: every request and response type survives encode → decode unchanged,
//! `encoded_len` equals the bytes written, a too-small buffer is refused untouched, and any
//! split of a byte stream into chunks decodes the same frames.

use proptest::prelude::*;
use streambus_core::{
    AuthenticateRequest, AuthenticateResponse, CreateTopicRequest, CreateTopicResponse,
    DeleteTopicRequest, DeleteTopicResponse, Encode, EncodeError, ErrorCode, ErrorResponse,
    FetchExtension, FetchRequest, FetchResponse, FetchTrailer, Flags, FrameDecoder,
    GetOffsetRequest, GetOffsetResponse, Header, Headers, HealthCheckResponse, ListTopicsResponse,
    LongPoll, Message, MessageSet, MessageSetBuilder, MetadataRequest, MetadataResponse,
    ProduceRequest, ProduceResponse, ProducerInfo, Request, RequestFrame, Response, ResponseFrame,
    Status, Text, Topic, TopicInfo, TopicList, TopicNames, encode_request, encode_response,
    request_encoded_len, response_encoded_len,
};
use streambus_core::{
    BrokerInfo, BrokerList, PartitionList, PartitionMetadata, ReplicaList, TopicMetadata,
    TopicMetadataList,
};

#[derive(Debug, Clone)]
struct OwnedMsg {
    offset: i64,
    timestamp: i64,
    key: Vec<u8>,
    value: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn topic_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,60}".prop_filter("not . or ..", |s| s != "." && s != "..")
}

fn msg() -> impl Strategy<Value = OwnedMsg> {
    (
        any::<i64>(),
        any::<i64>(),
        bytes(40),
        bytes(200),
        prop::collection::vec((bytes(10), bytes(20)), 0..4),
    )
        .prop_map(|(offset, timestamp, key, value, headers)| OwnedMsg {
            offset,
            timestamp,
            key,
            value,
            headers,
        })
}

fn t(s: &str) -> Topic<'_> {
    Topic::new(s).unwrap()
}

/// Encodes owned messages into `buf` and returns the set.
fn build<'b>(
    src: &'b [OwnedMsg],
    hdr_store: &'b [Vec<Header<'b>>],
    buf: &'b mut Vec<u8>,
) -> MessageSet<'b> {
    let need: usize = src
        .iter()
        .zip(hdr_store)
        .map(|(m, h)| to_msg(m, h).encoded_len())
        .sum();
    buf.resize(need, 0);
    let mut b = MessageSetBuilder::new(buf);
    for (m, h) in src.iter().zip(hdr_store) {
        b.push(&to_msg(m, h)).unwrap();
    }
    assert_eq!(b.len(), need);
    b.finish()
}

fn headers_of(m: &OwnedMsg) -> Vec<Header<'_>> {
    m.headers
        .iter()
        .map(|(k, v)| Header { key: k, value: v })
        .collect()
}

fn to_msg<'a>(m: &'a OwnedMsg, h: &'a [Header<'a>]) -> Message<'a> {
    Message {
        offset: m.offset,
        timestamp: m.timestamp,
        key: &m.key,
        value: &m.value,
        headers: Headers::from_slice(h),
    }
}

#[derive(Debug, Clone)]
enum OwnedReq {
    Produce {
        topic: String,
        partition: u32,
        msgs: Vec<OwnedMsg>,
        producer: Option<ProducerInfo>,
    },
    Fetch {
        topic: String,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        ext: Option<FetchExtension>,
    },
    GetOffset {
        topic: String,
        partition: u32,
    },
    Create {
        topic: String,
        partitions: u32,
        rf: u16,
    },
    Delete {
        topic: String,
    },
    List,
    Health,
    Metadata(Vec<String>),
    Authenticate {
        mechanism: Vec<u8>,
        credential: Vec<u8>,
    },
}

fn producer() -> impl Strategy<Value = Option<ProducerInfo>> {
    prop::option::of(
        (any::<i64>(), any::<i16>(), prop::option::of(any::<i32>())).prop_map(
            |(producer_id, producer_epoch, base_sequence)| ProducerInfo {
                producer_id,
                producer_epoch,
                base_sequence,
            },
        ),
    )
}

fn fetch_ext() -> impl Strategy<Value = Option<FetchExtension>> {
    prop::option::of(
        (any::<i8>(), prop::option::of((any::<u32>(), any::<u32>()))).prop_map(
            |(isolation_level, lp)| FetchExtension {
                isolation_level,
                long_poll: lp.map(|(max_wait_ms, min_bytes)| LongPoll {
                    max_wait_ms,
                    min_bytes,
                }),
            },
        ),
    )
}

fn owned_req() -> impl Strategy<Value = OwnedReq> {
    prop_oneof![
        (
            topic_name(),
            any::<u32>(),
            prop::collection::vec(msg(), 0..6),
            producer()
        )
            .prop_map(|(topic, partition, msgs, producer)| OwnedReq::Produce {
                topic,
                partition,
                msgs,
                producer
            }),
        (
            topic_name(),
            any::<u32>(),
            any::<i64>(),
            any::<u32>(),
            fetch_ext()
        )
            .prop_map(
                |(topic, partition, offset, max_bytes, ext)| OwnedReq::Fetch {
                    topic,
                    partition,
                    offset,
                    max_bytes,
                    ext
                }
            ),
        (topic_name(), any::<u32>())
            .prop_map(|(topic, partition)| OwnedReq::GetOffset { topic, partition }),
        (topic_name(), any::<u32>(), any::<u16>()).prop_map(|(topic, partitions, rf)| {
            OwnedReq::Create {
                topic,
                partitions,
                rf,
            }
        }),
        topic_name().prop_map(|topic| OwnedReq::Delete { topic }),
        Just(OwnedReq::List),
        Just(OwnedReq::Health),
        prop::collection::vec(topic_name(), 0..6).prop_map(OwnedReq::Metadata),
        (bytes(20), bytes(64)).prop_map(|(mechanism, credential)| OwnedReq::Authenticate {
            mechanism,
            credential
        }),
    ]
}

/// Encodes `r` as a frame with a `flags`/`id` of its own.
fn encode_owned_req(r: &OwnedReq, id: u64, flags: Flags) -> Vec<u8> {
    let mut mbuf = Vec::new();
    let hdrs: Vec<Vec<Header<'_>>>;
    let names: Vec<Topic<'_>>;
    let req = match r {
        OwnedReq::Produce {
            topic,
            partition,
            msgs,
            producer,
        } => {
            hdrs = msgs.iter().map(headers_of).collect();
            let messages = build(msgs, &hdrs, &mut mbuf);
            Request::Produce(ProduceRequest {
                topic: t(topic),
                partition: *partition,
                messages,
                producer: *producer,
            })
        }
        OwnedReq::Fetch {
            topic,
            partition,
            offset,
            max_bytes,
            ext,
        } => Request::Fetch(FetchRequest {
            topic: t(topic),
            partition: *partition,
            offset: *offset,
            max_bytes: *max_bytes,
            extension: *ext,
        }),
        OwnedReq::GetOffset { topic, partition } => Request::GetOffset(GetOffsetRequest {
            topic: t(topic),
            partition: *partition,
        }),
        OwnedReq::Create {
            topic,
            partitions,
            rf,
        } => Request::CreateTopic(CreateTopicRequest {
            topic: t(topic),
            num_partitions: *partitions,
            replication_factor: *rf,
        }),
        OwnedReq::Delete { topic } => Request::DeleteTopic(DeleteTopicRequest { topic: t(topic) }),
        OwnedReq::List => Request::ListTopics,
        OwnedReq::Health => Request::HealthCheck,
        OwnedReq::Metadata(topics) => {
            names = topics.iter().map(|n| t(n)).collect();
            Request::Metadata(MetadataRequest {
                topics: TopicNames::from_slice(&names),
            })
        }
        OwnedReq::Authenticate {
            mechanism,
            credential,
        } => Request::Authenticate(AuthenticateRequest {
            mechanism: Text(mechanism),
            credential,
        }),
    };
    let len = request_encoded_len(&req);
    // Too small by one: refused, nothing written.
    let mut small = vec![0xA5u8; len - 1];
    assert_eq!(
        encode_request(id, flags, &req, &mut small),
        Err(EncodeError::BufferTooSmall { required: len })
    );
    assert!(small.iter().all(|&b| b == 0xA5));
    let mut buf = vec![0u8; len + 7];
    let n = encode_request(id, flags, &req, &mut buf).unwrap();
    assert_eq!(n, len);
    buf.truncate(n);
    // Decode and compare while the borrowed request is alive.
    let frame = RequestFrame::new_checked(&buf[..]).unwrap();
    assert_eq!(frame.request_id(), id);
    assert_eq!(frame.flags(), flags);
    let back = Request::parse(&frame).unwrap();
    assert_eq!(back, req);
    if let (Request::Produce(a), Request::Produce(b)) = (&back, &req) {
        assert!(a.messages.iter().eq(b.messages.iter()));
    }
    buf
}

#[derive(Debug, Clone)]
enum OwnedResp {
    Produce(ProduceResponse),
    Fetch {
        hwm: i64,
        msgs: Vec<OwnedMsg>,
        trailer: Option<FetchTrailer>,
    },
    GetOffset {
        topic: String,
        partition: u32,
        start: i64,
        end: i64,
        hwm: i64,
    },
    Create {
        topic: String,
        created: bool,
    },
    Delete {
        topic: String,
        deleted: bool,
    },
    List(Vec<(String, u32)>),
    Health {
        status: Vec<u8>,
        uptime: i64,
    },
    Authenticate {
        principal: Vec<u8>,
    },
    Error {
        code: u16,
        message: Vec<u8>,
    },
    Metadata {
        brokers: Vec<(u32, Vec<u8>, u16)>,
        topics: Vec<OwnedTopicMeta>,
    },
}

type OwnedPartitionMeta = (u32, i32, i32, Vec<u32>);
type OwnedTopicMeta = (String, u16, Vec<OwnedPartitionMeta>);

fn owned_metadata() -> impl Strategy<Value = OwnedResp> {
    let partition = (
        any::<u32>(),
        any::<i32>(),
        any::<i32>(),
        prop::collection::vec(any::<u32>(), 0..4),
    );
    let topic = (
        topic_name(),
        any::<u16>(),
        prop::collection::vec(partition, 0..5),
    );
    (
        prop::collection::vec((any::<u32>(), bytes(30), any::<u16>()), 0..4),
        prop::collection::vec(topic, 0..5),
    )
        .prop_map(|(brokers, topics)| OwnedResp::Metadata { brokers, topics })
}

fn owned_resp() -> impl Strategy<Value = OwnedResp> {
    prop_oneof![
        (any::<i64>(), any::<u32>(), any::<i64>()).prop_map(
            |(base_offset, num_messages, high_water_mark)| {
                OwnedResp::Produce(ProduceResponse {
                    base_offset,
                    num_messages,
                    high_water_mark,
                })
            }
        ),
        (
            any::<i64>(),
            prop::collection::vec(msg(), 0..6),
            prop::option::of((any::<i64>(), any::<i64>()))
        )
            .prop_map(|(hwm, msgs, t)| OwnedResp::Fetch {
                hwm,
                msgs,
                trailer: t.map(|(last_stable_offset, next_offset)| FetchTrailer {
                    last_stable_offset,
                    next_offset
                }),
            }),
        (
            topic_name(),
            any::<u32>(),
            any::<i64>(),
            any::<i64>(),
            any::<i64>()
        )
            .prop_map(|(topic, partition, start, end, hwm)| OwnedResp::GetOffset {
                topic,
                partition,
                start,
                end,
                hwm
            }),
        (topic_name(), any::<bool>())
            .prop_map(|(topic, created)| OwnedResp::Create { topic, created }),
        (topic_name(), any::<bool>())
            .prop_map(|(topic, deleted)| OwnedResp::Delete { topic, deleted }),
        prop::collection::vec((topic_name(), any::<u32>()), 0..8).prop_map(OwnedResp::List),
        (bytes(20), any::<i64>()).prop_map(|(status, uptime)| OwnedResp::Health { status, uptime }),
        bytes(40).prop_map(|principal| OwnedResp::Authenticate { principal }),
        (1u16..=u16::MAX, bytes(100))
            .prop_map(|(code, message)| OwnedResp::Error { code, message }),
        owned_metadata(),
    ]
}

fn check_resp(r: &OwnedResp, id: u64) -> Vec<u8> {
    let mut mbuf = Vec::new();
    let hdrs: Vec<Vec<Header<'_>>>;
    let topics: Vec<TopicInfo<'_>>;
    let meta_brokers: Vec<BrokerInfo<'_>>;
    let meta_replicas: Vec<Vec<Vec<u32>>>;
    let meta_partitions: Vec<Vec<PartitionMetadata<'_>>>;
    let meta_topics: Vec<TopicMetadata<'_>>;
    let (resp, ty) = match r {
        OwnedResp::Produce(p) => (Response::Produce(*p), streambus_core::RequestType::Produce),
        OwnedResp::Fetch { hwm, msgs, trailer } => {
            hdrs = msgs.iter().map(headers_of).collect();
            let messages = build(msgs, &hdrs, &mut mbuf);
            (
                Response::Fetch(FetchResponse {
                    high_water_mark: *hwm,
                    messages,
                    trailer: *trailer,
                }),
                streambus_core::RequestType::Fetch,
            )
        }
        OwnedResp::GetOffset {
            topic,
            partition,
            start,
            end,
            hwm,
        } => (
            Response::GetOffset(GetOffsetResponse {
                topic: t(topic),
                partition: *partition,
                start_offset: *start,
                end_offset: *end,
                high_water_mark: *hwm,
            }),
            streambus_core::RequestType::GetOffset,
        ),
        OwnedResp::Create { topic, created } => (
            Response::CreateTopic(CreateTopicResponse {
                topic: t(topic),
                created: *created,
            }),
            streambus_core::RequestType::CreateTopic,
        ),
        OwnedResp::Delete { topic, deleted } => (
            Response::DeleteTopic(DeleteTopicResponse {
                topic: t(topic),
                deleted: *deleted,
            }),
            streambus_core::RequestType::DeleteTopic,
        ),
        OwnedResp::List(list) => {
            topics = list
                .iter()
                .map(|(n, p)| TopicInfo {
                    name: t(n),
                    num_partitions: *p,
                })
                .collect();
            (
                Response::ListTopics(ListTopicsResponse {
                    topics: TopicList::from_slice(&topics),
                }),
                streambus_core::RequestType::ListTopics,
            )
        }
        OwnedResp::Health { status, uptime } => (
            Response::HealthCheck(HealthCheckResponse {
                status: Text(status),
                uptime_secs: *uptime,
            }),
            streambus_core::RequestType::HealthCheck,
        ),
        OwnedResp::Authenticate { principal } => (
            Response::Authenticate(AuthenticateResponse {
                principal: Text(principal),
            }),
            streambus_core::RequestType::Authenticate,
        ),
        OwnedResp::Error { code, message } => (
            Response::Error(ErrorResponse {
                code: ErrorCode(*code),
                message: Text(message),
            }),
            streambus_core::RequestType::Fetch,
        ),
        OwnedResp::Metadata {
            brokers,
            topics: owned_topics,
        } => {
            meta_brokers = brokers
                .iter()
                .map(|(node_id, host, port)| BrokerInfo {
                    node_id: *node_id,
                    host: Text(host),
                    port: *port,
                })
                .collect();
            meta_replicas = owned_topics
                .iter()
                .map(|(_, _, ps)| ps.iter().map(|p| p.3.clone()).collect())
                .collect();
            meta_partitions = owned_topics
                .iter()
                .zip(&meta_replicas)
                .map(|((_, _, ps), reps)| {
                    ps.iter()
                        .zip(reps)
                        .map(|(p, r)| PartitionMetadata {
                            partition: p.0,
                            leader: p.1,
                            leader_epoch: p.2,
                            replicas: ReplicaList::from_slice(r),
                        })
                        .collect()
                })
                .collect();
            meta_topics = owned_topics
                .iter()
                .zip(&meta_partitions)
                .map(|((name, code, _), ps)| TopicMetadata {
                    name: t(name),
                    error_code: ErrorCode(*code),
                    partitions: PartitionList::from_slice(ps),
                })
                .collect();
            (
                Response::Metadata(MetadataResponse {
                    brokers: BrokerList::from_slice(&meta_brokers),
                    topics: TopicMetadataList::from_slice(&meta_topics),
                }),
                streambus_core::RequestType::Metadata,
            )
        }
    };
    let len = response_encoded_len(&resp);
    let mut small = vec![0x5Au8; len - 1];
    assert_eq!(
        encode_response(id, &resp, &mut small),
        Err(EncodeError::BufferTooSmall { required: len })
    );
    assert!(small.iter().all(|&b| b == 0x5A));
    let mut buf = vec![0u8; len];
    assert_eq!(encode_response(id, &resp, &mut buf).unwrap(), len);
    let frame = ResponseFrame::new_checked(&buf[..]).unwrap();
    assert_eq!(frame.request_id(), id);
    let back = Response::parse(&frame, ty).unwrap();
    assert_eq!(back, resp);
    // A decoded reply re-encodes to the same bytes (the wire-borrowed lists write themselves).
    let mut again = vec![0u8; response_encoded_len(&back)];
    assert_eq!(encode_response(id, &back, &mut again).unwrap(), len);
    assert_eq!(again, buf);
    buf
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn request_roundtrip(r in owned_req(), id in any::<u64>(), flags in any::<u16>()) {
        encode_owned_req(&r, id, Flags(flags));
    }

    #[test]
    fn response_roundtrip(r in owned_resp(), id in any::<u64>()) {
        check_resp(&r, id);
    }

    #[test]
    fn every_prefix_is_partial(r in owned_req()) {
        let frame = encode_owned_req(&r, 1, Flags::NONE);
        let d = FrameDecoder::requests();
        for cut in 0..frame.len() {
            match d.next_frame(&frame[..cut]) {
                Ok(Status::Partial(n)) => prop_assert!(n >= 1 && cut + n <= frame.len()),
                other => prop_assert!(false, "prefix {} gave {:?}", cut, other),
            }
        }
        prop_assert_eq!(d.next_frame(&frame), Ok(Status::Complete(frame.len())));
    }

    #[test]
    fn any_chunking_decodes_the_same_frames(
        reqs in prop::collection::vec(owned_req(), 1..6),
        cuts in prop::collection::vec(1usize..64, 1..200),
    ) {
        let frames: Vec<Vec<u8>> = reqs.iter().enumerate().map(|(i, r)| encode_owned_req(r, i as u64, Flags::NONE)).collect();
        let stream: Vec<u8> = frames.concat();
        let d = FrameDecoder::requests();
        let mut acc = Vec::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut cut_iter = cuts.iter().cycle();
        while pos < stream.len() {
            let n = (*cut_iter.next().unwrap()).min(stream.len() - pos);
            acc.extend_from_slice(&stream[pos..pos + n]);
            pos += n;
            while let Ok(Status::Complete(len)) = d.next_frame(&acc) {
                let f = RequestFrame::new_checked(&acc[..len]).unwrap();
                Request::parse(&f).unwrap();
                got.push(acc[..len].to_vec());
                acc.drain(..len);
            }
        }
        prop_assert!(acc.is_empty());
        prop_assert_eq!(got, frames);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The precomputed-CRC Fetch encoder writes exactly what the generic encoder writes, and a
    /// wrong records CRC produces a frame that fails the receiver's check.
    #[test]
    fn fetch_with_precomputed_crc_matches(
        msgs in prop::collection::vec(msg(), 0..6),
        hwm in any::<i64>(),
        trailer in prop::option::of((any::<i64>(), any::<i64>())),
        id in any::<u64>(),
        flip in any::<u32>(),
    ) {
        let hdrs: Vec<Vec<Header<'_>>> = msgs.iter().map(headers_of).collect();
        let mut mbuf = Vec::new();
        let messages = build(&msgs, &hdrs, &mut mbuf);
        let fetch = FetchResponse {
            high_water_mark: hwm,
            messages,
            trailer: trailer.map(|(last_stable_offset, next_offset)| FetchTrailer { last_stable_offset, next_offset }),
        };
        let resp = Response::Fetch(fetch);
        let len = response_encoded_len(&resp);
        let mut want = vec![0u8; len];
        encode_response(id, &resp, &mut want).unwrap();
        let crc = streambus_core::checksum::checksum(messages.as_bytes());
        let mut got = vec![0u8; len];
        prop_assert_eq!(streambus_core::broker::encode_fetch_response(id, &fetch, crc, &mut got[..len - 1]), Err(EncodeError::BufferTooSmall { required: len }));
        prop_assert_eq!(streambus_core::broker::encode_fetch_response(id, &fetch, crc, &mut got), Ok(len));
        prop_assert_eq!(&got, &want);
        if let Some(t) = fetch.trailer {
            let parts = streambus_core::broker::encode_fetch_frame_parts(id, hwm, messages.count(), messages.as_bytes().len(), crc, t).unwrap();
            let joined = [&parts.head[..], messages.as_bytes(), &parts.tail[..]].concat();
            prop_assert_eq!(&joined, &want);
        }
        let bad = crc ^ (flip | 1);
        streambus_core::broker::encode_fetch_response(id, &fetch, bad, &mut got).unwrap();
        let is_mismatch = matches!(ResponseFrame::new_checked(&got[..]), Err(streambus_core::DecodeError::ChecksumMismatch { .. }));
        prop_assert!(is_mismatch);
    }
}
