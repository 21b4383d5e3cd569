//! The frame reader: the one place that turns a byte stream into frame boundaries.
//!
//! [`FrameDecoder`] holds the limits (the minimum and maximum Length field) and judges a
//! Length on its 4 bytes alone. [`FrameReader`] adds the resumable state — the shape of
//! tokio-util's `LengthDelimitedCodec` (`Head`, then `Data(n)`), except that the head is not
//! consumed: the caller owns the buffer and gets whole frames, Length field included. The
//! stateless [`FrameDecoder::next_frame`], [`ServerConnection`](crate::ServerConnection)
//! and [`ClientConnection`](crate::ClientConnection) all read frames through it.

use crate::error::DecodeError;

/// The Length field.
pub(crate) const LENGTH_LEN: usize = 4;
/// The smallest request Length field: RequestID, Type, Version, Flags (12) and the CRC (4).
pub(crate) const MIN_REQUEST_LENGTH: u32 = 16;
/// The smallest response Length field: RequestID, Status, ErrorCode (11) and the CRC (4).
pub(crate) const MIN_RESPONSE_LENGTH: u32 = 15;
/// The default maximum Length field (10 MiB), in both directions.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 10 * 1024 * 1024;

/// The outcome of an incremental decode: done, or more bytes are needed.
///
/// "Need more" is not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Status<T> {
    /// The value is complete.
    Complete(T),
    /// At least this many more bytes are needed.
    Partial(usize),
}

/// Finds frame boundaries in a byte stream and enforces the maximum frame length.
///
/// Stateless over the caller's buffer: hand it the unconsumed bytes, it says how long the
/// next frame is once all of it is there. The Length field is judged on its own 4 bytes, so
/// a frame that is too large is refused before its body is buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FrameDecoder {
    min_len: u32,
    max_len: u32,
}

impl Default for FrameDecoder {
    /// A request decoder with the default maximum.
    fn default() -> Self {
        Self::requests()
    }
}

impl FrameDecoder {
    /// A decoder for request frames (as a server reads them), default maximum.
    pub const fn requests() -> Self {
        Self::new(MIN_REQUEST_LENGTH, DEFAULT_MAX_FRAME_LEN)
    }

    /// A decoder for response frames (as a client reads them), default maximum.
    pub const fn responses() -> Self {
        Self::new(MIN_RESPONSE_LENGTH, DEFAULT_MAX_FRAME_LEN)
    }

    /// Limits taken as given: a maximum below the minimum refuses every frame (the
    /// connections' configs are plain fields and keep that meaning).
    pub(crate) const fn new(min_len: u32, max_len: u32) -> Self {
        Self { min_len, max_len }
    }

    /// Sets the largest accepted Length field (never below the minimum frame).
    pub const fn with_max_frame_len(mut self, max: u32) -> Self {
        self.max_len = if max < self.min_len {
            self.min_len
        } else {
            max
        };
        self
    }

    /// The largest accepted Length field.
    pub const fn max_frame_len(&self) -> u32 {
        self.max_len
    }

    /// The smallest valid Length field.
    pub const fn min_frame_len(&self) -> u32 {
        self.min_len
    }

    /// The total size (Length field included) of the frame at the start of `buf`, once all of
    /// it is in `buf`.
    ///
    /// Errors are fatal for the stream: [`DecodeError::FrameTooShort`] (it can't be framed)
    /// and [`DecodeError::FrameTooLarge`] (it must not be buffered).
    #[inline]
    pub fn next_frame(&self, buf: &[u8]) -> Result<Status<usize>, DecodeError> {
        FrameReader::new(*self).poll(buf)
    }

    /// Judges a Length field on its own: the whole frame's size, Length field included.
    #[inline]
    fn frame_len(&self, length: u32) -> Result<usize, DecodeError> {
        if length < self.min_len {
            return Err(DecodeError::FrameTooShort {
                length,
                min: self.min_len,
            });
        }
        let too_large = DecodeError::FrameTooLarge {
            length,
            max: self.max_len,
        };
        if length > self.max_len {
            return Err(too_large);
        }
        // Only a 16-bit target (or a 32-bit one with a maximum near 4 GiB) can't hold it.
        usize::try_from(length)
            .ok()
            .and_then(|l| l.checked_add(LENGTH_LEN))
            .ok_or(too_large)
    }
}

/// Where a [`FrameReader`] is in the frame at the front of the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
enum ReadState {
    /// Waiting for the 4 Length bytes.
    Head,
    /// The Length was accepted: the frame takes this many bytes, Length field included.
    Body(usize),
}

/// The resumable frame reader: [`FrameDecoder`]'s limits plus the state of the frame being
/// received, so the Length is judged once per frame and the frame's size is known while its
/// body arrives (to reserve it, or to refuse it when it can't fit a fixed buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub(crate) struct FrameReader {
    limits: FrameDecoder,
    state: ReadState,
}

