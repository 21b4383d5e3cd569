//! A virtual-time harness: a client and a server connection wired together with no sockets,
//! plus a tiny in-test broker (quinn's `Pair`). One fixture per interesting state.

use core::time::Duration;
use std::collections::VecDeque;

use proptest::prelude::*;
use streambus_core::{
    ClientConfig, ClientConnection, ClientError, ClientEvent, ErrorCode, FetchRequest,
    FetchResponse, GetOffsetRequest, GetOffsetResponse, HealthCheckResponse, Instant, Message,
    MessageSetBuilder, PeerError, ProduceRequest, ProduceResponse, Request, Response, ServerConfig,
    ServerConnection, ServerEvent, Topic, encode_response,
};

const N: usize = 8;
const TIMEOUT: Duration = Duration::from_secs(5);
const T0: Instant = Instant::from_millis(1_000);

/// What the broker remembers of a request it holds.
#[derive(Debug, Clone)]
enum Held {
    Produce {
        id: u64,
        count: u32,
    },
    Fetch {
        id: u64,
        offset: i64,
    },
    GetOffset {
        id: u64,
        topic: String,
        partition: u32,
    },
    Health {
        id: u64,
    },
    Other {
        id: u64,
    },
}

impl Held {
    fn id(&self) -> u64 {
        match self {
            Self::Produce { id, .. }
            | Self::Fetch { id, .. }
            | Self::GetOffset { id, .. }
            | Self::Health { id }
            | Self::Other { id } => *id,
        }
    }
}

/// How the broker answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Policy {
    /// As soon as a request is read.
    Immediately,
    /// Never, until `release` is called.
    Hold,
}

/// A finished request as the client saw it, owned.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Produced {
        id: u64,
        base: i64,
        count: u32,
    },
    Fetched {
        id: u64,
        values: Vec<Vec<u8>>,
    },
    Offsets {
        id: u64,
        topic: String,
        end: i64,
    },
    Healthy {
        id: u64,
        status: String,
    },
    Error {
        id: u64,
        code: ErrorCode,
        message: String,
    },
    TimedOut {
        id: u64,
    },
}

struct Pair {
    now: Instant,
    client: ClientConnection<Vec<u8>, N>,
    server: ServerConnection,
    /// Bytes the server has received and not consumed.
    server_rx: Vec<u8>,
    /// Bytes on the wire from the server to the client.
    to_client: VecDeque<u8>,
    /// Largest chunk moved per read, each way.
    chunk: usize,
    policy: Policy,
    held: Vec<Held>,
    next_offset: i64,
    outcomes: Vec<Outcome>,
    closed_by_server: bool,
}

impl Pair {
    fn new() -> Self {
        Self::with(ClientConfig::default(), ServerConfig::default(), 4096)
    }

    fn with(mut cc: ClientConfig, sc: ServerConfig, rx_len: usize) -> Self {
        cc.request_timeout(TIMEOUT);
        Self {
            now: T0,
            client: ClientConnection::new(cc, vec![0; 4096], vec![0; rx_len]),
            server: ServerConnection::new(sc, T0),
            server_rx: Vec::new(),
            to_client: VecDeque::new(),
            chunk: usize::MAX,
            policy: Policy::Immediately,
            held: Vec::new(),
            next_offset: 0,
            outcomes: Vec::new(),
            closed_by_server: false,
        }
    }

    fn send(&mut self, req: &Request<'_>) -> u64 {
        self.client.send_request(self.now, req).unwrap()
    }

    /// Moves bytes both ways once and lets both sides react; returns whether anything moved.
    fn step(&mut self) -> bool {
        let mut moved = false;
        // Client -> server.
        if let Some(bytes) = self.client.poll_transmit() {
            let n = bytes.len().min(self.chunk);
            self.server_rx.extend_from_slice(&bytes[..n]);
            self.client.consume_transmit(n);
            moved = true;
        }
        self.serve();
        // Server -> client.
        if !self.to_client.is_empty() {
            let n = self.to_client.len().min(self.chunk);
            let bytes: Vec<u8> = self.to_client.drain(..n).collect();
            let mut at = 0;
            while at < bytes.len() {
                match self.client.handle_input(self.now, &bytes[at..]) {
                    Ok(k) => at += k,
                    Err(_) => return true,
                }
                self.collect();
            }
            moved = true;
        }
        self.collect();
        moved
    }

