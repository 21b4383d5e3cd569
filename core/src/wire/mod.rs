//! Wire format: primitives, frames, messages, request and response payloads.

pub(crate) mod frame;
pub(crate) mod message;
#[cfg(feature = "metadata")]
pub(crate) mod metadata;
pub(crate) mod reader;
pub(crate) mod request;
pub(crate) mod response;
pub(crate) mod types;

use core::fmt;

use crate::error::{EncodeError, Malformed};

/// A value with a v1 wire encoding into a caller-owned buffer.
pub trait Encode {
    /// The exact number of bytes [`Encode::encode`] writes.
    fn encoded_len(&self) -> usize;

    /// Writes the encoding at the start of `buf` and returns its length.
    ///
    /// If `buf` is shorter than [`Encode::encoded_len`], returns
    /// [`EncodeError::BufferTooSmall`] and writes nothing.
    fn encode(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        let len = self.encoded_len();
        let out = buf
            .get_mut(..len)
            .ok_or(EncodeError::BufferTooSmall { required: len })?;
        let mut w = Writer::new(out);
        self.write(&mut w)?;
        Ok(w.pos)
    }

    /// Writes the encoding through `w`; `w` has room for [`Encode::encoded_len`] bytes.
    #[doc(hidden)]
    fn write(&self, w: &mut Writer<'_>) -> Result<(), EncodeError>;
}

/// [`Encode`]'s two required methods, what a frame encoder calls through `&dyn Payload`: an
/// encoder that names one request type links that type's codec and no other (the embedded
/// client's footprint depends on it), and `Encode::encode` never enters a vtable. `Sync`, so a
/// driver's future holding one is `Send` (the host SDK spawns it).
pub(crate) trait Payload: Sync {
    /// [`Encode::encoded_len`].
    fn payload_len(&self) -> usize;
    /// [`Encode::write`].
    fn write_payload(&self, w: &mut Writer<'_>) -> Result<(), EncodeError>;
}

/// The empty payload (ListTopics, HealthCheck).
impl Payload for () {
    fn payload_len(&self) -> usize {
        0
    }
    fn write_payload(&self, _: &mut Writer<'_>) -> Result<(), EncodeError> {
        Ok(())
    }
}

impl<T: Encode + Sync + ?Sized> Payload for T {
    fn payload_len(&self) -> usize {
        self.encoded_len()
    }
    fn write_payload(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.write(w)
    }
}

/// Peer-supplied text (an error message, a health status): bytes that should be UTF-8.
///
/// Kept as bytes so a peer's odd text never makes a whole reply undecodable; `Display`
/// replaces invalid sequences with U+FFFD.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Text<'a>(pub &'a [u8]);

impl<'a> Text<'a> {
    /// The text as `&str`, if it is UTF-8.
    pub fn as_str(&self) -> Option<&'a str> {
        core::str::from_utf8(self.0).ok()
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }
}

impl<'a> From<&'a str> for Text<'a> {
    fn from(s: &'a str) -> Self {
        Self(s.as_bytes())
    }
}

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            f.write_str(chunk.valid())?;
            if !chunk.invalid().is_empty() {
                f.write_str("\u{FFFD}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// A bounds-checked big-endian cursor over a peer's bytes.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// The bytes read since [`rest`](Self::rest) returned `start`.
    pub(crate) fn read_since(&self, start: &'a [u8]) -> &'a [u8] {
        let used = start.len().saturating_sub(self.buf.len());
        start.get(..used).unwrap_or_default()
    }

    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], Malformed> {
        if n > self.buf.len() {
            return Err(Malformed::Truncated { field });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], Malformed> {
        let (head, tail) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or(Malformed::Truncated { field })?;
        self.buf = tail;
        Ok(*head)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, Malformed> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }
    pub(crate) fn i8(&mut self, field: &'static str) -> Result<i8, Malformed> {
        Ok(i8::from_be_bytes(self.array(field)?))
    }
    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, Malformed> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }
    pub(crate) fn i16(&mut self, field: &'static str) -> Result<i16, Malformed> {
        Ok(i16::from_be_bytes(self.array(field)?))
    }
    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, Malformed> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }
    pub(crate) fn i32(&mut self, field: &'static str) -> Result<i32, Malformed> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }
    pub(crate) fn i64(&mut self, field: &'static str) -> Result<i64, Malformed> {
        Ok(i64::from_be_bytes(self.array(field)?))
    }

    /// A u32 length prefix, then that many bytes.
    pub(crate) fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], Malformed> {
        let len = self.u32(field)?;
        self.take(len as usize, field)
    }

    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, Malformed> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(Malformed::InvalidBool { field, value }),
        }
    }

    /// A count that is validated against the bytes left: each element takes at least
    /// `min_elem` bytes.
    pub(crate) fn count(&mut self, field: &'static str, min_elem: usize) -> Result<u32, Malformed> {
        let count = self.u32(field)?;
        if (count as usize).saturating_mul(min_elem) > self.buf.len() {
            return Err(Malformed::CountTooLarge { field, count });
        }
        Ok(count)
    }
}

/// A big-endian cursor over a caller's output buffer. Every write is bounds-checked; the
/// encoders size the buffer with `encoded_len()` first, so a failure means a length bug and
/// surfaces as an error instead of a panic.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn put(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        let end = self.pos.saturating_add(bytes.len());
        let dst = self
            .buf
            .get_mut(self.pos..end)
            .ok_or(EncodeError::BufferTooSmall { required: end })?;
        dst.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    pub(crate) fn u8(&mut self, v: u8) -> Result<(), EncodeError> {
        self.put(&[v])
    }
    pub(crate) fn u16(&mut self, v: u16) -> Result<(), EncodeError> {
        self.put(&v.to_be_bytes())
    }
    pub(crate) fn i16(&mut self, v: i16) -> Result<(), EncodeError> {
        self.put(&v.to_be_bytes())
    }
    pub(crate) fn u32(&mut self, v: u32) -> Result<(), EncodeError> {
        self.put(&v.to_be_bytes())
    }
    pub(crate) fn i32(&mut self, v: i32) -> Result<(), EncodeError> {
        self.put(&v.to_be_bytes())
    }
    pub(crate) fn u64(&mut self, v: u64) -> Result<(), EncodeError> {
        self.put(&v.to_be_bytes())
    }
    pub(crate) fn i64(&mut self, v: i64) -> Result<(), EncodeError> {
        self.put(&v.to_be_bytes())
    }

    /// A u32 length prefix, then the bytes.
    pub(crate) fn bytes(&mut self, v: &[u8]) -> Result<(), EncodeError> {
        self.u32(len_u32(v.len())?)?;
        self.put(v)
    }
}

/// A length as a u32 field.
pub(crate) fn len_u32(len: usize) -> Result<u32, EncodeError> {
    u32::try_from(len).map_err(|_| EncodeError::TooLong { len })
}
