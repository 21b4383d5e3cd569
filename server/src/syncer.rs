//! Group commit for `--fsync always`: appends are written on the connection's task, and their
//! replies wait here, on threads that may block, for the fsync that covers them. Every reply
//! queued while an fsync runs is covered by the next one of its partition, so produces in
//! flight on one connection or many share fsyncs.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::storage::PendingSync;

/// Threads waiting on fsyncs: while one fsyncs a partition, another can take the next queue
/// (another partition's fsync, or the same partition's next one).
const THREADS: usize = 2;

/// A reply to send once its batch is on disk (or the fsync failed).
pub(crate) type Done = Box<dyn FnOnce(Result<(), crate::storage::StorageError>) + Send>;

#[derive(Default)]
struct Queue {
    items: VecDeque<(PendingSync, Done)>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The group-commit threads.
pub(crate) struct Syncer {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer")
            .field("queued", &self.shared.lock().items.len())
            .finish()
    }
}

impl Syncer {
    pub(crate) fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let threads = (0..THREADS)
            .map(|i| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("streambus-sync-{i}"))
                    .spawn(move || run(&s))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { shared, threads })
    }

    /// Queues `done` to run once `pending` is on disk.
    pub(crate) fn push(&self, pending: PendingSync, done: Done) {
        let mut q = self.shared.lock();
        q.items.push_back((pending, done));
        drop(q);
        self.shared.ready.notify_one();
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a group-commit thread panicked");
            }
        }
    }
}

/// How long a group waits for more members once the last group had several: the producers
/// whose replies just went out send their next batches within a round trip, and without this
/// pause each fsync would cover only what arrived during the previous one (about half of what
/// is in flight). A lone producer never waits.
const GROUP_DELAY: Duration = Duration::from_micros(200);

fn run(shared: &Shared) {
    let mut last_group = 0;
    loop {
        let batch: Vec<(PendingSync, Done)> = {
            let mut q = shared.lock();
            while q.items.is_empty() {
                if q.closed {
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
            if last_group > 1 && !q.closed {
                let until = Instant::now() + GROUP_DELAY;
                loop {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    q = shared
                        .ready
                        .wait_timeout(q, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
            q.items.drain(..).collect()
        };
        last_group = batch.len();
        // The first wait of a partition fsyncs everything appended so far; the later ones of
        // the same partition find themselves covered and return at once.
        for (pending, done) in batch {
            done(pending.wait());
        }
    }
}
