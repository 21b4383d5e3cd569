//! The one error type of the SDK.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use streambus_adapters::tls::rustls;
pub use streambus_core::ErrorCode;

/// What a failed call was doing, and to which topic and partition: printed by [`Error`]'s
/// `Display`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Context {
    /// The operation (`"produce"`, `"fetch"`, `"create topic"`, `"connect"`, …).
    pub operation: &'static str,
    /// The topic, when the operation names one.
    pub topic: Option<Arc<str>>,
    /// The partition, when the operation names one.
    pub partition: Option<u32>,
}

impl Context {
    pub(crate) fn new(operation: &'static str) -> Self {
        Self {
            operation,
            topic: None,
            partition: None,
        }
    }

    pub(crate) fn topic(mut self, topic: impl Into<Arc<str>>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    pub(crate) fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.operation.is_empty() {
            "request"
        } else {
            self.operation
        })?;
        match (&self.topic, self.partition) {
            (Some(t), Some(p)) => write!(f, " on topic {t:?} partition {p}"),
            (Some(t), None) => write!(f, " on topic {t:?}"),
            (None, _) => Ok(()),
        }
    }
}

/// Everything a call of this crate can fail with.
///
/// Split by who is at fault: the network ([`Io`](Self::Io), [`TimedOut`](Self::TimedOut)),
/// the broker's answer ([`Broker`](Self::Broker)), a broker breaking the protocol
/// ([`Protocol`](Self::Protocol)), or the caller ([`Config`](Self::Config),
/// [`InvalidInput`](Self::InvalidInput), [`Closed`](Self::Closed)). A broker's error reply is
/// always an `Err`, never a successful value. [`is_retriable`](Self::is_retriable) says which
/// are safe to try again.
///
/// `Error` is `Clone` (one failed batch fails each of its records with the same error); the
/// I/O source is shared behind an `Arc`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection failed: dialling, reading, writing, or the broker closed it.
    #[error("{context}: I/O error: {source}")]
    Io {
        /// What was being done.
        context: Context,
        /// The transport's error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// No answer within the timeout (connect, request, delivery or waiting for capacity).
    #[error("{context}: timed out after {after:?} {waiting}")]
    TimedOut {
        /// What was being done.
        context: Context,
        /// Which timeout ran out.
        waiting: &'static str,
        /// The timeout.
        after: Duration,
    },
    /// The broker answered with an error code.
    #[error("{context}: the broker answered {} ({}): {message}", code_name(*.code), .code.0)]
    Broker {
        /// What was being done.
        context: Context,
        /// The broker's error code (protocol §5).
        code: ErrorCode,
        /// The broker's message.
        message: String,
    },
    /// The broker broke the protocol (bad frame, CRC, unexpected reply); the connection was
    /// dropped.
    #[error("{context}: protocol violation by the broker: {source}")]
    Protocol {
        /// What was being done.
        context: Context,
        /// The core's description.
        #[source]
        source: ProtocolError,
    },
    /// TLS failed: the handshake (a broker certificate not trusted or not for this name), or
    /// the broker refused ours (an alert: no client certificate where one is required, one it
    /// does not trust). Not retriable: the same settings fail the same way.
    #[error("{context}: TLS: {source}")]
    Tls {
        /// What was being done.
        context: Context,
        /// rustls's description.
        #[source]
        source: rustls::Error,
    },
    /// A setting is invalid; nothing was sent.
    #[error("invalid setting {setting}: {reason}")]
    Config {
        /// The setting.
        setting: &'static str,
        /// Why.
        reason: String,
    },
    /// An argument is invalid (empty or bad topic name, partition out of range, a record too
    /// large); nothing was sent.
    #[error("{context}: invalid input: {reason}")]
    InvalidInput {
        /// What was being done.
        context: Context,
        /// Why.
        reason: String,
    },
    /// No broker of a bootstrap list answered
    /// ([`ClientBuilder::connect_bootstrap`](crate::ClientBuilder::connect_bootstrap) with
    /// several addresses): each address, in the order tried, with its error. Its `source()` is
    /// the last one's. Retriable when every attempt's error is.
    #[error("connect: no broker of the bootstrap list answered: {}", list_attempts(.attempts))]
    Unreachable {
        /// Each address tried and why it failed.
        attempts: Vec<(String, Error)>,
        /// The last attempt's error.
        #[source]
        last: Box<Error>,
    },
    /// The client, producer or consumer was closed.
    #[error("{context}: the {what} is closed")]
    Closed {
        /// What was being done.
        context: Context,
        /// What is closed.
        what: &'static str,
    },
}

