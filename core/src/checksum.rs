//! CRC-32/ISO-HDLC (IEEE 802.3, zlib's `crc32`): the only file that knows the polynomial and
//! the implementation.
//!
//! Parameters: reflected polynomial `0xEDB88320`, init and xorout `0xFFFFFFFF`; the check
//! value is `checksum(b"123456789") == 0xCBF43926`.
//!
//! Implementations, chosen by feature:
//!
//! | feature | implementation | table | speed/size trade |
//! |---|---|---|---|
//! | (default) | slice-by-16 over the `crc` crate's tables | 16 KiB in `.rodata` | portable, fastest table |
//! | `crc-small-table` | `crc`, byte-at-a-time | 1 KiB in `.rodata` | for small flash |
//! | `crc-simd` | `crc32fast` (PCLMULQDQ / ARMv8 CRC at run time) | 1 KiB fallback | host speed |
//!
//! [`combine`] computes the checksum of a concatenation `A ‖ B` from `crc(A)`, `crc(B)` and
//! `len(B)` in `O(log len(B))` steps, without reading the bytes again (zlib's
//! `crc32_combine`, implemented here from the GF(2) polynomial arithmetic).

/// The reflected CRC-32/ISO-HDLC polynomial.
const POLY: u32 = 0xEDB8_8320;

#[cfg(all(not(feature = "crc-simd"), not(feature = "crc-small-table")))]
type Imp = crc::Table<16>;
#[cfg(all(not(feature = "crc-simd"), feature = "crc-small-table"))]
type Imp = crc::Table<1>;

#[cfg(not(feature = "crc-simd"))]
static CRC: crc::Crc<u32, Imp> = crc::Crc::<u32, Imp>::new(&crc::CRC_32_ISO_HDLC);

/// Runs the `crc` crate from the reflected running register `reg` (not finalized: the
/// checksum of what was hashed is `!reg`) over `bytes`; returns the new register.
#[cfg(feature = "crc-small-table")]
#[cfg(not(feature = "crc-simd"))]
#[inline(always)]
fn crc_update(reg: u32, bytes: &[u8]) -> u32 {
    // The crate takes the initial value before reflection, and finalizes with the xorout
    // (`!`); CRC_32_ISO_HDLC reflects both ways, so nothing else is applied.
    let mut d = CRC.digest_with_initial(reg.reverse_bits());
    d.update(bytes);
    !d.finalize()
}

/// Slice-by-16 over the `crc` crate's 16 tables (`t[k]` is the effect of one byte followed
/// by `k` zero bytes).
///
/// The crate's own loop XORs the 16 lookups in one serial chain and leaves `len % 16` bytes
/// to a byte-at-a-time loop whose every step waits for the previous lookup; on small frames
/// that tail is most of the cost. Here the lookups are XORed as a tree (only the 4 that
/// depend on the register sit on the loop-carried path) and the tail takes 8- and 4-byte
/// steps, so at most 3 bytes go one at a time.
#[cfg(not(any(feature = "crc-simd", feature = "crc-small-table")))]
// Every table index is a `u8` and every table has 256 entries; every other index is a
// constant into an array, so no index here can be out of bounds.
#[allow(clippy::indexing_slicing)]
#[inline]
fn update_register(mut reg: u32, bytes: &[u8]) -> u32 {
    let t: &[[u32; 256]; 16] = CRC.table();
    let lookup = |k: usize, b: u8| t[k][usize::from(b)];
    let (blocks, rest) = bytes.as_chunks::<16>();
    for b in blocks {
        let [c0, c1, c2, c3] = (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) ^ reg).to_le_bytes();
        let data = ((lookup(11, b[4]) ^ lookup(10, b[5])) ^ (lookup(9, b[6]) ^ lookup(8, b[7])))
            ^ ((lookup(7, b[8]) ^ lookup(6, b[9])) ^ (lookup(5, b[10]) ^ lookup(4, b[11])))
            ^ ((lookup(3, b[12]) ^ lookup(2, b[13])) ^ (lookup(1, b[14]) ^ lookup(0, b[15])));
        reg = ((lookup(15, c0) ^ lookup(14, c1)) ^ (lookup(13, c2) ^ lookup(12, c3))) ^ data;
    }
    let (words, rest) = rest.as_chunks::<8>();
    for b in words {
        let [c0, c1, c2, c3] = (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) ^ reg).to_le_bytes();
        reg = ((lookup(7, c0) ^ lookup(6, c1)) ^ (lookup(5, c2) ^ lookup(4, c3)))
            ^ ((lookup(3, b[4]) ^ lookup(2, b[5])) ^ (lookup(1, b[6]) ^ lookup(0, b[7])));
    }
    let (words, rest) = rest.as_chunks::<4>();
    for b in words {
        let [c0, c1, c2, c3] = (u32::from_le_bytes(*b) ^ reg).to_le_bytes();
        reg = (lookup(3, c0) ^ lookup(2, c1)) ^ (lookup(1, c2) ^ lookup(0, c3));
    }
    for &b in rest {
        let [low, ..] = reg.to_le_bytes();
        reg = (reg >> 8) ^ lookup(0, low ^ b);
    }
    reg
}

#[cfg(feature = "crc-small-table")]
#[cfg(not(feature = "crc-simd"))]
#[inline]
fn update_register(reg: u32, bytes: &[u8]) -> u32 {
    crc_update(reg, bytes)
}

/// The CRC-32 of `bytes`.
#[inline]
pub fn checksum(bytes: &[u8]) -> u32 {
    let mut h = Hasher::new();
    h.update(bytes);
    h.finalize()
}

