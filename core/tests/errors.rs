//! Bad input: each case is a specific, typed error — never a panic.

use proptest::prelude::*;
use streambus_core::{
    DecodeError, ErrorCode, FrameDecoder, Malformed, MessageSet, Request, RequestFrame,
    RequestType, Response, ResponseFrame, Status, Topic, checksum::checksum,
};

/// A request frame with an arbitrary type, version and payload and a correct CRC.
fn frame(id: u64, ty: u8, version: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(&[ty, version, 0, 0]);
    body.extend_from_slice(payload);
    let mut f = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&body);
    f.extend_from_slice(&checksum(&body).to_be_bytes());
    f
}

fn parse(f: &[u8]) -> Result<Request<'_>, DecodeError> {
    Request::parse(&RequestFrame::new_checked(f)?)
}

fn str_field(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

#[test]
fn wrong_crc_is_checksum_mismatch_with_request_id() {
    let mut f = frame(77, 7, 1, b"");
    let last = f.len() - 1;
    f[last] ^= 1;
    let err = RequestFrame::new_checked(&f[..]).unwrap_err();
    assert!(
        matches!(err, DecodeError::ChecksumMismatch { request_id: 77, .. }),
        "{err:?}"
    );
    assert_eq!(err.error_code(), ErrorCode::CHECKSUM_MISMATCH);
    assert!(!err.is_fatal());
    // A flipped payload bit is caught too.
    let mut f = frame(5, 3, 1, &str_field(b"abc"));
    f[20] ^= 0x40;
    assert!(matches!(
        RequestFrame::new_checked(&f[..]),
        Err(DecodeError::ChecksumMismatch { request_id: 5, .. })
    ));
}

#[test]
fn length_over_max_is_fatal_on_four_bytes() {
    let d = FrameDecoder::requests();
    let err = d
        .next_frame(&(10 * 1024 * 1024 + 1u32).to_be_bytes())
        .unwrap_err();
    assert_eq!(
        err,
        DecodeError::FrameTooLarge {
            length: 10 * 1024 * 1024 + 1,
            max: 10 * 1024 * 1024
        }
    );
    assert!(err.is_fatal());
    assert_eq!(err.error_code(), ErrorCode::MESSAGE_TOO_LARGE);
    // Exactly the maximum is accepted (and then waits for the body).
    assert!(matches!(
        d.next_frame(&(10 * 1024 * 1024u32).to_be_bytes()),
        Ok(Status::Partial(_))
    ));
    // The limit is a setting.
    let small = FrameDecoder::requests().with_max_frame_len(64);
    assert!(matches!(
        small.next_frame(&65u32.to_be_bytes()),
        Err(DecodeError::FrameTooLarge {
            length: 65,
            max: 64
        })
    ));
}

#[test]
fn length_below_fixed_header_is_fatal() {
    for len in 0..16u32 {
        let err = FrameDecoder::requests()
            .next_frame(&len.to_be_bytes())
            .unwrap_err();
        assert_eq!(
            err,
            DecodeError::FrameTooShort {
                length: len,
                min: 16
            }
        );
        assert_eq!(err.error_code(), ErrorCode::INVALID_PROTOCOL);
        assert!(err.is_fatal());
    }
    assert!(
        FrameDecoder::responses()
            .next_frame(&14u32.to_be_bytes())
            .is_err()
    );
}

#[test]
fn unknown_type_and_wrong_version() {
    for ty in [0u8, 8, 0x20, 0xFF] {
        let f = frame(9, ty, 1, b"");
        let err = parse(&f).unwrap_err();
        assert_eq!(
            err,
            DecodeError::UnknownRequestType {
                request_id: 9,
                request_type: ty
            }
        );
        assert_eq!(err.error_code(), ErrorCode::UNKNOWN_REQUEST);
        assert!(!err.is_fatal());
    }
    let f = frame(10, 7, 2, b"");
    let err = parse(&f).unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnsupportedVersion {
            request_id: 10,
            version: 2
        }
    );
    assert_eq!(err.error_code(), ErrorCode::INVALID_PROTOCOL);
}

