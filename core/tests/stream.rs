//! The frame reader as the broker and the clients run it: every prefix and every split of a
//! stream of frames, fed through `ServerConnection` and through `ClientConnection`, gives the
//! same events as the whole stream (httparse's every-prefix test and minimq's fragmenting
//! fuzz driver, applied to the connections instead of the bare decoder).

use core::time::Duration;

use proptest::prelude::*;
use streambus_core::{
    ClientConfig, ClientConnection, ClientError, CreateTopicRequest, CreateTopicResponse,
    DeleteTopicRequest, DeleteTopicResponse, ErrorCode, ErrorResponse, FetchExtension,
    FetchRequest, FetchResponse, FetchTrailer, Flags, GetOffsetRequest, GetOffsetResponse,
    HealthCheckResponse, Instant, ListTopicsResponse, LongPoll, Message, MessageSetBuilder,
    PeerError, ProduceRequest, ProduceResponse, ProducerInfo, Request, Response, ServerConfig,
    ServerConnection, ServerEvent, Topic, TopicInfo, TopicList, encode_request, encode_response,
};

const T0: Instant = Instant::from_millis(1_000);
/// Requests in flight on the client side at most.
const N: usize = 12;
/// The server's maximum Length in these tests.
const SERVER_MAX: u32 = 2_048;
/// The client's maximum Length in these tests.
const CLIENT_MAX: u32 = 1_024;

fn topic() -> Topic<'static> {
    Topic::new("sensors.temp-1").unwrap()
}

/// Builds request `kind` (0..7) with a size knob `n` and passes it to `f`.
fn with_request<R>(kind: u8, n: u8, f: impl FnOnce(&Request<'_>) -> R) -> R {
    let mut records = [0u8; 1024];
    let mut set = MessageSetBuilder::new(&mut records);
    let value = [n; 40];
    for i in 0..n % 5 {
        set.push(&Message::new(&[i; 3], &value[..usize::from(n % 41)]))
            .unwrap();
    }
    let messages = set.finish();
    let request = match kind % 7 {
        0 => Request::Produce(ProduceRequest {
            topic: topic(),
            partition: u32::from(n),
            messages,
            producer: (n % 2 == 1).then_some(ProducerInfo {
                producer_id: 7,
                producer_epoch: 1,
                base_sequence: n.is_multiple_of(3).then_some(5),
            }),
        }),
        1 => Request::Fetch(FetchRequest {
            topic: topic(),
            partition: 0,
            offset: i64::from(n),
            max_bytes: 4096,
            extension: n.is_multiple_of(2).then_some(FetchExtension {
                isolation_level: 0,
                long_poll: n.is_multiple_of(4).then_some(LongPoll {
                    max_wait_ms: 100,
                    min_bytes: 1,
                }),
            }),
        }),
        2 => Request::GetOffset(GetOffsetRequest {
            topic: topic(),
            partition: 3,
        }),
        3 => Request::CreateTopic(CreateTopicRequest {
            topic: topic(),
            num_partitions: u32::from(n % 8) + 1,
            replication_factor: 1,
        }),
        4 => Request::DeleteTopic(DeleteTopicRequest { topic: topic() }),
        5 => Request::ListTopics,
        _ => Request::HealthCheck,
    };
    f(&request)
}

fn request_frame(id: u64, kind: u8, n: u8) -> Vec<u8> {
    with_request(kind, n, |r| {
        let mut buf = vec![0u8; 2048];
        // Any flags but Compressed (refused on a Produce).
        let flags = Flags(u16::from(n) & !Flags::COMPRESSED.0);
        let len = encode_request(id, flags, r, &mut buf).unwrap();
        buf.truncate(len);
        buf
    })
}

// ---------------------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------------------

/// One frame of a request stream: a request of `kind`, maybe damaged so the broker answers
/// it with a fault (`fault`: 0 none, 1 bad CRC, 2 wrong version, 3 unknown type).
#[derive(Debug, Clone, Copy)]
struct RequestSpec {
    kind: u8,
    n: u8,
    fault: u8,
}

/// How a request stream ends: 0 at a frame boundary, 1 a Length below the minimum, 2 a
/// Length above the maximum.
fn request_stream(specs: &[RequestSpec], tail: u8) -> (Vec<u8>, Vec<usize>) {
    let mut stream = Vec::new();
    let mut ends = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let mut f = request_frame(i as u64 + 1, s.kind, s.n);
        match s.fault % 4 {
            1 => *f.last_mut().unwrap() ^= 0x5a,
            // The Version and Type bytes are covered by the CRC: re-encode it.
            2 | 3 => {
                f[if s.fault % 4 == 2 { 13 } else { 12 }] = 0x7f;
                let end = f.len() - 4;
                let crc = streambus_core::checksum::checksum(&f[4..end]);
                f[end..].copy_from_slice(&crc.to_be_bytes());
            }
            _ => {}
        }
        stream.extend_from_slice(&f);
        ends.push(stream.len());
    }
    match tail % 3 {
        1 => stream.extend_from_slice(&[0, 0, 0, 15, 1, 2, 3]),
        2 => {
            stream.extend_from_slice(&(SERVER_MAX + 1).to_be_bytes());
            stream.extend_from_slice(&0xABCD_u64.to_be_bytes());
            stream.extend_from_slice(&[9; 20]);
        }
        _ => {}
    }
    (stream, ends)
}

