//! The server connection's fault rules and timers, driven with raw bytes and a virtual clock.

use core::time::Duration;

use streambus_core::{
    DecodeError, ErrorCode, Flags, Instant, ProduceRequest, Request, Response, ResponseFrame,
    ServerConfig, ServerConnection, ServerEvent, Topic, encode_request,
};

const T0: Instant = Instant::from_millis(1_000);

fn ms(n: u64) -> Instant {
    Instant::from_millis(1_000 + n)
}

fn frame(id: u64, flags: Flags, req: &Request<'_>) -> Vec<u8> {
    let mut buf = vec![0; 256];
    let n = encode_request(id, flags, req, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

fn health(id: u64) -> Vec<u8> {
    frame(id, Flags::NONE, &Request::HealthCheck)
}

fn conn() -> ServerConnection {
    ServerConnection::new(ServerConfig::default(), T0)
}

/// Decodes an error reply: (request id, code, message).
fn error_reply(bytes: &[u8]) -> (u64, ErrorCode, String) {
    let f = ResponseFrame::new_checked(bytes).unwrap();
    let Response::Error(e) = Response::parse_error(f.error_code(), f.payload()).unwrap() else {
        unreachable!()
    };
    (f.request_id(), e.code, e.message.to_string())
}

/// Answers a fault event and returns the decoded reply.
fn answer_fault(c: &mut ServerConnection, id: u64, e: &DecodeError) -> (u64, ErrorCode, String) {
    let mut tx = [0u8; 512];
    let n = c.respond_fault(id, e, &mut tx).unwrap();
    error_reply(&tx[..n])
}

#[test]
fn request_then_need_more() {
    let mut c = conn();
    let mut rx = health(9);
    rx.extend_from_slice(&health(10)[..5]);
    match c.poll_request(T0, &rx) {
        ServerEvent::Request {
            consumed,
            request_id,
            request,
            ..
        } => {
            assert_eq!(
                (consumed, request_id, request),
                (20, 9, Request::HealthCheck)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.in_flight(), 1);
    assert_eq!(
        c.poll_request(T0, &rx[20..]),
        ServerEvent::NeedMore {
            at_least: 15,
            frame_len: Some(20)
        }
    );
    // The Length was judged once: more body bytes only shrink what is missing.
    assert_eq!(
        c.poll_request(T0, &health(10)[..19]),
        ServerEvent::NeedMore {
            at_least: 1,
            frame_len: Some(20)
        }
    );
    assert!(matches!(
        c.poll_request(T0, &health(10)),
        ServerEvent::Request {
            request_id: 10,
            consumed: 20,
            ..
        }
    ));
    assert_eq!(
        c.poll_request(T0, &[]),
        ServerEvent::NeedMore {
            at_least: 4,
            frame_len: None
        }
    );
}

#[test]
fn crc_fault_is_answered_and_third_in_a_row_closes() {
    let mut c = conn();
    let mut bad = health(5);
    *bad.last_mut().unwrap() ^= 1;
    for round in 1..=2 {
        let ServerEvent::Reply {
            consumed,
            request_id,
            error,
        } = c.poll_request(T0, &bad)
        else {
            panic!("round {round}")
        };
        assert_eq!((consumed, request_id), (20, 5));
        let (id, code, msg) = answer_fault(&mut c, request_id, &error);
        assert_eq!((id, code), (5, ErrorCode::CHECKSUM_MISMATCH));
        assert!(msg.contains("CRC mismatch"), "{msg}");
    }
    assert_eq!(c.in_flight(), 0);
    match c.poll_request(T0, &bad) {
        ServerEvent::Close {
            reply: Some((5, e @ DecodeError::ChecksumMismatch { .. })),
        } => assert_eq!(answer_fault(&mut c, 5, &e).1, ErrorCode::CHECKSUM_MISMATCH),
        other => panic!("{other:?}"),
    }
    assert!(c.is_closed());
    assert_eq!(
        c.poll_request(T0, &health(1)),
        ServerEvent::Close { reply: None }
    );
}

#[test]
fn a_good_frame_resets_the_crc_fault_run() {
    let mut c = conn();
    let mut bad = health(5);
    bad[19] ^= 0x80;
    for _ in 0..5 {
        for _ in 0..2 {
            let ServerEvent::Reply {
                request_id, error, ..
            } = c.poll_request(T0, &bad)
            else {
                panic!()
            };
            answer_fault(&mut c, request_id, &error);
        }
        // An unknown type in an intact frame also counts as a good frame.
        let mut unknown = health(6);
        unknown[12] = 0x7f;
        let fixed = streambus_core::checksum::checksum(&unknown[4..16]);
        unknown[16..].copy_from_slice(&fixed.to_be_bytes());
        let ServerEvent::Reply { error, .. } = c.poll_request(T0, &unknown) else {
            panic!()
        };
        assert_eq!(
            answer_fault(&mut c, 6, &error).1,
            ErrorCode::UNKNOWN_REQUEST
        );
    }
    assert!(!c.is_closed());
}

fn with_header(id: u64, ty: u8, version: u8, flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&(16 + payload.len() as u32).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&[ty, version]);
    f.extend_from_slice(&flags.to_be_bytes());
    f.extend_from_slice(payload);
    let crc = streambus_core::checksum::checksum(&f[4..]);
    f.extend_from_slice(&crc.to_be_bytes());
    f
}

/// Topic "t", partition 0, one 28-byte record whose key length runs past the end.
fn produce_with_bad_record() -> Vec<u8> {
    let mut p = vec![0, 0, 0, 1, b't', 0, 0, 0, 0, 0, 0, 0, 1];
    p.extend_from_slice(&[0; 16]);
    p.extend_from_slice(&100u32.to_be_bytes());
    p.extend_from_slice(&[0; 8]);
    p
}

#[test]
fn intact_but_bad_frames_get_their_codes_and_the_connection_stays_open() {
    let cases: [(Vec<u8>, ErrorCode); 7] = [
        (with_header(1, 0x09, 1, 0, &[]), ErrorCode::UNKNOWN_REQUEST),
        (with_header(2, 0x07, 2, 0, &[]), ErrorCode::INVALID_PROTOCOL),
        // GetOffset with a truncated payload.
        (
            with_header(3, 0x03, 1, 0, &[0, 0, 0, 1, b't', 0]),
            ErrorCode::INVALID_REQUEST,
        ),
        // A bad topic name.
        (
            with_header(4, 0x05, 1, 0, &[0, 0, 0, 1, b'/']),
            ErrorCode::INVALID_REQUEST,
        ),
        // A Produce whose message record is cut short.
        (
            with_header(5, 0x01, 1, 0, &produce_with_bad_record()),
            ErrorCode::CORRUPT_MESSAGE,
        ),
        // Metadata for a valid topic and `..`: the whole request is refused (§6.4).
        (
            with_header(
                6,
                0x11,
                1,
                0,
                &[0, 0, 0, 2, 0, 0, 0, 1, b'a', 0, 0, 0, 2, b'.', b'.'],
            ),
            ErrorCode::INVALID_REQUEST,
        ),
        // Metadata claiming more topics than its bytes hold.
        (
            with_header(7, 0x11, 1, 0, &[0, 0, 0, 9, 0, 0, 0, 1, b'a']),
            ErrorCode::INVALID_REQUEST,
        ),
    ];
    let mut c = conn();
    for (bytes, code) in &cases {
        let ServerEvent::Reply {
            consumed,
            request_id,
            error,
        } = c.poll_request(T0, bytes)
        else {
            panic!("{code:?}")
        };
        assert_eq!(consumed, bytes.len());
        let (id, got, msg) = answer_fault(&mut c, request_id, &error);
        assert_eq!((id, got), (request_id, *code), "{msg}");
        assert!(!msg.is_empty());
    }
    assert!(!c.is_closed());
    assert!(matches!(
        c.poll_request(T0, &health(9)),
        ServerEvent::Request { .. }
    ));
}

#[test]
fn compressed_produce_is_invalid_request() {
    let req = Request::Produce(ProduceRequest {
        topic: Topic::new("t").unwrap(),
        partition: 0,
        messages: streambus_core::MessageSet::EMPTY,
        producer: None,
    });
    let mut c = conn();
    let f = frame(3, Flags::COMPRESSED, &req);
    let ServerEvent::Reply { error, .. } = c.poll_request(T0, &f) else {
        panic!()
    };
    let (_, code, msg) = answer_fault(&mut c, 3, &error);
    assert_eq!(code, ErrorCode::INVALID_REQUEST);
    assert!(msg.contains("compressed"), "{msg}");
    // Compressed on another type is ignored.
    let f = frame(4, Flags::COMPRESSED, &Request::HealthCheck);
    assert!(matches!(
        c.poll_request(T0, &f),
        ServerEvent::Request { request_id: 4, .. }
    ));
}

#[test]
fn length_below_16_closes_with_id_zero() {
    let mut c = conn();
    let rx = [0, 0, 0, 15, 1, 2, 3];
    match c.poll_request(T0, &rx) {
        ServerEvent::Close {
            reply: Some((0, e)),
        } => assert_eq!(answer_fault(&mut c, 0, &e).1, ErrorCode::INVALID_PROTOCOL),
        other => panic!("{other:?}"),
    }
    assert!(c.is_closed());
}

#[test]
fn length_over_max_waits_for_the_id_then_closes() {
    let mut cfg = ServerConfig::default();
    cfg.max_frame_len(100);
    let mut c = ServerConnection::new(cfg, T0);
    let mut rx = 101u32.to_be_bytes().to_vec();
    rx.extend_from_slice(&77u64.to_be_bytes());
    for cut in 4..12 {
        assert_eq!(
            c.poll_request(T0, &rx[..cut]),
            ServerEvent::NeedMore {
                at_least: 12 - cut,
                frame_len: None
            }
        );
    }
    match c.poll_request(T0, &rx) {
        ServerEvent::Close {
            reply: Some((77, e)),
        } => {
            let (id, code, msg) = answer_fault(&mut c, 77, &e);
            assert_eq!((id, code), (77, ErrorCode::MESSAGE_TOO_LARGE));
            assert!(msg.contains("101"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn length_over_max_then_silence_closes_at_read_timeout() {
    let mut c = conn();
    let rx = u32::MAX.to_be_bytes();
    assert!(matches!(
        c.poll_request(T0, &rx),
        ServerEvent::NeedMore { .. }
    ));
    let deadline = T0 + Duration::from_secs(30);
    assert_eq!(c.poll_timeout(), Some(deadline));
    assert!(!c.handle_timeout(ms(29_999)));
    assert!(c.handle_timeout(deadline));
}

#[test]
fn half_frame_closes_at_read_timeout_and_progress_rearms_it() {
    let mut c = conn();
    let f = health(1);
    assert!(matches!(
        c.poll_request(T0, &f[..3]),
        ServerEvent::NeedMore { .. }
    ));
    assert_eq!(c.poll_timeout(), Some(ms(30_000)));
    // No new bytes: the timer keeps its start.
    assert!(matches!(
        c.poll_request(ms(10_000), &f[..3]),
        ServerEvent::NeedMore { .. }
    ));
    assert_eq!(c.poll_timeout(), Some(ms(30_000)));
    // New bytes re-arm it.
    assert!(matches!(
        c.poll_request(ms(20_000), &f[..10]),
        ServerEvent::NeedMore { .. }
    ));
    assert_eq!(c.poll_timeout(), Some(ms(50_000)));
    assert!(!c.handle_timeout(ms(49_999)));
    assert!(c.handle_timeout(ms(50_000)));
    assert!(c.is_closed());
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn idle_timeout_runs_only_with_nothing_in_flight() {
    let mut c = conn();
    assert_eq!(c.poll_timeout(), Some(ms(600_000)));
    assert!(matches!(
        c.poll_request(ms(5), &health(1)),
        ServerEvent::Request { .. }
    ));
    assert_eq!(
        c.poll_timeout(),
        None,
        "a request in flight stops the idle timer"
    );
    let mut tx = [0u8; 64];
    let hc = Response::HealthCheck(streambus_core::HealthCheckResponse {
        status: "healthy".into(),
        uptime_secs: 1,
    });
    c.respond(1, &hc, &mut tx).unwrap();
    // The idle timer restarts at the next `now` seen after the pipeline emptied.
    assert!(!c.handle_timeout(ms(700_000)));
    assert_eq!(c.poll_timeout(), Some(ms(1_300_000)));
    assert!(!c.handle_timeout(ms(1_299_999)));
    assert!(c.handle_timeout(ms(1_300_000)));
}

#[test]
fn back_pressure_at_max_in_flight() {
    let mut cfg = ServerConfig::default();
    cfg.max_in_flight(2);
    let mut c = ServerConnection::new(cfg, T0);
    let mut rx = Vec::new();
    for id in 1..=3 {
        rx.extend_from_slice(&health(id));
    }
    let mut at = 0;
    for id in 1..=2 {
        let ServerEvent::Request {
            consumed,
            request_id,
            ..
        } = c.poll_request(T0, &rx[at..])
        else {
            panic!()
        };
        assert_eq!(request_id, id);
        at += consumed;
    }
    assert_eq!(c.poll_request(T0, &rx[at..]), ServerEvent::Blocked);
    assert_eq!(c.poll_timeout(), None);
    let mut tx = [0u8; 128];
    c.respond_error(
        2,
        ErrorCode::STORAGE_ERROR,
        format_args!("disk {}", "full"),
        &mut tx,
    )
    .unwrap();
    assert_eq!(error_reply(&tx[..23 + 9]).2, "disk full");
    assert!(matches!(
        c.poll_request(T0, &rx[at..]),
        ServerEvent::Request { request_id: 3, .. }
    ));
}

#[test]
fn buffer_too_small_writes_nothing_and_keeps_the_request_in_flight() {
    let mut c = conn();
    assert!(matches!(
        c.poll_request(T0, &health(1)),
        ServerEvent::Request { .. }
    ));
    let mut tx = [0xAAu8; 10];
    let hc = Response::HealthCheck(streambus_core::HealthCheckResponse {
        status: "healthy".into(),
        uptime_secs: 1,
    });
    assert_eq!(
        c.respond(1, &hc, &mut tx),
        Err(streambus_core::EncodeError::BufferTooSmall { required: 38 })
    );
    assert_eq!(tx, [0xAA; 10]);
    assert_eq!(c.in_flight(), 1);
}

#[test]
fn error_messages_are_capped_at_a_char_boundary() {
    let mut tx = vec![0u8; 1024];
    let long = "é".repeat(200); // 400 bytes
    let n = streambus_core::broker::encode_error_response(
        1,
        ErrorCode::INVALID_REQUEST,
        format_args!("x{long}tail"),
        &mut tx,
    )
    .unwrap();
    let (_, _, msg) = error_reply(&tx[..n]);
    assert_eq!(msg.len(), 255, "1 + 127 two-byte chars");
    assert!(msg.starts_with("xé") && !msg.contains("tail"));
}

/// With authentication required, a connection that has not authenticated within the read
/// timeout of being accepted is closed, busy or not; once authenticated, only the usual
/// timers run. Without the setting there is no such deadline.
#[test]
fn unauthenticated_connection_closes_at_the_read_timeout() {
    let mut config = ServerConfig::default();
    config
        .read_timeout(Duration::from_secs(5))
        .require_authentication(true);
    let mut c = ServerConnection::new(config, T0);
    assert_eq!(c.poll_timeout(), Some(ms(5_000)));
    // Requests that do not authenticate (a HealthCheck) do not move the deadline.
    assert!(matches!(
        c.poll_request(ms(4_000), &health(1)),
        ServerEvent::Request { .. }
    ));
    assert_eq!(c.poll_timeout(), Some(ms(5_000)));
    assert!(!c.handle_timeout(ms(4_999)));
    assert!(c.handle_timeout(ms(5_000)));
    assert!(c.is_closed());

    let mut c = ServerConnection::new(config, T0);
    c.authenticated();
    assert_eq!(
        c.poll_timeout(),
        Some(ms(600_000)),
        "only the idle timer is left"
    );
    assert!(!c.handle_timeout(ms(5_000)));

    let c = conn();
    assert_eq!(c.poll_timeout(), Some(ms(600_000)));
}
