//! [`Connection`]: what a handler keeps for one connection, and asks of it.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// One connection as the [`Handler`](crate::Handler) sees it, reached through
/// [`Reply::connection`](crate::Reply::connection): the principal it authenticated as (§6.3 of
/// the protocol; set by the handler on a successful `Authenticate`, or by a transport that
/// authenticated the peer itself), the run of failed authentications, and a request to close.
///
/// The connection hands its requests to the handler in the order they arrived and waits for
/// each [`handle`](crate::Handler::handle) call to return before decoding the next, so a
/// principal set while handling one request applies to every request after it.
#[derive(Debug, Default)]
pub struct Connection {
    principal: Mutex<Option<Arc<str>>>,
    authenticated: AtomicBool,
    failures: AtomicU8,
    close: AtomicBool,
}

impl Connection {
    /// A connection nobody has authenticated yet.
    pub const fn new() -> Self {
        Self {
            principal: Mutex::new(None),
            authenticated: AtomicBool::new(false),
            failures: AtomicU8::new(0),
            close: AtomicBool::new(false),
        }
    }

    /// The principal the connection speaks for, once authenticated.
    pub fn principal(&self) -> Option<Arc<str>> {
        self.principal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The connection authenticated as `principal` (replacing any earlier one): its run of
    /// failed authentications ends, and a server requiring authentication
    /// ([`ServerConfig::require_authentication`](streambus_core::ServerConfig)) keeps it open.
    pub fn set_principal(&self, principal: Arc<str>) {
        *self
            .principal
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(principal);
        self.failures.store(0, Ordering::Relaxed);
        self.authenticated.store(true, Ordering::Release);
    }

    /// Whether a principal was ever set.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Acquire)
    }

    /// Records a failed authentication and returns how many failed in a row (saturating).
    /// A failure does not forget the principal set before.
    pub fn authentication_failed(&self) -> u8 {
        let before = self
            .failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(1))
            })
            .unwrap_or(u8::MAX);
        before.saturating_add(1)
    }

    /// Asks the connection to close once the replies handed out so far are written: it hands
    /// out no further request.
    pub fn close(&self) {
        self.close.store(true, Ordering::Release);
    }

    /// Whether [`close`](Self::close) was asked.
    pub(crate) fn close_requested(&self) -> bool {
        self.close.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_count_in_a_row_until_a_principal_is_set() {
        let c = Connection::new();
        assert_eq!(c.principal(), None);
        assert_eq!(c.authentication_failed(), 1);
        assert_eq!(c.authentication_failed(), 2);
        c.set_principal("alice".into());
        assert!(c.is_authenticated());
        assert_eq!(c.principal().as_deref(), Some("alice"));
        assert_eq!(c.authentication_failed(), 1);
        assert_eq!(c.principal().as_deref(), Some("alice"));
    }
}