#[test]
fn truncated_payloads() {
    // GetOffset with the partition cut short.
    let mut p = str_field(b"orders");
    p.extend_from_slice(&[0, 0]);
    let err = parse(&frame(1, 3, 1, &p)).unwrap_err();
    assert_eq!(
        err,
        DecodeError::Malformed {
            reason: Malformed::Truncated { field: "partition" }
        }
    );
    assert_eq!(err.error_code(), ErrorCode::INVALID_REQUEST);
    // A topic length beyond the payload.
    let p = [0, 0, 0, 50, b'a'];
    assert_eq!(
        parse(&frame(1, 5, 1, &p)).unwrap_err(),
        DecodeError::Malformed {
            reason: Malformed::Truncated { field: "topic" }
        }
    );
    // Every request type with a required field rejects an empty payload.
    for ty in 1..=5u8 {
        assert!(
            matches!(
                parse(&frame(1, ty, 1, b"")),
                Err(DecodeError::Malformed { .. })
            ),
            "type {ty}"
        );
    }
}

/// A malformed Authenticate (0x10) payload is `InvalidRequest` naming the field cut short, and
/// the error text never carries the credential's bytes.
#[test]
fn malformed_authenticate_is_invalid_request() {
    let secret = b"s3cr3t-t0ken-never-shown";
    let mut cut_credential = str_field(b"token");
    cut_credential.extend_from_slice(&40u32.to_be_bytes());
    cut_credential.extend_from_slice(secret);
    for (payload, field) in [
        (Vec::new(), "mechanism"),
        (vec![0, 0, 0, 9, b't'], "mechanism"),
        (str_field(b"token"), "credential"),
        (cut_credential, "credential"),
    ] {
        let err = parse(&frame(3, 0x10, 1, &payload)).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Malformed {
                reason: Malformed::Truncated { field }
            }
        );
        assert_eq!(err.error_code(), ErrorCode::INVALID_REQUEST);
        assert!(!err.is_fatal());
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }
    // Whole, with trailing bytes: accepted, the trailing bytes ignored.
    let mut p = str_field(b"token");
    p.extend_from_slice(&str_field(secret));
    p.extend_from_slice(&[1, 2]);
    let f = frame(4, 0x10, 1, &p);
    let Ok(Request::Authenticate(a)) = parse(&f) else {
        panic!("a whole Authenticate was refused");
    };
    assert_eq!(
        (a.mechanism.as_str(), a.credential),
        (Some("token"), &secret[..])
    );
    let debug = format!("{a:?}");
    assert!(!debug.contains("s3cr3t"), "{debug}");
    assert!(debug.contains("credential_len: 24"), "{debug}");
}

#[test]
fn counts_beyond_the_bytes_present() {
    // A Produce claiming a million messages in a few bytes: refused before any loop.
    let mut p = str_field(b"t");
    p.extend_from_slice(&0u32.to_be_bytes());
    p.extend_from_slice(&1_000_000u32.to_be_bytes());
    p.extend_from_slice(&[0; 30]);
    let err = parse(&frame(1, 1, 1, &p)).unwrap_err();
    assert_eq!(
        err,
        DecodeError::Malformed {
            reason: Malformed::CountTooLarge {
                field: "message count",
                count: 1_000_000
            }
        }
    );
    // A message claiming more headers than bytes: a corrupt message record.
    let mut p = str_field(b"t");
    p.extend_from_slice(&0u32.to_be_bytes());
    p.extend_from_slice(&1u32.to_be_bytes());
    p.extend_from_slice(&[0; 16]); // offset, timestamp
    p.extend_from_slice(&str_field(b"k"));
    p.extend_from_slice(&str_field(b"v"));
    p.extend_from_slice(&u32::MAX.to_be_bytes()); // NumHeaders
    let err = parse(&frame(1, 1, 1, &p)).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::CorruptMessage {
                index: 0,
                reason: Malformed::CountTooLarge { .. }
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.error_code(), ErrorCode::CORRUPT_MESSAGE);
    // ListTopics response with an absurd count.
    let mut body = 1u64.to_be_bytes().to_vec();
    body.extend_from_slice(&[0, 0, 0]);
    body.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut f = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&body);
    f.extend_from_slice(&checksum(&body).to_be_bytes());
    let rf = ResponseFrame::new_checked(&f[..]).unwrap();
    assert!(matches!(
        Response::parse(&rf, RequestType::ListTopics),
        Err(DecodeError::Malformed {
            reason: Malformed::CountTooLarge {
                field: "topic count",
                ..
            }
        })
    ));
}