fn server() -> ServerConnection {
    let mut config = ServerConfig::default();
    config.max_frame_len(SERVER_MAX).max_in_flight(4);
    ServerConnection::new(config, T0)
}

/// Polls until the connection wants more bytes (answering every request and fault at once,
/// as a broker does); returns the events and the last `NeedMore` or `Close`.
fn poll_server(
    conn: &mut ServerConnection,
    rx: &mut Vec<u8>,
    events: &mut Vec<String>,
) -> Option<ServerEvent<'static>> {
    let mut tx = vec![0u8; 512];
    loop {
        let event = conn.poll_request(T0, rx);
        match event {
            ServerEvent::Request {
                consumed,
                request_id,
                ..
            } => {
                events.push(format!("{event:?}"));
                conn.respond_error(
                    request_id,
                    ErrorCode::STORAGE_ERROR,
                    format_args!("x"),
                    &mut tx,
                )
                .unwrap();
                rx.drain(..consumed);
            }
            ServerEvent::Reply {
                consumed,
                request_id,
                error,
            } => {
                events.push(format!("{event:?}"));
                conn.respond_fault(request_id, &error, &mut tx).unwrap();
                rx.drain(..consumed);
            }
            ServerEvent::NeedMore {
                at_least,
                frame_len,
            } => {
                return Some(ServerEvent::NeedMore {
                    at_least,
                    frame_len,
                });
            }
            ServerEvent::Close { reply } => {
                events.push(format!("{event:?}"));
                return Some(ServerEvent::Close { reply });
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Feeds `stream` in chunks ending at `cuts` (ascending); returns the events.
fn server_split(stream: &[u8], cuts: &[usize]) -> Vec<String> {
    let mut conn = server();
    let mut rx = Vec::new();
    let mut events = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain([&stream.len()]) {
        let to = to.clamp(from, stream.len());
        rx.extend_from_slice(&stream[from..to]);
        from = to;
        if let Some(ServerEvent::Close { .. }) = poll_server(&mut conn, &mut rx, &mut events) {
            break;
        }
    }
    events
}

/// What a broker must ask for after `have` bytes of the frame starting at `start`.
fn expected_need(stream: &[u8], start: usize, have: usize, tail: u8) -> ServerEvent<'static> {
    if have < 4 {
        return ServerEvent::NeedMore {
            at_least: 4 - have,
            frame_len: None,
        };
    }
    let length = u32::from_be_bytes(stream[start..start + 4].try_into().unwrap());
    if length > SERVER_MAX {
        assert_eq!(tail % 3, 2);
        return ServerEvent::NeedMore {
            at_least: 12 - have,
            frame_len: None,
        };
    }
    let total = 4 + length as usize;
    ServerEvent::NeedMore {
        at_least: total - have,
        frame_len: Some(total),
    }
}

fn check_server_stream(specs: &[RequestSpec], tail: u8) -> Result<(), TestCaseError> {
    let (stream, ends) = request_stream(specs, tail);
    let whole = server_split(&stream, &[]);
    // The whole stream: one event per frame up to the first Close.
    let closed_at = whole.iter().position(|e| e.starts_with("Close"));
    match closed_at {
        Some(i) if i < specs.len() => {
            prop_assert!(whole[i].contains("ChecksumMismatch"), "{}", whole[i]);
        }
        Some(i) => prop_assert_eq!((i, !tail.is_multiple_of(3)), (specs.len(), true)),
        None => prop_assert_eq!((whole.len(), tail % 3), (specs.len(), 0)),
    }
    for (i, s) in specs.iter().enumerate().take(whole.len()) {
        let want = match s.fault % 4 {
            0 => "Request",
            _ if closed_at == Some(i) => "Close",
            _ => "Reply",
        };
        prop_assert!(whole[i].starts_with(want), "frame {}: {}", i, whole[i]);
    }

    // Every prefix: the events of the frames it holds whole, then the exact NeedMore.
    for p in 0..=stream.len() {
        let mut conn = server();
        let mut rx = stream[..p].to_vec();
        let mut events = Vec::new();
        let last = poll_server(&mut conn, &mut rx, &mut events);
        let done = ends.iter().take_while(|&&e| e <= p).count();
        let start = done.checked_sub(1).map_or(0, |i| ends[i]);
        if closed_at.is_some_and(|c| c < done) {
            let c = closed_at.unwrap();
            prop_assert_eq!(&events[..], &whole[..=c], "prefix {}", p);
            continue;
        }
        let have = p - start;
        let fatal_ready = done == specs.len()
            && match tail % 3 {
                1 => have >= 4,
                2 => have >= 12,
                _ => false,
            };
        if fatal_ready {
            prop_assert_eq!(&events[..], &whole[..], "prefix {}", p);
            let closed = matches!(last, Some(ServerEvent::Close { .. }));
            prop_assert!(closed, "prefix {}: {:?}", p, last);
        } else {
            prop_assert_eq!(&events[..], &whole[..done], "prefix {}", p);
            prop_assert_eq!(
                last,
                Some(expected_need(&stream, start, have, tail)),
                "prefix {}",
                p
            );
        }
    }

    // Every split in two, and one byte at a time.
    for cut in 0..=stream.len() {
        prop_assert_eq!(&server_split(&stream, &[cut]), &whole, "split at {}", cut);
    }
    let bytewise: Vec<usize> = (1..stream.len()).collect();
    prop_assert_eq!(&server_split(&stream, &bytewise), &whole);
    Ok(())
}

fn request_specs() -> impl Strategy<Value = Vec<RequestSpec>> {
    prop::collection::vec(
        (
            any::<u8>(),
            any::<u8>(),
            prop_oneof![4 => Just(0u8), 1 => 1u8..4],
        )
            .prop_map(|(kind, n, fault)| RequestSpec { kind, n, fault }),
        0..6,
    )
}

// ---------------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------------

/// The broker's success reply to request `kind` with knob `n`, or an error reply.
fn response_frame(id: u64, kind: u8, n: u8, error: bool) -> Vec<u8> {
    let mut records = [0u8; 512];
    let mut set = MessageSetBuilder::new(&mut records);
    for i in 0..n % 4 {
        let mut m = Message::new(b"k", &[7; 30][..usize::from(n % 31)]);
        m.offset = i64::from(i);
        set.push(&m).unwrap();
    }
    let messages = set.finish();
    let infos = [
        TopicInfo {
            name: topic(),
            num_partitions: 3,
        },
        TopicInfo {
            name: Topic::new("b").unwrap(),
            num_partitions: 1,
        },
    ];
    let response = if error {
        Response::Error(ErrorResponse {
            code: ErrorCode(u16::from(n % 13)),
            message: "no such thing".into(),
        })
    } else {
        match kind % 7 {
            0 => Response::Produce(ProduceResponse {
                base_offset: 1,
                num_messages: u32::from(n),
                high_water_mark: 9,
            }),
            1 => Response::Fetch(FetchResponse {
                high_water_mark: 4,
                messages,
                trailer: n.is_multiple_of(2).then_some(FetchTrailer {
                    last_stable_offset: 4,
                    next_offset: 4,
                }),
            }),
            2 => Response::GetOffset(GetOffsetResponse {
                topic: topic(),
                partition: 3,
                start_offset: 0,
                end_offset: i64::from(n),
                high_water_mark: i64::from(n),
            }),
            3 => Response::CreateTopic(CreateTopicResponse {
                topic: topic(),
                created: n.is_multiple_of(2),
            }),
            4 => Response::DeleteTopic(DeleteTopicResponse {
                topic: topic(),
                deleted: true,
            }),
            5 => Response::ListTopics(ListTopicsResponse {
                topics: TopicList::from_slice(&infos[..usize::from(n % 3)]),
            }),
            _ => Response::HealthCheck(HealthCheckResponse {
                status: "healthy".into(),
                uptime_secs: i64::from(n),
            }),
        }
    };
    let mut buf = vec![0u8; 1024];
    let len = encode_response(id, &response, &mut buf).unwrap();
    buf.truncate(len);
    buf
}

/// Requests the client sends (kind, knob) and the broker's answers: `order` permutes them,
/// `error` makes some error replies.
#[derive(Debug, Clone)]
struct Exchange {
    requests: Vec<(u8, u8, bool)>,
    order: Vec<usize>,
    /// 0 none; 1 Length above the maximum; 2 below the minimum; 3 a frame larger than the
    /// receive buffer; 4 an intact reply whose payload doesn't fit its request (found out
    /// when it is handed out).
    tail: u8,
    rx_len: usize,
}

type Client = ClientConnection<Vec<u8>, N>;

fn client(x: &Exchange) -> Client {
    let mut config = ClientConfig::default();
    config
        .max_frame_len(CLIENT_MAX)
        .request_timeout(Duration::from_secs(60));
    let mut c = Client::new(config, vec![0; 4096], vec![0; x.rx_len]);
    for &(kind, n, _) in &x.requests {
        with_request(kind, n, |r| c.send_request(T0, r)).unwrap();
        let sent = c.poll_transmit().unwrap().len();
        c.consume_transmit(sent);
    }
    // For the misfit tail: a request whose reply will not fit its type.
    if x.tail % 5 == 4 {
        with_request(0, 0, |r| c.send_request(T0, r)).unwrap();
        let sent = c.poll_transmit().unwrap().len();
        c.consume_transmit(sent);
    }
    c
}

fn response_stream(x: &Exchange) -> (Vec<u8>, Vec<usize>) {
    let mut stream = Vec::new();
    let mut ends = Vec::new();
    for &i in &x.order {
        let (kind, n, error) = x.requests[i];
        stream.extend_from_slice(&response_frame(i as u64 + 1, kind, n, error));
        ends.push(stream.len());
    }
    match x.tail % 5 {
        1 => stream.extend_from_slice(&(CLIENT_MAX + 1).to_be_bytes()),
        2 => stream.extend_from_slice(&14u32.to_be_bytes()),
        3 => stream.extend_from_slice(&(x.rx_len as u32).to_be_bytes()),
        4 => {
            // A HealthCheck success body answering the Produce sent last.
            let id = x.requests.len() as u64 + 1;
            stream.extend_from_slice(&response_frame(id, 6, 1, false));
        }
        _ => {}
    }
    (stream, ends)
}

fn drain(c: &mut Client, events: &mut Vec<String>) {
    while let Some(ev) = c.poll_event() {
        events.push(format!("{ev:?}"));
    }
}

/// Feeds `bytes` like an adapter (draining when the receive buffer is full of replies not
/// yet handed out), then drains.
fn feed(c: &mut Client, mut bytes: &[u8], events: &mut Vec<String>) {
    while !bytes.is_empty() {
        match c.handle_input(T0, bytes) {
            Ok(0) => drain(c, events),
            Ok(n) => bytes = &bytes[n..],
            Err(_) => break,
        }
    }
    drain(c, events);
}

/// Feeds the stream in chunks ending at `cuts`; returns the events and the final error.
fn client_split(x: &Exchange, stream: &[u8], cuts: &[usize]) -> (Vec<String>, Option<ClientError>) {
    let mut c = client(x);
    let mut events = Vec::new();
    let mut from = 0;
    for &to in cuts.iter().chain([&stream.len()]) {
        let to = to.clamp(from, stream.len());
        feed(&mut c, &stream[from..to], &mut events);
        from = to;
    }
    (events, c.error())
}

fn check_client_stream(x: &Exchange) -> Result<(), TestCaseError> {
    let (stream, ends) = response_stream(x);
    let (whole, error) = client_split(x, &stream, &[]);
    // One response event per reply, in stream order, with its request's type.
    prop_assert_eq!(whole.len(), x.order.len());
    for (ev, &i) in whole.iter().zip(&x.order) {
        let (kind, _, is_error) = x.requests[i];
        let ty = with_request(kind, 0, |r| r.request_type());
        prop_assert!(
            ev.contains(&format!("request_id: {}, request_type: {ty:?}", i + 1)),
            "{}",
            ev
        );
        prop_assert_eq!(ev.contains("response: Error("), is_error, "{}", ev);
    }
    let want_error = match x.tail % 5 {
        0 => None,
        1 => Some("FrameTooLarge"),
        2 => Some("FrameTooShort"),
        3 => Some("ResponseTooLarge"),
        _ => Some("Decode(Malformed"),
    };
    prop_assert_eq!(
        error
            .map(|e| format!("{e:?}"))
            .map(|e| want_error.is_some_and(|w| e.contains(w))),
        want_error.map(|_| true),
        "{:?}",
        error
    );
    if x.tail % 5 == 4 {
        prop_assert!(matches!(
            error,
            Some(ClientError::Peer(PeerError::Decode(_)))
        ));
    }

    // Every prefix: the responses it holds whole, and an error only once its bytes are in.
    let tail_start = ends.last().copied().unwrap_or(0);
    for p in 0..=stream.len() {
        let (events, err) = client_split(x, &stream[..p], &[]);
        let done = ends.iter().take_while(|&&e| e <= p).count();
        prop_assert_eq!(&events[..], &whole[..done], "prefix {}", p);
        let tail_in = match x.tail % 5 {
            0 => false,
            4 => p == stream.len(),
            _ => p >= tail_start + 4,
        };
        prop_assert_eq!(err, if tail_in { error } else { None }, "prefix {}", p);
    }

    // Every split in two, and one byte at a time.
    for cut in 0..=stream.len() {
        prop_assert_eq!(
            &client_split(x, &stream, &[cut]),
            &(whole.clone(), error),
            "split at {}",
            cut
        );
    }
    let bytewise: Vec<usize> = (1..stream.len()).collect();
    prop_assert_eq!(
        &client_split(x, &stream, &bytewise),
        &(whole.clone(), error)
    );
    Ok(())
}

fn exchanges() -> impl Strategy<Value = Exchange> {
    (
        prop::collection::vec(
            (any::<u8>(), any::<u8>(), prop::bool::weighted(0.2)),
            0..N - 1,
        ),
        any::<u64>(),
        0u8..5,
        // Small receive buffers force compaction between frames; every reply fits.
        256usize..700,
    )
        .prop_map(|(requests, seed, tail, rx_len)| {
            let mut order: Vec<usize> = (0..requests.len()).collect();
            let mut s = seed;
            for i in (1..order.len()).rev() {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            Exchange {
                requests,
                order,
                tail,
                rx_len,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Every prefix and every split of a request stream through `ServerConnection`.
    #[test]
    fn server_every_prefix_and_split(specs in request_specs(), tail in 0u8..3) {
        check_server_stream(&specs, tail)?;
    }

    /// Every prefix and every split of a response stream through `ClientConnection`.
    #[test]
    fn client_every_prefix_and_split(x in exchanges()) {
        check_client_stream(&x)?;
    }

    /// Any chunking into many pieces gives the same events as the whole stream, both ways.
    #[test]
    fn any_chunking_both_ways(
        specs in request_specs(),
        tail in 0u8..3,
        x in exchanges(),
        cuts in prop::collection::vec(0usize..2_000, 0..40),
    ) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        let (stream, _) = request_stream(&specs, tail);
        prop_assert_eq!(server_split(&stream, &cuts), server_split(&stream, &[]));
        let (stream, _) = response_stream(&x);
        prop_assert_eq!(client_split(&x, &stream, &cuts), client_split(&x, &stream, &[]));
    }
}

/// A fixed stream of every request type, for a readable failure before the proptests.
#[test]
fn every_request_type_every_prefix_and_split() {
    let specs: Vec<RequestSpec> = (0..7)
        .map(|kind| RequestSpec {
            kind,
            n: kind * 7 + 3,
            fault: 0,
        })
        .collect();
    for tail in 0..3 {
        check_server_stream(&specs, tail).unwrap();
    }
}

/// A fixed exchange of every response type (and an error reply), in reverse order.
#[test]
fn every_response_type_every_prefix_and_split() {
    let requests: Vec<(u8, u8, bool)> = (0..8).map(|k| (k, k * 5 + 2, k == 7)).collect();
    for tail in 0..5 {
        let x = Exchange {
            order: (0..requests.len()).rev().collect(),
            requests: requests.clone(),
            tail,
            rx_len: 300,
        };
        check_client_stream(&x).unwrap();
    }
}
