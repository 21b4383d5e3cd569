//! Idempotent produce (protocol §6.2): per partition, the state of each producer (its epoch and
//! its last [`KEPT_BATCHES`] batches) and the decision on each batch it sends.
//!
//! The table is bounded: past `max` producers the least recently used one (a use is an appended
//! or deduplicated batch) is forgotten. It lives under the partition's writer lock, so a check
//! and the append it allows are one atomic step. It is rebuilt at open from the `.pidx` files
//! beside the segments (see [`PidxEntry`]).

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use lru::LruCache;

use super::Counters;
use super::error::StorageError;

/// Batches remembered per producer (protocol §6.2).
pub const KEPT_BATCHES: usize = 5;

/// Sequences wrap from `i32::MAX` to 0.
const SEQ_SPAN: i64 = 1 << 31;

/// The idempotence fields of a Produce, already validated (id > 0, epoch ≥ 0, sequence ≥ 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerBatch {
    /// ProducerID, > 0.
    pub producer_id: i64,
    /// ProducerEpoch, ≥ 0.
    pub epoch: i16,
    /// BaseSequence of the batch's first message, ≥ 0.
    pub base_sequence: i32,
}

/// Idempotence fields a Produce may not carry (protocol §6.2: `InvalidRequest`); the client's
/// fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidProducer {
    /// ProducerID < 0.
    #[error("producer id {0} is negative: want > 0")]
    NegativeId(i64),
    /// ProducerEpoch < 0.
    #[error("producer epoch {0} is negative: want >= 0")]
    NegativeEpoch(i16),
    /// BaseSequence < 0.
    #[error("base sequence {0} is negative: want >= 0")]
    NegativeSequence(i32),
}

impl ProducerBatch {
    /// The idempotence fields as they came on the wire: `Ok(None)` for a plain produce (no
    /// BaseSequence, or ProducerID 0); an error naming the field when one is negative.
    pub fn from_wire(
        producer_id: i64,
        epoch: i16,
        base_sequence: Option<i32>,
    ) -> Result<Option<Self>, InvalidProducer> {
        let Some(base_sequence) = base_sequence else {
            return Ok(None);
        };
        if producer_id == 0 {
            return Ok(None);
        }
        if producer_id < 0 {
            return Err(InvalidProducer::NegativeId(producer_id));
        }
        if epoch < 0 {
            return Err(InvalidProducer::NegativeEpoch(epoch));
        }
        if base_sequence < 0 {
            return Err(InvalidProducer::NegativeSequence(base_sequence));
        }
        Ok(Some(Self {
            producer_id,
            epoch,
            base_sequence,
        }))
    }
}

/// The sequence after a batch of `count` messages starting at `seq` (wrapping after
/// `i32::MAX` to 0).
pub(crate) fn next_sequence(seq: i32, count: u32) -> i32 {
    // Both operands are below 2^32, so the sum can't overflow an i64, and the remainder
    // fits an i32.
    i32::try_from((i64::from(seq) + i64::from(count)) % SEQ_SPAN).unwrap_or(0)
}

/// One remembered batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Batch {
    base_sequence: i32,
    count: u32,
    base_offset: i64,
}

/// What the broker knows of one producer on one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProducerState {
    epoch: i16,
    /// Ring of the last batches: `batches[(head + i) % KEPT_BATCHES]` for `i < len`, oldest
    /// first.
    batches: [Batch; KEPT_BATCHES],
    head: u8,
    len: u8,
}

