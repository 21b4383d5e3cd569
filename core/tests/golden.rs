//! Golden byte vectors: the five captured from the original SDK and broker (protocol-v1 §7)
//! and one request and one response of every type, laid out by hand from the spec with CRCs
//! from an independent implementation (Python's `zlib.crc32`). Each is decoded field by field
//! and re-encoded byte for byte, so compatibility can't drift.

use streambus_core::{
    CreateTopicRequest, CreateTopicResponse, DeleteTopicRequest, DeleteTopicResponse, Encode,
    ErrorCode, ErrorResponse, FetchExtension, FetchRequest, FetchResponse, FetchTrailer, Flags,
    FrameDecoder, GetOffsetRequest, GetOffsetResponse, Header, Headers, HealthCheckResponse,
    ListTopicsResponse, LongPoll, Message, MessageSetBuilder, ProduceRequest, ProduceResponse,
    ProducerInfo, Request, RequestFrame, RequestType, Response, ResponseFrame, Status, Text, Topic,
    TopicInfo, TopicList, encode_request, encode_response,
};

const HEALTH_REQ: &str = "00000010000000000000000107010000daa0bd51";
const PRODUCE_REQ: &str = "0000003b0000000000000002010100010000000174000000000000000100000000000000000000000000000001000000016b000000017600000000608b9119";
const PRODUCE_RESP: &str =
    "0000002300000000000000020000000000000000000000000000010000000000000001d04e446a";
const HEALTH_RESP: &str =
    "000000220000000000000001000000000000076865616c746879000000000000000223bf1731";
const ERROR_RESP: &str = "00000039000000000000006a01000800000026746f706963206d697373696e672d746f7069632d72617720646f6573206e6f74206578697374d304c1bf";
const PRODUCE_EXT_REQ: &str = "00000085000000000000000301010000000000066f7264657273000000020000000200000000000000000000000000000000000000000000000568656c6c6f000000020000000268310000000178000000026831000000000000000000000000fffffffffffffffb000000036b65790000000000000000000000000000002a000100000007bb744fb0";
const FETCH_REQ: &str =
    "0000002a000000000000000402010000000000066f726465727300000001000000000000000a00100000435583ef";
const FETCH_EXT_REQ: &str = "00000033000000000000000502010000000000066f72646572730000000000000000000000000000100000000001f400000001ef4976fa";
const FETCH_RESP: &str = "000000710000000000000004000000000000000000000c00000002000000000000000a00000000000003e80000000161000000016200000001000000016b0000000176000000000000000b00000000000003e90000000000000002636300000000000000000000000c000000000000000c5f87f46d";
const GETOFFSET_REQ: &str = "0000001e000000000000000603010000000000066f726465727300000003a5a27781";
const GETOFFSET_RESP: &str = "000000350000000000000006000000000000066f7264657273000000030000000000000005000000000000006300000000000000633f68547e";
const CREATE_REQ: &str =
    "000000250000000000000007040100000000000b6e65772e746f7069635f31000000040001ab22e87b";
const CREATE_RESP: &str = "0000001f00000000000000070000000000000b6e65772e746f7069635f3101977cb4e0";
const DELETE_REQ: &str = "0000001d000000000000000805010000000000096f6c642d746f706963c37a5acd";
const DELETE_RESP: &str = "0000001d0000000000000008000000000000096f6c642d746f706963017b9cb2dc";
const LIST_REQ: &str = "00000010000000000000000906010000526c91f5";
const LIST_RESP: &str =
    "0000002700000000000000090000000000000200000001610000000100000003622e63000000038297bacb";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn topic(s: &str) -> Topic<'_> {
    Topic::new(s).unwrap()
}

/// Decodes a request frame and checks it is exactly one whole frame.
fn decode_req(bytes: &[u8]) -> RequestFrame<&[u8]> {
    assert_eq!(
        FrameDecoder::requests().next_frame(bytes),
        Ok(Status::Complete(bytes.len()))
    );
    RequestFrame::new_checked(bytes).unwrap()
}

fn decode_resp(bytes: &[u8]) -> ResponseFrame<&[u8]> {
    assert_eq!(
        FrameDecoder::responses().next_frame(bytes),
        Ok(Status::Complete(bytes.len()))
    );
    ResponseFrame::new_checked(bytes).unwrap()
}

