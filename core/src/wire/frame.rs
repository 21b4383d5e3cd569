//! Frames: the length-prefixed, CRC-protected envelope around every request and response.
//!
//! ```text
//! Request : Length u32 | RequestID u64 | Type u8   | Version u8 | Flags u16 | Payload | CRC32 u32
//! Response: Length u32 | RequestID u64 | Status u8 | ErrorCode u16          | Payload | CRC32 u32
//! ```
//!
//! Length counts every byte after itself, the CRC included. The CRC covers RequestID through
//! the end of Payload.

use crate::checksum;
use crate::error::{DecodeError, EncodeError, Malformed};
use crate::wire::reader::{LENGTH_LEN, MIN_REQUEST_LENGTH, MIN_RESPONSE_LENGTH};
use crate::wire::request::Request;
use crate::wire::response::{FetchResponse, FetchTrailer, Response};
use crate::wire::types::{ErrorCode, Flags, RequestType, ResponseStatus};
use crate::wire::{Encode, Payload, Writer, len_u32};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes before a request's payload, the Length field included.
pub const REQUEST_HEADER_LEN: usize = 16;
/// Bytes before a response's payload, the Length field included.
pub const RESPONSE_HEADER_LEN: usize = 15;
/// The CRC trailer.
pub(crate) const CRC_LEN: usize = 4;

// The smallest Length is the header after the Length field plus the CRC.
const _: () = assert!(MIN_REQUEST_LENGTH as usize == REQUEST_HEADER_LEN - LENGTH_LEN + CRC_LEN);
const _: () = assert!(MIN_RESPONSE_LENGTH as usize == RESPONSE_HEADER_LEN - LENGTH_LEN + CRC_LEN);

/// Bytes up to the end of the RequestID: what [`peek_request_id`] needs.
pub(crate) const REQUEST_ID_END: usize = field::REQUEST_ID.end;

/// Byte ranges of the header fields, frame-relative.
mod field {
    use core::ops::Range;
    pub(super) const LENGTH: Range<usize> = 0..4;
    pub(super) const REQUEST_ID: Range<usize> = 4..12;
    pub(super) const TYPE: usize = 12;
    pub(super) const VERSION: usize = 13;
    pub(super) const FLAGS: Range<usize> = 14..16;
    pub(super) const STATUS: usize = 12;
    pub(super) const ERROR_CODE: Range<usize> = 13..15;
}

/// The RequestID of a frame whose first 12 bytes are in `buf`, before the frame is complete
/// (to answer a frame that is too large without buffering it).
pub fn peek_request_id(buf: &[u8]) -> Option<u64> {
    let id = buf.get(field::REQUEST_ID)?;
    Some(u64::from_be_bytes(id.try_into().ok()?))
}

fn be_u32(buf: &[u8], at: core::ops::Range<usize>) -> u32 {
    buf.get(at)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

fn be_u16(buf: &[u8], at: core::ops::Range<usize>) -> u16 {
    buf.get(at)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u16::from_be_bytes)
}

fn be_u64(buf: &[u8], at: core::ops::Range<usize>) -> u64 {
    buf.get(at)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// Validates length consistency and the CRC of a whole frame with `header_len` bytes before
/// its payload and a Length of at least `min`.
fn check_frame(buf: &[u8], header_len: usize, min: u32) -> Result<(), DecodeError> {
    let length = be_u32(buf, field::LENGTH);
    if buf.len() < header_len.saturating_add(CRC_LEN) {
        return Err(DecodeError::FrameTooShort { length, min });
    }
    let after_length = buf.len().saturating_sub(LENGTH_LEN);
    let declared = usize::try_from(length).unwrap_or(usize::MAX);
    if declared != after_length {
        return Err(DecodeError::Malformed {
            reason: match after_length.checked_sub(declared) {
                Some(len) => Malformed::TrailingBytes { len },
                None => Malformed::Truncated { field: "frame" },
            },
        });
    }
    let Some((body, crc)) = buf.split_last_chunk::<CRC_LEN>() else {
        return Err(DecodeError::FrameTooShort { length, min });
    };
    let expected = u32::from_be_bytes(*crc);
    let actual = checksum::checksum(body.get(LENGTH_LEN..).unwrap_or_default());
    if expected != actual {
        return Err(DecodeError::ChecksumMismatch {
            request_id: be_u64(buf, field::REQUEST_ID),
            expected,
            actual,
        });
    }
    Ok(())
}

/// The fixed header of a request frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RequestHeader {
    /// Chosen by the client, echoed in the response.
    pub request_id: u64,
    /// The Type byte (see [`RequestType`]).
    pub request_type: u8,
    /// The protocol version (1).
    pub version: u8,
    /// Request flags.
    pub flags: Flags,
}