impl ProducerState {
    fn new(epoch: i16) -> Self {
        Self {
            epoch,
            batches: [Batch::default(); KEPT_BATCHES],
            head: 0,
            len: 0,
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Batch> {
        let (head, len) = (usize::from(self.head), usize::from(self.len));
        (0..len).filter_map(move |i| self.batches.get((head + i) % KEPT_BATCHES))
    }

    fn next_expected(&self) -> i32 {
        self.iter()
            .last()
            .map_or(0, |b| next_sequence(b.base_sequence, b.count))
    }

    fn push(&mut self, b: Batch) {
        let (head, len) = (usize::from(self.head), usize::from(self.len));
        if len < KEPT_BATCHES {
            if let Some(slot) = self.batches.get_mut((head + len) % KEPT_BATCHES) {
                *slot = b;
            }
            self.len += 1;
        } else {
            if let Some(slot) = self.batches.get_mut(head) {
                *slot = b;
            }
            self.head = u8::try_from((head + 1) % KEPT_BATCHES).unwrap_or(0);
        }
    }
}

/// The decision on a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Append it (then [`Producers::record`] it).
    Append,
    /// A retry of a batch already appended at `base_offset`: answer with that, append nothing.
    Duplicate {
        /// The original batch's first offset.
        base_offset: i64,
        /// Its message count.
        count: u32,
    },
}

/// Approximate heap bytes of one producer's entry (147): the state and its key in the LRU
/// list node (two links, 16 bytes of allocator overhead), plus the hash table's slot (two
/// pointers and a control byte, at most 7/8 full).
pub const BYTES_PER_PRODUCER: u64 =
    (size_of::<(i64, ProducerState)>() + 2 * 8 + 16 + 17 * 8 / 7) as u64;

/// The producers of one partition.
#[derive(Debug)]
pub(crate) struct Producers {
    map: LruCache<i64, ProducerState>,
    max: NonZeroUsize,
    counters: Arc<Counters>,
}

impl Producers {
    pub(crate) fn new(max: NonZeroUsize, counters: Arc<Counters>) -> Self {
        Self {
            // Unbounded, with the bound kept here: a bounded `LruCache` allocates its whole
            // table up front, for every partition.
            map: LruCache::unbounded(),
            max,
            counters,
        }
    }

    /// Decides what to do with a batch of `count` (≥ 1) messages, by the table of §6.2.
    /// A duplicate counts as a use of the producer.
    pub(crate) fn check(
        &mut self,
        b: &ProducerBatch,
        count: u32,
    ) -> Result<Decision, StorageError> {
        let id = b.producer_id;
        let Some(s) = self.map.peek(&id) else {
            return if b.base_sequence == 0 {
                Ok(Decision::Append)
            } else {
                Err(StorageError::UnknownProducer {
                    producer_id: id,
                    sequence: b.base_sequence,
                })
            };
        };
        if b.epoch < s.epoch {
            return Err(StorageError::InvalidProducerEpoch {
                producer_id: id,
                epoch: b.epoch,
                current: s.epoch,
            });
        }
        if b.epoch > s.epoch {
            return if b.base_sequence == 0 {
                Ok(Decision::Append)
            } else {
                Err(StorageError::OutOfOrderSequence {
                    producer_id: id,
                    epoch: b.epoch,
                    expected: 0,
                    received: b.base_sequence,
                })
            };
        }
        let dup = s
            .iter()
            .find(|x| x.base_sequence == b.base_sequence && x.count == count)
            .map(|dup| Decision::Duplicate {
                base_offset: dup.base_offset,
                count: dup.count,
            });
        let expected = s.next_expected();
        if let Some(d) = dup {
            self.map.promote(&id);
            return Ok(d);
        }
        if b.base_sequence == expected {
            Ok(Decision::Append)
        } else {
            Err(StorageError::OutOfOrderSequence {
                producer_id: id,
                epoch: b.epoch,
                expected,
                received: b.base_sequence,
            })
        }
    }