fn enc_req(id: u64, flags: Flags, r: &Request<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; streambus_core::request_encoded_len(r)];
    let n = encode_request(id, flags, r, &mut buf).unwrap();
    assert_eq!(n, buf.len());
    buf
}

fn enc_resp(id: u64, r: &Response<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; streambus_core::response_encoded_len(r)];
    let n = encode_response(id, r, &mut buf).unwrap();
    assert_eq!(n, buf.len());
    buf
}

#[test]
fn health_check_request_spec_vector() {
    let b = hex(HEALTH_REQ);
    let f = decode_req(&b);
    assert_eq!(
        (f.request_id(), f.request_type(), f.version(), f.flags()),
        (1, Some(RequestType::HealthCheck), 1, Flags::NONE)
    );
    assert_eq!(Request::parse(&f).unwrap(), Request::HealthCheck);
    assert_eq!(enc_req(1, Flags::NONE, &Request::HealthCheck), b);
}

#[test]
fn produce_request_spec_vector() {
    let b = hex(PRODUCE_REQ);
    let f = decode_req(&b);
    assert_eq!(f.flags(), Flags::REQUIRE_ACK);
    let Request::Produce(p) = Request::parse(&f).unwrap() else {
        panic!("not a produce")
    };
    assert_eq!(
        (
            p.topic.as_str(),
            p.partition,
            p.messages.count(),
            p.producer
        ),
        ("t", 0, 1, None)
    );
    let m: Vec<Message<'_>> = p.messages.iter().collect();
    assert_eq!(
        m,
        vec![Message {
            offset: 0,
            timestamp: 1,
            key: b"k",
            value: b"v",
            headers: Headers::EMPTY
        }]
    );

    let mut mbuf = [0u8; 64];
    let mut builder = MessageSetBuilder::new(&mut mbuf);
    builder
        .push(&Message {
            timestamp: 1,
            ..Message::new(b"k", b"v")
        })
        .unwrap();
    let req = Request::Produce(ProduceRequest {
        topic: topic("t"),
        partition: 0,
        messages: builder.finish(),
        producer: None,
    });
    assert_eq!(enc_req(2, Flags::REQUIRE_ACK, &req), b);
}

#[test]
fn produce_response_spec_vector() {
    let b = hex(PRODUCE_RESP);
    let f = decode_resp(&b);
    let want = Response::Produce(ProduceResponse {
        base_offset: 0,
        num_messages: 1,
        high_water_mark: 1,
    });
    assert_eq!(Response::parse(&f, RequestType::Produce).unwrap(), want);
    assert_eq!(f.payload().len(), 20);
    assert_eq!(enc_resp(2, &want), b);
}

#[test]
fn health_check_response_spec_vector() {
    let b = hex(HEALTH_RESP);
    let f = decode_resp(&b);
    let want = Response::HealthCheck(HealthCheckResponse {
        status: Text(b"healthy"),
        uptime_secs: 2,
    });
    assert_eq!(Response::parse(&f, RequestType::HealthCheck).unwrap(), want);
    assert_eq!(enc_resp(1, &want), b);
}

#[test]
fn error_response_spec_vector() {
    let b = hex(ERROR_RESP);
    let f = decode_resp(&b);
    assert_eq!(
        (f.request_id(), f.status_byte(), f.error_code()),
        (106, 1, ErrorCode::TOPIC_NOT_FOUND)
    );
    let want = Response::Error(ErrorResponse {
        code: ErrorCode::TOPIC_NOT_FOUND,
        message: Text(b"topic missing-topic-raw does not exist"),
    });
    // An error payload decodes the same whatever request it answers.
    for ty in RequestType::ALL {
        assert_eq!(Response::parse(&f, ty).unwrap(), want);
    }
    assert_eq!(enc_resp(106, &want), b);
}