/// The fixed header of a response frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ResponseHeader {
    /// The RequestID of the request answered.
    pub request_id: u64,
    /// The Status byte (0 success, 1 error).
    pub status: u8,
    /// The error code (0 on success).
    pub error_code: ErrorCode,
}

/// A zero-copy view of one whole request frame, validated once by
/// [`RequestFrame::new_checked`]: length, minimum size and CRC. No accessor can fail after.
#[derive(Debug, Clone, Copy)]
pub struct RequestFrame<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> RequestFrame<T> {
    /// Checks that `buf` holds exactly one request frame with a matching CRC.
    pub fn new_checked(buf: T) -> Result<Self, DecodeError> {
        check_frame(buf.as_ref(), REQUEST_HEADER_LEN, MIN_REQUEST_LENGTH)?;
        Ok(Self { buf })
    }

    fn bytes(&self) -> &[u8] {
        self.buf.as_ref()
    }

    /// The RequestID.
    pub fn request_id(&self) -> u64 {
        be_u64(self.bytes(), field::REQUEST_ID)
    }

    /// The raw Type byte.
    pub fn request_type_byte(&self) -> u8 {
        self.bytes().get(field::TYPE).copied().unwrap_or(0)
    }

    /// The request type, if the Type byte names one.
    pub fn request_type(&self) -> Option<RequestType> {
        RequestType::from_u8(self.request_type_byte())
    }

    /// The Version byte.
    pub fn version(&self) -> u8 {
        self.bytes().get(field::VERSION).copied().unwrap_or(0)
    }

    /// The Flags field.
    pub fn flags(&self) -> Flags {
        Flags(be_u16(self.bytes(), field::FLAGS))
    }

    /// The whole fixed header.
    pub fn header(&self) -> RequestHeader {
        RequestHeader {
            request_id: self.request_id(),
            request_type: self.request_type_byte(),
            version: self.version(),
            flags: self.flags(),
        }
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        let b = self.bytes();
        b.get(REQUEST_HEADER_LEN..b.len().saturating_sub(CRC_LEN))
            .unwrap_or_default()
    }

    /// The whole frame.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes()
    }
}

impl<'a> RequestFrame<&'a [u8]> {
    /// The payload, borrowed for as long as the underlying bytes.
    pub fn payload_slice(&self) -> &'a [u8] {
        let b: &'a [u8] = self.buf;
        b.get(REQUEST_HEADER_LEN..b.len().saturating_sub(CRC_LEN))
            .unwrap_or_default()
    }
}

/// A zero-copy view of one whole response frame, validated once by
/// [`ResponseFrame::new_checked`].
#[derive(Debug, Clone, Copy)]
pub struct ResponseFrame<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> ResponseFrame<T> {
    /// Checks that `buf` holds exactly one response frame with a matching CRC.
    pub fn new_checked(buf: T) -> Result<Self, DecodeError> {
        check_frame(buf.as_ref(), RESPONSE_HEADER_LEN, MIN_RESPONSE_LENGTH)?;
        Ok(Self { buf })
    }

    /// A view of bytes that passed [`new_checked`](Self::new_checked) before (the accessors
    /// stay panic-free on any bytes; they just read garbage from unchecked ones).
    pub(crate) fn new_prechecked(buf: T) -> Self {
        Self { buf }
    }

    fn bytes(&self) -> &[u8] {
        self.buf.as_ref()
    }

    /// The RequestID being answered.
    pub fn request_id(&self) -> u64 {
        be_u64(self.bytes(), field::REQUEST_ID)
    }

    /// The raw Status byte.
    pub fn status_byte(&self) -> u8 {
        self.bytes().get(field::STATUS).copied().unwrap_or(0)
    }

    /// The status, if the byte names one.
    pub fn status(&self) -> Option<ResponseStatus> {
        ResponseStatus::from_u8(self.status_byte())
    }

    /// The ErrorCode field.
    pub fn error_code(&self) -> ErrorCode {
        ErrorCode(be_u16(self.bytes(), field::ERROR_CODE))
    }

    /// The whole fixed header.
    pub fn header(&self) -> ResponseHeader {
        ResponseHeader {
            request_id: self.request_id(),
            status: self.status_byte(),
            error_code: self.error_code(),
        }
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        let b = self.bytes();
        b.get(RESPONSE_HEADER_LEN..b.len().saturating_sub(CRC_LEN))
            .unwrap_or_default()
    }

    /// The whole frame.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes()
    }
}