/// A protocol violation by the broker, as the core saw it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The core's connection refused the broker's bytes.
    #[error("{}", core_detail(.0))]
    Core(#[from] streambus_core::ClientError),
    /// A reply that does not fit the request (wrong type, wrong count).
    #[error("{0}")]
    Unexpected(String),
}

/// What the core said, without its own "protocol violation by the broker" prefix: the
/// [`Error::Protocol`] around it says so already.
fn core_detail(e: &streambus_core::ClientError) -> String {
    match e {
        streambus_core::ClientError::Peer(p) => p.to_string(),
        other => other.to_string(),
    }
}

fn list_attempts(attempts: &[(String, Error)]) -> String {
    let mut out = String::new();
    for (i, (addr, e)) in attempts.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        out.push_str(addr);
        out.push_str(" (");
        // The attempt's own "connect: " is said once, up front.
        let e = e.to_string();
        out.push_str(e.strip_prefix("connect: ").unwrap_or(&e));
        out.push(')');
    }
    out
}

fn code_name(code: ErrorCode) -> &'static str {
    code.name().unwrap_or("unknown error code")
}

/// The longest duration a setting takes: 365 days. Deadlines are computed by adding settings
/// to the clock (some two at a time), and a longer one would run past the clock's range.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Broker codes that a retry may cure: RequestTimeout, StorageError, ChecksumMismatch (the
/// frame was damaged in transit) and NotLeader.
const RETRIABLE_CODES: [u16; 4] = [6, 7, 10, 15];

/// [`Error::TimedOut`]'s `waiting` while dialling.
pub(crate) const WAITING_CONNECT: &str = "connecting";
/// [`Error::TimedOut`]'s `waiting` while no connection of the pool was free or up.
pub(crate) const WAITING_CONNECTION: &str = "waiting for a connection to the broker";
/// [`Error::TimedOut`]'s `waiting` for a request sent and not answered.
pub(crate) const WAITING_ANSWER: &str = "waiting for the broker's answer";
/// [`Error::TimedOut`]'s `waiting` for a request held until the connection had written the
/// requests queued before it (never sent).
pub(crate) const WAITING_WRITE: &str =
    "waiting for the connection to write the requests queued before it";

