//! `streambus-crash`: the checking half of `scripts/crash-campaign` and `scripts/disk-full`.
//! It starts the real `streambus-server` binary as a child process (on 127.0.0.1 port 0, the
//! port read from its "broker listening" line), drives it over [`RawClient`] and the core
//! codecs, and checks what the broker stored against what it acknowledged.
//!
//! ```text
//! streambus-crash campaign --server target/release/streambus-server --rounds 9
//! streambus-crash disk-full --server target/release/streambus-server --dir /mnt/small-tmpfs
//! ```
//!
//! Every message value names itself (round, connection, sequence number) and carries filler
//! derived from the seed, so a stored message is either one that was sent, byte for byte, or a
//! violation. Each mode ends with a one-line verdict and exit status 1 on any violation.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use streambus_core::{
    CreateTopicRequest, DeleteTopicRequest, ErrorCode, Message, MessageSet, MessageSetBuilder,
    ProduceRequest, Request, RequestType, Response, Topic,
};
use streambus_tests::{RawClient, fetch_all};

#[derive(Parser)]
#[command(about = "StreamBus crash and disk-full campaigns against the real broker binary")]
struct Args {
    /// The `streambus-server` binary.
    #[arg(long, default_value = "target/release/streambus-server", global = true)]
    server: PathBuf,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Rounds of: start the broker, pipelined producers, SIGKILL at a random point, restart,
    /// check everything stored. Round r runs on runtime × fsync combination r mod 9 (each
    /// combination keeps its own data directory across its rounds).
    Campaign {
        /// Rounds in all.
        #[arg(long, env = "ROUNDS", default_value_t = 9)]
        rounds: u32,
        /// Runtimes, comma-separated.
        #[arg(long, default_value = "tokio,smol,blocking", value_delimiter = ',')]
        runtimes: Vec<String>,
        /// Fsync policies, comma-separated.
        #[arg(long, default_value = "always,interval,never", value_delimiter = ',')]
        fsync: Vec<String>,
        /// Producer connections per round.
        #[arg(long, default_value_t = 6)]
        connections: u16,
        /// Partitions of the topic (connection i writes partition i mod P).
        #[arg(long, default_value_t = 3)]
        partitions: u32,
        /// Produce requests in flight per connection: each round picks one in 16..=MAX.
        #[arg(long, default_value_t = 64)]
        max_window: usize,
        /// Produce requests per connection per round at most (1 to 8 messages each).
        #[arg(long, default_value_t = 10000)]
        max_requests: u64,
        /// Seed of the random choices (default: from the clock); printed for a rerun.
        #[arg(long, env = "SEED")]
        seed: Option<u64>,
        /// Where the data directories go (default: a fresh temporary directory, removed on
        /// success).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Checks the checker: after the kill of this round (1-based), cut the last byte off
        /// partition 0's newest `.log`, as a lost write would. Under `interval` and `never` the
        /// round then fails with lost messages; under `always` the cut batch may be one whose
        /// fsync (and reply) had not come, which is no violation.
        #[arg(long)]
        tamper_round: Option<u32>,
    },
    /// The broker on a small filesystem: produce until it is full, check the error replies,
    /// fetch and HealthCheck, free space by deleting a topic, produce again, restart, check.
    DiskFull {
        /// The data directory, on a small filesystem of its own (emptied first).
        #[arg(long)]
        dir: PathBuf,
        /// Runtime of the broker.
        #[arg(long, default_value = "tokio")]
        runtime: String,
    },
}

/// Ends the run on a failure of the harness (not a finding): one line, exit status 2.
fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("streambus-crash: {msg}");
    std::process::exit(2)
}

// ---------------------------------------------------------------------------------------------
// The broker as a child process.

/// A running `streambus-server`, killed on drop.
struct Broker {
    child: Child,
    addr: SocketAddr,
}