impl<'a> ResponseFrame<&'a [u8]> {
    /// The payload, borrowed for as long as the underlying bytes.
    pub fn payload_slice(&self) -> &'a [u8] {
        let b: &'a [u8] = self.buf;
        b.get(RESPONSE_HEADER_LEN..b.len().saturating_sub(CRC_LEN))
            .unwrap_or_default()
    }
}

/// Writes a frame: `header` (which starts with the Length field), the payload, the CRC —
/// computed by `crc_of` over the covered bytes (RequestID through the end of the payload).
fn write_frame(
    header_len: usize,
    write_header: impl FnOnce(&mut Writer<'_>) -> Result<(), EncodeError>,
    payload: &(impl Payload + ?Sized),
    buf: &mut [u8],
    crc_of: impl FnOnce(&[u8]) -> u32,
) -> Result<usize, EncodeError> {
    // Saturated sums fail below: no buffer and no u32 Length is that large.
    let total = header_len
        .saturating_add(payload.payload_len())
        .saturating_add(CRC_LEN);
    let length = len_u32(total.saturating_sub(LENGTH_LEN))?;
    let out = buf
        .get_mut(..total)
        .ok_or(EncodeError::BufferTooSmall { required: total })?;
    let mut w = Writer::new(out);
    w.u32(length)?;
    write_header(&mut w)?;
    payload.write_payload(&mut w)?;
    let end = w.position();
    let too_small = EncodeError::BufferTooSmall { required: total };
    let (covered, tail) = out.split_at_mut_checked(end).ok_or(too_small)?;
    let crc = crc_of(covered.get(LENGTH_LEN..).unwrap_or_default());
    let tail = tail.first_chunk_mut::<CRC_LEN>().ok_or(too_small)?;
    *tail = crc.to_be_bytes();
    Ok(total)
}

/// The exact size of a request frame carrying `request`.
pub fn request_encoded_len(request: &Request<'_>) -> usize {
    request
        .encoded_len()
        .saturating_add(REQUEST_HEADER_LEN + CRC_LEN)
}

/// The exact size of a response frame carrying `response`.
pub fn response_encoded_len(response: &Response<'_>) -> usize {
    response
        .encoded_len()
        .saturating_add(RESPONSE_HEADER_LEN + CRC_LEN)
}

/// Encodes a whole request frame (version 1) into `buf`; returns its length.
///
/// If `buf` is too small, returns [`EncodeError::BufferTooSmall`] and writes nothing.
pub fn encode_request(
    request_id: u64,
    flags: Flags,
    request: &Request<'_>,
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    encode_request_payload(request_id, flags, request.request_type(), request, buf)
}

/// [`encode_request`] for a request given as its type and payload (a [`Request`] or one
/// variant's struct).
pub(crate) fn encode_request_payload(
    request_id: u64,
    flags: Flags,
    request_type: RequestType,
    payload: &dyn Payload,
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    write_frame(
        REQUEST_HEADER_LEN,
        |w| {
            w.u64(request_id)?;
            w.u8(request_type.as_u8())?;
            w.u8(PROTOCOL_VERSION)?;
            w.u16(flags.0)
        },
        payload,
        buf,
        checksum::checksum,
    )
}

/// Encodes a whole response frame into `buf`; returns its length.
///
/// [`Response::Error`] gets Status 1 and its code; every other variant Status 0 and code 0.
/// If `buf` is too small, returns [`EncodeError::BufferTooSmall`] and writes nothing.
pub fn encode_response(
    request_id: u64,
    response: &Response<'_>,
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    write_response(request_id, response, buf, checksum::checksum)
}

/// A response frame with the CRC computed by `crc_of`.
fn write_response(
    request_id: u64,
    response: &Response<'_>,
    buf: &mut [u8],
    crc_of: impl FnOnce(&[u8]) -> u32,
) -> Result<usize, EncodeError> {
    let (status, code) = match response {
        Response::Error(e) => (ResponseStatus::Error, e.code),
        _ => (ResponseStatus::Ok, ErrorCode::NONE),
    };
    write_frame(
        RESPONSE_HEADER_LEN,
        |w| {
            w.u64(request_id)?;
            w.u8(status.as_u8())?;
            w.u16(code.0)
        },
        response,
        buf,
        crc_of,
    )
}

/// Encodes a Fetch success frame whose records' CRC-32 is already known (`records_crc ==
/// checksum(fetch.messages.as_bytes())`, e.g. combined from stored batch CRCs with
/// [`checksum::combine`]), so the records are copied but not hashed again. The output is
/// byte-identical to [`encode_response`] of `Response::Fetch(*fetch)` when `records_crc` is
/// right; when it is wrong, the frame fails the receiver's CRC check — corruption is caught
/// end to end instead of being re-blessed.
pub fn encode_fetch_response(
    request_id: u64,
    fetch: &FetchResponse<'_>,
    records_crc: u32,
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    let records_len = fetch.messages.as_bytes().len();
    // Covered bytes: the header after Length (11), HighWaterMark and NumMessages (12), the
    // records, the trailer.
    let head_len = RESPONSE_HEADER_LEN - LENGTH_LEN + 12;
    let crc_of = |covered: &[u8]| {
        let tail_at = head_len.saturating_add(records_len);
        let head = checksum::checksum(covered.get(..head_len).unwrap_or_default());
        let tail = covered.get(tail_at..).unwrap_or_default();
        let with_records = checksum::combine(head, records_crc, records_len as u64);
        checksum::combine(with_records, checksum::checksum(tail), tail.len() as u64)
    };
    write_response(request_id, &Response::Fetch(*fetch), buf, crc_of)
}

/// Bytes of a Fetch success frame before its records: the response header, HighWaterMark and
/// NumMessages.
pub const FETCH_HEAD_LEN: usize = RESPONSE_HEADER_LEN + 12;
/// Bytes of a Fetch success frame after its records: the trailer and the CRC.
pub const FETCH_TAIL_LEN: usize = 16 + CRC_LEN;

/// The bytes around a Fetch success frame's records, for a sender that writes the records
/// from elsewhere (a file, with `sendfile`): `head ‖ records ‖ tail` is exactly the frame
/// [`encode_response`] writes for the same fetch (with its trailer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FetchFrameParts {
    /// Header, HighWaterMark, NumMessages.
    pub head: [u8; FETCH_HEAD_LEN],
    /// LastStableOffset, NextOffset, CRC.
    pub tail: [u8; FETCH_TAIL_LEN],
}

