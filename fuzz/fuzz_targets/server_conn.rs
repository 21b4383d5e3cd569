//! Drives a `ServerConnection` like a broker adapter would, with arbitrary byte chunks, time
//! steps and answer orders. Asserts: no panic, the events' numbers stay within the buffer and
//! the configured limits, and the receive buffer never has to grow past one maximum frame.
#![no_main]

use core::time::Duration;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use streambus_core::{
    EncodeError, ErrorCode, HealthCheckResponse, Instant, Response, ServerConfig, ServerConnection,
    ServerEvent,
};

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let max_frame_len = u.int_in_range(16u32..=2048)?;
    let max_in_flight = u.int_in_range(1usize..=8)?;
    let mut config = ServerConfig::default();
    config
        .max_frame_len(max_frame_len)
        .max_in_flight(max_in_flight)
        .max_checksum_faults(u.int_in_range(1u8..=4)?)
        .read_timeout(Duration::from_millis(u.int_in_range(1u64..=1000)?))
        .idle_timeout(Duration::from_millis(u.int_in_range(1u64..=5000)?));
    let mut now = Instant::from_millis(u.int_in_range(0u64..=1 << 40)?);
    let mut conn = ServerConnection::new(config, now);
    let mut rx: Vec<u8> = Vec::new();
    let mut pending: Vec<u64> = Vec::new();
    let mut tx = vec![0u8; 8];
    let frame_cap = max_frame_len as usize + 4;

    while !u.is_empty() {
        match u.int_in_range(0u8..=3)? {
            // Bytes arrive; like a real adapter, never read past the frame being received.
            0 => {
                let chunk: &[u8] = u.arbitrary()?;
                let room = frame_cap.saturating_sub(rx.len());
                rx.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            // Time passes.
            1 => {
                now = now + Duration::from_millis(u.int_in_range(0u64..=2000)?);
                let due = conn.poll_timeout().is_some_and(|t| t <= now);
                let closed = conn.handle_timeout(now);
                if due && !closed {
                    // Only a restarted idle timer survives its deadline.
                    assert!(conn.poll_timeout().is_none_or(|t| t > now));
                }
                if closed {
                    assert!(conn.is_closed());
                    return Ok(());
                }
            }
            // A pending request is answered (any order), growing `tx` as asked.
            2 if !pending.is_empty() => {
                let i = u.choose_index(pending.len())?;
                let id = pending.swap_remove(i);
                let before = conn.in_flight();
                let ok = if u.arbitrary()? {
                    let r = Response::HealthCheck(HealthCheckResponse {
                        status: "healthy".into(),
                        uptime_secs: 1,
                    });
                    respond(&mut tx, |tx| conn.respond(id, &r, tx))
                } else {
                    let text: &str = u.arbitrary()?;
                    respond(&mut tx, |tx| {
                        conn.respond_error(id, ErrorCode::STORAGE_ERROR, format_args!("{text}"), tx)
                    })
                };
                assert!(ok <= 15 + 4 + 256 + 4 + 64, "error messages are capped");
                assert_eq!(conn.in_flight(), before - 1);
            }
            _ => {}
        }
        // Drain events.
        loop {
            let in_flight = conn.in_flight();
            match conn.poll_request(now, &rx) {
                ServerEvent::Request {
                    consumed,
                    request_id,
                    ..
                } => {
                    assert!(consumed >= 20 && consumed <= rx.len() && consumed <= frame_cap);
                    assert_eq!(conn.in_flight(), in_flight + 1);
                    pending.push(request_id);
                    rx.drain(..consumed);
                }
                ServerEvent::Reply {
                    consumed,
                    request_id,
                    error,
                } => {
                    assert!(consumed >= 20 && consumed <= rx.len() && consumed <= frame_cap);
                    assert!(!error.is_fatal());
                    rx.drain(..consumed);
                    respond(&mut tx, |tx| conn.respond_fault(request_id, &error, tx));
                    assert_eq!(conn.in_flight(), in_flight);
                }
                ServerEvent::NeedMore {
                    at_least,
                    frame_len,
                } => {
                    assert!(at_least > 0);
                    assert!(rx.len() + at_least <= frame_cap.max(12));
                    if let Some(len) = frame_len {
                        assert!(len <= frame_cap && len > rx.len());
                    }
                    break;
                }
                ServerEvent::Blocked => {
                    assert_eq!(conn.in_flight(), max_in_flight);
                    break;
                }
                ServerEvent::Close { reply } => {
                    assert!(conn.is_closed());
                    if let Some((id, error)) = reply {
                        respond(&mut tx, |tx| conn.respond_fault(id, &error, tx));
                    }
                    assert_eq!(
                        conn.poll_request(now, &rx),
                        ServerEvent::Close { reply: None }
                    );
                    assert_eq!(conn.poll_timeout(), None);
                    return Ok(());
                }
                _ => unreachable!(),
            }
        }
        assert!(conn.in_flight() <= max_in_flight);
        assert_eq!(conn.in_flight(), pending.len());
    }
    Ok(())
}

/// Encodes with the grow-and-retry contract: `BufferTooSmall` must write nothing and name
/// a size that then works.
fn respond(
    tx: &mut Vec<u8>,
    mut f: impl FnMut(&mut [u8]) -> core::result::Result<usize, EncodeError>,
) -> usize {
    match f(tx) {
        Ok(n) => n,
        Err(EncodeError::BufferTooSmall { required }) => {
            assert!(required > tx.len());
            tx.resize(required, 0);
            f(tx).expect("fits after growing")
        }
        Err(e) => panic!("{e}"),
    }
}
