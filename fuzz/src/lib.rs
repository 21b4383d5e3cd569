//! Shared checks for the StreamBus fuzz targets (`fuzz_targets/*.rs`).
//!
//! Every function here asserts properties of `streambus-core` on whatever bytes it gets; a
//! failed assertion (or any panic inside the core) is a bug the fuzzer reports.
//!
//! Raw-byte targets (`decode_frame`, `decode_stream`) start their input with one config byte:
//! bits 0–6 pick the maximum frame Length (`0` = the v1 default of 10 MiB, otherwise
//! `8 × value`), bit 7 asks `decode_frame` to repair each frame's CRC so that mutated payloads
//! get past [`RequestFrame::new_checked`] and reach the payload parsers through the frame.

pub mod storage;

use arbitrary::{Arbitrary, Unstructured};
use streambus_core::broker::{peek_request_id, stamp_record};
use streambus_core::checksum::checksum;
use streambus_core::{
    AuthenticateRequest, AuthenticateResponse, ClientConfig, ClientConnection, ClientError,
    CreateTopicRequest, CreateTopicResponse, DEFAULT_MAX_FRAME_LEN, DecodeError,
    DeleteTopicRequest, DeleteTopicResponse, Encode, EncodeError, ErrorCode, ErrorResponse,
    FetchExtension, FetchRequest, FetchResponse, FetchTrailer, Flags, FrameDecoder,
    GetOffsetRequest, GetOffsetResponse, Header, Headers, HealthCheckResponse, Instant,
    ListTopicsResponse, LongPoll, MAX_TOPIC_LEN, Message, MessageSet, MessageSetBuilder,
    PROTOCOL_VERSION, ProduceRequest, ProduceResponse, ProducerInfo, REQUEST_HEADER_LEN,
    RESPONSE_HEADER_LEN, Request, RequestFrame, RequestType, Response, ResponseFrame,
    ResponseStatus, ServerConfig, ServerConnection, ServerEvent, Status, Text, Topic, TopicInfo,
    TopicList, encode_request, encode_response, request_encoded_len, response_encoded_len,
};
use streambus_core::{
    BrokerInfo, BrokerList, MetadataRequest, MetadataResponse, PartitionList, PartitionMetadata,
    ReplicaList, TopicMetadata, TopicMetadataList, TopicNames,
};

/// The CRC trailer.
const CRC_LEN: usize = 4;

/// The settings carried by a raw-byte input's first byte.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// The maximum Length field for both decoders.
    pub max_frame_len: u32,
    /// Recompute each frame's CRC before validating it.
    pub fix_crc: bool,
}

impl Config {
    /// Splits the config byte off a raw input.
    pub fn split(data: &[u8]) -> (Config, &[u8]) {
        let (byte, rest) = data.split_first().map_or((0, data), |(b, r)| (*b, r));
        let small = u32::from(byte & 0x7f);
        let config = Config {
            max_frame_len: if small == 0 {
                DEFAULT_MAX_FRAME_LEN
            } else {
                small * 8
            },
            fix_crc: byte & 0x80 != 0,
        };
        (config, rest)
    }

    /// The request and response decoders with this maximum.
    pub fn decoders(&self) -> [FrameDecoder; 2] {
        [
            FrameDecoder::requests().with_max_frame_len(self.max_frame_len),
            FrameDecoder::responses().with_max_frame_len(self.max_frame_len),
        ]
    }
}

/// One step of framing a byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A whole frame (Length field included).
    Frame(Vec<u8>),
    /// A fatal framing error; the stream ends here.
    Fatal(DecodeError),
}

/// What framing a whole stream gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// Frames and the fatal error, in order.
    pub events: Vec<Event>,
    /// The bytes of an incomplete last frame (empty after a fatal error).
    pub rest: Vec<u8>,
}

impl Trace {
    fn ended_fatally(&self) -> bool {
        matches!(self.events.last(), Some(Event::Fatal(_)))
    }
}

/// `next_frame`, with its contract asserted.
pub fn checked_next_frame(d: &FrameDecoder, buf: &[u8]) -> Result<Status<usize>, DecodeError> {
    let out = d.next_frame(buf);
    let length = buf.first_chunk::<4>().map(|b| u32::from_be_bytes(*b));
    match (&out, length) {
        (Ok(Status::Partial(k)), None) => assert_eq!(*k, 4 - buf.len()),
        (Ok(_) | Err(_), None) => panic!("{out:?} decided on {} bytes", buf.len()),
        (Ok(Status::Partial(k)), Some(length)) => {
            assert!(*k > 0);
            assert_eq!(buf.len() + k, 4 + length as usize);
            assert!((d.min_frame_len()..=d.max_frame_len()).contains(&length));
        }
        (Ok(Status::Complete(n)), Some(length)) => {
            assert_eq!(*n, 4 + length as usize);
            assert!(*n <= buf.len());
            assert!((d.min_frame_len()..=d.max_frame_len()).contains(&length));
        }
        (Err(e), Some(length)) => {
            assert!(e.is_fatal(), "{e:?} is not fatal");
            match *e {
                DecodeError::FrameTooShort { length: l, min } => {
                    assert_eq!((l, min), (length, d.min_frame_len()));
                    assert!(length < min);
                }
                DecodeError::FrameTooLarge { length: l, max } => {
                    assert_eq!((l, max), (length, d.max_frame_len()));
                    assert!(length > max);
                }
                ref other => panic!("unexpected framing error {other:?}"),
            }
            assert!(!e.to_string().is_empty());
        }
    }
    out
}

