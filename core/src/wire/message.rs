//! The message record, inside Produce requests and Fetch responses:
//!
//! ```text
//! Offset i64 | Timestamp i64 (Unix ns) | KeyLen u32 | Key | ValueLen u32 | Value |
//! NumHeaders u32 | NumHeaders × ( HKeyLen u32 | HKey | HValLen u32 | HVal )
//! ```
//!
//! A [`MessageSet`] is a validated run of records kept as the bytes they arrived in: iterating
//! it yields borrowed [`Message`]s without copying, and a broker can store and send those bytes
//! as they are. [`MessageSetBuilder`] writes records into a caller buffer.

use core::fmt;

use crate::error::{DecodeError, EncodeError, Malformed};
use crate::wire::{Encode, Reader, Writer, len_u32};

/// The fixed part of a record: offset, timestamp and the three u32 counts.
pub const MESSAGE_FIXED_LEN: usize = 28;
/// The fixed part of a header entry: its two u32 lengths.
const HEADER_FIXED_LEN: usize = 8;
/// Offset of the Timestamp field inside a record.
const TIMESTAMP_AT: usize = 8;

/// One header: a key and a value, both raw bytes (the original SDK allows any bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Header<'a> {
    /// The header key.
    pub key: &'a [u8],
    /// The header value.
    pub value: &'a [u8],
}

#[derive(Clone, Copy)]
enum HeadersRepr<'a> {
    Wire { count: u32, bytes: &'a [u8] },
    Slice(&'a [Header<'a>]),
}

/// A message's headers: a list, in order, duplicates allowed. Either borrowed from wire bytes
/// (as decoded) or from a caller's slice (to encode).
#[derive(Clone, Copy)]
pub struct Headers<'a>(HeadersRepr<'a>);

impl<'a> Headers<'a> {
    /// No headers.
    pub const EMPTY: Headers<'static> = Headers(HeadersRepr::Slice(&[]));

    /// Headers to encode.
    pub const fn from_slice(headers: &'a [Header<'a>]) -> Self {
        Self(HeadersRepr::Slice(headers))
    }

    /// The number of headers.
    pub fn len(&self) -> usize {
        match self.0 {
            HeadersRepr::Wire { count, .. } => count as usize,
            HeadersRepr::Slice(s) => s.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The headers in order.
    pub fn iter(&self) -> HeadersIter<'a> {
        HeadersIter(match self.0 {
            HeadersRepr::Wire { count, bytes } => IterRepr::Wire {
                left: count,
                r: Reader::new(bytes),
            },
            HeadersRepr::Slice(s) => IterRepr::Slice(s.iter()),
        })
    }

    /// Bytes of the encoding, the NumHeaders count included.
    pub fn encoded_len(&self) -> usize {
        let headers = match self.0 {
            HeadersRepr::Wire { bytes, .. } => bytes.len(),
            HeadersRepr::Slice(s) => s.iter().fold(0, |sum: usize, h| {
                sum.saturating_add(HEADER_FIXED_LEN)
                    .saturating_add(h.key.len())
                    .saturating_add(h.value.len())
            }),
        };
        headers.saturating_add(4)
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u32(len_u32(self.len())?)?;
        match self.0 {
            HeadersRepr::Wire { bytes, .. } => w.put(bytes),
            HeadersRepr::Slice(s) => s.iter().try_for_each(|h| {
                w.bytes(h.key)?;
                w.bytes(h.value)
            }),
        }
    }
}

impl Default for Headers<'_> {
    fn default() -> Self {
        Headers::EMPTY
    }
}

impl PartialEq for Headers<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Headers<'_> {}

impl fmt::Debug for Headers<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Headers<'_> {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "Headers({=usize})", self.len())
    }
}

#[derive(Clone)]
enum IterRepr<'a> {
    Wire { left: u32, r: Reader<'a> },
    Slice(core::slice::Iter<'a, Header<'a>>),
}

/// Iterator over [`Headers`].
#[derive(Clone)]
pub struct HeadersIter<'a>(IterRepr<'a>);

impl fmt::Debug for HeadersIter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeadersIter").finish_non_exhaustive()
    }
}

impl<'a> Iterator for HeadersIter<'a> {
    type Item = Header<'a>;