impl Broker {
    /// Starts the binary on `dir` and waits (up to 60 s) for its "broker listening" line.
    /// The broker's output is appended to `log`.
    fn start(server: &Path, dir: &Path, log_path: &Path, runtime: &str, fsync: &str) -> Broker {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| die(format_args!("{}: {e}", dir.display())));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .unwrap_or_else(|e| die(format_args!("broker log: {e}")));
        let mut child = Command::new(server)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
            .arg("--data-dir")
            .arg(dir)
            .args([
                "--runtime",
                runtime,
                "--fsync",
                fsync,
                "--fsync-interval",
                "100ms",
            ])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| die(e)))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| die(format_args!("starting {}: {e}", server.display())));
        // The broker logs to stderr.
        let stdout = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log = log;
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = std::io::Write::write_all(&mut log, format!("{line}\n").as_bytes());
                if line.contains("broker listening")
                    && let Some(addr) = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("addr="))
                        .and_then(|a| {
                            a.trim_end_matches(|c: char| !c.is_ascii_digit())
                                .parse()
                                .ok()
                        })
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => Broker { child, addr },
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                die(format_args!(
                    "the broker did not listen within 60 s ({status:?}); see {}",
                    log_path.display()
                ))
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and wait until the process is gone (its directory lock released).
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (graceful), and wait.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Messages that name themselves.

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A message's identity: round (20 bits), connection (12 bits), sequence number (32 bits).
type MsgId = u64;

fn msg_id(round: u32, conn: u16, seq: u32) -> MsgId {
    (u64::from(round) << 44) | (u64::from(conn) << 32) | u64::from(seq)
}

fn id_parts(id: MsgId) -> (u32, u16, u32) {
    ((id >> 44) as u32, ((id >> 32) & 0xfff) as u16, id as u32)
}

const MAGIC: &[u8; 2] = b"SB";

/// The value of message `id`: magic, the id (8 bytes), then 0–99 filler bytes from the seed.
fn value(seed: u64, id: MsgId, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&id.to_be_bytes());
    let mut s = seed ^ id.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let len = (splitmix(&mut s) % 100) as usize;
    while out.len() < 10 + len {
        let w = splitmix(&mut s).to_le_bytes();
        let take = (10 + len - out.len()).min(8);
        out.extend_from_slice(&w[..take]);
    }
}

/// The id a stored value claims, if it is exactly the value of that id.
fn check_value(seed: u64, stored: &[u8], scratch: &mut Vec<u8>) -> Option<MsgId> {
    let id = MsgId::from_be_bytes(stored.get(2..10)?.try_into().ok()?);
    value(seed, id, scratch);
    (stored == &scratch[..]).then_some(id)
}

/// A Produce frame of messages `seq..seq + n` of (round, conn) to `topic`/`partition`.
fn produce_frame(
    c: &mut RawClient,
    seed: u64,
    topic: &str,
    partition: u32,
    ids: impl Iterator<Item = MsgId>,
) -> (u64, Vec<u8>) {
    let values: Vec<Vec<u8>> = ids
        .map(|id| {
            let mut v = Vec::new();
            value(seed, id, &mut v);
            v
        })
        .collect();
    let msgs: Vec<Message<'_>> = values.iter().map(|v| Message::new(b"", v)).collect();
    let mut buf = vec![0u8; msgs.iter().map(streambus_core::Encode::encoded_len).sum()];
    let mut b = MessageSetBuilder::new(&mut buf);
    for m in &msgs {
        b.push(m).expect("sized exactly");
    }
    let count = b.count();
    let messages = MessageSet::new_checked(count, &buf).expect("valid set");
    c.encode(&Request::Produce(ProduceRequest {
        topic: Topic::new(topic).expect("topic"),
        partition,
        messages,
        producer: None,
    }))
}

