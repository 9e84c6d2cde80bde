//! Aggregated GHASH for SM4-GCM on x86_64: PCLMULQDQ on xmm (1 block per
//! register), VPCLMULQDQ on ymm (2 blocks) and on zmm (4 blocks, AVX-512).
//!
//! Method (all three widths):
//! - GHASH is computed as POLYVAL over byte-reflected blocks (RFC 8452,
//!   appendix A): a GCM block `B` becomes the field element
//!   `u128::from_be_bytes(B)` (bit i = coefficient of x^i), the key is
//!   `K = mulX(H)`, and `dot(a, b) = a * b * x^-128 mod g` with
//!   `g = x^128 + x^127 + x^126 + x^121 + 1`.
//! - Horner's rule `S = dot(S + X, K)` is aggregated over up to 16 blocks:
//!   `S' = sum_j dot(X_j, K^(n - j))` (with `S` added into `X_0`), the
//!   unreduced 256-bit products are summed and reduced once (Gueron and
//!   Kounavis, "Intel Carry-Less Multiplication Instruction and its Usage for
//!   Computing the GCM Mode", Intel white paper 2010/2014, sections on
//!   aggregated reduction; Gueron, Langley, Lindell, RFC 8452 for the
//!   POLYVAL/GHASH correspondence).
//! - The reduction is two Montgomery folds by the constant
//!   `x^63 + x^62 + x^57` (0xC2 << 56), which divide by x^128.
//! - Key powers are stored as `pow[j] = K^(16 - j)`, so blocks `j..16` of a
//!   16-block group multiply `pow[j..16]` index for index. A short group of
//!   `n` blocks is placed at the end of a 16-block buffer and padded at the
//!   front with zero blocks up to the register width: zero blocks add
//!   nothing, so one code path handles every length.
//!
//! No branch or memory index depends on secret data (key, data, or state);
//! only lengths, which are public, steer the code.

use core::arch::x86_64::*;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::cpu::Sm4Path;

/// Blocks per aggregated reduction.
const GROUP: usize = 16;
const GROUP_BYTES: usize = 16 * GROUP;

/// Register width the hash runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Width {
    /// PCLMULQDQ on xmm (SSSE3 for the byte shuffle).
    Xmm,
    /// VPCLMULQDQ on ymm (AVX2).
    Ymm,
    /// VPCLMULQDQ on zmm (AVX-512 F + BW).
    Zmm,
}

impl Width {
    #[cfg(test)]
    pub(super) const ALL: [Width; 3] = [Width::Xmm, Width::Ymm, Width::Zmm];

    /// The width matching an SM4 path (the path's detection implies these
    /// features); `None` for the portable path.
    pub(super) fn for_path(path: Sm4Path) -> Option<Width> {
        match path {
            Sm4Path::Portable => None,
            Sm4Path::Aesni => Some(Width::Xmm),
            Sm4Path::GfniAvx2 => Some(Width::Ymm),
            Sm4Path::GfniAvx512 => Some(Width::Zmm),
        }
    }

    /// Whether the CPU has every feature the width's functions enable.
    pub(super) fn supported(self) -> bool {
        let xmm = is_x86_feature_detected!("pclmulqdq") && is_x86_feature_detected!("ssse3");
        let ymm = xmm && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("vpclmulqdq");
        match self {
            Width::Xmm => xmm,
            Width::Ymm => ymm,
            Width::Zmm => {
                ymm && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
            }
        }
    }
}

/// Hash key powers for one SM4-GCM key; zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
#[repr(C, align(64))]
pub(super) struct Key {
    /// `pow[j] = K^(16 - j)` (POLYVAL domain, little-endian lanes).
    pow: [[u8; 16]; GROUP],
    #[zeroize(skip)]
    width: Width,
}

impl Key {
    /// Precomputes the powers of the GCM hash key `h` (= E_K(0^128)).
    /// `None` when the CPU lacks the features of `width`.
    pub(super) fn new(h: &[u8; 16], width: Width) -> Option<Box<Key>> {
        if !width.supported() {
            return None;
        }
        let mut key = Box::new(Key {
            pow: [[0u8; 16]; GROUP],
            width,
        });
        // K = mulX(H) in the POLYVAL domain, without a secret branch.
        let mut hv = u128::from_be_bytes(*h);
        let mask = 0u128.wrapping_sub(hv >> 127);
        let mut k = (hv << 1) ^ (mask & 0xC200_0000_0000_0000_0000_0000_0000_0001);
        // SAFETY: every width includes PCLMULQDQ + SSSE3, checked above by
        // `width.supported()`.
        unsafe { powers(k, &mut key.pow) };
        hv.zeroize();
        k.zeroize();
        Some(key)
    }