    fn next(&mut self) -> Option<Header<'a>> {
        match &mut self.0 {
            IterRepr::Slice(it) => it.next().copied(),
            IterRepr::Wire { left, r } => {
                *left = left.checked_sub(1)?;
                // Validated at construction; a failure here would end the iteration early.
                let key = r.bytes("header key").ok()?;
                let value = r.bytes("header value").ok()?;
                Some(Header { key, value })
            }
        }
    }
}

/// One message. Decoded messages borrow the frame; messages to encode borrow the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Message<'a> {
    /// The offset (assigned by the broker; ignored in a Produce).
    pub offset: i64,
    /// Unix time in ns; 0 in a Produce asks the broker to stamp its append time.
    pub timestamp: i64,
    /// The key; empty means absent.
    pub key: &'a [u8],
    /// The value; empty means absent.
    pub value: &'a [u8],
    /// The headers.
    pub headers: Headers<'a>,
}

impl<'a> Message<'a> {
    /// A message with a key and value, no headers, offset and timestamp 0.
    pub const fn new(key: &'a [u8], value: &'a [u8]) -> Self {
        Self {
            offset: 0,
            timestamp: 0,
            key,
            value,
            headers: Headers::EMPTY,
        }
    }

    /// Reads one record.
    fn read(r: &mut Reader<'a>) -> Result<Self, Malformed> {
        let offset = r.i64("message offset")?;
        let timestamp = r.i64("message timestamp")?;
        let key = r.bytes("message key")?;
        let value = r.bytes("message value")?;
        let count = r.count("message header count", HEADER_FIXED_LEN)?;
        let start = r.rest();
        for _ in 0..count {
            r.bytes("header key")?;
            r.bytes("header value")?;
        }
        let bytes = r.read_since(start);
        Ok(Self {
            offset,
            timestamp,
            key,
            value,
            headers: Headers(HeadersRepr::Wire { count, bytes }),
        })
    }
}

impl Encode for Message<'_> {
    fn encoded_len(&self) -> usize {
        (MESSAGE_FIXED_LEN - 4)
            .saturating_add(self.key.len())
            .saturating_add(self.value.len())
            .saturating_add(self.headers.encoded_len())
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.i64(self.offset)?;
        w.i64(self.timestamp)?;
        w.bytes(self.key)?;
        w.bytes(self.value)?;
        self.headers.write(w)
    }
}

/// A validated run of `count` message records, kept as their wire bytes.
#[derive(Clone, Copy, Default)]
pub struct MessageSet<'a> {
    count: u32,
    bytes: &'a [u8],
}

impl<'a> MessageSet<'a> {
    /// An empty set.
    pub const EMPTY: MessageSet<'static> = MessageSet {
        count: 0,
        bytes: &[],
    };

    /// Checks that `bytes` holds exactly `count` well-formed records.
    pub fn new_checked(count: u32, bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let set = Self::read(&mut r, count)?;
        if r.remaining() != 0 {
            return Err(DecodeError::CorruptMessage {
                index: count,
                reason: Malformed::TrailingBytes { len: r.remaining() },
            });
        }
        Ok(set)
    }

    /// A set over `bytes` said to hold `count` records, **without** validating them: for bytes
    /// the caller produced or checked before (a broker's own log). Nothing can go out of
    /// bounds: if the bytes are malformed after all, iteration just ends early, and encoding
    /// copies them as they are.
    pub fn new_unchecked(count: u32, bytes: &'a [u8]) -> Self {
        Self { count, bytes }
    }

    /// Reads `count` records from `r`, validating each.
    pub(crate) fn read(r: &mut Reader<'a>, count: u32) -> Result<Self, DecodeError> {
        if (count as usize).saturating_mul(MESSAGE_FIXED_LEN) > r.remaining() {
            return Err(Malformed::CountTooLarge {
                field: "message count",
                count,
            }
            .into());
        }
        let start = r.rest();
        for index in 0..count {
            Message::read(r).map_err(|reason| DecodeError::CorruptMessage { index, reason })?;
        }
        let bytes = r.read_since(start);
        Ok(Self { count, bytes })
    }

    /// The number of messages.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The records' wire bytes (without the count).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The messages in order, borrowed.
    pub fn iter(&self) -> MessageSetIter<'a> {
        MessageSetIter {
            left: self.count,
            r: Reader::new(self.bytes),
        }
    }

    /// Each record's wire bytes in order, for storing or copying records as they are.
    pub fn records(&self) -> RecordIter<'a> {
        RecordIter { inner: self.iter() }
    }
}

