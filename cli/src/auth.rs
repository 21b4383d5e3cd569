//! `streambus auth new-token PRINCIPAL`: a fresh token and its line for the broker's
//! `--auth-file`. Needs no broker.

use sha2::{Digest, Sha256};

use crate::{Failure, Outcome, write_out};

/// Bytes of randomness in a token: 256 bits.
const TOKEN_BYTES: usize = 32;

/// A fresh token: 256 bits from the OS's random source, as 64 lowercase hex digits.
fn new_token() -> Result<String, Failure> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes)
        .map_err(|e| Failure::runtime(format!("reading the OS's random source: {e}")))?;
    Ok(hex::encode(bytes))
}

/// The line for the `[principals]` table of the auth file: the principal with its token's
/// SHA-256 (never the token) and no permission yet.
fn file_line(principal: &str, token: &str) -> String {
    let bare = principal
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    let key = if bare {
        principal.to_owned()
    } else {
        // A TOML basic string: quotes and backslashes escaped (control characters are refused).
        format!(
            "\"{}\"",
            principal.replace('\\', "\\\\").replace('"', "\\\"")
        )
    };
    let hash = hex::encode(Sha256::digest(token.as_bytes()));
    format!("{key} = {{ token_sha256 = \"{hash}\", produce = [], consume = [], admin = [] }}")
}

/// Prints a new token (first line) and its auth-file line (second line) to stdout, and what to
/// do with them to stderr.
pub(crate) fn new_token_for(principal: &str) -> Outcome {
    if principal.is_empty() || principal.len() > 255 || principal.chars().any(char::is_control) {
        return Err(Failure {
            code: 2,
            message: format!(
                "invalid PRINCIPAL {principal:?}: 1 to 255 bytes without control characters"
            ),
        });
    }
    let token = new_token()?;
    let line = file_line(principal, &token);
    eprintln!(
        "Line 1 is the token: give it to {principal}'s clients (--token or STREAMBUS_TOKEN); it is \
         shown only now. Put line 2 under [principals] in the broker's --auth-file, fill in the \
         topics it may produce to, consume from or admin (names, prefixes like \"logs.*\", or \
         \"*\"), then send the broker SIGHUP."
    );
    write_out(format!("{token}\n{line}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_256_bit_hex() {
        let t = new_token().unwrap();
        assert_eq!(t.len(), 64);
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(t, new_token().unwrap());
    }

    /// The broker's own parser reads the line and authenticates the token with it.
    #[test]
    fn the_line_is_read_by_the_broker() {
        for principal in ["ingest", "CN=app \"one\"", "a\\b"] {
            let token = new_token().unwrap();
            let line = file_line(principal, &token);
            assert!(!line.contains(&token));
            let policy = streambus_server::auth::Policy::parse(
                std::path::Path::new("auth.toml"),
                &format!("[principals]\n{line}\n"),
            )
            .unwrap();
            assert_eq!(
                policy.authenticate(token.as_bytes()).as_deref(),
                Some(principal)
            );
        }
    }
}
