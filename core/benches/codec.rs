//! Codec benchmarks: the original's BenchmarkEncode / BenchmarkDecode, plus CRC-32 throughput.
//!
//! ```text
//! cargo bench -p streambus-core --bench codec -- --warm-up-time 1 --measurement-time 3
//! cargo bench -p streambus-core --bench codec --features crc-simd -- --warm-up-time 1 --measurement-time 3
//! cargo bench -p streambus-core --bench codec --features crc-small-table -- crc/
//! ```
//!
//! Targets on the reference 2-vCPU machine: encode ≤ 40 ns and decode ≤ 60 ns for the
//! one-message Produce; CRC at 64 KiB ≥ 3.5 GB/s (default table) and ≥ 15 GB/s (`crc-simd`).
//!
//! "Decode" is what a broker does per frame: `FrameDecoder::next_frame`, `new_checked` (length
//! and CRC) and `Request::parse` / `Response::parse` (which validates every message record);
//! the `+iter` variants also walk every message and header, as a consumer would.
//! `conn_decode/*` is the same through the connections the broker and the clients run.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use streambus_core::checksum::checksum;
use streambus_core::{
    ClientConfig, ClientConnection, ClientEvent, FetchRequest, FetchResponse, FetchTrailer, Flags,
    FrameDecoder, Instant, Message, MessageSet, MessageSetBuilder, ProduceRequest, ProduceResponse,
    Request, RequestFrame, RequestType, Response, ResponseFrame, ServerConfig, ServerConnection,
    ServerEvent, Status, Topic, encode_request, encode_response, request_encoded_len,
    response_encoded_len,
};

/// A 10-character topic, as in the original benchmark.
const TOPIC: &str = "test-topic";

fn topic() -> Topic<'static> {
    Topic::new(TOPIC).expect("valid topic")
}

/// A Produce request; the topic is validated once, outside the timed loop, as a client does.
fn produce<'a>(topic: Topic<'a>, messages: MessageSet<'a>) -> Request<'a> {
    Request::Produce(ProduceRequest {
        topic,
        partition: 0,
        messages,
        producer: None,
    })
}

/// Builds `messages` into `buf` and encodes a Produce frame into `out`: the whole path from
/// message structs to frame bytes.
fn encode_produce(
    topic: Topic<'_>,
    messages: &[Message<'_>],
    set_buf: &mut [u8],
    out: &mut [u8],
) -> usize {
    let mut b = MessageSetBuilder::new(set_buf);
    for m in messages {
        b.push(m).expect("set buffer fits");
    }
    let set = b.finish();
    encode_request(1, Flags::REQUIRE_ACK, &produce(topic, set), out).expect("frame buffer fits")
}

/// Frame, validate and parse one request; returns something derived from every part.
#[inline(always)]
fn decode_request(buf: &[u8], iterate: bool) -> u64 {
    let d = FrameDecoder::requests();
    let Ok(Status::Complete(n)) = d.next_frame(buf) else {
        panic!("not a whole frame")
    };
    let frame = RequestFrame::new_checked(&buf[..n]).expect("valid frame");
    let Ok(Request::Produce(p)) = Request::parse(&frame) else {
        panic!("not a produce")
    };
    let mut acc = u64::from(p.messages.count()) + p.topic.as_str().len() as u64;
    if iterate {
        for m in p.messages.iter() {
            acc += (m.key.len() + m.value.len() + m.headers.len()) as u64;
        }
    }
    acc
}

/// Frame, validate and parse one Fetch response.
#[inline(always)]
fn decode_fetch(buf: &[u8], iterate: bool) -> u64 {
    let d = FrameDecoder::responses();
    let Ok(Status::Complete(n)) = d.next_frame(buf) else {
        panic!("not a whole frame")
    };
    let frame = ResponseFrame::new_checked(&buf[..n]).expect("valid frame");
    let Ok(Response::Fetch(f)) = Response::parse(&frame, RequestType::Fetch) else {
        panic!("not a fetch")
    };
    let mut acc = u64::from(f.messages.count());
    if iterate {
        for m in f.messages.iter() {
            acc += (m.key.len() + m.value.len() + m.headers.len()) as u64;
        }
    }
    acc
}

fn bench_produce_one(c: &mut Criterion) {
    let messages = [Message::new(b"key", b"value")];
    let mut set_buf = [0u8; 64];
    let mut out = [0u8; 128];
    let n = encode_produce(topic(), &messages, &mut set_buf, &mut out);

    let t = topic();
    let mut g = c.benchmark_group("produce_1msg");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| {
        b.iter(|| encode_produce(t, black_box(&messages), &mut set_buf, &mut out))
    });
    // The encode alone, with the message set already built.
    let mut prebuilt = [0u8; 64];
    let mut builder = MessageSetBuilder::new(&mut prebuilt);
    builder.push(&messages[0]).expect("fits");
    let set = builder.finish();
    let request = produce(topic(), set);
    let mut out2 = [0u8; 128];
    g.bench_function("encode_prebuilt_set", |b| {
        b.iter(|| encode_request(1, Flags::REQUIRE_ACK, black_box(&request), &mut out2))
    });
    let frame = out;
    g.bench_function("decode", |b| {
        b.iter(|| decode_request(black_box(&frame[..n]), false))
    });
    g.bench_function("decode+iter", |b| {
        b.iter(|| decode_request(black_box(&frame[..n]), true))
    });
    g.finish();
}

