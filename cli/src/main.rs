//! `streambus`: the StreamBus command-line tool, built on the `streambus-client` SDK.
//!
//! Exit status: 0 on success, 1 on a runtime error (one line on stderr naming what failed), 2
//! on a usage error (clap's message, or an argument the SDK refused before sending anything).
//! No panics reach the user: a bug prints one line and exits 1.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod admin;
mod args;
mod auth;
mod bench;
mod consume;
mod format;
mod plot;
mod produce;
mod raw;

use std::io::{self, Write};
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use streambus_client::{Client, Error};

use crate::args::{Cli, Command};

/// Why a command failed: its exit status and a one-line message.
#[derive(Debug)]
pub(crate) struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// A runtime error (exit status 1).
    pub(crate) fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }

    /// A usage error (exit status 2): a bad argument found after parsing.
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }

    /// An SDK error: the caller's (a bad argument or setting, nothing sent) is a usage error
    /// (2); anything else a runtime error (1). Network errors name the broker.
    pub(crate) fn sdk(broker: &str, e: &Error) -> Self {
        match e {
            Error::Config { .. } | Error::InvalidInput { .. } => Self {
                code: 2,
                message: e.to_string(),
            },
            Error::Io { .. } | Error::TimedOut { .. } | Error::Tls { .. } => {
                Self::runtime(format!("broker {broker}: {e}"))
            }
            _ => Self::runtime(e.to_string()),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Self::runtime(format!("writing the output: {e}"))
    }
}

/// The result of a command.
pub(crate) type Outcome = Result<(), Failure>;

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let mut line = format!("error: internal error: {info}");
        line.retain(|c| c != '\n');
        eprintln!("{line}");
        std::process::exit(1);
    }));
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            // Help and version go to stdout with status 0; errors to stderr with 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    // Where the broker's address came from, to name it when it is invalid.
    let broker_source = match matches.value_source("broker") {
        Some(ValueSource::EnvVariable) => "STREAMBUS_BROKER",
        Some(ValueSource::DefaultValue) => "default broker address",
        _ => "--broker",
    };
    // One thread is plenty for a command; a benchmark gets two workers.
    let runtime = if matches!(cli.command, Command::Bench(_)) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => return fail(&Failure::runtime(format!("starting the runtime: {e}"))),
    };
    let result = runtime.block_on(run(cli, broker_source));
    // Don't wait for a blocking read of stdin that will never finish (produce stopped by
    // Ctrl-C with its input still open): the process is ending anyway.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`| head`) is not an error.
        Err(f) if f.code == 0 => ExitCode::SUCCESS,
        Err(f) => fail(&f),
    }
}

fn fail(f: &Failure) -> ExitCode {
    let mut line = f.message.replace('\n', " ");
    line.truncate(line.trim_end().len());
    let _ = writeln!(io::stderr(), "error: {line}");
    ExitCode::from(f.code)
}

async fn run(cli: Cli, broker_source: &str) -> Outcome {
    if let Command::Auth(args::Auth::NewToken { principal }) = &cli.command {
        return auth::new_token_for(principal);
    }
    if let Command::Bench(b) = &cli.command {
        bench::check(b, cli.tls().is_some())?;
    }
    let mut builder = Client::builder()
        .tls_options(cli.tls())
        .connect_timeout(cli.timeout)
        .request_timeout(cli.timeout);
    if let Some(token) = cli.token.clone() {
        builder = builder.token(token);
    }
    // A comma-separated list: a bootstrap list for the SDK, which uses the first broker that
    // answers and routes each partition to its leader.
    let brokers: Vec<&str> = cli.broker.split(',').map(str::trim).collect();
    let client = match builder.connect_bootstrap(brokers.iter().copied()).await {
        Ok(client) => client,
        Err(Error::Config {
            setting: "addr",
            reason,
        }) => {
            return Err(Failure {
                code: 2,
                message: format!("invalid {broker_source}: {reason}"),
            });
        }
        Err(Error::Unreachable { attempts, .. }) => {
            let each: Vec<String> = attempts.iter().map(|(b, e)| format!("{b}: {e}")).collect();
            return Err(Failure::runtime(format!(
                "none of the {} brokers answered: {}",
                attempts.len(),
                each.join("; ")
            )));
        }
        Err(e) => return Err(Failure::sdk(brokers.first().unwrap_or(&""), &e)),
    };
    let broker = client.broker().to_owned();
    let ctx = Ctx { client, broker };
    match cli.command {
        Command::Topics(t) => admin::topics(&ctx, t).await,
        Command::Offsets(o) => admin::offsets(&ctx, o).await,
        Command::Health(h) => admin::health(&ctx, h).await,
        Command::Cluster(c) => admin::cluster(&ctx, c).await,
        Command::Produce(p) => produce::run(&ctx, p).await,
        Command::Consume(c) => consume::run(&ctx, c).await,
        Command::Bench(b) => bench::run(&ctx, b).await,
        Command::Auth(_) => Ok(()),
    }
}

impl Ctx {
    /// A builder with the settings of the command line (timeouts, TLS), for more clients.
    pub(crate) fn builder(&self) -> streambus_client::ClientBuilder {
        let cfg = self.client.config();
        Client::builder()
            .tls_options(cfg.tls.clone())
            .connect_timeout(cfg.connect_timeout)
            .request_timeout(cfg.request_timeout)
    }
}

/// What every command gets: the connected client and the broker's address.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) client: Client,
    pub(crate) broker: String,
}

impl Ctx {
    /// Maps an SDK error to a [`Failure`] naming this broker.
    pub(crate) fn err(&self, e: Error) -> Failure {
        Failure::sdk(&self.broker, &e)
    }
}

/// Writes to stdout; a closed pipe ends the command quietly with status 0.
pub(crate) fn write_out(bytes: &[u8]) -> Outcome {
    let mut out = io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(out_err)
}

/// An output error: a closed pipe is a quiet success, anything else a runtime error.
pub(crate) fn out_err(e: io::Error) -> Failure {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Failure {
            code: 0,
            message: String::new(),
        }
    } else {
        Failure::from(e)
    }
}

/// SIGINT (Ctrl-C), caught from the moment it is created: a long-running command stops
/// cleanly instead of being killed.
#[derive(Debug)]
pub(crate) struct Interrupt {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Interrupt {
    /// Installs the handler.
    pub(crate) fn new() -> Result<Self, Failure> {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .map_err(|e| Failure::runtime(format!("catching Ctrl-C: {e}")))?;
            Ok(Self { signal })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Resolves at the next SIGINT.
    pub(crate) async fn recv(&mut self) {
        #[cfg(unix)]
        self.signal.recv().await;
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