    #[cfg(test)]
    pub(super) fn width(&self) -> Width {
        self.width
    }

    /// Absorbs `data` into the state `acc` (POLYVAL domain). A final partial
    /// block is zero-padded, so only the last call for a message may pass a
    /// length that is not a multiple of 16.
    #[inline]
    pub(super) fn update(&self, acc: &mut u128, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        // SAFETY: a `Key` only exists if `Key::new` found the features of
        // `self.width` (`Width::supported`), which are exactly the features
        // each function enables.
        unsafe {
            *acc = match self.width {
                Width::Xmm => update_xmm(&self.pow, *acc, data),
                Width::Ymm => update_ymm(&self.pow, *acc, data),
                Width::Zmm => update_zmm(&self.pow, *acc, data),
            }
        }
    }

    /// Absorbs the length block and returns GCM's `S` (before the XOR with
    /// E(J0)) as bytes.
    pub(super) fn finish(&self, acc: u128, aad_len: usize, ct_len: usize) -> [u8; 16] {
        let lens = ((aad_len as u128 * 8) << 64) | (ct_len as u128 * 8);
        // SAFETY: as in `update`; every width includes PCLMULQDQ + SSSE3.
        let s = unsafe { dot_u128(acc ^ lens, self.pow[GROUP - 1]) };
        s.to_be_bytes()
    }
}

#[inline(always)]
fn to_m128(v: u128) -> __m128i {
    // SAFETY: u128 and __m128i are both 16 bytes of plain data; every bit
    // pattern is valid for both; x86 is little-endian, so lane byte i is
    // `v.to_le_bytes()[i]`.
    unsafe { core::mem::transmute::<u128, __m128i>(v) }
}

#[inline(always)]
fn from_m128(v: __m128i) -> u128 {
    // SAFETY: see `to_m128`.
    unsafe { core::mem::transmute::<__m128i, u128>(v) }
}

/// Shuffle mask reversing the 16 bytes of each 128-bit lane.
#[inline(always)]
fn rev_mask() -> __m128i {
    to_m128(0x0001_0203_0405_0607_0809_0a0b_0c0d_0e0f)
}

