//! Authentication and per-topic permissions (§6.3) end to end over real sockets, on each
//! runtime: unauthenticated requests, wrong tokens and the third-failure close, the permission
//! matrix, ListTopics' filter, the authentication deadline, and a broker without `--auth-file`.

use std::time::{Duration, Instant};

use streambus_core::{
    AuthenticateRequest, CreateTopicRequest, DeleteTopicRequest, ErrorCode, GetOffsetRequest,
    Request, RequestType, Response, Text, Topic,
};
use streambus_server::RuntimeKind;
use streambus_server::auth::token_sha256_hex;
use streambus_tests::{RawClient, broker_config, fetch, produce};

const RUNTIMES: [RuntimeKind; 3] = [RuntimeKind::Tokio, RuntimeKind::Smol, RuntimeKind::Blocking];

const ROOT: &str = "root-token-0000000000000000000000000000000000000000000000000000000";
const EXACT: &str = "exact-token-000000000000000000000000000000000000000000000000000000";
const PREFIX: &str = "prefix-token-00000000000000000000000000000000000000000000000000000";

/// The auth file of these tests: `root` may do everything; `exact` holds each permission on
/// one topic name; `prefix` on one prefix.
fn auth_file() -> String {
    format!(
        "[principals]\n\
         root = {{ token_sha256 = \"{}\", produce = [\"*\"], consume = [\"*\"], admin = [\"*\"] }}\n\
         exact = {{ token_sha256 = \"{}\", produce = [\"p\"], consume = [\"c\"], admin = [\"a\"] }}\n\
         prefix = {{ token_sha256 = \"{}\", produce = [\"p.*\"], consume = [\"c.*\"], admin = [\"a.*\"] }}\n",
        token_sha256_hex(ROOT),
        token_sha256_hex(EXACT),
        token_sha256_hex(PREFIX),
    )
}

struct Secured {
    running: streambus_server::Running,
    _dir: tempfile::TempDir,
}

/// A broker with [`auth_file`] and the given read timeout.
fn start(rt: RuntimeKind, read_timeout: Duration) -> Secured {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.toml");
    std::fs::write(&path, auth_file()).unwrap();
    let mut c = broker_config(&dir.path().join("data"), rt);
    c.auth_file = Some(path);
    c.read_timeout = read_timeout;
    Secured {
        running: streambus_server::start(c).expect("broker starts"),
        _dir: dir,
    }
}

fn topic(s: &str) -> Topic<'_> {
    Topic::new(s).unwrap()
}

fn authenticate(c: &mut RawClient, token: &str) -> streambus_tests::Reply {
    c.call(&Request::Authenticate(AuthenticateRequest::token(
        token.as_bytes(),
    )))
    .unwrap()
}

/// The error code and message of a reply (code 0 and "" on success).
fn outcome(r: &streambus_tests::Reply, ty: RequestType) -> (ErrorCode, String) {
    match r.parse(ty).unwrap() {
        Response::Error(e) => (e.code, e.message.to_string()),
        _ => (ErrorCode::NONE, String::new()),
    }
}

fn logged_in(addr: std::net::SocketAddr, token: &str) -> RawClient {
    let mut c = RawClient::connect(addr).unwrap();
    let r = authenticate(&mut c, token);
    assert_eq!(
        r.error_code(),
        0,
        "{:?}",
        outcome(&r, RequestType::Authenticate)
    );
    c
}

#[test]
fn unauthenticated_requests_get_40_and_the_connection_stays_usable() {
    for rt in RUNTIMES {
        let b = start(rt, Duration::from_secs(30));
        let mut c = RawClient::connect(b.running.addr()).unwrap();
        // HealthCheck needs no principal.
        let r = c.call(&Request::HealthCheck).unwrap();
        assert_eq!(r.error_code(), 0, "{rt:?}");
        for (r, ty) in [
            (
                produce(&mut c, "p", 0, &[b"v"]).unwrap(),
                RequestType::Produce,
            ),
            (fetch(&mut c, "c", 0, 0, 1024).unwrap(), RequestType::Fetch),
            (
                c.call(&Request::ListTopics).unwrap(),
                RequestType::ListTopics,
            ),
        ] {
            let (code, message) = outcome(&r, ty);
            assert_eq!(code, ErrorCode::AUTHENTICATION_FAILED, "{rt:?} {ty:?}");
            assert!(message.starts_with("authentication required"), "{message}");
        }
        // The same connection authenticates and is served.
        let r = authenticate(&mut c, ROOT);
        let Response::Authenticate(a) = r.parse(RequestType::Authenticate).unwrap() else {
            panic!("{rt:?}: {:?}", outcome(&r, RequestType::Authenticate));
        };
        assert_eq!(a.principal, Text(b"root"));
        let r = produce(&mut c, "p", 0, &[b"v"]).unwrap();
        assert_eq!(
            outcome(&r, RequestType::Produce).0,
            ErrorCode::NONE,
            "{rt:?}"
        );
    }
}

