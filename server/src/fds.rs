//! File descriptors: connections may never take the ones storage needs.
//!
//! At start the broker raises its soft `RLIMIT_NOFILE` toward the hard limit, counts what it
//! already holds (the logs' segment files, listeners), keeps a reserve for storage on top
//! (segments rolled, index files, metadata writes, topics created), and caps the connection count
//! at what is left, saying so in one line when that is below `--max-connections`.

/// What the descriptor limit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The soft limit after raising it.
    pub(crate) limit: u64,
    /// Descriptors open when the plan was made.
    pub(crate) in_use: u64,
    /// Kept for storage beyond those.
    pub(crate) reserve: u64,
    /// Connections served at most.
    pub(crate) connections: usize,
}

/// The reserve for storage beyond what is open at start: a quarter of the limit, between 64 and
/// 1 024 descriptors.
fn reserve(limit: u64) -> u64 {
    (limit / 4).clamp(64, 1024)
}

/// Raises the soft descriptor limit to the hard one (at most 2^20); returns the soft limit.
pub(crate) fn raise_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    const MOST: u64 = 1 << 20;
    let now = getrlimit(Resource::Nofile);
    let soft = now.current.unwrap_or(MOST);
    let hard = now.maximum.unwrap_or(MOST).min(MOST);
    if soft >= hard {
        return soft;
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: now.maximum,
        },
    ) {
        Ok(()) => hard,
        Err(e) => {
            tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit");
            soft
        }
    }
}

/// Descriptors this process holds now (64 when it can't tell).
pub(crate) fn in_use() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(64, |d| d.count() as u64)
}

/// The connection cap for `max_connections` under `limit` with `in_use` open: an error naming
/// the numbers when nothing is left for connections.
pub(crate) fn plan(max_connections: usize, limit: u64, in_use: u64) -> Result<Plan, String> {
    let reserve = reserve(limit);
    let left = limit.saturating_sub(in_use).saturating_sub(reserve);
    if left == 0 {
        return Err(format!(
            "the open-file limit of {limit} leaves no descriptor for connections: {in_use} are open and {reserve} are kept for storage (raise it with `ulimit -n`)"
        ));
    }
    Ok(Plan {
        limit,
        in_use,
        reserve,
        connections: max_connections.min(usize::try_from(left).unwrap_or(usize::MAX)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_get_what_storage_does_not_need() {
        let p = plan(10_000, 1024, 24).unwrap();
        assert_eq!((p.reserve, p.connections), (256, 1024 - 24 - 256));
        let p = plan(10_000, 1 << 20, 100).unwrap();
        assert_eq!((p.reserve, p.connections), (1024, 10_000));
        let p = plan(10, 256, 30).unwrap();
        assert_eq!((p.reserve, p.connections), (64, 10));
        let e = plan(10, 100, 40).unwrap_err();
        assert!(
            e.contains("limit of 100") && e.contains("40 are open"),
            "{e}"
        );
    }
}