fn create_topic(c: &mut RawClient, topic: &str, partitions: u32) {
    let r = c
        .call(&Request::CreateTopic(CreateTopicRequest {
            topic: Topic::new(topic).expect("topic"),
            num_partitions: partitions,
            replication_factor: 1,
        }))
        .unwrap_or_else(|e| die(format_args!("CreateTopic {topic}: {e}")));
    let code = r.error_code();
    if code != 0 && code != ErrorCode::TOPIC_EXISTS.0 {
        die(format_args!("CreateTopic {topic} failed with code {code}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Campaign.

/// What one producer connection saw in a round.
#[derive(Default)]
struct ProducerLog {
    /// (partition, base offset, first id, count) of every acknowledged Produce.
    acked: Vec<(u32, i64, MsgId, u32)>,
    /// Messages written to the socket (acknowledged or not): ids seq < sent may be stored.
    sent: u32,
    /// Error replies (none is expected: the broker is killed, never failing).
    errors: Vec<String>,
    /// A success reply whose count or id did not match a request.
    bad_replies: u64,
    /// Produce requests sent.
    requests: u64,
    /// Every request was answered (false: the connection broke first).
    complete: bool,
}

/// One connection: keeps `window` Produces in flight until `max_requests` were sent or the
/// connection breaks (the broker was killed), reading every reply that arrives.
#[allow(clippy::too_many_arguments)]
fn producer(
    addr: SocketAddr,
    seed: u64,
    round_seed: u64,
    round: u32,
    conn: u16,
    partition: u32,
    window: usize,
    max_requests: u64,
    acked_requests: &AtomicU64,
) -> ProducerLog {
    let mut log = ProducerLog::default();
    let Ok(mut c) = RawClient::connect(addr) else {
        return log;
    };
    let mut rng = round_seed ^ u64::from(conn);
    let mut pending: HashMap<u64, (MsgId, u32)> = HashMap::new();
    let mut send_one = |c: &mut RawClient,
                        log: &mut ProducerLog,
                        pending: &mut HashMap<u64, (MsgId, u32)>|
     -> bool {
        let n = 1 + (splitmix(&mut rng) % 8) as u32;
        let first = log.sent;
        let (id, frame) = produce_frame(
            c,
            seed,
            "crash",
            partition,
            (first..first + n).map(|s| msg_id(round, conn, s)),
        );
        log.sent += n;
        pending.insert(id, (msg_id(round, conn, first), n));
        log.requests += 1;
        c.send_raw(&frame).is_ok()
    };
    for _ in 0..window {
        if !send_one(&mut c, &mut log, &mut pending) {
            return log;
        }
    }
    while !pending.is_empty() {
        let Ok(reply) = c.recv() else { break };
        let Some((first, n)) = pending.remove(&reply.request_id()) else {
            log.bad_replies += 1;
            continue;
        };
        match reply.parse(RequestType::Produce) {
            Ok(Response::Produce(p)) if p.num_messages == n => {
                log.acked.push((partition, p.base_offset, first, n));
                acked_requests.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Response::Error(e)) => log.errors.push(format!(
                "code {}: {}",
                e.code.0,
                e.message.as_str().unwrap_or("?")
            )),
            _ => log.bad_replies += 1,
        }
        if log.requests < max_requests && !send_one(&mut c, &mut log, &mut pending) {
            // The broker is gone; read what it sent before.
            continue;
        }
    }
    log.complete = pending.is_empty();
    log
}

/// Counts of one check.
#[derive(Default, Clone, Copy)]
struct Counts {
    acked: u64,
    found: u64,
    lost: u64,
    duplicated: u64,
    corrupt: u64,
    unsent: u64,
    changed: u64,
    errors: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.acked += o.acked;
        self.found += o.found;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.corrupt += o.corrupt;
        self.unsent += o.unsent;
        self.changed += o.changed;
        self.errors += o.errors;
    }

    fn violations(&self) -> u64 {
        self.lost + self.duplicated + self.corrupt + self.unsent + self.changed + self.errors
    }

    fn line(&self) -> String {
        format!(
            "acked {} found {} lost {} duplicated {} corrupt {} never-sent {} earlier-changed {} error-replies {}",
            self.acked,
            self.found,
            self.lost,
            self.duplicated,
            self.corrupt,
            self.unsent,
            self.changed,
            self.errors
        )
    }
}

/// One runtime × fsync combination: its data directory and everything verified so far.
struct Combo {
    runtime: String,
    fsync: String,
    dir: PathBuf,
    /// Per partition, the log as last verified: (offset, id).
    log: Vec<Vec<(i64, MsgId)>>,
    /// Messages sent per (round, connection).
    sent: HashMap<(u32, u16), u32>,
    rounds: u32,
}

/// Checks the whole topic of `combo` against what was sent and acknowledged; updates the
/// verified log. `acked` is this round's acknowledgements.
fn verify(
    addr: SocketAddr,
    seed: u64,
    combo: &mut Combo,
    acked: &[(u32, i64, MsgId, u32)],
    problems: &mut Vec<String>,
) -> Counts {
    let mut k = Counts::default();
    let mut c = RawClient::connect(addr).unwrap_or_else(|e| die(format_args!("connect: {e}")));
    let mut scratch = Vec::new();
    let mut seen: HashSet<MsgId> = HashSet::new();
    let mut at: HashMap<(u32, i64), MsgId> = HashMap::new();
    for (p, old) in combo.log.iter_mut().enumerate() {
        let p = p as u32;
        let stored = fetch_all(&mut c, "crash", p, 0)
            .unwrap_or_else(|e| die(format_args!("fetching partition {p}: {e}")));
        let mut new = Vec::with_capacity(stored.len());
        let mut last = -1i64;
        for (off, v) in &stored {
            if *off <= last {
                k.duplicated += 1;
                problems.push(format!("partition {p}: offset {off} after {last}"));
            }
            last = *off;
            let Some(id) = check_value(seed, v, &mut scratch) else {
                k.corrupt += 1;
                problems.push(format!(
                    "partition {p} offset {off}: corrupt value ({} bytes)",
                    v.len()
                ));
                continue;
            };
            let (r, conn, seq) = id_parts(id);
            if seq >= combo.sent.get(&(r, conn)).copied().unwrap_or(0) {
                k.unsent += 1;
                problems.push(format!(
                    "partition {p} offset {off}: round {} connection {conn} seq {seq} was never sent",
                    r + 1
                ));
            }
            if !seen.insert(id) {
                k.duplicated += 1;
                problems.push(format!(
                    "partition {p} offset {off}: round {} connection {conn} seq {seq} stored twice",
                    r + 1
                ));
            }
            at.insert((p, *off), id);
            new.push((*off, id));
        }
        // Earlier rounds: the log as verified before is still a prefix, unchanged.
        let same = old.iter().zip(&new).take_while(|(a, b)| a == b).count();
        if same < old.len() {
            k.changed += (old.len() - same) as u64;
            problems.push(format!(
                "partition {p}: {} of {} earlier verified messages changed or gone, first at offset {}",
                old.len() - same,
                old.len(),
                old[same].0
            ));
        }
        *old = new;
    }
    for &(p, base, first, n) in acked {
        for i in 0..n {
            k.acked += 1;
            let id = first + u64::from(i);
            match at.get(&(p, base + i64::from(i))) {
                Some(&got) if got == id => k.found += 1,
                _ => {
                    k.lost += 1;
                    if k.lost <= 5 {
                        let (r, conn, seq) = id_parts(id);
                        problems.push(format!(
                            "acknowledged round {} connection {conn} seq {seq} missing at partition {p} offset {}",
                            r + 1,
                            base + i64::from(i)
                        ));
                    }
                }
            }
        }
    }
    k
}

#[allow(clippy::too_many_arguments)]
fn campaign(
    server: &Path,
    rounds: u32,
    runtimes: &[String],
    fsyncs: &[String],
    connections: u16,
    partitions: u32,
    max_window: usize,
    max_requests: u64,
    seed: Option<u64>,
    dir: Option<PathBuf>,
    tamper_round: Option<u32>,
) -> bool {
    let t0 = Instant::now();
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let tmp;
    let root = match dir {
        Some(d) => d,
        None => {
            tmp = tempfile::Builder::new()
                .prefix("streambus-crash-")
                .tempdir()
                .unwrap_or_else(|e| die(e));
            tmp.path().to_owned()
        }
    };
    let root_ref = &root;
    let mut combos: Vec<Combo> = runtimes
        .iter()
        .flat_map(|rt| {
            fsyncs.iter().map(move |f| Combo {
                runtime: rt.clone(),
                fsync: f.clone(),
                dir: root_ref.join(format!("{rt}-{f}")),
                log: vec![Vec::new(); partitions as usize],
                sent: HashMap::new(),
                rounds: 0,
            })
        })
        .collect();
    if combos.is_empty() {
        die("no runtime × fsync combination");
    }
    println!(
        "crash campaign: {rounds} rounds over {} runtime × fsync combinations, {connections} connections on {partitions} partitions, seed {seed}, data in {}",
        combos.len(),
        root.display()
    );
    let mut total = Counts::default();
    let mut rng = seed;
    let mut failed_rounds = Vec::new();
    for round in 0..rounds {
        let n_combos = combos.len();
        let combo = &mut combos[round as usize % n_combos];
        let window = 16 + (splitmix(&mut rng) % (max_window.max(16) - 15) as u64) as usize;
        let planned = u64::from(connections) * max_requests;
        // Kill after a random share (5–95 %) of the planned requests were acknowledged.
        let kill_at = planned * (5 + splitmix(&mut rng) % 91) / 100;
        let round_seed = splitmix(&mut rng);

        let broker = Broker::start(
            server,
            &combo.dir,
            &combo.dir.with_extension("log"),
            &combo.runtime,
            &combo.fsync,
        );
        let addr = broker.addr;
        if combo.rounds == 0 {
            let mut c = RawClient::connect(addr).unwrap_or_else(|e| die(e));
            create_topic(&mut c, "crash", partitions);
        }
        let acked_requests = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..connections)
            .map(|conn| {
                let acked_requests = Arc::clone(&acked_requests);
                let partition = u32::from(conn) % partitions;
                std::thread::spawn(move || {
                    producer(
                        addr,
                        seed,
                        round_seed,
                        round,
                        conn,
                        partition,
                        window,
                        max_requests,
                        &acked_requests,
                    )
                })
            })
            .collect();
        // Wait for the kill point (an event: the acknowledgement count), with a deadline that
        // flags a broker that stopped answering.
        let start = Instant::now();
        let mut last = (0, Instant::now());
        let mut hang = false;
        while acked_requests.load(Ordering::Relaxed) < kill_at
            && !threads.iter().all(std::thread::JoinHandle::is_finished)
        {
            let now = acked_requests.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(20) {
                hang = true;
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let at_kill = acked_requests.load(Ordering::Relaxed);
        let finished_first = threads.iter().all(std::thread::JoinHandle::is_finished);
        let pid = broker.pid();
        broker.kill();
        let logs: Vec<ProducerLog> = threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| die("a producer panicked")))
            .collect();
        let produced_for = start.elapsed();
        let mut acked = Vec::new();
        let mut errors = Vec::new();
        let mut bad = 0;
        let mut broke_early = 0;
        for (conn, l) in logs.into_iter().enumerate() {
            broke_early += u64::from(finished_first && !l.complete);
            combo.sent.insert((round, conn as u16), l.sent);
            acked.extend(l.acked);
            errors.extend(l.errors);
            bad += l.bad_replies;
        }
        if tamper_round == Some(round + 1) {
            tamper(&combo.dir.join("topics/crash/0"));
        }
        // Restart on the same directory (recovery) and check.
        let broker = Broker::start(
            server,
            &combo.dir,
            &combo.dir.with_extension("log"),
            &combo.runtime,
            &combo.fsync,
        );
        let mut problems = Vec::new();
        let mut k = verify(broker.addr, seed, combo, &acked, &mut problems);
        broker.kill();
        k.errors += errors.len() as u64 + bad;
        if hang {
            k.errors += 1;
            problems.push(format!(
                "no acknowledgement for 20 s at {at_kill} requests (broker pid {pid}): hang"
            ));
        }
        for e in errors.iter().take(3) {
            problems.push(format!("error reply: {e}"));
        }
        if broke_early > 0 {
            k.errors += broke_early;
            problems.push(format!(
                "{broke_early} connections broke before the kill (a read timed out or the broker closed them)"
            ));
        }
        if bad > 0 {
            problems.push(format!("{bad} replies did not match their request"));
        }
        combo.rounds += 1;
        let stored: usize = combo.log.iter().map(Vec::len).sum();
        println!(
            "round {:>3} {:>8}/{:<8} window {:>2}, killed after {:>6} acked requests ({:.2}s): {}; log {} messages",
            round + 1,
            combo.runtime,
            combo.fsync,
            window,
            at_kill,
            produced_for.as_secs_f64(),
            k.line(),
            stored
        );
        for p in problems.iter().take(10) {
            println!("    {p}");
        }
        if k.violations() > 0 {
            failed_rounds.push(round + 1);
        }
        total.add(&k);
    }
    let ok = total.violations() == 0;
    let verdict = format!(
        "{}: {rounds} rounds, {} in {:.0}s (seed {seed})",
        if ok { "PASS" } else { "FAIL" },
        total.line(),
        t0.elapsed().as_secs_f64()
    );
    if !ok {
        println!(
            "failed rounds: {failed_rounds:?}; data kept in {}",
            root.display()
        );
        // Keep the evidence.
        if let Some(t) = tmp_keep(&root) {
            println!("{t}");
        }
    }
    println!("crash-campaign {verdict}");
    ok
}

/// Cuts the last byte off the newest `.log` in `partition_dir`.
fn tamper(partition_dir: &Path) {
    let newest = std::fs::read_dir(partition_dir)
        .unwrap_or_else(|e| die(format_args!("{}: {e}", partition_dir.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .max()
        .unwrap_or_else(|| die("no segment to tamper with"));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap_or_else(|e| die(e));
    let len = f.metadata().unwrap_or_else(|e| die(e)).len();
    f.set_len(len.saturating_sub(1)).unwrap_or_else(|e| die(e));
    println!("    tampered: cut the last byte of {}", newest.display());
}

/// On failure the temporary directory must outlive the process: copy its path out.
fn tmp_keep(root: &Path) -> Option<String> {
    let keep = root.with_extension("kept");
    std::fs::rename(root, &keep).ok()?;
    Some(format!("moved to {}", keep.display()))
}

// ---------------------------------------------------------------------------------------------
// Disk full.

fn disk_full(server: &Path, dir: &Path, runtime: &str) -> bool {
    let t0 = Instant::now();
    let data = dir.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let seed = 0x5eed;
    let mut failures: Vec<String> = Vec::new();
    let mut fail = |what: String| {
        println!("    VIOLATION: {what}");
        failures.push(what);
    };
    let log = std::env::temp_dir().join(format!("streambus-disk-full-{}.log", std::process::id()));
    let broker = Broker::start(server, &data, &log, runtime, "always");
    let mut c = RawClient::connect(broker.addr).unwrap_or_else(|e| die(e));
    create_topic(&mut c, "keep", 1);
    create_topic(&mut c, "filler", 1);
    // Produce 64 messages a request to both topics until both are refused. Each acknowledged
    // (topic, base, first id, n) is remembered.
    let mut acked: Vec<(&str, i64, MsgId, u32)> = Vec::new();
    let mut sent = 0u32;
    let mut refusals: Vec<String> = Vec::new();
    let mut refused = [false, false];
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(refused[0] && refused[1]) {
        if Instant::now() > deadline {
            die("the filesystem did not fill within 120 s");
        }
        for (i, topic) in ["keep", "filler"].into_iter().enumerate() {
            if refused[i] {
                continue;
            }
            let first = msg_id(0, i as u16, sent);
            let (_, frame) = produce_frame(&mut c, seed, topic, 0, first..first + 64);
            let reply = c
                .send_raw(&frame)
                .and_then(|()| c.recv())
                .unwrap_or_else(|e| die(format_args!("produce to {topic}: {e}")));
            match reply.parse(RequestType::Produce) {
                Ok(Response::Produce(p)) => acked.push((topic, p.base_offset, first, 64)),
                Ok(Response::Error(e)) => {
                    refused[i] = true;
                    refusals.push(format!(
                        "{topic}: code {} {}",
                        e.code.0,
                        e.message.as_str().unwrap_or("?")
                    ));
                    if e.code != ErrorCode::STORAGE_ERROR {
                        fail(format!(
                            "{topic}: refused with code {}, not StorageError",
                            e.code.0
                        ));
                    }
                    let m = e.message.as_str().unwrap_or("");
                    if !m.contains(&*data.to_string_lossy()) {
                        fail(format!("{topic}: the error does not name a file: {m:?}"));
                    }
                }
                other => fail(format!("{topic}: unexpected reply {other:?}")),
            }
        }
        sent += 64;
    }
    let n_keep = acked.iter().filter(|a| a.0 == "keep").count() * 64;
    println!(
        "disk full after {} acknowledged messages ({} to keep); refusals:",
        acked.len() * 64,
        n_keep
    );
    for r in &refusals {
        println!("    {r}");
    }
    // A second append to a full disk is refused the same way, not a hang or a crash.
    let first = msg_id(1, 0, 0);
    let (_, frame) = produce_frame(&mut c, seed, "keep", 0, first..first + 64);
    match c.send_raw(&frame).and_then(|()| c.recv()) {
        Ok(r) if r.error_code() == ErrorCode::STORAGE_ERROR.0 => {}
        Ok(r) => fail(format!("append to a full disk: code {}", r.error_code())),
        Err(e) => fail(format!("append to a full disk: {e}")),
    }
    // Fetch and HealthCheck still work, on this connection and a new one.
    let check_stored = |addr: SocketAddr, acked: &[(&str, i64, MsgId, u32)], what: &str| {
        let mut bad = Vec::new();
        let mut c = match RawClient::connect(addr) {
            Ok(c) => c,
            Err(e) => return vec![format!("{what}: connect: {e}")],
        };
        match c.call(&Request::HealthCheck) {
            Ok(r) if r.error_code() == 0 => {}
            Ok(r) => bad.push(format!("{what}: HealthCheck code {}", r.error_code())),
            Err(e) => bad.push(format!("{what}: HealthCheck: {e}")),
        }
        for topic in ["keep", "filler"] {
            let want: Vec<_> = acked.iter().filter(|a| a.0 == topic).collect();
            if want.is_empty() {
                continue;
            }
            let stored: HashMap<i64, Vec<u8>> = match fetch_all(&mut c, topic, 0, 0) {
                Ok(s) => s.into_iter().collect(),
                Err(e) => {
                    bad.push(format!("{what}: fetch {topic}: {e}"));
                    continue;
                }
            };
            let mut scratch = Vec::new();
            let (mut lost, mut n) = (0, 0);
            for &&(_, base, first, k) in &want {
                for i in 0..k {
                    n += 1;
                    let ok = stored
                        .get(&(base + i64::from(i)))
                        .and_then(|v| check_value(seed, v, &mut scratch))
                        == Some(first + u64::from(i));
                    lost += u64::from(!ok);
                }
            }
            if lost > 0 {
                bad.push(format!(
                    "{what}: {topic}: {lost} of {n} acknowledged messages missing"
                ));
            }
            let ids: HashSet<MsgId> = stored
                .values()
                .filter_map(|v| check_value(seed, v, &mut scratch))
                .collect();
            if ids.len() != stored.len() {
                bad.push(format!(
                    "{what}: {topic}: {} stored messages corrupt or duplicated",
                    stored.len() - ids.len()
                ));
            }
        }
        bad
    };
    for b in check_stored(broker.addr, &acked, "disk full") {
        fail(b);
    }
    // Free space without a restart: delete the filler topic.
    let r = c
        .call(&Request::DeleteTopic(DeleteTopicRequest {
            topic: Topic::new("filler").expect("topic"),
        }))
        .unwrap_or_else(|e| die(format_args!("DeleteTopic: {e}")));
    if r.error_code() != 0 {
        fail(format!(
            "DeleteTopic on a full disk: code {}",
            r.error_code()
        ));
    }
    acked.retain(|a| a.0 != "filler");
    // Appends work again.
    let mut after = 0;
    for j in 0..50u32 {
        let first = msg_id(2, 0, j * 64);
        let (_, frame) = produce_frame(&mut c, seed, "keep", 0, first..first + 64);
        match c.send_raw(&frame).and_then(|()| c.recv()) {
            Ok(r) => match r.parse(RequestType::Produce) {
                Ok(Response::Produce(p)) => {
                    acked.push(("keep", p.base_offset, first, 64));
                    after += 1;
                }
                _ => {
                    fail(format!(
                        "append {j} after freeing space: code {}",
                        r.error_code()
                    ));
                    break;
                }
            },
            Err(e) => {
                fail(format!("append {j} after freeing space: {e}"));
                break;
            }
        }
    }
    println!("after deleting the filler topic: {after} of 50 appends acknowledged");
    for b in check_stored(broker.addr, &acked, "after freeing space") {
        fail(b);
    }
    // Restart: everything acknowledged is there.
    broker.stop();
    let broker = Broker::start(server, &data, &log, runtime, "always");
    for b in check_stored(broker.addr, &acked, "after a restart") {
        fail(b);
    }
    broker.stop();
    let ok = failures.is_empty();
    println!(
        "disk-full {}: {runtime}, {} acknowledged messages checked after a restart, {} violations, {:.1}s",
        if ok { "PASS" } else { "FAIL" },
        acked.iter().map(|a| u64::from(a.3)).sum::<u64>(),
        failures.len(),
        t0.elapsed().as_secs_f64()
    );
    ok
}

fn main() {
    let args = Args::parse();
    let ok = match args.mode {
        Mode::Campaign {
            rounds,
            runtimes,
            fsync,
            connections,
            partitions,
            max_window,
            max_requests,
            seed,
            dir,
            tamper_round,
        } => campaign(
            &args.server,
            rounds,
            &runtimes,
            &fsync,
            connections.clamp(1, 4095),
            partitions.max(1),
            max_window,
            max_requests,
            seed,
            dir,
            tamper_round,
        ),
        Mode::DiskFull { dir, runtime } => disk_full(&args.server, &dir, &runtime),
    };
    std::process::exit(if ok { 0 } else { 1 });
}