/// Frames `bytes` in one go.
pub fn frame_whole(d: &FrameDecoder, bytes: &[u8]) -> Trace {
    let mut events = Vec::new();
    let mut rest = bytes;
    loop {
        match checked_next_frame(d, rest) {
            Ok(Status::Complete(n)) => {
                let (frame, tail) = rest.split_at(n);
                events.push(Event::Frame(frame.to_vec()));
                rest = tail;
            }
            Ok(Status::Partial(_)) => {
                return Trace {
                    events,
                    rest: rest.to_vec(),
                };
            }
            Err(e) => {
                events.push(Event::Fatal(e));
                return Trace {
                    events,
                    rest: Vec::new(),
                };
            }
        }
    }
}

/// Frames `bytes` fed in chunks, the way a connection reads them: append to a buffer, take
/// every complete frame, drain what was consumed. Chunk sizes cycle through `sizes`
/// (`s + 1` bytes each; 1 byte at a time when `sizes` is empty).
pub fn frame_chunked(d: &FrameDecoder, bytes: &[u8], sizes: &[u8]) -> Trace {
    let mut events = Vec::new();
    let mut acc: Vec<u8> = Vec::new();
    let mut input = bytes;
    let mut chunk = 0usize;
    // The buffer length the last `Partial` said the frame at the front needs, at least.
    let mut need = 0usize;
    while !input.is_empty() {
        let size = sizes
            .get(chunk % sizes.len().max(1))
            .map_or(1, |s| usize::from(*s) + 1)
            .min(input.len());
        chunk += 1;
        let (head, tail) = input.split_at(size);
        acc.extend_from_slice(head);
        input = tail;
        loop {
            match checked_next_frame(d, &acc) {
                Ok(Status::Complete(n)) => {
                    assert!(n >= need, "frame of {n} bytes after a hint of {need}");
                    events.push(Event::Frame(acc[..n].to_vec()));
                    acc.drain(..n);
                    need = 0;
                }
                Ok(Status::Partial(k)) => {
                    assert!(acc.len() + k >= need, "need shrank");
                    need = acc.len() + k;
                    break;
                }
                Err(e) => {
                    events.push(Event::Fatal(e));
                    return Trace {
                        events,
                        rest: Vec::new(),
                    };
                }
            }
        }
    }
    Trace { events, rest: acc }
}

/// Asserts that chunked framing gives what whole-buffer framing gives.
pub fn check_stream(data: &[u8]) {
    let (config, data) = Config::split(data);
    // Next byte: how many chunk-size bytes follow (0–15); then the sizes; then the stream.
    let (n_sizes, data) = data
        .split_first()
        .map_or((0, data), |(b, r)| (usize::from(b & 0x0f), r));
    let (sizes, stream) = data.split_at(n_sizes.min(data.len()));
    check_server_stream(&config, stream, sizes);
    check_client_stream(&config, stream, sizes);
    for d in config.decoders() {
        let whole = frame_whole(&d, stream);
        let chunked = frame_chunked(&d, stream, sizes);
        if whole.ended_fatally() {
            assert_eq!(chunked.events, whole.events);
        } else {
            assert_eq!(chunked, whole);
        }
        // Frames are consecutive and cover the stream up to the incomplete rest.
        if !whole.ended_fatally() {
            let mut joined: Vec<u8> = Vec::new();
            for e in &whole.events {
                if let Event::Frame(f) = e {
                    joined.extend_from_slice(f);
                }
            }
            joined.extend_from_slice(&whole.rest);
            assert_eq!(joined, stream);
        }
    }
}

/// Chunk ends for `stream` from the chunk sizes of [`frame_chunked`].
fn chunk_ends(len: usize, sizes: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < len {
        let size = sizes
            .get(i % sizes.len().max(1))
            .map_or(1, |s| usize::from(*s) + 1);
        at = (at + size).min(len);
        ends.push(at);
        i += 1;
    }
    ends
}

