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
//! | (default) | `crc`, slice-by-16 | 16 KiB in `.rodata` | portable, fastest table |
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
    #[cfg(not(feature = "crc-simd"))]
    inner: crc::Digest<'static, u32, Imp>,
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
            // The `crc` crate takes the initial value before reflection and the xorout, so
            // undo both: the running register of a finalized value `c` is `!c`.
            Self {
                inner: CRC.digest_with_initial((!crc).reverse_bits()),
            }
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
        self.inner.update(bytes);
    }

    /// The checksum of everything fed so far.
    #[inline]
    pub fn finalize(self) -> u32 {
        self.inner.finalize()
    }
}

/// `a · b mod P` in GF(2), both in reflected bit order.
const fn mul_mod_p(a: u32, mut b: u32) -> u32 {
    let mut m: u32 = 1 << 31;
    let mut p: u32 = 0;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
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
        k += 1;
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
}