impl Error {
    /// Whether trying the same call again may succeed: I/O errors, timeouts, and the broker
    /// codes RequestTimeout (6), StorageError (7), ChecksumMismatch (10) and NotLeader (15).
    ///
    /// A retried plain produce may append twice (the first attempt may have landed before its
    /// answer was lost); the [`Producer`](crate::Producer) is idempotent by default, so its
    /// retries land once.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Io { .. } | Self::TimedOut { .. } => true,
            Self::Broker { code, .. } => RETRIABLE_CODES.contains(&code.0),
            Self::Unreachable { attempts, .. } => attempts.iter().all(|(_, e)| e.is_retriable()),
            _ => false,
        }
    }

    /// Whether the request was certainly not sent: the broker refused the connection (or
    /// closed it before any request went out on it), or connecting (or waiting for a
    /// connection, or for the connection to write the requests queued before it) timed out.
    /// Such a call may go to another
    /// broker even when sending it twice would not be safe.
    pub(crate) fn never_sent(&self) -> bool {
        match self {
            Self::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotConnected
            ),
            Self::TimedOut { waiting, .. } => {
                *waiting == WAITING_CONNECT
                    || *waiting == WAITING_CONNECTION
                    || *waiting == WAITING_WRITE
            }
            _ => false,
        }
    }

    /// Whether the broker did not answer or could not be reached: an I/O error, or a timeout
    /// dialling it, writing to it or waiting for its answer (a dead or hung broker). Not a
    /// timeout waiting for room on this side (a saturated client or pool, a full buffer),
    /// which says nothing about the broker.
    pub(crate) fn broker_silent(&self) -> bool {
        match self {
            Self::Io { .. } => true,
            Self::TimedOut { waiting, .. } => {
                *waiting == WAITING_CONNECT
                    || *waiting == WAITING_WRITE
                    || *waiting == WAITING_ANSWER
            }
            _ => false,
        }
    }

    /// The broker's error code, when the broker answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// What the failed call was doing (absent for [`Config`](Self::Config)).
    pub fn context(&self) -> Option<&Context> {
        match self {
            Self::Io { context, .. }
            | Self::TimedOut { context, .. }
            | Self::Broker { context, .. }
            | Self::Protocol { context, .. }
            | Self::Tls { context, .. }
            | Self::InvalidInput { context, .. }
            | Self::Closed { context, .. } => Some(context),
            Self::Config { .. } | Self::Unreachable { .. } => None,
        }
    }

    /// An I/O error, or [`Tls`](Self::Tls) when rustls is what failed.
    pub(crate) fn io(context: Context, e: std::io::Error) -> Self {
        if let Some(source) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Self::Tls {
                context,
                source: source.clone(),
            };
        }
        Self::Io {
            context,
            source: Arc::new(e),
        }
    }

    /// Whether `e` is rustls refusing the connection.
    pub(crate) fn is_tls(e: &std::io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
    }

    pub(crate) fn closed_by_peer(context: Context) -> Self {
        Self::io(
            context,
            std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the connection to the broker closed",
            ),
        )
    }

    /// An [`Io`](Self::Io) error of kind `NotConnected`: the broker closed the connection
    /// before any request went out on it (after `why`, the error its task ended with, when
    /// known). Such a request was certainly not sent.
    pub(crate) fn closed_unused(context: Context, why: Option<&Error>) -> Self {
        Self::unsent(
            context,
            "the broker closed the connection before any request was sent on it",
            why,
        )
    }

    /// An [`Io`](Self::Io) error of kind `NotConnected`: the connection closed (after `why`)
    /// before this request was written to it. It was certainly not sent.
    pub(crate) fn closed_before_sent(context: Context, why: Option<&Error>) -> Self {
        Self::unsent(
            context,
            "the connection closed before the request was sent",
            why,
        )
    }

    fn unsent(context: Context, what: &str, why: Option<&Error>) -> Self {
        let message = match why {
            Some(e) => format!("{what} ({e})"),
            None => what.to_owned(),
        };
        Self::io(
            context,
            std::io::Error::new(std::io::ErrorKind::NotConnected, message),
        )
    }

    /// [`Unreachable`](Self::Unreachable) from the bootstrap attempts (at least one).
    pub(crate) fn unreachable(attempts: Vec<(String, Error)>) -> Self {
        let last = attempts.last().map_or_else(
            || Self::config("addr", "no broker address given"),
            |(_, e)| e.clone(),
        );
        Self::Unreachable {
            attempts,
            last: Box::new(last),
        }
    }

    pub(crate) fn invalid(context: Context, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            context,
            reason: reason.into(),
        }
    }

    /// `Err` naming `setting` when duration `d` is longer than [`MAX_DURATION`].
    pub(crate) fn check_duration(setting: &'static str, d: Duration) -> Result<()> {
        if d > MAX_DURATION {
            return Err(Self::config(
                setting,
                format!("{d:?} is longer than the maximum of 365 days"),
            ));
        }
        Ok(())
    }

    pub(crate) fn config(setting: &'static str, reason: impl Into<String>) -> Self {
        Self::Config {
            setting,
            reason: reason.into(),
        }
    }

    /// The same error for another operation (the connection layer knows no topic; the caller
    /// adds it).
    pub(crate) fn with_context(mut self, new: &Context) -> Self {
        match &mut self {
            Self::Io { context, .. }
            | Self::TimedOut { context, .. }
            | Self::Broker { context, .. }
            | Self::Protocol { context, .. }
            | Self::Tls { context, .. }
            | Self::InvalidInput { context, .. }
            | Self::Closed { context, .. } => *context = new.clone(),
            Self::Config { .. } | Self::Unreachable { .. } => {}
        }
        self
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_the_operation_topic_partition_and_code() {
        let e = Error::Broker {
            context: Context::new("produce").topic("orders").partition(3),
            code: ErrorCode::TOPIC_NOT_FOUND,
            message: "topic orders does not exist".into(),
        };
        assert_eq!(
            e.to_string(),
            "produce on topic \"orders\" partition 3: the broker answered TopicNotFound (8): \
             topic orders does not exist"
        );
        assert!(!e.is_retriable());
        assert_eq!(e.code(), Some(ErrorCode::TOPIC_NOT_FOUND));
    }

    #[test]
    fn a_silent_broker_is_a_dead_or_hung_one_not_a_full_client() {
        let timed_out = |waiting| Error::TimedOut {
            context: Context::new("fetch"),
            waiting,
            after: Duration::from_secs(1),
        };
        let io = Error::io(
            Context::new("fetch"),
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"),
        );
        assert!(io.broker_silent());
        for waiting in [WAITING_ANSWER, WAITING_CONNECT, WAITING_WRITE] {
            assert!(timed_out(waiting).broker_silent(), "{waiting}");
        }
        // Waiting for room on this side says nothing about the broker.
        for waiting in [WAITING_CONNECTION, "waiting for a free connection slot"] {
            assert!(!timed_out(waiting).broker_silent(), "{waiting}");
        }
    }

    #[test]
    fn io_errors_chain_their_source_and_are_retriable() {
        use std::error::Error as _;
        let e = Error::io(
            Context::new("fetch").topic("t"),
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"),
        );
        assert!(e.is_retriable());
        assert_eq!(e.source().map(|s| s.to_string()).as_deref(), Some("reset"));
        assert_eq!(e.to_string(), "fetch on topic \"t\": I/O error: reset");
    }

    #[test]
    fn a_request_the_connection_never_carried_is_known_unsent_and_a_lost_one_is_not() {
        let reset = Error::io(
            Context::new("create topic"),
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"),
        );
        let refused = Error::closed_unused(Context::new("connect"), Some(&reset));
        assert_eq!(
            refused.to_string(),
            "connect: I/O error: the broker closed the connection before any request was sent \
             on it (create topic: I/O error: reset)"
        );
        let unsent = Error::closed_before_sent(Context::new("create topic"), None);
        assert_eq!(
            unsent.to_string(),
            "create topic: I/O error: the connection closed before the request was sent"
        );
        for e in [&refused, &unsent] {
            assert!(e.never_sent() && e.is_retriable(), "{e}");
        }
        assert!(!reset.never_sent());
        assert!(!Error::closed_by_peer(Context::new("create topic")).never_sent());
    }

    #[test]
    fn a_protocol_violation_is_said_once_and_chains_the_cores_error() {
        use std::error::Error as _;
        let core = streambus_core::ClientError::Peer(streambus_core::PeerError::UnknownResponse {
            request_id: 7,
        });
        let e = Error::Protocol {
            context: Context::new("fetch").topic("t"),
            source: ProtocolError::Core(core),
        };
        assert_eq!(
            e.to_string(),
            "fetch on topic \"t\": protocol violation by the broker: response to request 7, \
             which is not in flight"
        );
        let source = e.source().and_then(|s| s.source()).map(ToString::to_string);
        assert_eq!(
            source.as_deref(),
            Some("protocol violation by the broker: response to request 7, which is not in flight")
        );
    }

    #[test]
    fn retriable_broker_codes() {
        let mk = |c| Error::Broker {
            context: Context::new("produce"),
            code: ErrorCode(c),
            message: String::new(),
        };
        let retriable: Vec<u16> = (0..50).filter(|&c| mk(c).is_retriable()).collect();
        assert_eq!(retriable, vec![6, 7, 10, 15]);
        assert_eq!(
            mk(15).to_string(),
            "produce: the broker answered NotLeader (15): "
        );
    }
}