impl FrameReader {
    /// A reader at the start of a frame.
    pub(crate) const fn new(limits: FrameDecoder) -> Self {
        Self {
            limits,
            state: ReadState::Head,
        }
    }

    /// `buf` holds the bytes received from the start of the current frame on (the same
    /// start at every call until the frame completes). Returns the frame's size once all of
    /// it is in `buf`, and is then ready for the next frame, which starts at that offset.
    ///
    /// An error (the Length is out of range) leaves the reader where it was: the stream
    /// can't go on.
    #[inline]
    pub(crate) fn poll(&mut self, buf: &[u8]) -> Result<Status<usize>, DecodeError> {
        let total = match self.state {
            ReadState::Body(total) => total,
            ReadState::Head => {
                let Some(head) = buf.first_chunk::<LENGTH_LEN>() else {
                    return Ok(Status::Partial(LENGTH_LEN.saturating_sub(buf.len())));
                };
                let total = self.limits.frame_len(u32::from_be_bytes(*head))?;
                self.state = ReadState::Body(total);
                total
            }
        };
        match total.checked_sub(buf.len()) {
            Some(missing @ 1..) => Ok(Status::Partial(missing)),
            _ => {
                self.state = ReadState::Head;
                Ok(Status::Complete(total))
            }
        }
    }

    /// The size of the frame being received, Length field included, once its Length was
    /// accepted.
    pub(crate) const fn frame_len(&self) -> Option<usize> {
        match self.state {
            ReadState::Head => None,
            ReadState::Body(total) => Some(total),
        }
    }
}

/// The size of a whole frame already accepted by a [`FrameReader`], read back from its
/// Length field.
pub(crate) fn accepted_frame_len(frame: &[u8]) -> usize {
    frame
        .first_chunk::<LENGTH_LEN>()
        .and_then(|l| usize::try_from(u32::from_be_bytes(*l)).ok())
        .map_or(0, |l| l.saturating_add(LENGTH_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(length: u32, total: usize) -> std::vec::Vec<u8> {
        let mut f = std::vec![0xAA; total];
        f[..4].copy_from_slice(&length.to_be_bytes());
        f
    }

    extern crate std;

    #[test]
    fn resumes_from_head_to_body_and_back() {
        let mut r = FrameReader::new(FrameDecoder::requests());
        let f = frame(16, 20);
        assert_eq!(r.poll(&f[..0]), Ok(Status::Partial(4)));
        assert_eq!(r.poll(&f[..3]), Ok(Status::Partial(1)));
        assert_eq!(r.frame_len(), None);
        assert_eq!(r.poll(&f[..4]), Ok(Status::Partial(16)));
        assert_eq!(r.frame_len(), Some(20));
        assert_eq!(r.poll(&f[..19]), Ok(Status::Partial(1)));
        assert_eq!(r.poll(&f), Ok(Status::Complete(20)));
        assert_eq!(r.frame_len(), None, "ready for the next frame");
    }

    #[test]
    fn limits_are_judged_on_four_bytes() {
        let mut r = FrameReader::new(FrameDecoder::responses().with_max_frame_len(100));
        assert_eq!(
            r.poll(&101u32.to_be_bytes()),
            Err(DecodeError::FrameTooLarge {
                length: 101,
                max: 100
            })
        );
        assert_eq!(
            r.poll(&14u32.to_be_bytes()),
            Err(DecodeError::FrameTooShort {
                length: 14,
                min: 15
            })
        );
        assert_eq!(r.frame_len(), None);
        assert_eq!(r.poll(&100u32.to_be_bytes()), Ok(Status::Partial(100)));
    }

    #[test]
    fn the_largest_length_never_overflows() {
        let mut r = FrameReader::new(FrameDecoder::new(MIN_REQUEST_LENGTH, u32::MAX));
        let got = r.poll(&u32::MAX.to_be_bytes());
        match usize::try_from(u32::MAX)
            .ok()
            .and_then(|l| l.checked_add(4))
        {
            Some(total) => assert_eq!(got, Ok(Status::Partial(total - 4))),
            None => assert!(matches!(got, Err(DecodeError::FrameTooLarge { .. }))),
        }
        assert_eq!(
            accepted_frame_len(&u32::MAX.to_be_bytes()),
            4 + u32::MAX as usize
        );
    }

    #[test]
    fn a_maximum_below_the_minimum_refuses_everything() {
        let d = FrameDecoder::new(MIN_REQUEST_LENGTH, 3);
        assert!(matches!(
            d.next_frame(&16u32.to_be_bytes()),
            Err(DecodeError::FrameTooLarge { .. })
        ));
    }
}