#[test]
fn produce_request_with_headers_and_extensions() {
    let b = hex(PRODUCE_EXT_REQ);
    let f = decode_req(&b);
    let Request::Produce(p) = Request::parse(&f).unwrap() else {
        panic!()
    };
    assert_eq!(
        p.producer,
        Some(ProducerInfo {
            producer_id: 42,
            producer_epoch: 1,
            base_sequence: Some(7)
        })
    );
    let msgs: Vec<_> = p.messages.iter().collect();
    assert_eq!(msgs.len(), 2);
    let hdrs: Vec<_> = msgs[0].headers.iter().collect();
    // Order kept, duplicate keys kept.
    assert_eq!(
        hdrs,
        vec![
            Header {
                key: b"h1",
                value: b"x"
            },
            Header {
                key: b"h1",
                value: b""
            }
        ]
    );
    assert_eq!(
        (msgs[0].key, msgs[0].value, msgs[0].timestamp),
        (&b""[..], &b"hello"[..], 0)
    );
    assert_eq!(
        (msgs[1].key, msgs[1].value, msgs[1].timestamp),
        (&b"key"[..], &b""[..], -5)
    );

    let headers = [
        Header {
            key: b"h1",
            value: b"x",
        },
        Header {
            key: b"h1",
            value: b"",
        },
    ];
    let mut mbuf = [0u8; 256];
    let mut builder = MessageSetBuilder::new(&mut mbuf);
    builder
        .push(&Message {
            headers: Headers::from_slice(&headers),
            ..Message::new(b"", b"hello")
        })
        .unwrap();
    builder
        .push(&Message {
            timestamp: -5,
            ..Message::new(b"key", b"")
        })
        .unwrap();
    let req = Request::Produce(ProduceRequest {
        topic: topic("orders"),
        partition: 2,
        messages: builder.finish(),
        producer: Some(ProducerInfo {
            producer_id: 42,
            producer_epoch: 1,
            base_sequence: Some(7),
        }),
    });
    assert_eq!(enc_req(3, Flags::NONE, &req), b);
}

#[test]
fn fetch_request_vectors() {
    let b = hex(FETCH_REQ);
    let want = Request::Fetch(FetchRequest {
        topic: topic("orders"),
        partition: 1,
        offset: 10,
        max_bytes: 1 << 20,
        extension: None,
    });
    assert_eq!(Request::parse(&decode_req(&b)).unwrap(), want);
    assert_eq!(enc_req(4, Flags::NONE, &want), b);

    let b = hex(FETCH_EXT_REQ);
    let want = Request::Fetch(FetchRequest {
        topic: topic("orders"),
        partition: 0,
        offset: 0,
        max_bytes: 4096,
        extension: Some(FetchExtension {
            isolation_level: 0,
            long_poll: Some(LongPoll {
                max_wait_ms: 500,
                min_bytes: 1,
            }),
        }),
    });
    assert_eq!(Request::parse(&decode_req(&b)).unwrap(), want);
    assert_eq!(enc_req(5, Flags::NONE, &want), b);
}

#[test]
fn fetch_response_vector() {
    let b = hex(FETCH_RESP);
    let f = decode_resp(&b);
    let Response::Fetch(r) = Response::parse(&f, RequestType::Fetch).unwrap() else {
        panic!()
    };
    assert_eq!(r.high_water_mark, 12);
    assert_eq!(
        r.trailer,
        Some(FetchTrailer {
            last_stable_offset: 12,
            next_offset: 12
        })
    );
    let msgs: Vec<_> = r.messages.iter().collect();
    assert_eq!(
        msgs.iter()
            .map(|m| (m.offset, m.timestamp))
            .collect::<Vec<_>>(),
        vec![(10, 1000), (11, 1001)]
    );
    assert_eq!(
        msgs[0].headers.iter().collect::<Vec<_>>(),
        vec![Header {
            key: b"k",
            value: b"v"
        }]
    );
    assert_eq!(msgs[1].value, b"cc");

    let hdr = [Header {
        key: b"k",
        value: b"v",
    }];
    let mut mbuf = [0u8; 256];
    let mut builder = MessageSetBuilder::new(&mut mbuf);
    builder
        .push(&Message {
            offset: 10,
            timestamp: 1000,
            key: b"a",
            value: b"b",
            headers: Headers::from_slice(&hdr),
        })
        .unwrap();
    builder
        .push(&Message {
            offset: 11,
            timestamp: 1001,
            ..Message::new(b"", b"cc")
        })
        .unwrap();
    let want = Response::Fetch(FetchResponse {
        high_water_mark: 12,
        messages: builder.finish(),
        trailer: Some(FetchTrailer {
            last_stable_offset: 12,
            next_offset: 12,
        }),
    });
    assert_eq!(enc_resp(4, &want), b);
}

