//! Errors, split by who is at fault: the peer's bytes ([`DecodeError`]) or the caller's buffer
//! and values ([`EncodeError`]).

use core::fmt;

use crate::wire::types::ErrorCode;

/// What exactly was wrong inside an intact frame's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Malformed {
    /// The payload ended inside the named field.
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// A count claims more elements than the remaining bytes can hold.
    CountTooLarge {
        /// The field holding the count.
        field: &'static str,
        /// The count as read.
        count: u32,
    },
    /// A topic name is empty, longer than 249 bytes, not UTF-8, `.`/`..`, or has a byte outside
    /// `[A-Za-z0-9._-]`.
    InvalidTopicName {
        /// The length of the offending name.
        len: usize,
    },
    /// A bool field holds something other than 0 or 1.
    InvalidBool {
        /// The field being read.
        field: &'static str,
        /// The byte as read.
        value: u8,
    },
    /// A response's Status byte is not 0 (success) or 1 (error).
    InvalidStatus {
        /// The byte as read.
        value: u8,
    },
    /// Bytes after the last field where the format allows none.
    TrailingBytes {
        /// How many bytes were left over.
        len: usize,
    },
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Truncated { field } => write!(f, "payload ends inside field {field}"),
            Self::CountTooLarge { field, count } => {
                write!(f, "{field} = {count} is larger than the bytes present")
            }
            Self::InvalidTopicName { len } => write!(
                f,
                "invalid topic name ({len} bytes): want 1-249 bytes of [A-Za-z0-9._-], not . or .."
            ),
            Self::InvalidBool { field, value } => {
                write!(f, "{field} = {value} is not a bool (0 or 1)")
            }
            Self::InvalidStatus { value } => write!(f, "response status {value} is not 0 or 1"),
            Self::TrailingBytes { len } => write!(f, "{len} unexpected bytes after the payload"),
        }
    }
}

impl core::error::Error for Malformed {}

/// The peer sent bytes that can't be accepted.
///
/// [`DecodeError::is_fatal`] tells whether the connection can go on (the frame boundary is
/// known and the frame can be skipped) or must be closed; [`DecodeError::error_code`] gives
/// the v1 error code for the error response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum DecodeError {
    /// The Length field is below the fixed header size: the stream can't be framed.
    FrameTooShort {
        /// The Length field as read.
        length: u32,
        /// The smallest valid Length.
        min: u32,
    },
    /// The Length field is above the configured maximum; decided on the 4 length bytes alone.
    FrameTooLarge {
        /// The Length field as read.
        length: u32,
        /// The configured maximum.
        max: u32,
    },
    /// The frame's CRC-32 does not match its bytes.
    ChecksumMismatch {
        /// The RequestID as read (it may itself be damaged).
        request_id: u64,
        /// The CRC carried by the frame.
        expected: u32,
        /// The CRC computed over the frame's bytes.
        actual: u32,
    },
    /// A request's Type byte names no known request.
    UnknownRequestType {
        /// The RequestID of the frame.
        request_id: u64,
        /// The Type byte as read.
        request_type: u8,
    },
    /// A request's Version is not 1.
    UnsupportedVersion {
        /// The RequestID of the frame.
        request_id: u64,
        /// The Version byte as read.
        version: u8,
    },
    /// The request uses a flag this broker can't honour (Compressed on a Produce).
    UnsupportedFlags {
        /// The RequestID of the frame.
        request_id: u64,
        /// The Flags field as read.
        flags: u16,
    },
    /// The payload of an intact frame doesn't follow the format.
    Malformed {
        /// What was wrong.
        reason: Malformed,
    },
    /// A message record inside a Produce or Fetch payload is malformed.
    CorruptMessage {
        /// Index of the message within its set.
        index: u32,
        /// What was wrong.
        reason: Malformed,
    },
}

impl DecodeError {
    /// Whether the connection must be closed: the stream can no longer be framed, or the
    /// frame is too large to buffer.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::FrameTooShort { .. } | Self::FrameTooLarge { .. }
        )
    }

    /// The v1 error code a broker answers this error with.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::FrameTooShort { .. } | Self::UnsupportedVersion { .. } => {
                ErrorCode::INVALID_PROTOCOL
            }
            Self::FrameTooLarge { .. } => ErrorCode::MESSAGE_TOO_LARGE,
            Self::ChecksumMismatch { .. } => ErrorCode::CHECKSUM_MISMATCH,
            Self::UnknownRequestType { .. } => ErrorCode::UNKNOWN_REQUEST,
            Self::Malformed { .. } | Self::UnsupportedFlags { .. } => ErrorCode::INVALID_REQUEST,
            Self::CorruptMessage { .. } => ErrorCode::CORRUPT_MESSAGE,
        }
    }
}

impl From<Malformed> for DecodeError {
    fn from(reason: Malformed) -> Self {
        Self::Malformed { reason }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FrameTooShort { length, min } => {
                write!(f, "frame length {length} is below the minimum {min}")
            }
            Self::FrameTooLarge { length, max } => {
                write!(f, "frame length {length} exceeds the maximum {max}")
            }
            Self::ChecksumMismatch {
                request_id,
                expected,
                actual,
            } => write!(
                f,
                "CRC mismatch in request {request_id}: frame says {expected:#010x}, bytes give {actual:#010x}"
            ),
            Self::UnknownRequestType { request_type, .. } => {
                write!(f, "unknown request type {request_type:#04x}")
            }
            Self::UnsupportedVersion { version, .. } => {
                write!(f, "unsupported protocol version {version} (want 1)")
            }
            Self::UnsupportedFlags { flags, .. } => write!(
                f,
                "compressed produce requests are not supported (flags {flags:#06x})"
            ),
            Self::Malformed { reason } => write!(f, "malformed payload: {reason}"),
            Self::CorruptMessage { index, reason } => {
                write!(f, "corrupt message #{index}: {reason}")
            }
        }
    }
}

impl core::error::Error for DecodeError {}

/// The caller asked for an encoding that can't be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum EncodeError {
    /// The output buffer is too small; nothing was written. Retry with `required` bytes.
    BufferTooSmall {
        /// The bytes the encoding needs.
        required: usize,
    },
    /// A field or the frame is longer than its u32 length prefix can express.
    TooLong {
        /// The length that did not fit.
        len: usize,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BufferTooSmall { required } => {
                write!(f, "buffer too small: {required} bytes required")
            }
            Self::TooLong { len } => write!(f, "length {len} does not fit in a u32 field"),
        }
    }
}

impl core::error::Error for EncodeError {}
