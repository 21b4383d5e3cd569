//! Token authentication and per-topic permissions (§6.3 of the protocol): the `--auth-file`.
//!
//! The file is TOML with one `[principals]` table; each principal has the SHA-256 of its token
//! (never the token; a principal reached only by a TLS client certificate whose subject is its
//! name may have none) and the topics it may `produce` to, `consume` from, or `admin`ister
//! (create, delete, describe), each a list of patterns: an exact topic name, a prefix ending in
//! `*` (`logs.*`), or `*` for every topic:
//!
//! ```toml
//! [principals]
//! ingest = { token_sha256 = "9f86d081…", produce = ["orders", "logs.*"] }
//! reader = { token_sha256 = "60303ae2…", consume = ["*"] }
//! ops    = { token_sha256 = "fd61a03a…", admin = ["*"], consume = ["*"] }
//! ```
//!
//! Tokens are 256 bits from the OS's random source (`streambus auth new-token PRINCIPAL` makes
//! one and prints its line for this file); a presented token is hashed and compared with every
//! principal's hash in constant time. The file is read at
//! start (an invalid file stops the broker) and again on SIGHUP ([`Auth::reload`]: an invalid
//! file keeps the rules in force). No token, hash or credential ever reaches a log line, a
//! metric or an error message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use streambus_core::{MECHANISM_TOKEN, Request, Topic};
use subtle::ConstantTimeEq;

/// Why an auth file can't be used. Never carries a token or a hash.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The file can't be read.
    #[error("auth file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("auth file {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong (the TOML parser's message).
        reason: String,
    },
    /// A principal's entry is invalid.
    #[error("auth file {path}: principal {principal:?}: {reason}")]
    Principal {
        /// The file.
        path: PathBuf,
        /// The principal.
        principal: String,
        /// What is wrong.
        reason: String,
    },
}

/// What a request needs, as the permission names of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Permission {
    /// Produce to a topic.
    Produce,
    /// Fetch from a topic, read its offsets.
    Consume,
    /// Create, delete and describe topics.
    Admin,
}

impl Permission {
    /// The name used in the file and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Produce => "produce",
            Self::Consume => "consume",
            Self::Admin => "admin",
        }
    }
}

/// A topic pattern: an exact name, a prefix, or every topic.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(s: &str) -> Result<Self, String> {
        match s.strip_suffix('*') {
            Some("") => Ok(Self::Prefix(String::new())),
            Some(prefix) => {
                // A prefix is a name in the making: the same characters.
                Topic::new(prefix).map_err(|_| {
                    format!("{s:?} is not a topic name, a prefix ending in *, or *")
                })?;
                Ok(Self::Prefix(prefix.to_owned()))
            }
            None => {
                Topic::new(s).map_err(|_| {
                    format!("{s:?} is not a topic name, a prefix ending in *, or *")
                })?;
                Ok(Self::Exact(s.to_owned()))
            }
        }
    }

    fn matches(&self, topic: &str) -> bool {
        match self {
            Self::Exact(name) => name == topic,
            Self::Prefix(prefix) => topic.starts_with(prefix.as_str()),
        }
    }
}

/// One principal of the file.
#[derive(Debug)]
struct Principal {
    name: Arc<str>,
    /// `None`: reached only by a client certificate naming it.
    token_sha256: Option<[u8; 32]>,
    produce: Vec<Pattern>,
    consume: Vec<Pattern>,
    admin: Vec<Pattern>,
}

impl Principal {
    fn may(&self, permission: Permission, topic: &str) -> bool {
        let patterns = match permission {
            Permission::Produce => &self.produce,
            Permission::Consume => &self.consume,
            Permission::Admin => &self.admin,
        };
        patterns.iter().any(|p| p.matches(topic))
    }