    /// Records a batch appended at `base_offset` (after [`check`](Self::check) allowed it, or
    /// replayed from disk at open): a new epoch restarts the producer's state; an older one
    /// (never written by this broker) is ignored.
    pub(crate) fn record(&mut self, b: &ProducerBatch, count: u32, base_offset: i64) {
        let batch = Batch {
            base_sequence: b.base_sequence,
            count,
            base_offset,
        };
        if let Some(s) = self.map.get_mut(&b.producer_id) {
            if b.epoch < s.epoch {
                return;
            }
            if b.epoch > s.epoch {
                *s = ProducerState::new(b.epoch);
            }
            s.push(batch);
            return;
        }
        let mut s = ProducerState::new(b.epoch);
        s.push(batch);
        self.map.put(b.producer_id, s);
        self.counters.producers.fetch_add(1, Ordering::Relaxed);
        while self.map.len() > self.max.get() {
            if self.map.pop_lru().is_none() {
                break;
            }
            self.counters.producers.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Every kept batch as `(producer fields, count, base offset)`: producers from the least
    /// to the most recently used, each one's batches oldest first. Replaying them through
    /// [`record`](Self::record) in this order rebuilds the same table.
    pub(crate) fn export(&self) -> Vec<(ProducerBatch, u32, i64)> {
        let mut out = Vec::new();
        for (&producer_id, s) in self.map.iter().rev() {
            for b in s.iter() {
                out.push((
                    ProducerBatch {
                        producer_id,
                        epoch: s.epoch,
                        base_sequence: b.base_sequence,
                    },
                    b.count,
                    b.base_offset,
                ));
            }
        }
        out
    }

    /// Producers known.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

impl Drop for Producers {
    fn drop(&mut self) {
        self.counters
            .producers
            .fetch_sub(self.map.len() as u64, Ordering::Relaxed);
    }
}

/// Bytes of one `.pidx` entry.
pub(crate) const PIDX_ENTRY_LEN: usize = 32;

/// `.pidx` entry layout (big-endian): byte ranges of each field.
mod field {
    use std::ops::Range;
    pub(super) const BASE_OFFSET: Range<usize> = 0..8;
    pub(super) const PRODUCER_ID: Range<usize> = 8..16;
    pub(super) const BASE_SEQUENCE: Range<usize> = 16..20;
    pub(super) const COUNT: Range<usize> = 20..24;
    pub(super) const EPOCH: Range<usize> = 24..26;
    pub(super) const RESERVED: Range<usize> = 26..28;
    pub(super) const ENTRY_CRC: Range<usize> = 28..32;
}

/// One idempotent batch of a segment, in its `.pidx` file: written before the batch's `.idx`
/// entry, so a batch that recovery keeps has its producer entry, and one it cuts leaves an entry
/// past the end that recovery cuts too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PidxEntry {
    pub(crate) base_offset: i64,
    pub(crate) count: u32,
    pub(crate) producer: ProducerBatch,
}

fn get<const N: usize>(b: &[u8; PIDX_ENTRY_LEN], r: std::ops::Range<usize>) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(r) {
        out.copy_from_slice(src);
    }
    out
}

fn put(b: &mut [u8; PIDX_ENTRY_LEN], r: std::ops::Range<usize>, v: &[u8]) {
    if let Some(dst) = b.get_mut(r) {
        dst.copy_from_slice(v);
    }
}

impl PidxEntry {
    pub(crate) fn encode(&self) -> [u8; PIDX_ENTRY_LEN] {
        let mut b = [0u8; PIDX_ENTRY_LEN];
        put(&mut b, field::BASE_OFFSET, &self.base_offset.to_be_bytes());
        put(
            &mut b,
            field::PRODUCER_ID,
            &self.producer.producer_id.to_be_bytes(),
        );
        put(
            &mut b,
            field::BASE_SEQUENCE,
            &self.producer.base_sequence.to_be_bytes(),
        );
        put(&mut b, field::COUNT, &self.count.to_be_bytes());
        put(&mut b, field::EPOCH, &self.producer.epoch.to_be_bytes());
        put(&mut b, field::RESERVED, &[0, 0]);
        let crc =
            streambus_core::checksum::checksum(b.get(..field::ENTRY_CRC.start).unwrap_or_default());
        put(&mut b, field::ENTRY_CRC, &crc.to_be_bytes());
        b
    }