/// An incremental CRC-32: `update` with consecutive slices gives the checksum of their
/// concatenation.
#[derive(Clone)]
pub struct Hasher {
    /// The reflected running register: the checksum so far is `!reg`.
    #[cfg(not(feature = "crc-simd"))]
    reg: u32,
    #[cfg(feature = "crc-simd")]
    inner: crc32fast::Hasher,
}

impl core::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Hasher").finish_non_exhaustive()
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}

impl Hasher {
    /// A hasher for an empty input.
    #[inline]
    pub fn new() -> Self {
        Self::resume(0)
    }

    /// A hasher that continues after bytes whose checksum is `crc`.
    #[inline]
    pub fn resume(crc: u32) -> Self {
        #[cfg(not(feature = "crc-simd"))]
        {
            Self { reg: !crc }
        }
        #[cfg(feature = "crc-simd")]
        {
            Self {
                inner: crc32fast::Hasher::new_with_initial(crc),
            }
        }
    }

    /// Feeds more bytes.
    #[inline]
    pub fn update(&mut self, bytes: &[u8]) {
        #[cfg(not(feature = "crc-simd"))]
        {
            self.reg = update_register(self.reg, bytes);
        }
        #[cfg(feature = "crc-simd")]
        self.inner.update(bytes);
    }

    /// The checksum of everything fed so far.
    #[inline]
    pub fn finalize(self) -> u32 {
        #[cfg(not(feature = "crc-simd"))]
        {
            !self.reg
        }
        #[cfg(feature = "crc-simd")]
        {
            self.inner.finalize()
        }
    }
}

/// `a · b mod P` in GF(2), both in reflected bit order.
const fn mul_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m: u32 = 1 << 31;
    let mut p: u32 = 0;
    loop {
        if a & m != 0 {
            p ^= b;
            // `m` is a power of two here, so this is the mask of the bits below it.
            if a & m.wrapping_sub(1) == 0 {
                break;
            }
        }
        m >>= 1;
        if m == 0 {
            break;
        }
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
    p
}

/// `X2N[k] = x^(2^k) mod P`. Evaluated at compile time: an out-of-range index here would be a
/// build error, not a run-time panic.
#[allow(clippy::indexing_slicing)]
const X2N: [u32; 32] = {
    let mut t = [0u32; 32];
    let mut p: u32 = 1 << 30; // x^1
    let mut k = 0;
    while k < 32 {
        t[k] = p;
        p = mul_mod_p(p, p);
        k += 1;
    }
    t
};

/// `x^(n · 2^k) mod P`.
#[allow(clippy::indexing_slicing)] // `k & 31` is always below `X2N.len() == 32`.
const fn x2n_mod_p(mut n: u64, mut k: usize) -> u32 {
    let mut p: u32 = 1 << 31; // x^0 = 1
    while n != 0 {
        if n & 1 != 0 {
            p = mul_mod_p(X2N[k & 31], p);
        }
        n >>= 1;
        // At most 64 steps; only `k & 31` is used.
        k = k.wrapping_add(1);
    }
    p
}

/// The CRC-32 of `A ‖ B`, given `crc_a = checksum(A)`, `crc_b = checksum(B)` and
/// `len_b = B.len()`.
///
/// ```
/// use streambus_core::checksum::{checksum, combine};
/// let (a, b) = (b"hello, ".as_slice(), b"world".as_slice());
/// assert_eq!(combine(checksum(a), checksum(b), b.len() as u64), checksum(b"hello, world"));
/// ```
#[inline]
pub const fn combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    // Shifting A's register by 8·len_b zero bits: multiply by x^(8·len_b) = x^(len_b · 2^3).
    mul_mod_p(x2n_mod_p(len_b, 3), crc_a) ^ crc_b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value() {
        assert_eq!(checksum(b"123456789"), 0xCBF4_3926);
        assert_eq!(checksum(b""), 0);
    }

    #[test]
    fn resume_equals_one_shot() {
        let data = b"The quick brown fox jumps over the lazy dog";
        for cut in 0..=data.len() {
            let (a, b) = data.split_at(cut);
            let mut h = Hasher::resume(checksum(a));
            h.update(b);
            assert_eq!(h.finalize(), checksum(data), "cut {cut}");
        }
    }

    #[test]
    fn combine_matches_one_shot() {
        let data: [u8; 300] = core::array::from_fn(|i| (i * 7 + 3) as u8);
        for cut in 0..=data.len() {
            let (a, b) = data.split_at(cut);
            assert_eq!(
                combine(checksum(a), checksum(b), b.len() as u64),
                checksum(&data)
            );
        }
    }

    /// The padded-head fast path against the `crc` crate's byte-at-a-time reference, for
    /// every length, alignment and resume point.
    #[test]
    fn matches_bytewise_reference() {
        let reference = crc::Crc::<u32, crc::Table<1>>::new(&crc::CRC_32_ISO_HDLC);
        let data: [u8; 200] = core::array::from_fn(|i| (i * 131 + 17) as u8);
        for start in 0..17 {
            for end in start..data.len() {
                let bytes = &data[start..end];
                assert_eq!(checksum(bytes), reference.checksum(bytes), "{start}..{end}");
            }
        }
        for cut in 0..data.len() {
            let (a, b) = data.split_at(cut);
            let mut h = Hasher::new();
            h.update(a);
            h.update(b);
            assert_eq!(h.finalize(), reference.checksum(&data), "cut {cut}");
        }
    }
}