    /// Whether the principal holds any permission on `topic` (ListTopics shows it).
    fn sees(&self, topic: &str) -> bool {
        [Permission::Produce, Permission::Consume, Permission::Admin]
            .into_iter()
            .any(|p| self.may(p, topic))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    principals: BTreeMap<String, EntryShape>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryShape {
    #[serde(default)]
    token_sha256: Option<String>,
    #[serde(default)]
    produce: Vec<String>,
    #[serde(default)]
    consume: Vec<String>,
    #[serde(default)]
    admin: Vec<String>,
}

/// The rules of one version of the auth file.
#[derive(Debug)]
pub struct Policy {
    principals: Vec<Principal>,
}

/// The SHA-256 of a token, as the file holds it (lowercase hex).
pub fn token_sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Policy {
    /// Parses and validates an auth file's text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, AuthError> {
        let shape: FileShape = toml::from_str(text).map_err(|e| AuthError::Parse {
            path: path.to_owned(),
            reason: e.message().to_owned(),
        })?;
        let mut principals: Vec<Principal> = Vec::with_capacity(shape.principals.len());
        for (name, entry) in shape.principals {
            let bad = |reason: String| AuthError::Principal {
                path: path.to_owned(),
                principal: name.clone(),
                reason,
            };
            if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
                return Err(bad(
                    "a principal's name is 1 to 255 bytes without control characters".into(),
                ));
            }
            let hash = match entry.token_sha256 {
                None => None,
                Some(text) => {
                    let mut hash = [0u8; 32];
                    hex::decode_to_slice(text.trim(), &mut hash).map_err(|_| {
                        bad("token_sha256 is not 64 hex digits (the SHA-256 of the token; see `streambus auth new-token`)".into())
                    })?;
                    if let Some(other) = principals
                        .iter()
                        .find(|p| p.token_sha256.is_some_and(|h| bool::from(h.ct_eq(&hash))))
                    {
                        return Err(bad(format!(
                            "has the same token as principal {:?}: every principal needs its own",
                            other.name
                        )));
                    }
                    Some(hash)
                }
            };
            let patterns = |list: Vec<String>, permission: &str| {
                list.iter()
                    .map(|p| Pattern::parse(p).map_err(|e| bad(format!("{permission}: {e}"))))
                    .collect::<Result<Vec<_>, _>>()
            };
            principals.push(Principal {
                produce: patterns(entry.produce, "produce")?,
                consume: patterns(entry.consume, "consume")?,
                admin: patterns(entry.admin, "admin")?,
                name: name.as_str().into(),
                token_sha256: hash,
            });
        }
        Ok(Self { principals })
    }

    /// Reads and validates an auth file.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// How many principals the file names.
    pub fn len(&self) -> usize {
        self.principals.len()
    }

    /// Whether the file names none.
    pub fn is_empty(&self) -> bool {
        self.principals.is_empty()
    }

    /// The principal whose token is `token`. Hashes it, then compares with every principal's
    /// hash in constant time, so the time taken says nothing about which one (if any) matched.
    /// A principal without a token (certificate only) never matches.
    pub fn authenticate(&self, token: &[u8]) -> Option<Arc<str>> {
        let presented: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for p in &self.principals {
            if p.token_sha256
                .is_some_and(|h| bool::from(h.ct_eq(&presented)))
            {
                found = Some(Arc::clone(&p.name));
            }
        }
        found
    }

    /// The principal of this name, if the file lists it (a verified TLS client certificate's
    /// subject names its principal this way).
    pub fn principal_named(&self, name: &str) -> Option<Arc<str>> {
        self.principal(name).map(|p| Arc::clone(&p.name))
    }