/// Feeds `stream` to a `ServerConnection` in chunks ending at `ends`, answering every request
/// and fault at once as a broker does; returns its events (`NeedMore` only as the last).
fn serve_chunks(config: &Config, stream: &[u8], ends: &[usize]) -> Vec<String> {
    let mut sc = ServerConfig::default();
    sc.max_frame_len(config.max_frame_len).max_in_flight(1);
    let mut conn = ServerConnection::new(sc, Instant::ZERO);
    let mut rx: Vec<u8> = Vec::new();
    let mut tx = vec![0u8; 512];
    let mut events = Vec::new();
    let mut from = 0;
    for &to in ends {
        rx.extend_from_slice(&stream[from..to]);
        from = to;
        loop {
            let event = conn.poll_request(Instant::ZERO, &rx);
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
                        format_args!("-"),
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
                ServerEvent::NeedMore { .. } => break,
                ServerEvent::Close { .. } => {
                    events.push(format!("{event:?}"));
                    return events;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    let last = conn.poll_request(Instant::ZERO, &rx);
    events.push(format!("{last:?}"));
    events
}

/// The stream read by a broker: in chunks, the same events as whole.
pub fn check_server_stream(config: &Config, stream: &[u8], sizes: &[u8]) {
    let whole = serve_chunks(config, stream, &[stream.len()]);
    let chunked = serve_chunks(config, stream, &chunk_ends(stream.len(), sizes));
    assert_eq!(chunked, whole);
}

/// Requests a client has in flight when the stream's responses arrive: ids 1 to 8.
const CLIENT_IN_FLIGHT: usize = 8;

/// Feeds `stream` to a `ClientConnection` (with HealthCheck requests 1..=8 in flight) in
/// chunks ending at `ends`, the way the drivers do; returns its events and final error.
fn receive_chunks(
    config: &Config,
    stream: &[u8],
    ends: &[usize],
) -> (Vec<String>, Option<ClientError>) {
    let mut cc = ClientConfig::default();
    cc.max_frame_len(config.max_frame_len);
    let rx_len = (config.max_frame_len as usize + 4).min(4096);
    let mut conn: ClientConnection<Vec<u8>, CLIENT_IN_FLIGHT> =
        ClientConnection::new(cc, vec![0; 64], vec![0; rx_len]);
    for _ in 0..CLIENT_IN_FLIGHT {
        conn.send_request(Instant::ZERO, &Request::HealthCheck)
            .unwrap();
        conn.consume_transmit(usize::MAX);
    }
    let mut events = Vec::new();
    let drain = |conn: &mut ClientConnection<Vec<u8>, CLIENT_IN_FLIGHT>,
                 events: &mut Vec<String>| {
        while let Some(ev) = conn.poll_event() {
            events.push(format!("{ev:?}"));
        }
    };
    let mut from = 0;
    for &to in ends {
        let mut chunk = &stream[from..to];
        from = to;
        while !chunk.is_empty() {
            match conn.handle_input(Instant::ZERO, chunk) {
                Ok(0) => {
                    let before = events.len();
                    drain(&mut conn, &mut events);
                    // A full receive buffer holds a response (or one that fits no request,
                    // which poisons the connection when it is handed out).
                    assert!(events.len() > before || conn.error().is_some());
                }
                Ok(n) => chunk = &chunk[n..],
                Err(e) => {
                    assert_eq!(conn.error(), Some(e));
                    break;
                }
            }
        }
        drain(&mut conn, &mut events);
    }
    (events, conn.error())
}

/// The stream read by a client: in chunks, the same responses and the same error as whole.
pub fn check_client_stream(config: &Config, stream: &[u8], sizes: &[u8]) {
    let whole = receive_chunks(config, stream, &[stream.len()]);
    let chunked = receive_chunks(config, stream, &chunk_ends(stream.len(), sizes));
    assert_eq!(chunked, whole);
}

/// Asserts the `decode_frame` properties on one raw input.
pub fn check_frames(data: &[u8]) {
    let (config, data) = Config::split(data);
    // The raw bytes as a frame and as a payload, without any framing.
    let _ = RequestFrame::new_checked(data).map(|f| check_request_frame(&f));
    let _ = ResponseFrame::new_checked(data).map(|f| check_response_frame(&f));
    check_request_payloads(data);
    check_response_payloads(data);

    let [requests, responses] = config.decoders();
    for event in frame_whole(&requests, data).events {
        if let Event::Frame(mut frame) = event {
            if config.fix_crc {
                fix_crc(&mut frame);
            }
            match RequestFrame::new_checked(&frame[..]) {
                Ok(f) => check_request_frame(&f),
                Err(e) => check_crc_error(&frame, e, config.fix_crc),
            }
        }
    }
    for event in frame_whole(&responses, data).events {
        if let Event::Frame(mut frame) = event {
            if config.fix_crc {
                fix_crc(&mut frame);
            }
            match ResponseFrame::new_checked(&frame[..]) {
                Ok(f) => check_response_frame(&f),
                Err(e) => check_crc_error(&frame, e, config.fix_crc),
            }
        }
    }
}

/// Writes the right CRC into a whole frame.
fn fix_crc(frame: &mut [u8]) {
    let end = frame.len() - CRC_LEN;
    let crc = checksum(&frame[4..end]);
    frame[end..].copy_from_slice(&crc.to_be_bytes());
}

/// A framed (so length-consistent) frame can only fail validation on its CRC.
fn check_crc_error(frame: &[u8], e: DecodeError, fixed: bool) {
    assert!(!fixed, "frame with a fixed CRC refused: {e:?}");
    let end = frame.len() - CRC_LEN;
    match e {
        DecodeError::ChecksumMismatch {
            request_id,
            expected,
            actual,
        } => {
            assert_eq!(Some(request_id), peek_request_id(frame));
            assert_eq!(
                expected,
                u32::from_be_bytes(frame[end..].try_into().unwrap())
            );
            assert_eq!(actual, checksum(&frame[4..end]));
            assert_ne!(expected, actual);
        }
        other => panic!("framed frame refused with {other:?}"),
    }
}

/// Checks a validated request frame: header accessors, `Request::parse`, and that a parsed
/// request re-encodes to a frame that parses to the same value.
pub fn check_request_frame(frame: &RequestFrame<&[u8]>) {
    let bytes = frame.as_bytes();
    let header = frame.header();
    assert_eq!(header.request_id, frame.request_id());
    assert_eq!(Some(header.request_id), peek_request_id(bytes));
    assert_eq!(header.request_type, bytes[12]);
    assert_eq!(header.version, bytes[13]);
    assert_eq!(
        frame.payload().len(),
        bytes.len() - REQUEST_HEADER_LEN - CRC_LEN
    );
    check_request_payloads(frame.payload());

    let request = match Request::parse(frame) {
        Ok(r) => r,
        Err(e) => {
            match e {
                DecodeError::UnsupportedVersion {
                    request_id,
                    version,
                } => {
                    assert_eq!(request_id, header.request_id);
                    assert_eq!(version, header.version);
                    assert_ne!(version, PROTOCOL_VERSION);
                }
                DecodeError::UnknownRequestType {
                    request_id,
                    request_type,
                } => {
                    assert_eq!(request_id, header.request_id);
                    assert_eq!(request_type, header.request_type);
                    assert!(RequestType::from_u8(request_type).is_none());
                }
                DecodeError::Malformed { .. } | DecodeError::CorruptMessage { .. } => {}
                other => panic!("unexpected request error {other:?}"),
            }
            assert!(!e.is_fatal());
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert_eq!(header.version, PROTOCOL_VERSION);
    assert_eq!(Some(request.request_type()), frame.request_type());
    walk_request(&request);

    let len = request_encoded_len(&request);
    let mut buf = vec![0u8; len];
    assert_eq!(
        encode_request(header.request_id, header.flags, &request, &mut buf),
        Ok(len)
    );
    let again = RequestFrame::new_checked(&buf[..]).expect("re-encoded request frame");
    assert_eq!(again.header(), header);
    assert_eq!(Request::parse(&again).as_ref(), Ok(&request));
    if len == bytes.len() {
        // No ignored bytes in the original: the encoding is the only one.
        assert_eq!(&buf[..], bytes);
    }
}

/// Parses `payload` as every request type; each success must re-encode to a payload that
/// parses to the same value.
pub fn check_request_payloads(payload: &[u8]) {
    for ty in RequestType::ALL {
        let Ok(request) = Request::parse_payload(ty, payload) else {
            continue;
        };
        assert_eq!(request.request_type(), ty);
        walk_request(&request);
        let len = request.encoded_len();
        assert!(len <= payload.len());
        let mut buf = vec![0u8; len];
        assert_eq!(request.encode(&mut buf), Ok(len));
        assert_eq!(Request::parse_payload(ty, &buf).as_ref(), Ok(&request));
        if len == payload.len() {
            assert_eq!(&buf[..], payload);
        }
    }
}

/// Checks a validated response frame: header accessors, `Response::parse` for every request
/// type, and re-encoding.
pub fn check_response_frame(frame: &ResponseFrame<&[u8]>) {
    let bytes = frame.as_bytes();
    let header = frame.header();
    assert_eq!(header.request_id, frame.request_id());
    assert_eq!(header.status, bytes[12]);
    assert_eq!(
        frame.payload().len(),
        bytes.len() - RESPONSE_HEADER_LEN - CRC_LEN
    );
    check_response_payloads(frame.payload());

    for ty in RequestType::ALL {
        let response = match Response::parse(frame, ty) {
            Ok(r) => r,
            Err(e) => {
                assert!(
                    matches!(
                        e,
                        DecodeError::Malformed { .. } | DecodeError::CorruptMessage { .. }
                    ),
                    "unexpected response error {e:?}"
                );
                assert!(!e.to_string().is_empty());
                continue;
            }
        };
        match frame.status() {
            Some(ResponseStatus::Error) => {
                assert!(
                    matches!(response, Response::Error(ErrorResponse { code, .. }) if code == header.error_code)
                );
            }
            Some(_) => assert!(!matches!(response, Response::Error(_))),
            None => panic!("status {} accepted", header.status),
        }
        walk_response(&response);

        let len = response_encoded_len(&response);
        let mut buf = vec![0u8; len];
        assert_eq!(
            encode_response(header.request_id, &response, &mut buf),
            Ok(len)
        );
        let again = ResponseFrame::new_checked(&buf[..]).expect("re-encoded response frame");
        assert_eq!(again.request_id(), header.request_id);
        assert_eq!(again.status(), Some(response.status()));
        assert_eq!(Response::parse(&again, ty).as_ref(), Ok(&response));
        let canonical_header =
            header.status == 1 || (header.status == 0 && header.error_code.0 == 0);
        if len == bytes.len() && canonical_header {
            assert_eq!(&buf[..], bytes);
        }
    }
}

/// Parses `payload` as every success payload and as an error payload.
pub fn check_response_payloads(payload: &[u8]) {
    for ty in RequestType::ALL {
        if let Ok(response) = Response::parse_payload(ty, payload) {
            walk_response(&response);
            let len = response.encoded_len();
            let mut buf = vec![0u8; len];
            assert_eq!(response.encode(&mut buf), Ok(len));
            assert_eq!(Response::parse_payload(ty, &buf).as_ref(), Ok(&response));
        }
    }
    if let Ok(response) = Response::parse_error(ErrorCode(7), payload) {
        walk_response(&response);
        let mut buf = vec![0u8; response.encoded_len()];
        assert_eq!(response.encode(&mut buf), Ok(buf.len()));
        assert_eq!(
            Response::parse_error(ErrorCode(7), &buf).as_ref(),
            Ok(&response)
        );
    }
}

fn walk_topic(topic: Topic<'_>) {
    let s = topic.as_str();
    assert!((1..=MAX_TOPIC_LEN).contains(&s.len()));
    assert_eq!(Topic::new(s), Ok(topic));
}

fn walk_request(request: &Request<'_>) {
    if let Some(topic) = request.topic() {
        walk_topic(topic);
    }
    if let Request::Produce(p) = request {
        walk_messages(&p.messages);
    }
    if let Request::Metadata(m) = request {
        let mut n = 0;
        for topic in m.topics.iter() {
            walk_topic(topic);
            n += 1;
        }
        assert_eq!(n, m.topics.len());
    }
    let debug = format!("{request:?}");
    if let Request::Authenticate(a) = request {
        check_credential_hidden(a, &debug);
    }
}

/// The `Debug` text of an Authenticate request names the credential's length, never its bytes.
fn check_credential_hidden(a: &AuthenticateRequest<'_>, debug: &str) {
    assert!(debug.contains(&format!("credential_len: {}", a.credential.len())));
    // The text does not depend on the credential's bytes at all: the same request with
    // other bytes of the same length prints the same. (Looking for the credential in the text
    // misfires when its bytes happen to occur there, e.g. dots that stand for a mechanism's
    // unprintable bytes.)
    let other: Vec<u8> = a.credential.iter().map(|b| b ^ 0x55).collect();
    let twin = Request::Authenticate(AuthenticateRequest {
        mechanism: a.mechanism,
        credential: &other,
    });
    assert_eq!(format!("{twin:?}"), debug, "the credential shows in Debug");
}

/// The `decode_authenticate` target: any payload parsed as an Authenticate request is either
/// `InvalidRequest` (malformed, naming the field and never the credential) or a request that
/// re-encodes to the bytes it was read from (bytes after the credential are ignored) and never
/// shows its credential in `Debug`; the same payload as an Authenticate reply re-encodes too.
pub fn check_authenticate(payload: &[u8]) {
    match Request::parse_payload(RequestType::Authenticate, payload) {
        Ok(Request::Authenticate(a)) => {
            let request = Request::Authenticate(a);
            let len = request.encoded_len();
            assert_eq!(len, 8 + a.mechanism.as_bytes().len() + a.credential.len());
            assert!(len <= payload.len());
            let mut buf = vec![0u8; len];
            assert_eq!(request.encode(&mut buf), Ok(len));
            assert_eq!(&buf[..], &payload[..len]);
            check_credential_hidden(&a, &format!("{request:?}"));
            let mut frame = vec![0u8; request_encoded_len(&request)];
            assert_eq!(
                encode_request(9, Flags::NONE, &request, &mut frame),
                Ok(frame.len())
            );
            let checked = RequestFrame::new_checked(&frame[..]).expect("an encoded frame");
            assert_eq!(Request::parse(&checked), Ok(request));
        }
        Ok(other) => panic!("an Authenticate payload parsed as {other:?}"),
        Err(e) => {
            assert!(matches!(e, DecodeError::Malformed { .. }), "{e:?}");
            assert_eq!(e.error_code(), ErrorCode::INVALID_REQUEST);
            assert!(!e.is_fatal());
        }
    }
    if let Ok(response) = Response::parse_payload(RequestType::Authenticate, payload) {
        let Response::Authenticate(r) = response else {
            panic!("an Authenticate reply parsed as {response:?}");
        };
        let mut buf = vec![0u8; response.encoded_len()];
        assert_eq!(response.encode(&mut buf), Ok(buf.len()));
        assert_eq!(buf.len(), 4 + r.principal.as_bytes().len());
        assert_eq!(&buf[..], &payload[..buf.len()]);
    }
}

fn walk_response(response: &Response<'_>) {
    match response {
        Response::Fetch(f) => walk_messages(&f.messages),
        Response::GetOffset(g) => walk_topic(g.topic),
        Response::CreateTopic(c) => walk_topic(c.topic),
        Response::DeleteTopic(d) => walk_topic(d.topic),
        Response::ListTopics(l) => {
            let mut n = 0;
            for t in l.topics.iter() {
                walk_topic(t.name);
                n += 1;
            }
            assert_eq!(n, l.topics.len());
        }
        Response::HealthCheck(h) => {
            let _ = h.status.to_string();
        }
        Response::Metadata(m) => walk_metadata(m),
        Response::Error(e) => {
            let _ = e.message.to_string();
            let _ = e.message.as_str();
        }
        _ => {}
    }
    let _ = format!("{response:?}");
}

/// Iterates every level of a decoded Metadata reply and checks each list yields its count.
fn walk_metadata(m: &MetadataResponse<'_>) {
    assert_eq!(m.brokers.iter().count(), m.brokers.len());
    for b in m.brokers.iter() {
        let _ = b.host.to_string();
    }
    assert_eq!(m.topics.iter().len(), m.topics.len());
    let mut topics = 0;
    for t in m.topics.iter() {
        topics += 1;
        walk_topic(t.name);
        let mut partitions = 0;
        for p in t.partitions.iter() {
            partitions += 1;
            assert_eq!(p.replicas.iter().count(), p.replicas.len());
        }
        assert_eq!(partitions, t.partitions.len());
    }
    assert_eq!(topics, m.topics.len());
}

/// Iterates a decoded message set: every message and header, every record, and checks that
/// each message re-encodes to exactly its record.
pub fn walk_messages(set: &MessageSet<'_>) {
    assert_eq!(
        MessageSet::new_checked(set.count(), set.as_bytes()),
        Ok(*set)
    );
    let mut n = 0u32;
    let mut total = 0usize;
    for (message, record) in set.iter().zip(set.records()) {
        n += 1;
        total += record.len();
        let headers: Vec<Header<'_>> = message.headers.iter().collect();
        assert_eq!(headers.len(), message.headers.len());
        assert_eq!(message.encoded_len(), record.len());
        let mut buf = vec![0u8; record.len()];
        assert_eq!(message.encode(&mut buf), Ok(record.len()));
        assert_eq!(&buf[..], record);

        let mut stamped = record.to_vec();
        let old = stamp_record(&mut stamped, 42, 7);
        assert_eq!(old, Some(message.timestamp));
        let one = MessageSet::new_checked(1, &stamped).expect("stamped record");
        let m = one.iter().next().expect("one message");
        assert_eq!(m.offset, 42);
        assert_eq!(
            m.timestamp,
            if message.timestamp == 0 {
                7
            } else {
                message.timestamp
            }
        );
        assert_eq!((m.key, m.value), (message.key, message.value));
        assert_eq!(m.headers, message.headers);
    }
    assert_eq!(n, set.count());
    assert_eq!(set.records().count(), set.count() as usize);
    assert_eq!(total, set.as_bytes().len());
}

// ---------------------------------------------------------------------------------------------
// roundtrip: owned, arbitrary values borrowed into the core's types.

/// A valid topic name.
#[derive(Debug, Clone)]
pub struct TopicName(pub String);

impl<'a> Arbitrary<'a> for TopicName {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-";
        let len = u.int_in_range(1..=MAX_TOPIC_LEN)?;
        let mut name = String::with_capacity(len);
        for _ in 0..len {
            name.push(char::from(*u.choose(CHARS)?));
        }
        if name == "." || name == ".." {
            name = "_".into();
        }
        Ok(Self(name))
    }
}

impl TopicName {
    fn topic(&self) -> Topic<'_> {
        Topic::new(&self.0).expect("generated topic names are valid")
    }
}

/// A message to encode.
#[derive(Debug, Clone, Arbitrary)]
pub struct OwnedMessage {
    offset: i64,
    timestamp: i64,
    key: Vec<u8>,
    value: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A request to encode.
#[derive(Debug, Clone, Arbitrary)]
pub enum OwnedRequest {
    Produce {
        topic: TopicName,
        partition: u32,
        messages: Vec<OwnedMessage>,
        producer: Option<(i64, i16, Option<i32>)>,
    },
    Fetch {
        topic: TopicName,
        partition: u32,
        offset: i64,
        max_bytes: u32,
        extension: Option<(i8, Option<(u32, u32)>)>,
    },
    GetOffset {
        topic: TopicName,
        partition: u32,
    },
    CreateTopic {
        topic: TopicName,
        num_partitions: u32,
        replication_factor: u16,
    },
    DeleteTopic {
        topic: TopicName,
    },
    ListTopics,
    HealthCheck,
    Metadata(Vec<TopicName>),
    Authenticate {
        mechanism: Vec<u8>,
        credential: Vec<u8>,
    },
}

/// A response to encode.
#[derive(Debug, Clone, Arbitrary)]
pub enum OwnedResponse {
    Produce {
        base_offset: i64,
        num_messages: u32,
        high_water_mark: i64,
    },
    Fetch {
        high_water_mark: i64,
        messages: Vec<OwnedMessage>,
        trailer: Option<(i64, i64)>,
    },
    GetOffset {
        topic: TopicName,
        partition: u32,
        start_offset: i64,
        end_offset: i64,
        high_water_mark: i64,
    },
    CreateTopic {
        topic: TopicName,
        created: bool,
    },
    DeleteTopic {
        topic: TopicName,
        deleted: bool,
    },
    ListTopics(Vec<(TopicName, u32)>),
    HealthCheck {
        status: Vec<u8>,
        uptime_secs: i64,
    },
    Authenticate {
        principal: Vec<u8>,
    },
    Error {
        /// Picks the request type the error answers.
        answers: u8,
        code: u16,
        message: Vec<u8>,
    },
    Metadata(OwnedMetadata),
}

/// A Metadata topic to encode: name, error code, partitions (id, leader, epoch, replicas).
type MetadataTopic = (TopicName, u16, Vec<(u32, i32, i32, Vec<u32>)>);

/// A Metadata reply to encode: brokers (node, host, port), then topics with their partitions
/// (id, leader, epoch, replicas).
#[derive(Debug, Clone, Arbitrary)]
pub struct OwnedMetadata {
    brokers: Vec<(u32, Vec<u8>, u16)>,
    topics: Vec<MetadataTopic>,
}

/// The `roundtrip` target's input.
#[derive(Debug, Clone, Arbitrary)]
pub struct RoundtripInput {
    request_id: u64,
    flags: u16,
    /// Picks the size of a too-small buffer.
    cut: u32,
    item: Item,
}

/// A request or a response.
#[derive(Debug, Clone, Arbitrary)]
pub enum Item {
    Request(OwnedRequest),
    Response(OwnedResponse),
}

/// Builds the messages into a set with [`MessageSetBuilder`] (checking its too-small
/// behaviour on the way) and hands the set to `f`.
fn with_message_set<R>(
    messages: &[OwnedMessage],
    cut: u32,
    f: impl FnOnce(MessageSet<'_>) -> R,
) -> R {
    let headers: Vec<Vec<Header<'_>>> = messages
        .iter()
        .map(|m| {
            m.headers
                .iter()
                .map(|(key, value)| Header { key, value })
                .collect()
        })
        .collect();
    let borrowed: Vec<Message<'_>> = messages
        .iter()
        .zip(&headers)
        .map(|(m, h)| Message {
            offset: m.offset,
            timestamp: m.timestamp,
            key: &m.key,
            value: &m.value,
            headers: Headers::from_slice(h),
        })
        .collect();
    let total: usize = borrowed.iter().map(|m| m.encoded_len()).sum();

    // Too small: pushes succeed until one doesn't fit; that one writes nothing.
    if total > 0 {
        let small = cut as usize % total;
        let mut buf = vec![0xA5u8; small];
        let mut b = MessageSetBuilder::new(&mut buf);
        let mut written = 0usize;
        for m in &borrowed {
            let need = m.encoded_len();
            match b.push(m) {
                Ok(()) => written += need,
                Err(e) => {
                    assert_eq!(
                        e,
                        EncodeError::BufferTooSmall {
                            required: written + need
                        }
                    );
                    assert_eq!(b.len(), written);
                    break;
                }
            }
        }
        assert!(written < total);
        let len = b.len();
        assert!(buf[len..].iter().all(|&x| x == 0xA5), "a failed push wrote");
    }

    let mut buf = vec![0u8; total];
    let mut b = MessageSetBuilder::new(&mut buf);
    for m in &borrowed {
        b.push(m).expect("exact-size buffer");
    }
    assert_eq!(b.remaining(), 0);
    assert_eq!(b.count() as usize, borrowed.len());
    let set = b.finish();
    assert_eq!(set.encoded_len(), total);

    // The set's messages are the ones pushed.
    let decoded: Vec<Message<'_>> = set.iter().collect();
    assert_eq!(decoded, borrowed);
    f(set)
}

/// `encode` into a buffer one byte too small (or smaller) returns the size and writes nothing.
fn check_too_small(
    cut: u32,
    len: usize,
    encode: impl FnOnce(&mut [u8]) -> Result<usize, EncodeError>,
) {
    if len == 0 {
        return;
    }
    let small = cut as usize % len;
    let mut buf = vec![0xA5u8; small];
    assert_eq!(
        encode(&mut buf),
        Err(EncodeError::BufferTooSmall { required: len })
    );
    assert!(buf.iter().all(|&x| x == 0xA5), "a failed encode wrote");
}

/// Asserts `decode(encode(x)) == x` for one arbitrary request or response.
pub fn check_roundtrip(input: &RoundtripInput) {
    match &input.item {
        Item::Request(OwnedRequest::Metadata(names)) => {
            let names: Vec<Topic<'_>> = names.iter().map(TopicName::topic).collect();
            let request = Request::Metadata(MetadataRequest {
                topics: TopicNames::from_slice(&names),
            });
            roundtrip_request(input, &request);
        }
        Item::Response(OwnedResponse::Metadata(m)) => check_metadata_roundtrip(input, m),
        Item::Request(r) => {
            let messages: &[OwnedMessage] = match r {
                OwnedRequest::Produce { messages, .. } => messages,
                _ => &[],
            };
            with_message_set(messages, input.cut, |set| {
                let request = borrow_request(r, set);
                roundtrip_request(input, &request);
            });
        }
        Item::Response(r) => {
            let messages: &[OwnedMessage] = match r {
                OwnedResponse::Fetch { messages, .. } => messages,
                _ => &[],
            };
            with_message_set(messages, input.cut, |set| {
                let topics: Vec<TopicInfo<'_>> = match r {
                    OwnedResponse::ListTopics(t) => t
                        .iter()
                        .map(|(name, n)| TopicInfo {
                            name: name.topic(),
                            num_partitions: *n,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                let (response, ty) = borrow_response(r, set, &topics);
                roundtrip_response(input, &response, ty);
            });
        }
    }
}

fn borrow_request<'a>(r: &'a OwnedRequest, messages: MessageSet<'a>) -> Request<'a> {
    match r {
        OwnedRequest::Produce {
            topic,
            partition,
            producer,
            ..
        } => Request::Produce(ProduceRequest {
            topic: topic.topic(),
            partition: *partition,
            messages,
            producer: producer.map(
                |(producer_id, producer_epoch, base_sequence)| ProducerInfo {
                    producer_id,
                    producer_epoch,
                    base_sequence,
                },
            ),
        }),
        OwnedRequest::Fetch {
            topic,
            partition,
            offset,
            max_bytes,
            extension,
        } => Request::Fetch(FetchRequest {
            topic: topic.topic(),
            partition: *partition,
            offset: *offset,
            max_bytes: *max_bytes,
            extension: extension.map(|(isolation_level, lp)| FetchExtension {
                isolation_level,
                long_poll: lp.map(|(max_wait_ms, min_bytes)| LongPoll {
                    max_wait_ms,
                    min_bytes,
                }),
            }),
        }),
        OwnedRequest::GetOffset { topic, partition } => Request::GetOffset(GetOffsetRequest {
            topic: topic.topic(),
            partition: *partition,
        }),
        OwnedRequest::CreateTopic {
            topic,
            num_partitions,
            replication_factor,
        } => Request::CreateTopic(CreateTopicRequest {
            topic: topic.topic(),
            num_partitions: *num_partitions,
            replication_factor: *replication_factor,
        }),
        OwnedRequest::DeleteTopic { topic } => Request::DeleteTopic(DeleteTopicRequest {
            topic: topic.topic(),
        }),
        OwnedRequest::ListTopics => Request::ListTopics,
        OwnedRequest::HealthCheck => Request::HealthCheck,
        OwnedRequest::Metadata(_) => unreachable!("borrowed in check_roundtrip"),
        OwnedRequest::Authenticate {
            mechanism,
            credential,
        } => Request::Authenticate(AuthenticateRequest {
            mechanism: Text(mechanism),
            credential,
        }),
    }
}

/// Borrows an arbitrary Metadata reply into the core's slices and round-trips it.
fn check_metadata_roundtrip(input: &RoundtripInput, m: &OwnedMetadata) {
    let brokers: Vec<BrokerInfo<'_>> = m
        .brokers
        .iter()
        .map(|(node_id, host, port)| BrokerInfo {
            node_id: *node_id,
            host: Text(host),
            port: *port,
        })
        .collect();
    let partitions: Vec<Vec<PartitionMetadata<'_>>> = m
        .topics
        .iter()
        .map(|(_, _, ps)| {
            ps.iter()
                .map(
                    |(partition, leader, leader_epoch, replicas)| PartitionMetadata {
                        partition: *partition,
                        leader: *leader,
                        leader_epoch: *leader_epoch,
                        replicas: ReplicaList::from_slice(replicas),
                    },
                )
                .collect()
        })
        .collect();
    let topics: Vec<TopicMetadata<'_>> = m
        .topics
        .iter()
        .zip(&partitions)
        .map(|((name, code, _), ps)| TopicMetadata {
            name: name.topic(),
            error_code: ErrorCode(*code),
            partitions: PartitionList::from_slice(ps),
        })
        .collect();
    let response = Response::Metadata(MetadataResponse {
        brokers: BrokerList::from_slice(&brokers),
        topics: TopicMetadataList::from_slice(&topics),
    });
    roundtrip_response(input, &response, RequestType::Metadata);
}

fn borrow_response<'a>(
    r: &'a OwnedResponse,
    messages: MessageSet<'a>,
    topics: &'a [TopicInfo<'a>],
) -> (Response<'a>, RequestType) {
    match r {
        OwnedResponse::Produce {
            base_offset,
            num_messages,
            high_water_mark,
        } => (
            Response::Produce(ProduceResponse {
                base_offset: *base_offset,
                num_messages: *num_messages,
                high_water_mark: *high_water_mark,
            }),
            RequestType::Produce,
        ),
        OwnedResponse::Fetch {
            high_water_mark,
            trailer,
            ..
        } => (
            Response::Fetch(FetchResponse {
                high_water_mark: *high_water_mark,
                messages,
                trailer: trailer.map(|(last_stable_offset, next_offset)| FetchTrailer {
                    last_stable_offset,
                    next_offset,
                }),
            }),
            RequestType::Fetch,
        ),
        OwnedResponse::GetOffset {
            topic,
            partition,
            start_offset,
            end_offset,
            high_water_mark,
        } => (
            Response::GetOffset(GetOffsetResponse {
                topic: topic.topic(),
                partition: *partition,
                start_offset: *start_offset,
                end_offset: *end_offset,
                high_water_mark: *high_water_mark,
            }),
            RequestType::GetOffset,
        ),
        OwnedResponse::CreateTopic { topic, created } => (
            Response::CreateTopic(CreateTopicResponse {
                topic: topic.topic(),
                created: *created,
            }),
            RequestType::CreateTopic,
        ),
        OwnedResponse::DeleteTopic { topic, deleted } => (
            Response::DeleteTopic(DeleteTopicResponse {
                topic: topic.topic(),
                deleted: *deleted,
            }),
            RequestType::DeleteTopic,
        ),
        OwnedResponse::ListTopics(_) => (
            Response::ListTopics(ListTopicsResponse {
                topics: TopicList::from_slice(topics),
            }),
            RequestType::ListTopics,
        ),
        OwnedResponse::HealthCheck {
            status,
            uptime_secs,
        } => (
            Response::HealthCheck(HealthCheckResponse {
                status: Text(status),
                uptime_secs: *uptime_secs,
            }),
            RequestType::HealthCheck,
        ),
        OwnedResponse::Authenticate { principal } => (
            Response::Authenticate(AuthenticateResponse {
                principal: Text(principal),
            }),
            RequestType::Authenticate,
        ),
        OwnedResponse::Error {
            answers,
            code,
            message,
        } => (
            Response::Error(ErrorResponse {
                code: ErrorCode(*code),
                message: Text(message),
            }),
            RequestType::ALL[usize::from(*answers) % RequestType::ALL.len()],
        ),
        OwnedResponse::Metadata(_) => unreachable!("borrowed in check_roundtrip"),
    }
}

fn roundtrip_request(input: &RoundtripInput, request: &Request<'_>) {
    let flags = Flags(input.flags);
    let payload_len = request.encoded_len();
    let len = request_encoded_len(request);
    assert_eq!(len, REQUEST_HEADER_LEN + payload_len + CRC_LEN);

    check_too_small(input.cut, len, |b| {
        encode_request(input.request_id, flags, request, b)
    });
    check_too_small(input.cut, payload_len, |b| request.encode(b));

    // Payload alone.
    let mut payload = vec![0u8; payload_len];
    assert_eq!(request.encode(&mut payload), Ok(payload_len));
    assert_eq!(
        Request::parse_payload(request.request_type(), &payload).as_ref(),
        Ok(request)
    );

    // Whole frame, found by the decoder.
    let mut buf = vec![0u8; len + 1];
    assert_eq!(
        encode_request(input.request_id, flags, request, &mut buf),
        Ok(len)
    );
    let frame_bytes = &buf[..len];
    assert_eq!(
        &frame_bytes[REQUEST_HEADER_LEN..len - CRC_LEN],
        &payload[..]
    );
    let d = FrameDecoder::requests();
    assert_eq!(d.next_frame(&buf), Ok(Status::Complete(len)));
    let prefix = input.cut as usize % len;
    assert_eq!(
        d.next_frame(&buf[..prefix]),
        Ok(Status::Partial(if prefix < 4 {
            4 - prefix
        } else {
            len - prefix
        }))
    );
    let frame = RequestFrame::new_checked(frame_bytes).expect("encoded request frame");
    assert_eq!(frame.request_id(), input.request_id);
    assert_eq!(frame.flags(), flags);
    assert_eq!(frame.version(), PROTOCOL_VERSION);
    assert_eq!(frame.request_type(), Some(request.request_type()));
    let decoded = Request::parse(&frame).expect("encoded request parses");
    assert_eq!(&decoded, request);
    if let (Request::Produce(a), Request::Produce(b)) = (&decoded, request) {
        assert!(a.messages.iter().eq(b.messages.iter()));
        walk_messages(&a.messages);
    }
}

fn roundtrip_response(input: &RoundtripInput, response: &Response<'_>, ty: RequestType) {
    let payload_len = response.encoded_len();
    let len = response_encoded_len(response);
    assert_eq!(len, RESPONSE_HEADER_LEN + payload_len + CRC_LEN);

    check_too_small(input.cut, len, |b| {
        encode_response(input.request_id, response, b)
    });
    check_too_small(input.cut, payload_len, |b| response.encode(b));

    let mut buf = vec![0u8; len + 1];
    assert_eq!(
        encode_response(input.request_id, response, &mut buf),
        Ok(len)
    );
    let d = FrameDecoder::responses();
    assert_eq!(d.next_frame(&buf), Ok(Status::Complete(len)));
    let frame = ResponseFrame::new_checked(&buf[..len]).expect("encoded response frame");
    assert_eq!(frame.request_id(), input.request_id);
    assert_eq!(frame.status(), Some(response.status()));
    match response {
        Response::Error(e) => assert_eq!(frame.error_code(), e.code),
        _ => assert_eq!(frame.error_code(), ErrorCode::NONE),
    }
    let decoded = Response::parse(&frame, ty).expect("encoded response parses");
    assert_eq!(&decoded, response);
    if let (Response::Fetch(a), Response::Fetch(b)) = (&decoded, response) {
        assert!(a.messages.iter().eq(b.messages.iter()));
        walk_messages(&a.messages);
    }
    if let (Response::ListTopics(a), Response::ListTopics(b)) = (&decoded, response) {
        assert!(a.topics.iter().eq(b.topics.iter()));
    }
    if let Response::Metadata(m) = &decoded {
        walk_metadata(m);
    }
}
