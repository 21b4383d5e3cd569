//! `streambus-server`: the broker binary.

use std::process::ExitCode;

use std::io::IsTerminal as _;

use clap::CommandFactory;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use streambus_server::{Cli, Config};

fn main() -> ExitCode {
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) if !e.use_stderr() => {
            // --help / --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{}", usage_error(&e));
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_matches(&matches) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Logs go to stderr, coloured only on a terminal.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .init();
    let mut signals = match Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: installing signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let running = match streambus_server::start(config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    for sig in signals.forever() {
        if sig == SIGHUP {
            // Logged (and counted) by `reload_auth`; an invalid file keeps the old rules.
            let _ = running.reload_auth();
            continue;
        }
        tracing::info!(signal = sig, "shutting down");
        break;
    }
    match running.shutdown() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error during shutdown: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One line for a command-line error: clap's first line, plus, for a bad value, the allowed
/// values and the `STREAMBUS_*` variable it came from (when it did not come from a flag).
fn usage_error(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("error: invalid command line");
    if !matches!(
        e.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return first.to_owned();
    }
    let mut line = first.to_owned();
    if let Some(ContextValue::Strings(values)) = e.get(ContextKind::ValidValue) {
        line.push_str(&format!(" (allowed: {})", values.join(", ")));
    }
    // Which setting: the argument clap names, like `--fsync <FSYNC>`.
    let flag = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(a)) => a.split_whitespace().next().unwrap_or("").to_owned(),
        _ => String::new(),
    };
    let given_as_flag = std::env::args().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    if !flag.is_empty() && !given_as_flag {
        let command = Cli::command();
        let env = command
            .get_arguments()
            .find(|a| {
                a.get_long()
                    .is_some_and(|l| flag.strip_prefix("--") == Some(l))
            })
            .and_then(|a| a.get_env())
            .map(|v| v.to_string_lossy().into_owned());
        if let Some(var) = env {
            line.push_str(&format!(" (from {var})"));
        }
    }
    line
}