    /// Steps until nothing moves.
    fn drive(&mut self) {
        for _ in 0..100_000 {
            if !self.step() {
                return;
            }
        }
        panic!("did not settle");
    }

    /// Jumps the clock to the earliest timer and fires it.
    fn advance_to_next_timeout(&mut self) -> Instant {
        let next = [self.client.poll_timeout(), self.server.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .expect("a timer");
        self.now = next;
        self.client.handle_timeout(next);
        if self.server.handle_timeout(next) {
            self.closed_by_server = true;
        }
        self.collect();
        next
    }

    fn collect(&mut self) {
        while let Some(ev) = self.client.poll_event() {
            self.outcomes.push(outcome(ev));
        }
    }

    fn serve(&mut self) {
        loop {
            match self.server.poll_request(self.now, &self.server_rx) {
                ServerEvent::Request {
                    consumed,
                    request_id: id,
                    request,
                    ..
                } => {
                    let held = match request {
                        Request::Produce(p) => Held::Produce {
                            id,
                            count: p.messages.count(),
                        },
                        Request::Fetch(f) => Held::Fetch {
                            id,
                            offset: f.offset,
                        },
                        Request::GetOffset(g) => Held::GetOffset {
                            id,
                            topic: g.topic.as_str().to_owned(),
                            partition: g.partition,
                        },
                        Request::HealthCheck => Held::Health { id },
                        _ => Held::Other { id },
                    };
                    self.server_rx.drain(..consumed);
                    self.held.push(held);
                    if self.policy == Policy::Immediately {
                        self.release_all();
                    }
                }
                ServerEvent::Reply {
                    consumed,
                    request_id,
                    error,
                } => {
                    self.server_rx.drain(..consumed);
                    let mut tx = [0u8; 512];
                    let n = self
                        .server
                        .respond_fault(request_id, &error, &mut tx)
                        .unwrap();
                    self.to_client.extend(&tx[..n]);
                }
                ServerEvent::Close { reply } => {
                    if let Some((id, e)) = reply {
                        let mut tx = [0u8; 512];
                        let n = self.server.respond_fault(id, &e, &mut tx).unwrap();
                        self.to_client.extend(&tx[..n]);
                    }
                    self.closed_by_server = true;
                    return;
                }
                ServerEvent::NeedMore { .. } | ServerEvent::Blocked => return,
                other => panic!("{other:?}"),
            }
        }
    }

    /// Answers held requests in the order of `ids`.
    fn release(&mut self, ids: &[u64]) {
        for &id in ids {
            let i = self.held.iter().position(|h| h.id() == id).unwrap();
            let h = self.held.remove(i);
            self.answer(h);
        }
    }

    fn release_all(&mut self) {
        for h in std::mem::take(&mut self.held) {
            self.answer(h);
        }
    }

    fn answer(&mut self, h: Held) {
        let mut records = [0u8; 512];
        let mut tx = vec![0u8; 1024];
        let resp = match &h {
            Held::Produce { count, .. } => {
                let base = self.next_offset;
                self.next_offset += i64::from(*count);
                Response::Produce(ProduceResponse {
                    base_offset: base,
                    num_messages: *count,
                    high_water_mark: self.next_offset,
                })
            }
            Held::Fetch { offset, .. } => {
                let mut b = MessageSetBuilder::new(&mut records);
                let values: Vec<String> = (0..3).map(|k| format!("v{}", offset + k)).collect();
                for (k, v) in values.iter().enumerate() {
                    let mut m = Message::new(b"", v.as_bytes());
                    m.offset = offset + k as i64;
                    b.push(&m).unwrap();
                }
                let messages = b.finish();
                let fetch = Response::Fetch(FetchResponse {
                    high_water_mark: offset + 3,
                    messages,
                    trailer: None,
                });
                let n = self.server.respond(h.id(), &fetch, &mut tx).unwrap();
                self.to_client.extend(&tx[..n]);
                return;
            }
            Held::GetOffset {
                topic, partition, ..
            } => {
                let topic = Topic::new(topic).unwrap();
                let n = self
                    .server
                    .respond(
                        h.id(),
                        &Response::GetOffset(GetOffsetResponse {
                            topic,
                            partition: *partition,
                            start_offset: 0,
                            end_offset: self.next_offset,
                            high_water_mark: self.next_offset,
                        }),
                        &mut tx,
                    )
                    .unwrap();
                self.to_client.extend(&tx[..n]);
                return;
            }
            Held::Health { .. } => Response::HealthCheck(HealthCheckResponse {
                status: "healthy".into(),
                uptime_secs: 2,
            }),
            Held::Other { id } => {
                let n = self
                    .server
                    .respond_error(
                        *id,
                        ErrorCode::INVALID_REQUEST,
                        format_args!("request {id} not supported here"),
                        &mut tx,
                    )
                    .unwrap();
                self.to_client.extend(&tx[..n]);
                return;
            }
        };
        let n = self.server.respond(h.id(), &resp, &mut tx).unwrap();
        self.to_client.extend(&tx[..n]);
    }

    fn completed_ids(&self) -> Vec<u64> {
        self.outcomes.iter().map(Outcome::id).collect()
    }
}

impl Outcome {
    fn id(&self) -> u64 {
        match self {
            Self::Produced { id, .. }
            | Self::Fetched { id, .. }
            | Self::Offsets { id, .. }
            | Self::Healthy { id, .. }
            | Self::Error { id, .. }
            | Self::TimedOut { id } => *id,
        }
    }
}

fn outcome(ev: ClientEvent<'_>) -> Outcome {
    match ev {
        ClientEvent::TimedOut { request_id, .. } => Outcome::TimedOut { id: request_id },
        ClientEvent::Response {
            request_id: id,
            response,
            ..
        } => match response {
            Response::Produce(p) => Outcome::Produced {
                id,
                base: p.base_offset,
                count: p.num_messages,
            },
            Response::Fetch(f) => Outcome::Fetched {
                id,
                values: f.messages.iter().map(|m| m.value.to_vec()).collect(),
            },
            Response::GetOffset(g) => Outcome::Offsets {
                id,
                topic: g.topic.as_str().to_owned(),
                end: g.end_offset,
            },
            Response::HealthCheck(h) => Outcome::Healthy {
                id,
                status: h.status.to_string(),
            },
            Response::Error(e) => Outcome::Error {
                id,
                code: e.code,
                message: e.message.to_string(),
            },
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

fn topic() -> Topic<'static> {
    Topic::new("sensors").unwrap()
}

/// A request of each kind, cycling by `k`.
fn request(k: usize) -> Request<'static> {
    match k % 4 {
        0 => Request::HealthCheck,
        1 => Request::Produce(ProduceRequest {
            topic: topic(),
            partition: 0,
            messages: streambus_core::MessageSet::EMPTY,
            producer: None,
        }),
        2 => Request::Fetch(FetchRequest {
            topic: topic(),
            partition: 0,
            offset: k as i64,
            max_bytes: 1024,
            extension: None,
        }),
        _ => Request::GetOffset(GetOffsetRequest {
            topic: topic(),
            partition: 3,
        }),
    }
}

fn expected(k: usize, id: u64) -> Outcome {
    match k % 4 {
        0 => Outcome::Healthy {
            id,
            status: "healthy".into(),
        },
        1 => Outcome::Produced {
            id,
            base: 0,
            count: 0,
        },
        2 => Outcome::Fetched {
            id,
            values: (0..3).map(|j| format!("v{}", k + j).into_bytes()).collect(),
        },
        _ => Outcome::Offsets {
            id,
            topic: "sensors".into(),
            end: 0,
        },
    }
}

// ---- fixtures: one per interesting state ----

/// Nothing in flight.
fn idle() -> Pair {
    Pair::new()
}

/// `k` requests (ids 1..=k) read by the broker and held unanswered.
fn with_held(k: usize) -> Pair {
    let mut p = Pair::new();
    p.policy = Policy::Hold;
    for i in 0..k {
        p.send(&request(i));
    }
    p.drive();
    assert_eq!(p.held.len(), k);
    assert_eq!(p.client.in_flight(), k);
    p
}

/// The client's table is full (N held requests).
fn full() -> Pair {
    with_held(N)
}

/// Request 1 timed out (reported), the broker still holds it.
fn with_timed_out() -> Pair {
    let mut p = with_held(1);
    p.advance_to_next_timeout();
    assert_eq!(p.outcomes, [Outcome::TimedOut { id: 1 }]);
    p
}

/// A client whose connection a peer error poisoned.
fn poisoned() -> Pair {
    let mut p = with_held(1);
    let mut tx = [0u8; 64];
    // Answer an id that was never sent.
    let n = encode_response(
        99,
        &Response::HealthCheck(HealthCheckResponse {
            status: "healthy".into(),
            uptime_secs: 1,
        }),
        &mut tx,
    )
    .unwrap();
    assert_eq!(
        p.client.handle_input(p.now, &tx[..n]),
        Err(ClientError::Peer(PeerError::UnknownResponse {
            request_id: 99
        }))
    );
    p
}

// ---- tests ----

#[test]
fn idle_pair_has_only_the_server_idle_timer() {
    let p = idle();
    assert_eq!(p.client.poll_timeout(), None);
    assert_eq!(p.client.poll_transmit(), None);
    assert_eq!(p.server.poll_timeout(), Some(T0 + Duration::from_secs(600)));
}

#[test]
fn pipelining_1_to_n_requests() {
    for k in 1..=N {
        let mut p = idle();
        let ids: Vec<u64> = (0..k).map(|i| p.send(&request(i))).collect();
        assert_eq!(ids, (1..=k as u64).collect::<Vec<_>>(), "ids are 1, 2, ...");
        p.drive();
        let want: Vec<Outcome> = (0..k).map(|i| expected(i, ids[i])).collect();
        assert_eq!(p.outcomes, want, "k = {k}");
        assert_eq!(p.client.in_flight(), 0);
        assert_eq!(p.server.in_flight(), 0);
    }
}

#[test]
fn responses_out_of_order_are_matched_by_id() {
    let mut p = full();
    let order = [5, 1, 8, 3, 2, 7, 4, 6];
    p.release(&order);
    p.drive();
    assert_eq!(p.completed_ids(), order);
    for o in &p.outcomes {
        let id = o.id();
        assert_eq!(*o, expected(id as usize - 1, id));
    }
}

#[test]
fn busy_when_full_and_free_after_a_completion() {
    let mut p = full();
    assert_eq!(
        p.client.send_request(p.now, &Request::HealthCheck),
        Err(ClientError::Busy)
    );
    assert_eq!(p.client.poll_transmit(), None, "nothing was queued");
    p.release(&[4]);
    p.drive();
    assert_eq!(p.completed_ids(), [4]);
    assert_eq!(p.send(&Request::HealthCheck), 9, "no id was burnt by Busy");
}

#[test]
fn timeouts_fire_exactly_at_the_deadline() {
    let mut p = with_held(2);
    let deadline = T0 + TIMEOUT;
    assert_eq!(p.client.poll_timeout(), Some(deadline));
    p.client
        .handle_timeout(Instant::from_micros(deadline.as_micros() - 1));
    assert_eq!(p.client.poll_event(), None);
    p.client.handle_timeout(deadline);
    p.collect();
    assert_eq!(
        p.outcomes,
        [Outcome::TimedOut { id: 1 }, Outcome::TimedOut { id: 2 }]
    );
    assert_eq!(p.client.poll_timeout(), None);
}

#[test]
fn later_requests_keep_their_own_deadlines() {
    let mut p = idle();
    p.policy = Policy::Hold;
    p.send(&Request::HealthCheck);
    p.now = T0 + Duration::from_secs(2);
    p.send(&Request::HealthCheck);
    p.drive();
    assert_eq!(p.advance_to_next_timeout(), T0 + TIMEOUT);
    assert_eq!(p.outcomes, [Outcome::TimedOut { id: 1 }]);
    assert_eq!(
        p.advance_to_next_timeout(),
        T0 + Duration::from_secs(2) + TIMEOUT
    );
    assert_eq!(p.completed_ids(), [1, 2]);
}

#[test]
fn a_late_response_is_dropped_and_frees_the_slot() {
    let mut p = with_timed_out();
    assert_eq!(p.client.in_flight(), 1, "slot kept for the late response");
    let id = p.send(&Request::HealthCheck);
    p.drive();
    p.release(&[1, id]);
    p.drive();
    assert_eq!(
        p.outcomes,
        [
            Outcome::TimedOut { id: 1 },
            Outcome::Healthy {
                id,
                status: "healthy".into()
            }
        ]
    );
    assert_eq!(p.client.in_flight(), 0);
}

#[test]
fn a_late_response_before_the_timeout_is_reported_is_dropped_too() {
    let mut p = with_held(1);
    p.client.handle_timeout(T0 + TIMEOUT);
    p.release(&[1]);
    // Deliver the late response before polling events.
    let bytes: Vec<u8> = p.to_client.drain(..).collect();
    p.client.handle_input(p.now, &bytes).unwrap();
    p.collect();
    assert_eq!(p.outcomes, [Outcome::TimedOut { id: 1 }]);
    assert_eq!(p.client.in_flight(), 0);
}

#[test]
fn a_second_response_to_a_timed_out_request_is_a_peer_error() {
    let mut p = with_held(1);
    p.client.handle_timeout(T0 + TIMEOUT);
    p.release(&[1]);
    let late: Vec<u8> = p.to_client.drain(..).collect();
    p.client.handle_input(p.now, &late).unwrap();
    // The same response again, before the timeout is reported: id 1 was answered already.
    assert_eq!(
        p.client.handle_input(p.now, &late),
        Err(ClientError::Peer(PeerError::UnknownResponse {
            request_id: 1
        }))
    );
}

#[test]
fn every_byte_boundary_of_fragmentation_both_ways() {
    // The reference: 4 pipelined requests, one chunk.
    let run = |split: usize, to_server: bool| {
        let mut p = idle();
        p.policy = Policy::Hold;
        for i in 0..4 {
            p.send(&request(i));
        }
        let wire = p.client.poll_transmit().unwrap().to_vec();
        p.client.consume_transmit(wire.len());
        if to_server {
            p.server_rx.extend_from_slice(&wire[..split]);
            p.serve();
            p.server_rx.extend_from_slice(&wire[split..]);
            p.serve();
            p.release(&[1, 2, 3, 4]);
            p.drive();
        } else {
            p.server_rx.extend_from_slice(&wire);
            p.serve();
            p.release(&[1, 2, 3, 4]);
            let back: Vec<u8> = p.to_client.drain(..).collect();
            assert!(split <= back.len());
            let split = split.min(back.len());
            assert_eq!(p.client.handle_input(p.now, &back[..split]), Ok(split));
            p.collect();
            assert_eq!(
                p.client.handle_input(p.now, &back[split..]),
                Ok(back.len() - split)
            );
            p.collect();
        }
        p.outcomes
    };
    let want: Vec<Outcome> = (0..4).map(|i| expected(i, i as u64 + 1)).collect();
    let mut p = idle();
    for i in 0..4 {
        p.send(&request(i));
    }
    let req_len = p.client.poll_transmit().unwrap().len();
    for split in 0..=req_len {
        assert_eq!(run(split, true), want, "request stream split at {split}");
    }
    // The response stream of the same 4 requests.
    let mut q = idle();
    q.policy = Policy::Hold;
    for i in 0..4 {
        q.send(&request(i));
    }
    q.drive();
    q.release(&[1, 2, 3, 4]);
    let resp_len = q.to_client.len();
    for split in 0..=resp_len {
        assert_eq!(run(split, false), want, "response stream split at {split}");
    }
}

#[test]
fn bad_crc_on_the_way_in_is_answered_and_the_connection_stays() {
    let mut p = idle();
    p.send(&Request::HealthCheck);
    let mut wire = p.client.poll_transmit().unwrap().to_vec();
    p.client.consume_transmit(wire.len());
    let last = wire.len() - 1;
    wire[last] ^= 0xff;
    p.server_rx.extend_from_slice(&wire);
    p.drive();
    match &p.outcomes[..] {
        [
            Outcome::Error {
                id: 1,
                code,
                message,
            },
        ] => {
            assert_eq!(*code, ErrorCode::CHECKSUM_MISMATCH);
            assert!(message.contains("CRC"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let id = p.send(&Request::HealthCheck);
    p.drive();
    assert_eq!(p.completed_ids(), [1, id]);
}

#[test]
fn broker_error_replies_reach_the_client_as_responses() {
    let mut p = idle();
    let id = p.send(&Request::ListTopics);
    p.drive();
    assert_eq!(
        p.outcomes,
        [Outcome::Error {
            id,
            code: ErrorCode::INVALID_REQUEST,
            message: format!("request {id} not supported here"),
        }]
    );
}

#[test]
fn server_blocks_at_its_pipelining_limit_and_resumes() {
    let mut sc = ServerConfig::default();
    sc.max_in_flight(3);
    let mut p = Pair::with(ClientConfig::default(), sc, 4096);
    p.policy = Policy::Hold;
    for i in 0..6 {
        p.send(&request(i));
    }
    p.drive();
    assert_eq!(p.held.len(), 3, "stopped reading at the limit");
    assert_eq!(
        p.server.poll_request(p.now, &p.server_rx),
        ServerEvent::Blocked
    );
    p.release(&[2]);
    p.drive();
    assert_eq!(p.held.len(), 3, "one more read after one reply");
    p.policy = Policy::Immediately;
    p.release_all();
    p.drive();
    assert_eq!(p.outcomes.len(), 6);
}

#[test]
fn poisoned_client_refuses_everything() {
    let mut p = poisoned();
    let err = Err(ClientError::Peer(PeerError::UnknownResponse {
        request_id: 99,
    }));
    assert_eq!(
        p.client
            .send_request(p.now, &Request::HealthCheck)
            .map(|_| ()),
        err
    );
    assert_eq!(p.client.handle_input(p.now, &[0]).map(|_| ()), err);
    assert_eq!(p.client.poll_event(), None);
    assert!(p.client.error().unwrap().is_fatal());
}

fn health_reply(id: u64) -> Vec<u8> {
    let mut tx = vec![0u8; 64];
    let n = encode_response(
        id,
        &Response::HealthCheck(HealthCheckResponse {
            status: "healthy".into(),
            uptime_secs: 1,
        }),
        &mut tx,
    )
    .unwrap();
    tx.truncate(n);
    tx
}

#[test]
fn client_peer_faults_poison() {
    // Bad CRC.
    let mut p = with_held(1);
    let mut r = health_reply(1);
    let last = r.len() - 1;
    r[last] ^= 1;
    assert!(matches!(
        p.client.handle_input(p.now, &r),
        Err(ClientError::Peer(PeerError::Decode(
            streambus_core::DecodeError::ChecksumMismatch { .. }
        )))
    ));
    // A reply whose payload doesn't fit the request's type (health reply to a produce): the
    // frame is intact, so it is found out where it is decoded (once), when handed out.
    let mut p = with_held(2);
    let r = health_reply(2);
    assert_eq!(p.client.handle_input(p.now, &r), Ok(r.len()));
    assert_eq!(p.client.poll_event(), None);
    assert!(matches!(
        p.client.error(),
        Some(ClientError::Peer(PeerError::Decode(_)))
    ));
    assert!(matches!(
        p.client.handle_input(p.now, &r),
        Err(ClientError::Peer(PeerError::Decode(_)))
    ));
    // The same id answered twice.
    let mut p = with_held(1);
    let mut r = health_reply(1);
    r.extend_from_slice(&health_reply(1));
    assert_eq!(
        p.client.handle_input(p.now, &r),
        Err(ClientError::Peer(PeerError::UnknownResponse {
            request_id: 1
        }))
    );
    // Length below the minimum.
    let mut p = with_held(1);
    assert!(matches!(
        p.client.handle_input(p.now, &[0, 0, 0, 14]),
        Err(ClientError::Peer(PeerError::Decode(
            streambus_core::DecodeError::FrameTooShort { .. }
        )))
    ));
}

#[test]
fn response_larger_than_the_receive_buffer_is_fatal() {
    let mut p = Pair::with(ClientConfig::default(), ServerConfig::default(), 64);
    p.send(&request(2)); // a fetch: 3 messages, > 64 bytes
    p.drive();
    assert!(matches!(
        p.client.error(),
        Some(ClientError::ResponseTooLarge { capacity: 64, .. })
    ));
}

#[test]
fn request_that_does_not_fit_the_transmit_buffer_changes_nothing() {
    let mut c: ClientConnection<Vec<u8>, 2> =
        ClientConnection::new(ClientConfig::default(), vec![0; 30], vec![0; 64]);
    assert_eq!(c.send_request(T0, &Request::HealthCheck), Ok(1));
    let fetch = request(2);
    assert_eq!(
        c.send_request(T0, &fetch),
        Err(ClientError::BufferTooSmall { required: 47 })
    );
    assert_eq!(c.in_flight(), 1);
    assert_eq!(c.poll_transmit().map(<[u8]>::len), Some(20));
    // Partly written: the rest moves to the front and the next frame fits.
    c.consume_transmit(15);
    assert_eq!(c.send_request(T0, &Request::HealthCheck), Ok(2));
    assert_eq!(c.poll_transmit().map(<[u8]>::len), Some(25));
}

#[test]
fn server_closes_a_silent_half_frame_at_the_read_timeout() {
    let mut p = idle();
    p.server_rx.extend_from_slice(&[0, 0, 0, 16, 0, 0]);
    p.serve();
    let at = p.advance_to_next_timeout();
    assert_eq!(at, T0 + Duration::from_secs(30));
    assert!(p.closed_by_server);
}

#[test]
fn client_state_is_small() {
    let size = size_of::<ClientConnection<&mut [u8], 4>>();
    assert!(
        size <= 512,
        "ClientConnection<&mut [u8], 4> is {size} bytes"
    );
    let size = size_of::<ServerConnection>();
    assert!(size <= 128, "ServerConnection is {size} bytes");
}

/// The client sends an Authenticate (§6.3) through its connection; the server reads the same
/// mechanism and credential, and the client decodes the principal it answers.
#[test]
fn authenticate_round_trips_between_client_and_server() {
    use streambus_core::{AuthenticateRequest, AuthenticateResponse, Text};
    let mut p = Pair::new();
    let token = [0x5a_u8; 32];
    let id = p.send(&Request::Authenticate(AuthenticateRequest::token(&token)));
    let bytes = p.client.poll_transmit().unwrap().to_vec();
    p.client.consume_transmit(bytes.len());
    let ServerEvent::Request {
        request_id,
        request: Request::Authenticate(a),
        ..
    } = p.server.poll_request(p.now, &bytes)
    else {
        panic!("not an Authenticate");
    };
    assert_eq!(request_id, id);
    assert_eq!((a.mechanism, a.credential), (Text(b"token"), &token[..]));
    let mut tx = [0u8; 64];
    let reply = Response::Authenticate(AuthenticateResponse {
        principal: Text(b"sensor-7"),
    });
    let n = p.server.respond(id, &reply, &mut tx).unwrap();
    assert_eq!(p.client.handle_input(p.now, &tx[..n]), Ok(n));
    match p.client.poll_event() {
        Some(ClientEvent::Response {
            request_id,
            response: Response::Authenticate(r),
            ..
        }) => assert_eq!((request_id, r.principal), (id, Text(b"sensor-7"))),
        other => panic!("{other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any chunking of both directions, any answer order: same outcomes.
    #[test]
    fn any_chunking_and_order(
        chunk in 1usize..80,
        k in 1usize..=N,
        seed in any::<u64>(),
        rx_len in 140usize..600,
    ) {
        // Small receive buffers force compaction between frames.
        let mut p = Pair::with(ClientConfig::default(), ServerConfig::default(), rx_len);
        p.chunk = chunk;
        p.policy = Policy::Hold;
        for i in 0..k {
            p.send(&request(i));
        }
        p.drive();
        let mut order: Vec<u64> = (1..=k as u64).collect();
        let mut s = seed;
        for i in (1..order.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            order.swap(i, (s >> 33) as usize % (i + 1));
        }
        p.release(&order);
        p.drive();
        prop_assert_eq!(p.completed_ids(), order.clone());
        for o in &p.outcomes {
            let id = o.id();
            prop_assert_eq!(o.clone(), expected(id as usize - 1, id));
        }
    }
}