    fn principal(&self, name: &str) -> Option<&Principal> {
        self.principals.iter().find(|p| &*p.name == name)
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Not authenticated (40).
    Unauthenticated,
    /// The connection's principal is no longer in the file (40).
    UnknownPrincipal(Arc<str>),
    /// The principal lacks `permission` on `topic` (41).
    Denied {
        /// The principal.
        principal: Arc<str>,
        /// What it lacks.
        permission: Permission,
        /// On which topic.
        topic: String,
    },
}

/// What a request may touch, once allowed.
#[derive(Debug, Clone)]
pub enum Access {
    /// Everything (no authentication configured, or a request that names no topic).
    All,
    /// What this principal sees (ListTopics shows only these topics).
    Principal(Arc<Policy>, Arc<str>),
}

impl Access {
    /// Whether `topic` is visible.
    pub fn sees(&self, topic: &str) -> bool {
        match self {
            Self::All => true,
            Self::Principal(policy, name) => policy.principal(name).is_some_and(|p| p.sees(topic)),
        }
    }
}

/// The broker's authentication: the auth file's path and the rules in force.
#[derive(Debug)]
pub struct Auth {
    path: PathBuf,
    policy: RwLock<Arc<Policy>>,
}

impl Auth {
    /// Loads `path`.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let policy = Policy::load(path)?;
        Ok(Self {
            path: path.to_owned(),
            policy: RwLock::new(Arc::new(policy)),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The rules in force.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads the file again: valid, it replaces the rules for every request from now on;
    /// invalid, the rules in force stay and the error says why. Returns the principal count.
    pub fn reload(&self) -> Result<usize, AuthError> {
        let policy = Policy::load(&self.path)?;
        let n = policy.len();
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        Ok(n)
    }

    /// The mechanisms this broker accepts, for error messages.
    pub const MECHANISMS: &'static str = MECHANISM_TOKEN;

    /// Whether `principal` may make `request` (an authenticated connection's principal, or
    /// `None`). Authenticate and HealthCheck need no principal.
    pub fn check(
        &self,
        request: &Request<'_>,
        principal: Option<&Arc<str>>,
    ) -> Result<Access, Refusal> {
        if matches!(request, Request::HealthCheck | Request::Authenticate(_)) {
            return Ok(Access::All);
        }
        let Some(name) = principal else {
            return Err(Refusal::Unauthenticated);
        };
        let policy = self.policy();
        let Some(p) = policy.principal(name) else {
            return Err(Refusal::UnknownPrincipal(Arc::clone(name)));
        };
        let needs: &[Permission] = match request {
            Request::Produce(_) => &[Permission::Produce],
            Request::Fetch(_) => &[Permission::Consume],
            // Consumers read offsets; describing a topic is also an admin's.
            Request::GetOffset(_) => &[Permission::Consume, Permission::Admin],
            Request::CreateTopic(_) | Request::DeleteTopic(_) => &[Permission::Admin],
            _ => &[],
        };
        if let (Some(topic), Some(first)) = (request.topic(), needs.first()) {
            let topic = topic.as_str();
            if !needs.iter().any(|&n| p.may(n, topic)) {
                return Err(Refusal::Denied {
                    principal: Arc::clone(name),
                    permission: *first,
                    topic: topic.to_owned(),
                });
            }
        }
        let name = Arc::clone(name);
        Ok(Access::Principal(policy, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Result<Policy, AuthError> {
        Policy::parse(Path::new("auth.toml"), text)
    }

    #[test]
    fn a_token_authenticates_its_principal_only() {
        let text = format!(
            "[principals]\n\"CN=app one\" = {{ token_sha256 = \"{}\" }}\nb = {{ token_sha256 = \"{}\" }}\n",
            token_sha256_hex("t1"),
            token_sha256_hex("t2")
        );
        let p = policy(&text).unwrap();
        assert_eq!(p.authenticate(b"t1").as_deref(), Some("CN=app one"));
        assert_eq!(p.authenticate(b"t2").as_deref(), Some("b"));
        assert_eq!(p.authenticate(b"t3"), None);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn a_principal_without_a_token_is_reached_by_name_only() {
        let text = format!(
            "[principals]\n\"CN=device\" = {{ consume = [\"*\"] }}\nb = {{ token_sha256 = \"{}\" }}\n",
            token_sha256_hex("t2")
        );
        let p = policy(&text).unwrap();
        assert_eq!(p.principal_named("CN=device").as_deref(), Some("CN=device"));
        // No token reaches it, not even an empty one.
        assert_eq!(p.authenticate(b""), None);
        assert_eq!(p.authenticate(b"t2").as_deref(), Some("b"));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn patterns_exact_prefix_and_all() {
        let text = format!(
            "[principals]\na = {{ token_sha256 = \"{}\", produce = [\"orders\", \"logs.*\"], admin = [\"*\"] }}\n",
            token_sha256_hex("t")
        );
        let p = policy(&text).unwrap();
        let a = p.principal("a").unwrap();
        assert!(a.may(Permission::Produce, "orders"));
        assert!(!a.may(Permission::Produce, "orders2"));
        assert!(a.may(Permission::Produce, "logs.app"));
        assert!(!a.may(Permission::Produce, "logs"));
        assert!(!a.may(Permission::Consume, "orders"));
        assert!(a.may(Permission::Admin, "anything"));
    }

    #[test]
    fn invalid_files_say_what_and_never_the_hash() {
        let hash = token_sha256_hex("t");
        for (text, says) in [
            ("principals = 3".to_owned(), "invalid type"),
            (
                "[principals]\na = { token_sha256 = \"xyz\" }".to_owned(),
                "64 hex digits",
            ),
            (
                format!("[principals]\na = {{ token_sha256 = \"{hash}\", produce = [\"a/b\"] }}"),
                "produce: \"a/b\" is not a topic name",
            ),
            (
                format!("[principals]\na = {{ token_sha256 = \"{hash}\", read = [\"a\"] }}"),
                "unknown field",
            ),
            (
                format!(
                    "[principals]\na = {{ token_sha256 = \"{hash}\" }}\nb = {{ token_sha256 = \"{hash}\" }}"
                ),
                "same token as principal \"a\"",
            ),
        ] {
            let e = policy(&text).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(e.starts_with("auth file auth.toml"), "{e}");
            assert!(!e.contains(&hash), "{e}");
        }
    }
}