#[test]
fn bad_topic_names() {
    let cases: [&[u8]; 7] = [
        b"",
        b".",
        b"..",
        b"a/b",
        b"caf\xc3\xa9",
        b"\xff\xfe",
        &[b'a'; 250],
    ];
    for name in cases {
        let err = parse(&frame(1, 5, 1, &str_field(name))).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Malformed {
                reason: Malformed::InvalidTopicName { len: name.len() }
            },
            "{name:?}"
        );
        assert_eq!(err.error_code(), ErrorCode::INVALID_REQUEST);
    }
    assert!(Topic::new(&"a".repeat(249)).is_ok());
    assert!(Topic::new("...").is_ok());
    assert!(Topic::from_bytes(b"not utf8 \xff").is_err());
}

#[test]
fn trailing_bytes_in_requests_are_ignored() {
    let mut p = str_field(b"orders");
    p.extend_from_slice(&[1, 2, 3]);
    assert!(matches!(
        parse(&frame(1, 5, 1, &p)),
        Ok(Request::DeleteTopic(_))
    ));
    assert_eq!(
        parse(&frame(1, 7, 1, b"xyz")).unwrap(),
        Request::HealthCheck
    );
}

#[test]
fn bad_bool_and_status_in_responses() {
    let resp = |status: u8, payload: &[u8]| {
        let mut body = 3u64.to_be_bytes().to_vec();
        body.extend_from_slice(&[status, 0, 0]);
        body.extend_from_slice(payload);
        let mut f = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&body);
        f.extend_from_slice(&checksum(&body).to_be_bytes());
        f
    };
    let mut p = str_field(b"t");
    p.push(2);
    let f = resp(0, &p);
    let rf = ResponseFrame::new_checked(&f[..]).unwrap();
    assert_eq!(
        Response::parse(&rf, RequestType::CreateTopic).unwrap_err(),
        DecodeError::Malformed {
            reason: Malformed::InvalidBool {
                field: "created",
                value: 2
            }
        }
    );
    let f = resp(9, &[]);
    let rf = ResponseFrame::new_checked(&f[..]).unwrap();
    assert_eq!(
        Response::parse(&rf, RequestType::HealthCheck).unwrap_err(),
        DecodeError::Malformed {
            reason: Malformed::InvalidStatus { value: 9 }
        }
    );
}

#[test]
fn message_set_must_match_its_bytes_exactly() {
    assert!(MessageSet::new_checked(0, &[]).is_ok());
    assert!(matches!(
        MessageSet::new_checked(1, &[0; 27]),
        Err(DecodeError::Malformed { .. })
    ));
    let mut rec = vec![0u8; 28];
    assert_eq!(MessageSet::new_checked(1, &rec).unwrap().count(), 1);
    rec.push(0);
    assert!(matches!(
        MessageSet::new_checked(1, &rec),
        Err(DecodeError::CorruptMessage {
            reason: Malformed::TrailingBytes { len: 1 },
            ..
        })
    ));
}

#[test]
fn error_display_says_what_and_which_value() {
    let e = DecodeError::FrameTooLarge {
        length: 20_000_000,
        max: 10_485_760,
    };
    assert_eq!(
        e.to_string(),
        "frame length 20000000 exceeds the maximum 10485760"
    );
    let e = DecodeError::Malformed {
        reason: Malformed::InvalidTopicName { len: 300 },
    };
    assert!(e.to_string().contains("300 bytes"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes never panic the decoder, framing or any payload parser.
    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300), ty in any::<u8>(), version in 0u8..3) {
        let _ = FrameDecoder::requests().next_frame(&data);
        let _ = RequestFrame::new_checked(&data[..]);
        let _ = ResponseFrame::new_checked(&data[..]);
        // With a valid envelope around arbitrary payloads, every parser gets exercised.
        let f = frame(1, ty, version, &data);
        if let Ok(Request::Produce(p)) = parse(&f) {
            for m in p.messages.iter() {
                let _ = m.headers.iter().count();
            }
        }
        for rt in RequestType::ALL {
            let _ = Request::parse_payload(rt, &data);
            if let Ok(Response::Fetch(fr)) = Response::parse_payload(rt, &data) {
                prop_assert!(fr.messages.iter().count() == fr.messages.count() as usize);
            }
        }
    }
}
