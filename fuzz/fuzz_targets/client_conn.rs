//! Drives a `ClientConnection` with arbitrary requests, byte chunks (garbage, or real response
//! frames for ids in flight, possibly damaged), time steps and partial writes. Asserts: no
//! panic, at most `N` requests in flight, every request completes at most once, completions
//! only name requests that were sent, and a poisoned connection stays poisoned (handing out
//! only the replies that arrived intact before the fault).
#![no_main]

use std::collections::{HashMap, HashSet};

use core::time::Duration;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use streambus_core::{
    ClientConfig, ClientConnection, ClientError, ClientEvent, ErrorCode, ErrorResponse,
    FetchRequest, FetchResponse, HealthCheckResponse, Instant, MessageSet, ProduceResponse,
    Request, RequestType, Response, Text, Topic, encode_response, response_encoded_len,
};

const N: usize = 4;

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let tx_len = u.int_in_range(16usize..=256)?;
    let rx_len = u.int_in_range(16usize..=512)?;
    let mut config = ClientConfig::default();
    config
        .request_timeout(Duration::from_millis(u.int_in_range(1u64..=1000)?))
        .max_frame_len(u.int_in_range(15u32..=1024)?);
    let mut conn: ClientConnection<Vec<u8>, N> =
        ClientConnection::new(config, vec![0; tx_len], vec![0; rx_len]);
    let mut now = Instant::from_millis(u.int_in_range(0u64..=1 << 40)?);
    // id -> type, for requests sent and not completed.
    let mut open: HashMap<u64, RequestType> = HashMap::new();
    let mut done: HashSet<u64> = HashSet::new();
    let mut last_id = 0;
    let topic = Topic::new("t").unwrap();

    while !u.is_empty() {
        let poisoned = conn.error();
        match u.int_in_range(0u8..=5)? {
            0 => {
                let request = match u.int_in_range(0u8..=2)? {
                    0 => Request::HealthCheck,
                    1 => Request::ListTopics,
                    _ => Request::Fetch(FetchRequest {
                        topic,
                        partition: u.arbitrary()?,
                        offset: u.arbitrary()?,
                        max_bytes: u.arbitrary()?,
                        extension: None,
                    }),
                };
                let before = conn.in_flight();
                match conn.send_request(now, &request) {
                    Ok(id) => {
                        assert!(id > last_id, "ids increase");
                        last_id = id;
                        open.insert(id, request.request_type());
                        assert_eq!(conn.in_flight(), before + 1);
                    }
                    Err(ClientError::Busy) => assert_eq!(before, N),
                    Err(ClientError::BufferTooSmall { required }) => {
                        assert!(required > tx_len - conn.poll_transmit().map_or(0, <[u8]>::len));
                        assert_eq!(conn.in_flight(), before);
                    }
                    Err(e) => assert_eq!(Some(e), poisoned),
                }
            }
            1 => {
                let pending = conn.poll_transmit().map_or(0, <[u8]>::len);
                assert!(pending <= tx_len);
                let n = u.int_in_range(0..=pending)?;
                conn.consume_transmit(n);
            }
            // Garbage bytes.
            2 => {
                let chunk: &[u8] = u.arbitrary()?;
                feed(&mut conn, now, chunk, &mut open, &mut done);
            }
            // A real response frame for an id in flight (or not), maybe damaged, maybe split.
            3 => {
                let id = if !open.is_empty() && u.arbitrary()? {
                    *open.keys().nth(u.choose_index(open.len())?).unwrap()
                } else {
                    u.arbitrary()?
                };
                let ty = open.get(&id).copied().unwrap_or(RequestType::HealthCheck);
                let msg: &str = u.arbitrary()?;
                let response = match (u.arbitrary::<bool>()?, ty) {
                    (true, _) => Response::Error(ErrorResponse {
                        code: ErrorCode(u.arbitrary()?),
                        message: Text(msg.as_bytes()),
                    }),
                    (_, RequestType::Fetch) => Response::Fetch(FetchResponse {
                        high_water_mark: 0,
                        messages: MessageSet::EMPTY,
                        trailer: None,
                    }),
                    (_, RequestType::Produce) => Response::Produce(ProduceResponse::default()),
                    _ => Response::HealthCheck(HealthCheckResponse {
                        status: Text(msg.as_bytes()),
                        uptime_secs: 1,
                    }),
                };
                // Sized by the response: an arbitrary message can take it past any fixed size.
                let mut frame = vec![0u8; response_encoded_len(&response)];
                let n = encode_response(id, &response, &mut frame).unwrap();
                assert_eq!(
                    n,
                    frame.len(),
                    "encode_response writes response_encoded_len bytes"
                );
                if u.ratio(1u8, 8)? {
                    let i = u.choose_index(frame.len())?;
                    frame[i] ^= u.int_in_range(1u8..=255)?;
                }
                let split = u.int_in_range(0..=frame.len())?;
                feed(&mut conn, now, &frame[..split], &mut open, &mut done);
                feed(&mut conn, now, &frame[split..], &mut open, &mut done);
            }
            4 => {
                now = now + Duration::from_millis(u.int_in_range(0u64..=1500)?);
                conn.handle_timeout(now);
                assert!(conn.poll_timeout().is_none_or(|t| t > now));
            }
            _ => {}
        }
        if poisoned.is_some() {
            assert_eq!(conn.error(), poisoned, "poison sticks");
            assert!(conn.poll_event().is_none());
        }
        drain(&mut conn, &mut open, &mut done);
        assert!(conn.in_flight() <= N);
        // A reply that fits no request poisons the connection when it is handed out, after
        // its slot was freed: its id stays in `open`.
        if conn.error().is_none() {
            assert!(conn.in_flight() >= open.len());
        }
    }
    Ok(())
}

/// Takes every pending event, checking it against the requests in flight.
fn drain(
    conn: &mut ClientConnection<Vec<u8>, N>,
    open: &mut HashMap<u64, RequestType>,
    done: &mut HashSet<u64>,
) {
    while let Some(ev) = conn.poll_event() {
        let (id, ty) = match ev {
            ClientEvent::Response {
                request_id,
                request_type,
                ..
            } => (request_id, request_type),
            ClientEvent::TimedOut {
                request_id,
                request_type,
            } => (request_id, request_type),
            _ => unreachable!(),
        };
        assert_eq!(
            open.remove(&id),
            Some(ty),
            "completion {id} names a request in flight"
        );
        assert!(done.insert(id), "request {id} completes once");
    }
}

/// Feeds `bytes` like an adapter: when the receive buffer is full, drain events and go on.
fn feed(
    conn: &mut ClientConnection<Vec<u8>, N>,
    now: Instant,
    mut bytes: &[u8],
    open: &mut HashMap<u64, RequestType>,
    done: &mut HashSet<u64>,
) {
    let poisoned = conn.error();
    let mut stalled = false;
    while !bytes.is_empty() {
        match conn.handle_input(now, bytes) {
            Ok(0) => {
                // Full of responses not yet handed out: drain them, then there is room.
                assert!(!stalled, "no room even after draining every event");
                stalled = true;
                drain(conn, open, done);
            }
            Ok(n) => {
                stalled = false;
                bytes = &bytes[n..];
            }
            Err(e) => {
                assert!(poisoned.is_none_or(|p| p == e));
                assert_eq!(conn.error(), Some(e));
                return;
            }
        }
    }
}