fn bench_produce_hundred(c: &mut Criterion) {
    let value = [0x5au8; 100];
    let messages: Vec<Message<'_>> = (0..100).map(|_| Message::new(b"", &value)).collect();
    let set_len: usize = messages
        .iter()
        .map(streambus_core::Encode::encoded_len)
        .sum();
    let mut set_buf = vec![0u8; set_len];
    let frame_len = {
        let mut b = MessageSetBuilder::new(&mut set_buf);
        for m in &messages {
            b.push(m).expect("fits");
        }
        request_encoded_len(&produce(topic(), b.finish()))
    };
    let mut out = vec![0u8; frame_len];
    let n = encode_produce(topic(), &messages, &mut set_buf, &mut out);
    assert_eq!(n, frame_len);

    let t = topic();
    let mut g = c.benchmark_group("produce_100x100B");
    g.throughput(Throughput::Bytes(frame_len as u64));
    g.bench_function("encode", |b| {
        b.iter(|| encode_produce(t, black_box(&messages), &mut set_buf, &mut out))
    });
    let frame = out.clone();
    g.bench_function("decode", |b| {
        b.iter(|| decode_request(black_box(&frame), false))
    });
    g.bench_function("decode+iter", |b| {
        b.iter(|| decode_request(black_box(&frame), true))
    });
    g.finish();
}

fn bench_fetch_1mib(c: &mut Criterion) {
    // 1024 records of 1 KiB each (28 B fixed + 16 B key + 980 B value): 1 MiB of records.
    let key = [b'k'; 16];
    let value = [0xa5u8; 980];
    let mut set_buf = vec![0u8; 1 << 20];
    let mut b = MessageSetBuilder::new(&mut set_buf);
    for i in 0..1024 {
        let mut m = Message::new(&key, &value);
        m.offset = i;
        m.timestamp = 1_700_000_000_000_000_000 + i;
        b.push(&m).expect("fits");
    }
    assert_eq!(b.remaining(), 0);
    let set = b.finish();
    let response = Response::Fetch(FetchResponse {
        high_water_mark: 1024,
        messages: set,
        trailer: Some(FetchTrailer {
            last_stable_offset: 1024,
            next_offset: 1024,
        }),
    });
    let len = response_encoded_len(&response);
    let mut out = vec![0u8; len];

    let mut g = c.benchmark_group("fetch_1MiB");
    g.throughput(Throughput::Bytes(len as u64));
    g.bench_function("encode", |b| {
        b.iter(|| encode_response(7, black_box(&response), &mut out))
    });
    encode_response(7, &response, &mut out).expect("fits");
    let frame = out.clone();
    g.bench_function("decode", |b| {
        b.iter(|| decode_fetch(black_box(&frame), false))
    });
    g.bench_function("decode+iter", |b| {
        b.iter(|| decode_fetch(black_box(&frame), true))
    });
    g.finish();
}