impl Encode for MessageSet<'_> {
    fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.put(self.bytes)
    }
}

impl PartialEq for MessageSet<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.count == other.count && self.bytes == other.bytes
    }
}

impl Eq for MessageSet<'_> {}

impl fmt::Debug for MessageSet<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for MessageSet<'_> {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(
            f,
            "MessageSet({=u32} messages, {=usize} bytes)",
            self.count,
            self.bytes.len()
        )
    }
}

/// Iterator over a [`MessageSet`]'s messages.
#[derive(Debug, Clone)]
pub struct MessageSetIter<'a> {
    left: u32,
    r: Reader<'a>,
}

impl<'a> Iterator for MessageSetIter<'a> {
    type Item = Message<'a>;

    fn next(&mut self) -> Option<Message<'a>> {
        self.left = self.left.checked_sub(1)?;
        // The set was validated at construction, so this can't fail; if it did, the
        // iteration would simply end.
        Message::read(&mut self.r).ok()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left as usize))
    }
}

/// Iterator over a [`MessageSet`]'s records as raw wire bytes.
#[derive(Debug, Clone)]
pub struct RecordIter<'a> {
    inner: MessageSetIter<'a>,
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let before = self.inner.r.rest();
        self.inner.next()?;
        Some(self.inner.r.read_since(before))
    }
}

/// Rewrites the Offset of a record in place, and its Timestamp when it is 0.
///
/// `record` must start at a record; returns its old timestamp, or `None` (writing nothing) if
/// `record` is shorter than the fixed fields.
pub fn stamp_record(record: &mut [u8], offset: i64, timestamp_if_zero: i64) -> Option<i64> {
    let fixed = record.get_mut(..TIMESTAMP_AT + 8)?;
    let (off, ts) = fixed.split_at_mut(TIMESTAMP_AT);
    off.copy_from_slice(&offset.to_be_bytes());
    let old = i64::from_be_bytes((&*ts).try_into().ok()?);
    if old == 0 {
        ts.copy_from_slice(&timestamp_if_zero.to_be_bytes());
    }
    Some(old)
}

/// Writes message records into a caller buffer, one [`push`](Self::push) at a time.
#[derive(Debug)]
pub struct MessageSetBuilder<'b> {
    buf: &'b mut [u8],
    len: usize,
    count: u32,
}

impl<'b> MessageSetBuilder<'b> {
    /// A builder writing into `buf`.
    pub fn new(buf: &'b mut [u8]) -> Self {
        Self {
            buf,
            len: 0,
            count: 0,
        }
    }

    /// Appends one record. If it doesn't fit, returns [`EncodeError::BufferTooSmall`] with the
    /// total buffer size needed and writes nothing.
    pub fn push(&mut self, message: &Message<'_>) -> Result<(), EncodeError> {
        let need = message.encoded_len();
        let count = self
            .count
            .checked_add(1)
            .ok_or(EncodeError::TooLong { len: usize::MAX })?;
        let required = self.len.saturating_add(need);
        let out = self
            .buf
            .get_mut(self.len..)
            .and_then(|free| free.get_mut(..need))
            .ok_or(EncodeError::BufferTooSmall { required })?;
        let n = message.encode(out)?;
        self.len = self.len.saturating_add(n);
        self.count = count;
        Ok(())
    }

    /// Messages written so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes left in the buffer.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.len)
    }

    /// The records written so far, as a set.
    pub fn as_set(&self) -> MessageSet<'_> {
        MessageSet {
            count: self.count,
            bytes: self.buf.get(..self.len).unwrap_or_default(),
        }
    }

    /// Ends the builder, returning the set over the caller's buffer.
    pub fn finish(self) -> MessageSet<'b> {
        let count = self.count;
        let len = self.len;
        let buf: &'b [u8] = self.buf;
        MessageSet {
            count,
            bytes: buf.get(..len).unwrap_or_default(),
        }
    }
}