#[test]
fn wrong_token_gets_40_and_the_third_in_a_row_closes_the_connection() {
    for rt in RUNTIMES {
        let b = start(rt, Duration::from_secs(30));
        let mut c = RawClient::connect(b.running.addr()).unwrap();
        let wrong = "not-a-token-of-this-broker";
        // Two failures, then a success: the run restarts.
        for _ in 0..2 {
            let (code, message) = outcome(&authenticate(&mut c, wrong), RequestType::Authenticate);
            assert_eq!(code, ErrorCode::AUTHENTICATION_FAILED, "{rt:?}");
            assert!(message.contains("supported mechanisms: token"), "{message}");
            assert!(!message.contains(wrong), "the credential echoed: {message}");
        }
        assert_eq!(authenticate(&mut c, EXACT).error_code(), 0, "{rt:?}");
        // An unknown mechanism counts as a failure too.
        let r = c
            .call(&Request::Authenticate(AuthenticateRequest {
                mechanism: Text(b"scram"),
                credential: ROOT.as_bytes(),
            }))
            .unwrap();
        let (code, message) = outcome(&r, RequestType::Authenticate);
        assert_eq!(code, ErrorCode::AUTHENTICATION_FAILED);
        assert!(message.contains("mechanism is not supported"), "{message}");
        assert_eq!(
            outcome(&authenticate(&mut c, wrong), RequestType::Authenticate).0,
            ErrorCode::AUTHENTICATION_FAILED
        );
        // The third failure in a row is answered, then the connection closes: a request
        // pipelined behind it is not answered.
        let (id, third) = c.encode(&Request::Authenticate(AuthenticateRequest::token(
            wrong.as_bytes(),
        )));
        let (_, health) = c.encode(&Request::HealthCheck);
        c.send_raw(&[third, health].concat()).unwrap();
        let r = c.recv().unwrap();
        assert_eq!(r.request_id(), id);
        let (code, message) = outcome(&r, RequestType::Authenticate);
        assert_eq!(code, ErrorCode::AUTHENTICATION_FAILED, "{rt:?}");
        assert!(message.contains("closing the connection"), "{message}");
        assert!(c.is_closed_by_peer(), "{rt:?}: still open after 3 failures");
    }
}

#[test]
fn a_connection_not_authenticated_within_the_read_timeout_is_closed() {
    for rt in RUNTIMES {
        let b = start(rt, Duration::from_millis(300));
        let started = Instant::now();
        let mut idle = RawClient::connect(b.running.addr()).unwrap();
        // Busy but unauthenticated: a HealthCheck does not keep it open.
        assert_eq!(idle.call(&Request::HealthCheck).unwrap().error_code(), 0);
        let mut authed = logged_in(b.running.addr(), ROOT);
        assert!(idle.is_closed_by_peer(), "{rt:?}: not closed");
        assert!(started.elapsed() >= Duration::from_millis(300));
        // The authenticated one stays open past the deadline.
        assert_eq!(authed.call(&Request::HealthCheck).unwrap().error_code(), 0);
    }
}

