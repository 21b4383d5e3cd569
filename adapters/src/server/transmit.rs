//! The transmit queue: encoded reply bytes with file ranges spliced in (sent with `sendfile`,
//! never copied through user space).

use std::collections::VecDeque;

use streambus_core::EncodeError;

use crate::FileChunk;

/// `buf[start..end]` waits to be written, with file ranges spliced in at given positions of
/// `buf`. The buffer keeps its initialized length, so bytes are zeroed once when it grows,
/// never per reply.
#[derive(Debug, Default)]
pub(crate) struct TxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The file ranges, on the heap once a reply had one: most connections never send one,
    /// and a transmit queue sits in every connection's task and outbox.
    files: Option<Box<Files>>,
}

/// File ranges spliced into a transmit queue.
#[derive(Debug, Default)]
struct Files {
    /// `(position in buf, range)`: the range goes out once `buf` is written up to the position.
    queue: VecDeque<(usize, FileChunk)>,
    /// Their bytes.
    bytes: u64,
}

/// What to write next.
#[derive(Debug)]
pub(crate) enum Pending<'a> {
    /// Nothing.
    None,
    /// These bytes.
    Bytes(&'a [u8]),
    /// This file range.
    File(&'a FileChunk),
}

impl TxBuf {
    /// Bytes waiting, file ranges included.
    pub(crate) fn waiting(&self) -> u64 {
        (self.end - self.start) as u64 + self.files.as_ref().map_or(0, |f| f.bytes)
    }

    /// The buffer's initialized size (what an idle connection would keep).
    pub(crate) fn capacity(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn push_bytes(&mut self, bytes: &[u8]) {
        let end = self.end + bytes.len();
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.buf[self.end..end].copy_from_slice(bytes);
        self.end = end;
    }

    pub(crate) fn push_file(&mut self, chunk: FileChunk) {
        if chunk.len > 0 {
            let files = self.files.get_or_insert_default();
            files.bytes += chunk.len;
            files.queue.push_back((self.end, chunk));
        }
    }

    pub(crate) fn pending(&self) -> Pending<'_> {
        match self.files.as_ref().and_then(|f| f.queue.front()) {
            Some((at, chunk)) if *at == self.start => Pending::File(chunk),
            Some((at, _)) => Pending::Bytes(&self.buf[self.start..*at]),
            None if self.start < self.end => Pending::Bytes(&self.buf[self.start..self.end]),
            None => Pending::None,
        }
    }

    pub(crate) fn sent(&mut self, n: usize) {
        match &mut self.files {
            Some(files) if files.queue.front().is_some_and(|(at, _)| *at == self.start) => {
                if let Some((_, chunk)) = files.queue.front_mut() {
                    let n = (n as u64).min(chunk.len);
                    chunk.offset += n;
                    chunk.len -= n;
                    files.bytes -= n;
                    if chunk.len == 0 {
                        files.queue.pop_front();
                    }
                }
            }
            _ => self.start += n,
        }
        if self.start >= self.end && self.files.as_ref().is_none_or(|f| f.queue.is_empty()) {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Appends one encoded frame, growing the buffer to what the encoder says it needs; an
    /// error other than a small buffer is returned (nothing written).
    pub(crate) fn append(
        &mut self,
        guess: usize,
        mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
    ) -> Result<(), EncodeError> {
        let mut size = guess;
        loop {
            if self.buf.len() < self.end + size {
                self.buf.resize(self.end + size, 0);
            }
            match encode(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                // The encoder names the size it needs; a second miss would be its bug.
                Err(EncodeError::BufferTooSmall { required }) if required > size => {
                    size = required;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves everything queued in `other` behind what this queue holds (a swap when this one
    /// is empty, so completed replies are not copied twice).
    pub(crate) fn take_from(&mut self, other: &mut TxBuf) {
        if other.waiting() == 0 {
            return;
        }
        if self.waiting() == 0 {
            std::mem::swap(self, other);
            other.start = 0;
            other.end = 0;
            return;
        }
        let shift = self.end - other.start;
        if let Some(theirs) = &mut other.files
            && !theirs.queue.is_empty()
        {
            let ours = self.files.get_or_insert_default();
            for (at, chunk) in theirs.queue.drain(..) {
                ours.queue.push_back((at + shift, chunk));
            }
            ours.bytes += std::mem::take(&mut theirs.bytes);
        }
        let (s, e) = (other.start, other.end);
        let end = self.end + (e - s);
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        self.buf[self.end..end].copy_from_slice(&other.buf[s..e]);
        self.end = end;
        other.start = 0;
        other.end = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(tx: &mut TxBuf) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let (item, n) = match tx.pending() {
                Pending::None => return out,
                Pending::Bytes(b) => (String::from_utf8_lossy(b).into_owned(), b.len()),
                Pending::File(f) => (format!("<file {}+{}>", f.offset, f.len), f.len as usize),
            };
            out.push(item);
            tx.sent(n);
        }
    }

    fn chunk(offset: u64, len: u64) -> FileChunk {
        let file = std::sync::Arc::new(tempfile_like());
        FileChunk { file, offset, len }
    }

    fn tempfile_like() -> std::fs::File {
        std::fs::File::open("/dev/null").expect("/dev/null opens")
    }

    /// Queued replies keep their order, file ranges in their place, whether the queue was
    /// empty (a swap) or not (a copy with shifted positions).
    #[test]
    fn take_from_keeps_bytes_and_file_ranges_in_order() {
        let mut a = TxBuf::default();
        let mut b = TxBuf::default();
        b.push_bytes(b"h1");
        b.push_file(chunk(0, 5));
        b.push_bytes(b"t1");
        a.take_from(&mut b);
        assert_eq!(b.waiting(), 0);
        b.push_bytes(b"h2");
        b.push_file(chunk(7, 3));
        b.push_bytes(b"t2");
        a.take_from(&mut b);
        assert_eq!(a.waiting(), 2 + 5 + 2 + 2 + 3 + 2);
        assert_eq!(
            drain(&mut a),
            ["h1", "<file 0+5>", "t1h2", "<file 7+3>", "t2"]
        );
    }
}
