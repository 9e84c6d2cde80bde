//! AES-GCM on x86_64 with AES-NI + PCLMULQDQ, VAES + VPCLMULQDQ on 256-bit
//! vectors (AVX2) and VAES + VPCLMULQDQ on 512-bit vectors (AVX-512).
//!
//! GHASH is computed as POLYVAL over byte-reflected blocks (RFC 8452,
//! appendix A): every block is byte-reversed, the hash key is `H * x`, and
//! each product `a * b * x^-128` is reduced with two Montgomery folds by the
//! constant `x^63 + x^62 + x^57`. Products of up to 16 blocks are summed
//! unreduced and reduced once. The key powers are stored highest first
//! (`pow[j] = K^(16 - j)`), so the last `n` entries multiply `n` blocks.
//!
//! All code here is free of secret-dependent branches and memory indices.

use core::arch::x86_64::*;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Expanded key: round keys and GHASH key powers, zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
#[repr(C, align(64))]
pub(super) struct Keys {
    rk: [[u8; 16]; 15],
    /// `pow[j] = K^(16 - j)` in the byte-reflected POLYVAL domain.
    pow: [[u8; 16]; 16],
}

const CHUNK: usize = 256;

#[inline(always)]
fn ld(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` is 16 readable bytes; loadu has no alignment requirement.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

#[inline(always)]
fn st(v: __m128i) -> [u8; 16] {
    let mut b = [0u8; 16];
    // SAFETY: `b` is 16 writable bytes; storeu has no alignment requirement.
    unsafe { _mm_storeu_si128(b.as_mut_ptr().cast(), v) };
    b
}

macro_rules! base_fn {
    ($(#[$m:meta])* fn $name:ident $($rest:tt)*) => {
        $(#[$m])*
        #[inline]
        #[target_feature(enable = "aes,pclmulqdq,ssse3,sse4.1")]
        unsafe fn $name $($rest)*
    };
}

base_fn! {
    fn bswap(x: __m128i) -> __m128i {
        _mm_shuffle_epi8(x, _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))
    }
}

base_fn! {
    /// Unreduced product of `a` and `b`, added into (lo, mid, hi).
    fn mul_acc(a: __m128i, b: __m128i, acc: &mut (__m128i, __m128i, __m128i)) {
        acc.0 = _mm_xor_si128(acc.0, _mm_clmulepi64_si128(a, b, 0x00));
        acc.1 = _mm_xor_si128(acc.1, _mm_clmulepi64_si128(a, b, 0x01));
        acc.1 = _mm_xor_si128(acc.1, _mm_clmulepi64_si128(a, b, 0x10));
        acc.2 = _mm_xor_si128(acc.2, _mm_clmulepi64_si128(a, b, 0x11));
    }
}

base_fn! {
    /// Montgomery reduction of `lo + mid * x^64 + hi * x^128` by x^128.
    fn reduce(lo: __m128i, mid: __m128i, hi: __m128i) -> __m128i {
        let poly = _mm_set_epi64x(0xC200_0000_0000_0000u64 as i64, 0);
        let t = _mm_clmulepi64_si128(lo, poly, 0x10);
        let mid = _mm_xor_si128(_mm_xor_si128(mid, t), _mm_shuffle_epi32(lo, 0x4e));
        let t = _mm_clmulepi64_si128(mid, poly, 0x10);
        _mm_xor_si128(_mm_xor_si128(hi, t), _mm_shuffle_epi32(mid, 0x4e))
    }
}

base_fn! {
    fn dot(a: __m128i, b: __m128i) -> __m128i {
        let z = _mm_setzero_si128();
        let mut acc = (z, z, z);
        mul_acc(a, b, &mut acc);
        reduce(acc.0, acc.1, acc.2)
    }
}

base_fn! {
    /// Hashes `n <= 16` byte-reflected blocks into `acc`.
    fn ghash_n(pow: &[[u8; 16]; 16], acc: __m128i, blocks: &[__m128i]) -> __m128i {
        let n = blocks.len();
        debug_assert!((1..=16).contains(&n));
        let z = _mm_setzero_si128();
        let mut s = (z, z, z);
        for (j, b) in blocks.iter().enumerate() {
            let x = if j == 0 { _mm_xor_si128(*b, acc) } else { *b };
            mul_acc(x, ld(&pow[16 - n + j]), &mut s);
        }
        reduce(s.0, s.1, s.2)
    }
}

base_fn! {
    fn encrypt_block<const NR: usize>(rk: &[[u8; 16]; 15], x: __m128i) -> __m128i {
        let mut x = _mm_xor_si128(x, ld(&rk[0]));
        for k in rk.iter().take(NR).skip(1) {
            x = _mm_aesenc_si128(x, ld(k));
        }
        _mm_aesenclast_si128(x, ld(&rk[NR]))
    }
}

base_fn! {
    fn expand_step(prev: __m128i, assist: __m128i) -> __m128i {
        let mut x = prev;
        x = _mm_xor_si128(x, _mm_slli_si128(x, 4));
        x = _mm_xor_si128(x, _mm_slli_si128(x, 4));
        x = _mm_xor_si128(x, _mm_slli_si128(x, 4));
        _mm_xor_si128(x, assist)
    }
}

macro_rules! assist {
    ($x:expr, $rcon:literal, $shuf:literal) => {
        _mm_shuffle_epi32(_mm_aeskeygenassist_si128($x, $rcon), $shuf)
    };
}

base_fn! {
    /// Expands a 16- or 32-byte key and the GHASH key powers.
    fn expand(key: &[u8]) -> Keys {
        let mut rk = [_mm_setzero_si128(); 15];
        let nr;
        if key.len() == 16 {
            nr = 10;
            rk[0] = _mm_loadu_si128(key.as_ptr().cast());
            rk[1] = expand_step(rk[0], assist!(rk[0], 0x01, 0xff));
            rk[2] = expand_step(rk[1], assist!(rk[1], 0x02, 0xff));
            rk[3] = expand_step(rk[2], assist!(rk[2], 0x04, 0xff));
            rk[4] = expand_step(rk[3], assist!(rk[3], 0x08, 0xff));
            rk[5] = expand_step(rk[4], assist!(rk[4], 0x10, 0xff));
            rk[6] = expand_step(rk[5], assist!(rk[5], 0x20, 0xff));
            rk[7] = expand_step(rk[6], assist!(rk[6], 0x40, 0xff));
            rk[8] = expand_step(rk[7], assist!(rk[7], 0x80, 0xff));
            rk[9] = expand_step(rk[8], assist!(rk[8], 0x1b, 0xff));
            rk[10] = expand_step(rk[9], assist!(rk[9], 0x36, 0xff));
        } else {
            nr = 14;
            rk[0] = _mm_loadu_si128(key.as_ptr().cast());
            rk[1] = _mm_loadu_si128(key[16..].as_ptr().cast());
            rk[2] = expand_step(rk[0], assist!(rk[1], 0x01, 0xff));
            rk[3] = expand_step(rk[1], assist!(rk[2], 0x00, 0xaa));
            rk[4] = expand_step(rk[2], assist!(rk[3], 0x02, 0xff));
            rk[5] = expand_step(rk[3], assist!(rk[4], 0x00, 0xaa));
            rk[6] = expand_step(rk[4], assist!(rk[5], 0x04, 0xff));
            rk[7] = expand_step(rk[5], assist!(rk[6], 0x00, 0xaa));
            rk[8] = expand_step(rk[6], assist!(rk[7], 0x08, 0xff));
            rk[9] = expand_step(rk[7], assist!(rk[8], 0x00, 0xaa));
            rk[10] = expand_step(rk[8], assist!(rk[9], 0x10, 0xff));
            rk[11] = expand_step(rk[9], assist!(rk[10], 0x00, 0xaa));
            rk[12] = expand_step(rk[10], assist!(rk[11], 0x20, 0xff));
            rk[13] = expand_step(rk[11], assist!(rk[12], 0x00, 0xaa));
            rk[14] = expand_step(rk[12], assist!(rk[13], 0x40, 0xff));
        }
        let mut keys = Keys {
            rk: [[0u8; 16]; 15],
            pow: [[0u8; 16]; 16],
        };
        for (d, s) in keys.rk.iter_mut().zip(rk.iter_mut()) {
            *d = st(*s);
            *s = _mm_setzero_si128();
        }
        // H = E(0); K = H * x in the POLYVAL domain.
        let h = if nr == 10 {
            encrypt_block::<10>(&keys.rk, _mm_setzero_si128())
        } else {
            encrypt_block::<14>(&keys.rk, _mm_setzero_si128())
        };
        key_powers(h, &mut keys.pow);
        keys
    }
}

base_fn! {
    /// `pow[j] = K^(16 - j)` with `K = H * x` in the POLYVAL domain, from
    /// the GCM hash key `H` (as loaded from its 16 bytes).
    fn key_powers(h: __m128i, pow: &mut [[u8; 16]; 16]) {
        let mut hv = u128::from_le_bytes(st(bswap(h)));
        let mask = 0u128.wrapping_sub(hv >> 127);
        let mut k = (hv << 1) ^ (mask & 0xC200_0000_0000_0000_0000_0000_0000_0001);
        hv.zeroize();
        let kv = ld(&k.to_le_bytes());
        k.zeroize();
        let mut p = kv;
        for j in (0..16).rev() {
            pow[j] = st(p);
            p = dot(p, kv);
        }
    }
}

/// Per-message state shared by the paths.
struct Msg {
    /// Byte-reversed counter block: the 32-bit counter is the low dword.
    ctr: __m128i,
    acc: __m128i,
    ekj0: __m128i,
}

base_fn! {
    fn start<const NR: usize>(keys: &Keys, nonce: &[u8; 12], aad: &[u8]) -> Msg {
        let mut j0 = [0u8; 16];
        j0[..12].copy_from_slice(nonce);
        j0[15] = 1;
        let j0 = ld(&j0);
        let ekj0 = encrypt_block::<NR>(&keys.rk, j0);
        let ctr = _mm_add_epi32(bswap(j0), _mm_set_epi32(0, 0, 0, 1));
        let mut acc = _mm_setzero_si128();
        let mut blocks = [_mm_setzero_si128(); 16];
        for group in aad.chunks(CHUNK) {
            let n = group.len().div_ceil(16);
            for (b, c) in blocks.iter_mut().zip(group.chunks(16)) {
                let mut t = [0u8; 16];
                t[..c.len()].copy_from_slice(c);
                *b = bswap(ld(&t));
            }
            acc = ghash_n(&keys.pow, acc, &blocks[..n]);
        }
        Msg { ctr, acc, ekj0 }
    }
}

base_fn! {
    /// Processes the final `input.len() < 256` bytes one block at a time and
    /// returns the tag.
    fn finish<const NR: usize, const ENC: bool>(
        keys: &Keys,
        mut m: Msg,
        aad_len: usize,
        total_len: usize,
        input: &[u8],
        output: &mut [u8],
    ) -> [u8; 16] {
        debug_assert!(input.len() < CHUNK);
        let lens = _mm_set_epi64x((aad_len as i64) << 3, (total_len as i64) << 3);
        if !input.is_empty() {
            let n = input.len().div_ceil(16);
            let full = input.len() / 16;
            let mut blocks = [_mm_setzero_si128(); 16];
            let mut ks = [_mm_setzero_si128(); 16];
            for (i, k) in ks.iter_mut().enumerate().take(n) {
                let c = _mm_add_epi32(m.ctr, _mm_set_epi32(0, 0, 0, i as i32));
                *k = encrypt_block::<NR>(&keys.rk, bswap(c));
            }
            for i in 0..full {
                let x = _mm_loadu_si128(input.as_ptr().add(16 * i).cast());
                let y = _mm_xor_si128(x, ks[i]);
                _mm_storeu_si128(output.as_mut_ptr().add(16 * i).cast(), y);
                blocks[i] = bswap(if ENC { y } else { x });
            }
            let rem = input.len() - 16 * full;
            if rem > 0 {
                let mut t = [0u8; 16];
                t[..rem].copy_from_slice(&input[16 * full..]);
                let x = ld(&t);
                let mut y = st(_mm_xor_si128(x, ks[full]));
                output[16 * full..].copy_from_slice(&y[..rem]);
                y[rem..].fill(0);
                blocks[full] = bswap(if ENC { ld(&y) } else { x });
            }
            if n < 16 {
                // Hash the lengths block with the data: one reduction.
                blocks[n] = lens;
                let acc = ghash_n(&keys.pow, m.acc, &blocks[..n + 1]);
                return st(_mm_xor_si128(bswap(acc), m.ekj0));
            }
            m.acc = ghash_n(&keys.pow, m.acc, &blocks[..n]);
        }
        let acc = ghash_n(&keys.pow, m.acc, &[lens]);
        st(_mm_xor_si128(bswap(acc), m.ekj0))
    }
}

// ---------------------------------------------------------------------------
// AES-NI + PCLMULQDQ: 8 blocks per step, two steps per 256-byte chunk.

#[target_feature(enable = "aes,pclmulqdq,ssse3,sse4.1")]
unsafe fn chunks_aesni<const NR: usize, const ENC: bool>(
    keys: &Keys,
    m: &mut Msg,
    input: &[u8],
    output: &mut [u8],
) {
    let rev = _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut rk = [_mm_setzero_si128(); 15];
    for (d, s) in rk.iter_mut().zip(keys.rk.iter()) {
        *d = ld(s);
    }
    for (ic, oc) in input.chunks_exact(128).zip(output.chunks_exact_mut(128)) {
        let mut x = [_mm_setzero_si128(); 8];
        for (i, v) in x.iter_mut().enumerate() {
            let c = _mm_add_epi32(m.ctr, _mm_set_epi32(0, 0, 0, i as i32));
            *v = _mm_xor_si128(_mm_shuffle_epi8(c, rev), rk[0]);
        }
        m.ctr = _mm_add_epi32(m.ctr, _mm_set_epi32(0, 0, 0, 8));
        for k in rk.iter().take(NR).skip(1) {
            for v in x.iter_mut() {
                *v = _mm_aesenc_si128(*v, *k);
            }
        }
        let z = _mm_setzero_si128();
        let mut s = (z, z, z);
        for (i, v) in x.iter_mut().enumerate() {
            let inp = _mm_loadu_si128(ic.as_ptr().add(16 * i).cast());
            let out = _mm_xor_si128(_mm_aesenclast_si128(*v, rk[NR]), inp);
            _mm_storeu_si128(oc.as_mut_ptr().add(16 * i).cast(), out);
            let mut c = _mm_shuffle_epi8(if ENC { out } else { inp }, rev);
            if i == 0 {
                c = _mm_xor_si128(c, m.acc);
            }
            mul_acc(c, ld(&keys.pow[8 + i]), &mut s);
        }
        m.acc = reduce(s.0, s.1, s.2);
    }
}

#[target_feature(enable = "aes,pclmulqdq,ssse3,sse4.1")]
pub(super) unsafe fn crypt_aesni<const NR: usize, const ENC: bool>(
    keys: &Keys,
    nonce: &[u8; 12],
    aad: &[u8],
    input: &[u8],
    output: &mut [u8],
) -> [u8; 16] {
    let mut m = start::<NR>(keys, nonce, aad);
    let bulk = input.len() / 128 * 128;
    chunks_aesni::<NR, ENC>(keys, &mut m, &input[..bulk], &mut output[..bulk]);
    let (ti, to) = (&input[bulk..], &mut output[bulk..]);
    finish::<NR, ENC>(keys, m, aad.len(), input.len(), ti, to)
}

// ---------------------------------------------------------------------------
// VAES + VPCLMULQDQ on 256-bit vectors: 16 blocks (8 vectors) per chunk.

#[inline]
#[target_feature(enable = "aes,pclmulqdq,ssse3,sse4.1,avx2,vaes,vpclmulqdq")]
unsafe fn hsum256(v: __m256i) -> __m128i {
    _mm_xor_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1))
}

#[target_feature(enable = "aes,pclmulqdq,ssse3,sse4.1,avx2,vaes,vpclmulqdq")]
unsafe fn chunks_avx2<const NR: usize, const ENC: bool>(
    keys: &Keys,
    m: &mut Msg,
    input: &[u8],
    output: &mut [u8],
) {
    let rev = _mm256_broadcastsi128_si256(_mm_set_epi8(
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
    ));
    let mut rk = [_mm256_setzero_si256(); 15];
    for (d, s) in rk.iter_mut().zip(keys.rk.iter()) {
        *d = _mm256_broadcastsi128_si256(ld(s));
    }
    let mut pw = [_mm256_setzero_si256(); 8];
    for (i, p) in pw.iter_mut().enumerate() {
        *p = _mm256_loadu_si256(keys.pow.as_ptr().add(2 * i).cast());
    }
    let mut ctr = _mm256_add_epi32(
        _mm256_broadcastsi128_si256(m.ctr),
        _mm256_set_epi32(0, 0, 0, 1, 0, 0, 0, 0),
    );
    let two = _mm256_set_epi32(0, 0, 0, 2, 0, 0, 0, 2);
    for (ic, oc) in input
        .chunks_exact(CHUNK)
        .zip(output.chunks_exact_mut(CHUNK))
    {
        let mut x = [_mm256_setzero_si256(); 8];
        for v in x.iter_mut() {
            *v = _mm256_xor_si256(_mm256_shuffle_epi8(ctr, rev), rk[0]);
            ctr = _mm256_add_epi32(ctr, two);
        }
        for k in rk.iter().take(NR).skip(1) {
            for v in x.iter_mut() {
                *v = _mm256_aesenc_epi128(*v, *k);
            }
        }
        let z = _mm256_setzero_si256();
        let (mut lo, mut mid, mut hi) = (z, z, z);
        for (i, v) in x.iter_mut().enumerate() {
            let inp = _mm256_loadu_si256(ic.as_ptr().add(32 * i).cast());
            let out = _mm256_xor_si256(_mm256_aesenclast_epi128(*v, rk[NR]), inp);
            _mm256_storeu_si256(oc.as_mut_ptr().add(32 * i).cast(), out);
            let mut c = _mm256_shuffle_epi8(if ENC { out } else { inp }, rev);
            if i == 0 {
                c = _mm256_xor_si256(c, _mm256_set_m128i(_mm_setzero_si128(), m.acc));
            }
            lo = _mm256_xor_si256(lo, _mm256_clmulepi64_epi128(c, pw[i], 0x00));
            mid = _mm256_xor_si256(mid, _mm256_clmulepi64_epi128(c, pw[i], 0x01));
            mid = _mm256_xor_si256(mid, _mm256_clmulepi64_epi128(c, pw[i], 0x10));
            hi = _mm256_xor_si256(hi, _mm256_clmulepi64_epi128(c, pw[i], 0x11));
        }
        m.acc = reduce(hsum256(lo), hsum256(mid), hsum256(hi));
    }
    m.ctr = _mm256_castsi256_si128(_mm256_sub_epi32(
        ctr,
        _mm256_set_epi32(0, 0, 0, 1, 0, 0, 0, 0),
    ));
}

#[target_feature(enable = "aes,pclmulqdq,ssse3,sse4.1,avx2,vaes,vpclmulqdq")]
pub(super) unsafe fn crypt_avx2<const NR: usize, const ENC: bool>(
    keys: &Keys,
    nonce: &[u8; 12],
    aad: &[u8],
    input: &[u8],
    output: &mut [u8],
) -> [u8; 16] {
    let mut m = start::<NR>(keys, nonce, aad);
    let bulk = input.len() / CHUNK * CHUNK;
    if bulk > 0 {
        chunks_avx2::<NR, ENC>(keys, &mut m, &input[..bulk], &mut output[..bulk]);
    }
    let (ti, to) = (&input[bulk..], &mut output[bulk..]);
    finish::<NR, ENC>(keys, m, aad.len(), input.len(), ti, to)
}

// ---------------------------------------------------------------------------
// VAES + VPCLMULQDQ on 512-bit vectors: 16 blocks (4 vectors) per chunk.

#[inline]
#[target_feature(
    enable = "aes,pclmulqdq,ssse3,sse4.1,avx2,vaes,vpclmulqdq,avx512f,avx512bw,avx512vl"
)]
unsafe fn hsum512(v: __m512i) -> __m128i {
    let y = _mm256_xor_si256(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
    _mm_xor_si128(_mm256_castsi256_si128(y), _mm256_extracti128_si256(y, 1))
}

#[target_feature(
    enable = "aes,pclmulqdq,ssse3,sse4.1,avx2,vaes,vpclmulqdq,avx512f,avx512bw,avx512vl"
)]
unsafe fn chunks_avx512<const NR: usize, const ENC: bool>(
    keys: &Keys,
    m: &mut Msg,
    input: &[u8],
    output: &mut [u8],
) {
    let rev = _mm512_broadcast_i32x4(_mm_set_epi8(
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
    ));
    let mut rk = [_mm512_setzero_si512(); 15];
    for (d, s) in rk.iter_mut().zip(keys.rk.iter()) {
        *d = _mm512_broadcast_i32x4(ld(s));
    }
    let mut pw = [_mm512_setzero_si512(); 4];
    for (i, p) in pw.iter_mut().enumerate() {
        *p = _mm512_loadu_si512(keys.pow.as_ptr().add(4 * i).cast());
    }
    let mut ctr = _mm512_add_epi32(
        _mm512_broadcast_i32x4(m.ctr),
        _mm512_set_epi32(0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0),
    );
    let four = _mm512_broadcast_i32x4(_mm_set_epi32(0, 0, 0, 4));
    for (ic, oc) in input
        .chunks_exact(CHUNK)
        .zip(output.chunks_exact_mut(CHUNK))
    {
        let mut x = [_mm512_setzero_si512(); 4];
        for v in x.iter_mut() {
            *v = _mm512_xor_si512(_mm512_shuffle_epi8(ctr, rev), rk[0]);
            ctr = _mm512_add_epi32(ctr, four);
        }
        for k in rk.iter().take(NR).skip(1) {
            for v in x.iter_mut() {
                *v = _mm512_aesenc_epi128(*v, *k);
            }
        }
        let z = _mm512_setzero_si512();
        let (mut lo, mut mid, mut hi) = (z, z, z);
        for (i, v) in x.iter_mut().enumerate() {
            let inp = _mm512_loadu_si512(ic.as_ptr().add(64 * i).cast());
            let out = _mm512_xor_si512(_mm512_aesenclast_epi128(*v, rk[NR]), inp);
            _mm512_storeu_si512(oc.as_mut_ptr().add(64 * i).cast(), out);
            let mut c = _mm512_shuffle_epi8(if ENC { out } else { inp }, rev);
            if i == 0 {
                c = _mm512_xor_si512(c, _mm512_zextsi128_si512(m.acc));
            }
            lo = _mm512_xor_si512(lo, _mm512_clmulepi64_epi128(c, pw[i], 0x00));
            mid = _mm512_ternarylogic_epi64(
                mid,
                _mm512_clmulepi64_epi128(c, pw[i], 0x01),
                _mm512_clmulepi64_epi128(c, pw[i], 0x10),
                0x96,
            );
            hi = _mm512_xor_si512(hi, _mm512_clmulepi64_epi128(c, pw[i], 0x11));
        }
        m.acc = reduce(hsum512(lo), hsum512(mid), hsum512(hi));
    }
    m.ctr = _mm512_castsi512_si128(ctr);
}

#[target_feature(
    enable = "aes,pclmulqdq,ssse3,sse4.1,avx2,vaes,vpclmulqdq,avx512f,avx512bw,avx512vl"
)]
pub(super) unsafe fn crypt_avx512<const NR: usize, const ENC: bool>(
    keys: &Keys,
    nonce: &[u8; 12],
    aad: &[u8],
    input: &[u8],
    output: &mut [u8],
) -> [u8; 16] {
    let mut m = start::<NR>(keys, nonce, aad);
    let bulk = input.len() / CHUNK * CHUNK;
    if bulk > 0 {
        chunks_avx512::<NR, ENC>(keys, &mut m, &input[..bulk], &mut output[..bulk]);
    }
    let (ti, to) = (&input[bulk..], &mut output[bulk..]);
    finish::<NR, ENC>(keys, m, aad.len(), input.len(), ti, to)
}

/// Expands `key` (16 or 32 bytes).
///
/// # Safety
/// The CPU must support AES-NI, PCLMULQDQ, SSSE3 and SSE4.1.
pub(super) unsafe fn new_keys(key: &[u8]) -> Box<Keys> {
    Box::new(expand(key))
}