/// The head and tail of a Fetch success frame carrying `count` records of `records_len`
/// bytes whose CRC-32 is `records_crc`. Fails only when the frame would not fit a u32 Length.
pub fn encode_fetch_frame_parts(
    request_id: u64,
    high_water_mark: i64,
    count: u32,
    records_len: usize,
    records_crc: u32,
    trailer: FetchTrailer,
) -> Result<FetchFrameParts, EncodeError> {
    let length = len_u32(records_len.saturating_add(FETCH_HEAD_LEN - LENGTH_LEN + FETCH_TAIL_LEN))?;
    let mut head = [0u8; FETCH_HEAD_LEN];
    let mut w = Writer::new(&mut head);
    w.u32(length)?;
    w.u64(request_id)?;
    w.u8(ResponseStatus::Ok.as_u8())?;
    w.u16(ErrorCode::NONE.0)?;
    w.i64(high_water_mark)?;
    w.u32(count)?;
    let mut trailer_bytes = [0u8; 16];
    let mut w = Writer::new(&mut trailer_bytes);
    w.i64(trailer.last_stable_offset)?;
    w.i64(trailer.next_offset)?;
    let head_crc = checksum::checksum(head.get(LENGTH_LEN..).unwrap_or_default());
    let crc = checksum::combine(
        checksum::combine(head_crc, records_crc, records_len as u64),
        checksum::checksum(&trailer_bytes),
        16,
    );
    let mut tail = [0u8; FETCH_TAIL_LEN];
    let mut w = Writer::new(&mut tail);
    w.put(&trailer_bytes)?;
    w.u32(crc)?;
    Ok(FetchFrameParts { head, tail })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::reader::{FrameDecoder, Status};

    #[test]
    fn decoder_partial_until_complete() {
        let mut buf = [0u8; 64];
        let n = encode_request(7, Flags::NONE, &Request::HealthCheck, &mut buf).unwrap();
        let d = FrameDecoder::requests();
        for cut in 0..n {
            assert!(
                matches!(d.next_frame(&buf[..cut]), Ok(Status::Partial(k)) if k > 0),
                "cut {cut}"
            );
        }
        assert_eq!(d.next_frame(&buf[..n]), Ok(Status::Complete(n)));
    }

    #[test]
    fn too_large_decided_on_four_bytes() {
        let d = FrameDecoder::requests().with_max_frame_len(100);
        assert_eq!(
            d.next_frame(&101u32.to_be_bytes()),
            Err(DecodeError::FrameTooLarge {
                length: 101,
                max: 100
            })
        );
        assert_eq!(
            d.next_frame(&15u32.to_be_bytes()),
            Err(DecodeError::FrameTooShort {
                length: 15,
                min: 16
            })
        );
        assert_eq!(
            FrameDecoder::responses().next_frame(&15u32.to_be_bytes()),
            Ok(Status::Partial(15))
        );
    }
}