    /// Decodes an entry; `None` if its checksum fails or a field is out of range.
    pub(crate) fn decode(b: &[u8; PIDX_ENTRY_LEN]) -> Option<Self> {
        let crc = streambus_core::checksum::checksum(b.get(..field::ENTRY_CRC.start)?);
        if crc != u32::from_be_bytes(get(b, field::ENTRY_CRC)) {
            return None;
        }
        let producer = ProducerBatch::from_wire(
            i64::from_be_bytes(get(b, field::PRODUCER_ID)),
            i16::from_be_bytes(get(b, field::EPOCH)),
            Some(i32::from_be_bytes(get(b, field::BASE_SEQUENCE))),
        )
        .ok()??;
        let count = u32::from_be_bytes(get(b, field::COUNT));
        (count > 0).then_some(Self {
            base_offset: i64::from_be_bytes(get(b, field::BASE_OFFSET)),
            count,
            producer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(id: i64, epoch: i16, seq: i32) -> ProducerBatch {
        ProducerBatch {
            producer_id: id,
            epoch,
            base_sequence: seq,
        }
    }

    fn table(max: usize) -> Producers {
        Producers::new(
            NonZeroUsize::new(max).unwrap(),
            Arc::new(Counters::default()),
        )
    }

    #[test]
    fn bytes_per_producer_is_what_the_docs_say() {
        assert_eq!(BYTES_PER_PRODUCER, 147);
    }

    #[test]
    fn sequences_wrap_after_i32_max_to_zero() {
        assert_eq!(next_sequence(0, 5), 5);
        assert_eq!(next_sequence(i32::MAX, 1), 0);
        assert_eq!(next_sequence(i32::MAX - 1, 4), 2);
        assert_eq!(next_sequence(i32::MAX, u32::MAX), i32::MAX - 1);
    }

    #[test]
    fn wire_fields_plain_idempotent_or_invalid() {
        assert_eq!(ProducerBatch::from_wire(5, 1, None), Ok(None));
        assert_eq!(ProducerBatch::from_wire(0, -1, Some(-1)), Ok(None));
        assert_eq!(
            ProducerBatch::from_wire(5, 1, Some(2)),
            Ok(Some(batch(5, 1, 2)))
        );
        assert_eq!(
            ProducerBatch::from_wire(-1, 0, Some(0)),
            Err(InvalidProducer::NegativeId(-1))
        );
        assert_eq!(
            ProducerBatch::from_wire(1, -1, Some(0)),
            Err(InvalidProducer::NegativeEpoch(-1))
        );
        let e = ProducerBatch::from_wire(1, 0, Some(-3)).unwrap_err();
        assert_eq!(e.to_string(), "base sequence -3 is negative: want >= 0");
    }

    #[test]
    fn pidx_entry_round_trips_and_detects_any_flipped_bit() {
        let e = PidxEntry {
            base_offset: 0x0102_0304_0506_0708,
            count: 77,
            producer: batch(i64::MAX, i16::MAX, i32::MAX),
        };
        let b = e.encode();
        assert_eq!(PidxEntry::decode(&b), Some(e));
        for bit in 0..PIDX_ENTRY_LEN * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(PidxEntry::decode(&c), None, "bit {bit}");
        }
    }

    #[test]
    fn least_recently_used_producer_is_forgotten_and_counted() {
        let counters = Arc::new(Counters::default());
        let mut p = Producers::new(NonZeroUsize::new(2).unwrap(), Arc::clone(&counters));
        p.record(&batch(1, 0, 0), 1, 0);
        p.record(&batch(2, 0, 0), 1, 1);
        // A duplicate of producer 1 is a use: producer 2 is now the least recent.
        assert_eq!(
            p.check(&batch(1, 0, 0), 1).unwrap(),
            Decision::Duplicate {
                base_offset: 0,
                count: 1
            }
        );
        p.record(&batch(3, 0, 0), 1, 2);
        assert_eq!(p.len(), 2);
        assert_eq!(counters.producers.load(Ordering::Relaxed), 2);
        let e = p.check(&batch(2, 0, 1), 1).unwrap_err();
        assert!(
            matches!(
                e,
                StorageError::UnknownProducer {
                    producer_id: 2,
                    sequence: 1
                }
            ),
            "{e:?}"
        );
        assert_eq!(p.check(&batch(1, 0, 1), 1).unwrap(), Decision::Append);
        drop(p);
        assert_eq!(counters.producers.load(Ordering::Relaxed), 0);
    }

    /// A producer in the reference: its epoch and the batches of that epoch, in order, as
    /// (sequence, count, offset).
    type ModelProducer = (i16, Vec<(i32, u32, i64)>);

    /// The reference: every batch ever appended, per producer, with the epoch it came in, and
    /// the order of uses; the rules of §6.2 read straight off it.
    #[derive(Default)]
    struct Model {
        /// producer → (epoch, batches of that epoch in order: (seq, count, offset))
        state: std::collections::HashMap<i64, ModelProducer>,
        /// producers, least recently used first
        uses: Vec<i64>,
        end: i64,
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        Appended(i64),
        Duplicate(i64, u32),
        Code(u16),
    }

    impl Model {
        fn touch(&mut self, id: i64, max: usize) {
            self.uses.retain(|&u| u != id);
            self.uses.push(id);
            while self.uses.len() > max {
                let gone = self.uses.remove(0);
                self.state.remove(&gone);
            }
        }

        fn produce(&mut self, b: ProducerBatch, count: u32, max: usize) -> Outcome {
            let id = b.producer_id;
            let append = |m: &mut Model, restart: bool| {
                let at = m.end;
                m.end += i64::from(count);
                let e = m.state.entry(id).or_insert((b.epoch, Vec::new()));
                if restart {
                    *e = (b.epoch, Vec::new());
                }
                e.1.push((b.base_sequence, count, at));
                m.touch(id, max);
                Outcome::Appended(at)
            };
            let Some((epoch, batches)) = self.state.get(&id).cloned() else {
                return if b.base_sequence == 0 {
                    append(self, true)
                } else {
                    Outcome::Code(14)
                };
            };
            if b.epoch < epoch {
                return Outcome::Code(30);
            }
            if b.epoch > epoch {
                return if b.base_sequence == 0 {
                    append(self, true)
                } else {
                    Outcome::Code(13)
                };
            }
            let last5 = &batches[batches.len().saturating_sub(KEPT_BATCHES)..];
            if let Some(&(_, n, off)) = last5
                .iter()
                .find(|&&(s, n, _)| s == b.base_sequence && n == count)
            {
                self.touch(id, max);
                return Outcome::Duplicate(off, n);
            }
            let &(s, n, _) = batches.last().unwrap();
            let expected = ((i64::from(s) + i64::from(n)) % (1 << 31)) as i32;
            if b.base_sequence == expected {
                append(self, false)
            } else {
                Outcome::Code(13)
            }
        }
    }

    fn run(p: &mut Producers, end: &mut i64, b: ProducerBatch, count: u32) -> Outcome {
        match p.check(&b, count) {
            Ok(Decision::Append) => {
                let at = *end;
                p.record(&b, count, at);
                *end += i64::from(count);
                Outcome::Appended(at)
            }
            Ok(Decision::Duplicate { base_offset, count }) => {
                Outcome::Duplicate(base_offset, count)
            }
            Err(e) => Outcome::Code(e.error_code().0),
        }
    }

    /// Requests that hit every row of the table often: few producers, low epochs, and sequences
    /// that are mostly the next expected, a recent one, 0, or near the wrap.
    fn requests() -> impl Strategy<Value = Vec<(i64, i16, u8, i32, u32)>> {
        proptest::collection::vec((1i64..5, 0i16..3, 0u8..6, 0i32..40, 1u32..4), 1..200)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn table_agrees_with_the_reference_model(reqs in requests(), max in 1usize..5) {
            let mut p = table(max);
            let mut model = Model::default();
            let mut end = 0;
            for (id, epoch, pick, raw, count) in reqs {
                // Pick the sequence the way real clients and their retries do.
                let known = model.state.get(&id).cloned();
                let seq = match (pick, &known) {
                    (0 | 1, Some((_, bs))) => {
                        let &(s, n, _) = bs.last().unwrap();
                        ((i64::from(s) + i64::from(n)) % (1 << 31)) as i32
                    }
                    (2, Some((_, bs))) => bs[(raw as usize) % bs.len()].0,
                    (3, _) => 0,
                    (4, _) => i32::MAX - (raw % 3),
                    _ => raw,
                };
                let b = batch(id, epoch, seq);
                let want = model.produce(b, count, max);
                let got = run(&mut p, &mut end, b, count);
                prop_assert_eq!(&got, &want, "request {:?} x{}", b, count);
                prop_assert_eq!(end, model.end);
                prop_assert_eq!(p.len(), model.state.len());
            }
        }
    }
}

/// The idempotent producer state of a replicated partition, kept by its Raft state machine
/// (not by the log: a replica's table is the committed entries', see `docs/cluster.md`). The
/// same rules and bounds as a single broker's table; counted in the storage's producer gauges.
#[derive(Debug)]
pub struct ProducerTable(Producers);

impl ProducerTable {
    pub(crate) fn new(max: NonZeroUsize, counters: Arc<Counters>) -> Self {
        Self(Producers::new(max, counters))
    }

    /// Checks a batch of `count` (≥ 1) messages by protocol §6.2: `Ok(None)` to append it,
    /// `Ok(Some((base_offset, count)))` for a retry of a batch already in the log there.
    pub fn check(
        &mut self,
        batch: &ProducerBatch,
        count: u32,
    ) -> Result<Option<(i64, u32)>, StorageError> {
        Ok(match self.0.check(batch, count)? {
            Decision::Append => None,
            Decision::Duplicate { base_offset, count } => Some((base_offset, count)),
        })
    }

    /// Records a batch stored at `base_offset`.
    pub fn record(&mut self, batch: &ProducerBatch, count: u32, base_offset: i64) {
        self.0.record(batch, count, base_offset);
    }

    /// The table as a list (for a snapshot): see [`import`](Self::import).
    pub fn export(&self) -> Vec<(ProducerBatch, u32, i64)> {
        self.0.export()
    }

    /// Replaces the table with an exported one.
    pub fn import(&mut self, batches: &[(ProducerBatch, u32, i64)]) {
        self.0 = Producers::new(self.0.max, Arc::clone(&self.0.counters));
        for (b, count, base) in batches {
            self.0.record(b, *count, *base);
        }
    }
}