/// The reader as the connections run it: a one-message Produce through
/// `ServerConnection::poll_request` (answered, so the pipeline never fills), and a Fetch reply of
/// 100 × 100 B records through `ClientConnection` (`handle_input` + `poll_event`, the reply
/// decoded once).
fn bench_connections(c: &mut Criterion) {
    let messages = [Message::new(b"key", b"value")];
    let mut set_buf = [0u8; 64];
    let mut out = [0u8; 128];
    let n = encode_produce(topic(), &messages, &mut set_buf, &mut out);
    let request = out[..n].to_vec();

    let value = [0x5au8; 100];
    let mut records = vec![0u8; 100 * (28 + 100)];
    let mut b = MessageSetBuilder::new(&mut records);
    for i in 0..100 {
        let mut m = Message::new(b"", &value);
        m.offset = i;
        b.push(&m).expect("fits");
    }
    let reply = Response::Fetch(FetchResponse {
        high_water_mark: 100,
        messages: b.finish(),
        trailer: None,
    });
    let fetch = Request::Fetch(FetchRequest {
        topic: topic(),
        partition: 0,
        offset: 0,
        max_bytes: 1 << 20,
        extension: None,
    });
    let mut reply_frame = vec![0u8; response_encoded_len(&reply)];

    let mut g = c.benchmark_group("conn_decode");
    g.throughput(Throughput::Elements(1));
    let mut server = ServerConnection::new(ServerConfig::default(), Instant::ZERO);
    let mut tx = [0u8; 64];
    let ack = Response::Produce(ProduceResponse::default());
    g.bench_function("server_produce_1msg", |b| {
        b.iter(|| {
            let ServerEvent::Request {
                consumed,
                request_id,
                ..
            } = server.poll_request(Instant::ZERO, black_box(&request))
            else {
                panic!("not a request")
            };
            server.respond(request_id, &ack, &mut tx).expect("fits");
            consumed
        })
    });
    let mut client: ClientConnection<Vec<u8>, 1> =
        ClientConnection::new(ClientConfig::default(), vec![0; 256], vec![0; 16 * 1024]);
    g.bench_function("client_fetch_100x100B", |b| {
        // The request goes out and its reply is encoded outside the timed part (a timer read
        // costs tens of ns against microseconds here).
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let id = client
                    .send_request(Instant::ZERO, &fetch)
                    .expect("a free slot");
                client.consume_transmit(usize::MAX);
                let n = encode_response(id, &reply, &mut reply_frame).expect("fits");
                let start = std::time::Instant::now();
                client
                    .handle_input(Instant::ZERO, black_box(&reply_frame[..n]))
                    .expect("a valid reply");
                let Some(ClientEvent::Response {
                    response: Response::Fetch(f),
                    ..
                }) = client.poll_event()
                else {
                    panic!("not a fetch reply")
                };
                black_box(f.messages.count());
                timed += start.elapsed();
            }
            timed
        })
    });
    g.finish();
}

fn bench_crc(c: &mut Criterion) {
    let data: Vec<u8> = (0..64 * 1024).map(|i| (i * 31 + 7) as u8).collect();
    let mut g = c.benchmark_group("crc");
    for size in [100usize, 1024, 64 * 1024] {
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("{size}B"), |b| {
            b.iter(|| checksum(black_box(&data[..size])))
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_produce_one,
    bench_produce_hundred,
    bench_fetch_1mib,
    bench_connections,
    bench_crc
);
criterion_main!(benches);