macro_rules! xmm_fn {
    ($(#[$m:meta])* fn $name:ident $($rest:tt)*) => {
        $(#[$m])*
        #[inline]
        #[target_feature(enable = "pclmulqdq,ssse3")]
        unsafe fn $name $($rest)*
    };
}

xmm_fn! {
    /// Montgomery reduction: `(lo + mid * x^64 + hi * x^128) * x^-128 mod g`.
    fn reduce(lo: __m128i, mid: __m128i, hi: __m128i) -> __m128i {
        let c = _mm_set_epi64x(0xC200_0000_0000_0000u64 as i64, 0);
        // Fold the low 64 bits of `lo`: adding lo0 * g clears them; after
        // dividing by x^64 this leaves lo0 * (x^63 + x^62 + x^57) at the new
        // origin and lo0 at x^64 (the qword swap).
        let t = _mm_clmulepi64_si128(lo, c, 0x10);
        let mid = _mm_xor_si128(_mm_xor_si128(mid, t), _mm_shuffle_epi32(lo, 0x4e));
        // Same for the low 64 bits of the new value.
        let t = _mm_clmulepi64_si128(mid, c, 0x10);
        _mm_xor_si128(_mm_xor_si128(hi, t), _mm_shuffle_epi32(mid, 0x4e))
    }
}

xmm_fn! {
    /// Unreduced product `a * b` added into (lo, mid, hi).
    fn mul_acc(a: __m128i, b: __m128i, lo: &mut __m128i, mid: &mut __m128i, hi: &mut __m128i) {
        *lo = _mm_xor_si128(*lo, _mm_clmulepi64_si128(a, b, 0x00));
        *mid = _mm_xor_si128(*mid, _mm_clmulepi64_si128(a, b, 0x01));
        *mid = _mm_xor_si128(*mid, _mm_clmulepi64_si128(a, b, 0x10));
        *hi = _mm_xor_si128(*hi, _mm_clmulepi64_si128(a, b, 0x11));
    }
}

xmm_fn! {
    fn dot(a: __m128i, b: __m128i) -> __m128i {
        let (mut lo, mut mid, mut hi) = (_mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128());
        mul_acc(a, b, &mut lo, &mut mid, &mut hi);
        reduce(lo, mid, hi)
    }
}

xmm_fn! {
    fn dot_u128(a: u128, b: [u8; 16]) -> u128 {
        from_m128(dot(to_m128(a), to_m128(u128::from_le_bytes(b))))
    }
}

xmm_fn! {
    /// `pow[j] = K^(16 - j)`.
    fn powers(k: u128, pow: &mut [[u8; 16]; GROUP]) {
        let kv = to_m128(k);
        let mut p = kv;
        for j in (0..GROUP).rev() {
            pow[j] = from_m128(p).to_le_bytes();
            p = dot(p, kv);
        }
        // Leave no key power in a local (best effort: registers and
        // spills are outside our control).
        p = _mm_setzero_si128();
        core::hint::black_box(p);
    }
}

/// Copies the last `rest.len() < 256` bytes of a message (or of a call) to
/// the end of a 16-block buffer, zero-padded to whole blocks, and XORs the
/// state into its first block (in the GCM byte order). Returns the buffer
/// and the index of its first data block.
#[inline(always)]
fn tail_buffer(acc: u128, rest: &[u8]) -> ([u8; GROUP_BYTES], usize) {
    debug_assert!(!rest.is_empty() && rest.len() < GROUP_BYTES);
    let nb = rest.len().div_ceil(16);
    let first = GROUP - nb;
    let mut buf = [0u8; GROUP_BYTES];
    buf[16 * first..16 * first + rest.len()].copy_from_slice(rest);
    // The state is a POLYVAL-domain value v; the block whose reflection is
    // v is v.to_be_bytes(), and reflection is linear.
    let a = acc.to_be_bytes();
    for (b, x) in buf[16 * first..16 * first + 16].iter_mut().zip(a) {
        *b ^= x;
    }
    (buf, first)
}

// --- xmm: 1 block per register ---------------------------------------------

xmm_fn! {
    /// Hashes blocks `first..16` of `blocks` (a pointer to 16 readable
    /// blocks) with `pow[first..16]`; `acc` is added to block `first`.
    fn group_xmm(pow: &[[u8; 16]; GROUP], blocks: *const u8, first: usize, acc: __m128i) -> __m128i {
        let m = rev_mask();
        let (mut lo, mut mid, mut hi) = (_mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128());
        for (j, pj) in pow.iter().enumerate().skip(first) {
            let mut x = _mm_shuffle_epi8(_mm_loadu_si128(blocks.add(16 * j).cast()), m);
            if j == first {
                x = _mm_xor_si128(x, acc);
            }
            let p = _mm_loadu_si128(pj.as_ptr().cast());
            mul_acc(x, p, &mut lo, &mut mid, &mut hi);
        }
        reduce(lo, mid, hi)
    }
}

xmm_fn! {
    fn update_xmm(pow: &[[u8; 16]; GROUP], acc: u128, data: &[u8]) -> u128 {
        let mut a = to_m128(acc);
        let mut groups = data.chunks_exact(GROUP_BYTES);
        for g in &mut groups {
            a = group_xmm(pow, g.as_ptr(), 0, a);
        }
        let rest = groups.remainder();
        if rest.is_empty() {
            return from_m128(a);
        }
        let (mut buf, first) = tail_buffer(from_m128(a), rest);
        let r = from_m128(group_xmm(pow, buf.as_ptr(), first, _mm_setzero_si128()));
        buf.zeroize();
        r
    }
}

// --- ymm: 2 blocks per register --------------------------------------------

macro_rules! ymm_fn {
    ($(#[$m:meta])* fn $name:ident $($rest:tt)*) => {
        $(#[$m])*
        #[inline]
        #[target_feature(enable = "pclmulqdq,ssse3,avx2,vpclmulqdq")]
        unsafe fn $name $($rest)*
    };
}

ymm_fn! {
    /// As `group_xmm`, `first` even.
    fn group_ymm(pow: &[[u8; 16]; GROUP], blocks: *const u8, first: usize, acc: __m128i) -> __m128i {
        debug_assert!(first.is_multiple_of(2));
        let m = _mm256_broadcastsi128_si256(rev_mask());
        let z = _mm256_setzero_si256();
        let (mut lo, mut mid, mut hi) = (z, z, z);
        let mut j = first;
        while j < GROUP {
            let mut x = _mm256_shuffle_epi8(_mm256_loadu_si256(blocks.add(16 * j).cast()), m);
            if j == first {
                x = _mm256_xor_si256(x, _mm256_zextsi128_si256(acc));
            }
            let p = _mm256_loadu_si256(pow[j].as_ptr().cast());
            lo = _mm256_xor_si256(lo, _mm256_clmulepi64_epi128(x, p, 0x00));
            mid = _mm256_xor_si256(mid, _mm256_clmulepi64_epi128(x, p, 0x01));
            mid = _mm256_xor_si256(mid, _mm256_clmulepi64_epi128(x, p, 0x10));
            hi = _mm256_xor_si256(hi, _mm256_clmulepi64_epi128(x, p, 0x11));
            j += 2;
        }
        let h = |v: __m256i| _mm_xor_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        reduce(h(lo), h(mid), h(hi))
    }
}

ymm_fn! {
    fn update_ymm(pow: &[[u8; 16]; GROUP], acc: u128, data: &[u8]) -> u128 {
        let mut a = to_m128(acc);
        let mut groups = data.chunks_exact(GROUP_BYTES);
        for g in &mut groups {
            a = group_ymm(pow, g.as_ptr(), 0, a);
        }
        let rest = groups.remainder();
        if rest.is_empty() {
            return from_m128(a);
        }
        let (mut buf, first) = tail_buffer(from_m128(a), rest);
        let r = from_m128(group_ymm(pow, buf.as_ptr(), first & !1, _mm_setzero_si128()));
        buf.zeroize();
        r
    }
}

// --- zmm: 4 blocks per register --------------------------------------------

macro_rules! zmm_fn {
    ($(#[$m:meta])* fn $name:ident $($rest:tt)*) => {
        $(#[$m])*
        #[inline]
        #[target_feature(enable = "pclmulqdq,ssse3,avx2,vpclmulqdq,avx512f,avx512bw")]
        unsafe fn $name $($rest)*
    };
}

zmm_fn! {
    /// As `group_xmm`, `first` a multiple of 4.
    fn group_zmm(pow: &[[u8; 16]; GROUP], blocks: *const u8, first: usize, acc: __m128i) -> __m128i {
        debug_assert!(first.is_multiple_of(4));
        let m = _mm512_broadcast_i32x4(rev_mask());
        let z = _mm512_setzero_si512();
        let (mut lo, mut mid, mut hi) = (z, z, z);
        let mut j = first;
        while j < GROUP {
            let mut x = _mm512_shuffle_epi8(_mm512_loadu_si512(blocks.add(16 * j).cast()), m);
            if j == first {
                x = _mm512_xor_si512(x, _mm512_zextsi128_si512(acc));
            }
            let p = _mm512_loadu_si512(pow[j].as_ptr().cast());
            lo = _mm512_xor_si512(lo, _mm512_clmulepi64_epi128(x, p, 0x00));
            mid = _mm512_xor_si512(mid, _mm512_clmulepi64_epi128(x, p, 0x01));
            mid = _mm512_xor_si512(mid, _mm512_clmulepi64_epi128(x, p, 0x10));
            hi = _mm512_xor_si512(hi, _mm512_clmulepi64_epi128(x, p, 0x11));
            j += 4;
        }
        let h = |v: __m512i| {
            let y = _mm256_xor_si256(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
            _mm_xor_si128(_mm256_castsi256_si128(y), _mm256_extracti128_si256(y, 1))
        };
        reduce(h(lo), h(mid), h(hi))
    }
}

zmm_fn! {
    fn update_zmm(pow: &[[u8; 16]; GROUP], acc: u128, data: &[u8]) -> u128 {
        let mut a = to_m128(acc);
        let mut groups = data.chunks_exact(GROUP_BYTES);
        for g in &mut groups {
            a = group_zmm(pow, g.as_ptr(), 0, a);
        }
        let rest = groups.remainder();
        if rest.is_empty() {
            return from_m128(a);
        }
        let (mut buf, first) = tail_buffer(from_m128(a), rest);
        let r = from_m128(group_zmm(pow, buf.as_ptr(), first & !3, _mm_setzero_si128()));
        buf.zeroize();
        r
    }
}