#[test]
fn get_offset_vectors() {
    let b = hex(GETOFFSET_REQ);
    let want = Request::GetOffset(GetOffsetRequest {
        topic: topic("orders"),
        partition: 3,
    });
    assert_eq!(Request::parse(&decode_req(&b)).unwrap(), want);
    assert_eq!(enc_req(6, Flags::NONE, &want), b);

    let b = hex(GETOFFSET_RESP);
    let want = Response::GetOffset(GetOffsetResponse {
        topic: topic("orders"),
        partition: 3,
        start_offset: 5,
        end_offset: 99,
        high_water_mark: 99,
    });
    assert_eq!(
        Response::parse(&decode_resp(&b), RequestType::GetOffset).unwrap(),
        want
    );
    assert_eq!(enc_resp(6, &want), b);
}

#[test]
fn create_topic_vectors() {
    let b = hex(CREATE_REQ);
    let want = Request::CreateTopic(CreateTopicRequest {
        topic: topic("new.topic_1"),
        num_partitions: 4,
        replication_factor: 1,
    });
    assert_eq!(Request::parse(&decode_req(&b)).unwrap(), want);
    assert_eq!(enc_req(7, Flags::NONE, &want), b);

    let b = hex(CREATE_RESP);
    let want = Response::CreateTopic(CreateTopicResponse {
        topic: topic("new.topic_1"),
        created: true,
    });
    assert_eq!(
        Response::parse(&decode_resp(&b), RequestType::CreateTopic).unwrap(),
        want
    );
    assert_eq!(enc_resp(7, &want), b);
}

#[test]
fn delete_topic_vectors() {
    let b = hex(DELETE_REQ);
    let want = Request::DeleteTopic(DeleteTopicRequest {
        topic: topic("old-topic"),
    });
    assert_eq!(Request::parse(&decode_req(&b)).unwrap(), want);
    assert_eq!(enc_req(8, Flags::NONE, &want), b);

    let b = hex(DELETE_RESP);
    let want = Response::DeleteTopic(DeleteTopicResponse {
        topic: topic("old-topic"),
        deleted: true,
    });
    assert_eq!(
        Response::parse(&decode_resp(&b), RequestType::DeleteTopic).unwrap(),
        want
    );
    assert_eq!(enc_resp(8, &want), b);
}

#[test]
fn list_topics_vectors() {
    let b = hex(LIST_REQ);
    assert_eq!(
        Request::parse(&decode_req(&b)).unwrap(),
        Request::ListTopics
    );
    assert_eq!(enc_req(9, Flags::NONE, &Request::ListTopics), b);

    let b = hex(LIST_RESP);
    let topics = [
        TopicInfo {
            name: topic("a"),
            num_partitions: 1,
        },
        TopicInfo {
            name: topic("b.c"),
            num_partitions: 3,
        },
    ];
    let want = Response::ListTopics(ListTopicsResponse {
        topics: TopicList::from_slice(&topics),
    });
    let f = decode_resp(&b);
    let got = Response::parse(&f, RequestType::ListTopics).unwrap();
    assert_eq!(got, want);
    let Response::ListTopics(l) = got else {
        panic!()
    };
    assert_eq!(l.topics.iter().collect::<Vec<_>>(), topics);
    assert_eq!(enc_resp(9, &want), b);
}

#[test]
fn encoded_len_matches_payload_of_every_vector() {
    for (h, ty) in [
        (PRODUCE_EXT_REQ, RequestType::Produce),
        (FETCH_EXT_REQ, RequestType::Fetch),
        (CREATE_REQ, RequestType::CreateTopic),
    ] {
        let b = hex(h);
        let f = decode_req(&b);
        let r = Request::parse(&f).unwrap();
        assert_eq!(r.request_type(), ty);
        assert_eq!(r.encoded_len(), f.payload().len());
    }
}