/// Which code each (principal, request) gets: the permission matrix over produce, consume and
/// admin, allowed and denied, by exact name and by prefix.
#[test]
fn permission_matrix_answers_41_exactly_where_a_permission_is_missing() {
    let create = |name: &'static str| {
        Request::CreateTopic(CreateTopicRequest {
            topic: Topic::new(name).unwrap(),
            num_partitions: 1,
            replication_factor: 1,
        })
    };
    for rt in RUNTIMES {
        let b = start(rt, Duration::from_secs(30));
        let addr = b.running.addr();
        let mut root = logged_in(addr, ROOT);
        for t in ["p", "c", "a", "p.x", "c.x", "a.x", "other", "px"] {
            assert_eq!(root.call(&create(t)).unwrap().error_code(), 0, "{t}");
        }
        let deny = ErrorCode::AUTHORIZATION_FAILED;
        let ok = ErrorCode::NONE;
        for (token, allowed) in [(EXACT, ["p", "c", "a"]), (PREFIX, ["p.x", "c.x", "a.x"])] {
            let [p, cn, a] = allowed;
            let mut c = logged_in(addr, token);
            // produce: only on its produce topic.
            for (t, want) in [
                (p, ok),
                (cn, deny),
                (a, deny),
                ("other", deny),
                ("px", deny),
            ] {
                let r = produce(&mut c, t, 0, &[b"v"]).unwrap();
                let (code, message) = outcome(&r, RequestType::Produce);
                assert_eq!(code, want, "{rt:?} {token} produce {t}: {message}");
                if code == deny {
                    assert!(
                        message.contains("lacks the produce permission"),
                        "{message}"
                    );
                }
            }
            // consume: Fetch and GetOffset only on its consume topic (admin may describe).
            for (t, want) in [(cn, ok), (p, deny), ("other", deny)] {
                let r = fetch(&mut c, t, 0, 0, 1024).unwrap();
                assert_eq!(outcome(&r, RequestType::Fetch).0, want, "{rt:?} fetch {t}");
                let r = c
                    .call(&Request::GetOffset(GetOffsetRequest {
                        topic: topic(t),
                        partition: 0,
                    }))
                    .unwrap();
                assert_eq!(
                    outcome(&r, RequestType::GetOffset).0,
                    want,
                    "{rt:?} offsets {t}"
                );
            }
            // admin: create and delete only on its admin topic.
            for (t, want) in [(a, ok), (p, deny), (cn, deny), ("other", deny)] {
                let r = c.call(&create(t)).unwrap();
                assert_eq!(
                    outcome(&r, RequestType::CreateTopic).0,
                    want,
                    "{rt:?} create {t}"
                );
            }
            let r = c
                .call(&Request::DeleteTopic(DeleteTopicRequest {
                    topic: topic(p),
                }))
                .unwrap();
            assert_eq!(
                outcome(&r, RequestType::DeleteTopic).0,
                deny,
                "{rt:?} delete {p}"
            );
            let r = c
                .call(&Request::DeleteTopic(DeleteTopicRequest {
                    topic: topic(a),
                }))
                .unwrap();
            assert_eq!(
                outcome(&r, RequestType::DeleteTopic).0,
                ok,
                "{rt:?} delete {a}"
            );
            assert_eq!(root.call(&create(a)).unwrap().error_code(), 0);
            // ListTopics shows exactly the topics it holds a permission on.
            let r = c.call(&Request::ListTopics).unwrap();
            let Response::ListTopics(l) = r.parse(RequestType::ListTopics).unwrap() else {
                panic!("{rt:?}: list refused");
            };
            let names: Vec<&str> = l.topics.iter().map(|t| t.name.as_str()).collect();
            let mut want = allowed.to_vec();
            want.sort_unstable();
            assert_eq!(names, want, "{rt:?} {token}");
            // The connection is still usable after every refusal.
            assert_eq!(c.call(&Request::HealthCheck).unwrap().error_code(), 0);
        }
        // Root sees everything.
        let r = root.call(&Request::ListTopics).unwrap();
        let Response::ListTopics(l) = r.parse(RequestType::ListTopics).unwrap() else {
            panic!("list refused");
        };
        assert_eq!(l.topics.len(), 8);
    }
}

#[test]
fn without_an_auth_file_authenticate_gets_40_not_enabled_and_the_connection_stays_open() {
    for rt in RUNTIMES {
        let dir = tempfile::tempdir().unwrap();
        let b = streambus_tests::start_broker(dir.path(), rt);
        let mut c = RawClient::connect(b.addr()).unwrap();
        // Any number of them: the three-failures rule is for brokers with authentication.
        for _ in 0..4 {
            let (code, message) = outcome(&authenticate(&mut c, ROOT), RequestType::Authenticate);
            assert_eq!(code, ErrorCode::AUTHENTICATION_FAILED, "{rt:?}");
            assert_eq!(message, "authentication is not enabled on this broker");
        }
        let r = produce(&mut c, "t", 0, &[b"v"]).unwrap();
        assert_eq!(
            outcome(&r, RequestType::Produce).0,
            ErrorCode::NONE,
            "{rt:?}"
        );
    }
}
