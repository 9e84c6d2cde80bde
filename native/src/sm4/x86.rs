//! SM4 CTR keystream on x86: 16 blocks per step with GFNI on AVX-512,
//! 8 with GFNI on AVX2, 4 with the AES-NI S-box.
//!
//! Blocks are processed word-sliced: register `x[j]` holds word j of every
//! block in flight, one 32-bit lane per block, so a round is a handful of
//! vector XORs, the S-box on every byte and the linear map L as rotations.
//! The counter blocks are built directly in that form (nonce words
//! broadcast, counters per lane), and lanes are assigned counters so that a
//! 4x4 transpose inside each 128-bit lane yields consecutive blocks.
//!
//! S-box (no table lookups): SM4's S-box is `A * inv(A * x + C) + C` in
//! GF(2^8)/0x1F5; mapping that field to the AES field (0x11B) with an
//! isomorphism T gives `S(x) = M2 * inv_aes(M1 * x + c1) + c2` with
//! `M1 = T*A`, `c1 = T*C`, `M2 = A*T^-1`, `c2 = C` (derivation and checks in
//! docs/architecture.md; the technique is the one described for AES-NI by
//! M.-J. Saarinen, "sm4ni", and for GFNI in Intel's GFNI white paper).
//! - GFNI: `gf2p8affineqb(M1, c1)` then `gf2p8affineinvqb(M2, c2)`.
//! - AES-NI: `inv_aes(y) = A_aes^-1 * (SubBytes(y) + 0x63)`; SubBytes comes
//!   from AESENCLAST with a zero round key on input pre-permuted by
//!   InvShiftRows; both affine maps are applied as two 16-entry nibble
//!   lookups with PSHUFB (register shuffles, constant time).

use core::arch::x86_64::*;

/// GFNI matrices (qword: byte 7-i is the row giving output bit i).
const M1: i64 = 0x4c28_7db9_1a22_505d;
const C1: i32 = 0x3e;
const M2: i64 = 0xf3ab_34a9_74a6_b589_u64 as i64;
const C2: i32 = 0xd3;

/// Nibble tables for the AES-NI S-box: pre-affine (M1, c1) and post-affine
/// (M2 * A_aes^-1, folding 0x63 and C).
const PRE_LO: [u8; 16] = [
    0x3e, 0xb2, 0x0e, 0x82, 0xbb, 0x37, 0x8b, 0x07, 0xa1, 0x2d, 0x91, 0x1d, 0x24, 0xa8, 0x14, 0x98,
];
const PRE_HI: [u8; 16] = [
    0x00, 0xdc, 0x2e, 0xf2, 0xc5, 0x19, 0xeb, 0x37, 0x08, 0xd4, 0x26, 0xfa, 0xcd, 0x11, 0xe3, 0x3f,
];
const POST_LO: [u8; 16] = [
    0x6c, 0xd4, 0xa6, 0x1e, 0x52, 0xea, 0x98, 0x20, 0x0b, 0xb3, 0xc1, 0x79, 0x35, 0x8d, 0xff, 0x47,
];
const POST_HI: [u8; 16] = [
    0x00, 0xe0, 0x50, 0xb0, 0x9d, 0x7d, 0xcd, 0x2d, 0xc0, 0x20, 0x90, 0x70, 0x5d, 0xbd, 0x0d, 0xed,
];
/// Byte shuffle that swaps each 32-bit word's bytes (per 128-bit lane).
const BSWAP32: [u8; 16] = [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12];
/// InvShiftRows as a PSHUFB index, so AESENCLAST's ShiftRows cancels out.
const INV_SHIFT_ROWS: [u8; 16] = [0, 13, 10, 7, 4, 1, 14, 11, 8, 5, 2, 15, 12, 9, 6, 3];

fn nonce_words(nonce: &[u8; 12]) -> [u32; 3] {
    [0, 1, 2].map(|i| {
        u32::from_be_bytes([
            nonce[4 * i],
            nonce[4 * i + 1],
            nonce[4 * i + 2],
            nonce[4 * i + 3],
        ])
    })
}

/// 16 x `W` blocks of keystream (256 x `W` bytes) for counters
/// `ctr..ctr+16W`, plus with `X4` four more blocks (64 bytes, counters
/// `ctr+16W..ctr+16W+4`) in an xmm group: `W` (+1) independent word-sliced
/// groups go through the rounds interleaved, so the S-box and rotation
/// latencies overlap. (`W = 1, X4`: the 17 blocks of a 256-byte message
/// plus E(J0) at ~1.3x the cost of 16, where `W = 2` costs ~1.35x and
/// wastes 15 blocks; xmm operations are half the cost of zmm ones.)
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL and GFNI; `out` holds
/// 256 * W (+ 64 with `X4`) bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,gfni")]
pub unsafe fn keystream_avx512<const W: usize, const X4: bool>(
    rk: &[u32; 32],
    nonce: &[u8; 12],
    ctr: u32,
    out: &mut [u8],
) {
    debug_assert!(out.len() >= 256 * W + if X4 { 64 } else { 0 });
    let n = nonce_words(nonce);
    // Lane 4L + j gets counter ctr + 4j + L (see module docs).
    let lanes = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let mut x = [[_mm512_setzero_si512(); 4]; W];
    for (g, xg) in x.iter_mut().enumerate() {
        *xg = [
            _mm512_set1_epi32(n[0] as i32),
            _mm512_set1_epi32(n[1] as i32),
            _mm512_set1_epi32(n[2] as i32),
            _mm512_add_epi32(
                _mm512_set1_epi32(ctr.wrapping_add(16 * g as u32) as i32),
                lanes,
            ),
        ];
    }
    let mut y = [
        _mm_set1_epi32(n[0] as i32),
        _mm_set1_epi32(n[1] as i32),
        _mm_set1_epi32(n[2] as i32),
        _mm_add_epi32(
            _mm_set1_epi32(ctr.wrapping_add(16 * W as u32) as i32),
            _mm_setr_epi32(0, 1, 2, 3),
        ),
    ];
    let m1 = _mm512_set1_epi64(M1);
    let m2 = _mm512_set1_epi64(M2);
    let m1x = _mm_set1_epi64x(M1);
    let m2x = _mm_set1_epi64x(M2);
    // Four rounds per iteration with constant word indices, so the state
    // stays in registers (with `(i + 1) % 4` indices it lived on the stack
    // and every round waited for a store-to-load forward).
    macro_rules! round {
        ($a:literal, $b:literal, $c:literal, $d:literal, $k:expr) => {
            let kk = _mm512_set1_epi32($k as i32);
            for xg in x.iter_mut() {
                let t = _mm512_xor_si512(
                    _mm512_xor_si512(xg[$b], xg[$c]),
                    _mm512_xor_si512(xg[$d], kk),
                );
                let b = _mm512_gf2p8affineinv_epi64_epi8::<C2>(
                    _mm512_gf2p8affine_epi64_epi8::<C1>(t, m1),
                    m2,
                );
                let l = _mm512_xor_si512(
                    _mm512_xor_si512(b, _mm512_rol_epi32::<2>(b)),
                    _mm512_xor_si512(
                        _mm512_xor_si512(_mm512_rol_epi32::<10>(b), _mm512_rol_epi32::<18>(b)),
                        _mm512_rol_epi32::<24>(b),
                    ),
                );
                xg[$a] = _mm512_xor_si512(xg[$a], l);
            }
            if X4 {
                let t = _mm_xor_si128(
                    _mm_xor_si128(y[$b], y[$c]),
                    _mm_xor_si128(y[$d], _mm512_castsi512_si128(kk)),
                );
                let b = _mm_gf2p8affineinv_epi64_epi8::<C2>(
                    _mm_gf2p8affine_epi64_epi8::<C1>(t, m1x),
                    m2x,
                );
                let l = _mm_xor_si128(
                    _mm_xor_si128(b, _mm_rol_epi32::<2>(b)),
                    _mm_xor_si128(
                        _mm_xor_si128(_mm_rol_epi32::<10>(b), _mm_rol_epi32::<18>(b)),
                        _mm_rol_epi32::<24>(b),
                    ),
                );
                y[$a] = _mm_xor_si128(y[$a], l);
            }
        };
    }
    for k in rk.chunks_exact(4) {
        round!(0, 1, 2, 3, k[0]);
        round!(1, 2, 3, 0, k[1]);
        round!(2, 3, 0, 1, k[2]);
        round!(3, 0, 1, 2, k[3]);
    }
    let bswap = _mm512_broadcast_i32x4(_mm_loadu_si128(BSWAP32.as_ptr().cast()));
    for (g, xg) in x.iter().enumerate() {
        let (a, b, c, d) = (xg[3], xg[2], xg[1], xg[0]);
        let t0 = _mm512_unpacklo_epi32(a, b);
        let t1 = _mm512_unpackhi_epi32(a, b);
        let t2 = _mm512_unpacklo_epi32(c, d);
        let t3 = _mm512_unpackhi_epi32(c, d);
        let r = [
            _mm512_unpacklo_epi64(t0, t2),
            _mm512_unpackhi_epi64(t0, t2),
            _mm512_unpacklo_epi64(t1, t3),
            _mm512_unpackhi_epi64(t1, t3),
        ];
        for (j, v) in r.into_iter().enumerate() {
            // SAFETY: 256 * g + 64 * j + 64 <= 256 * W <= out.len().
            _mm512_storeu_si512(
                out.as_mut_ptr().add(256 * g + 64 * j).cast(),
                _mm512_shuffle_epi8(v, bswap),
            );
        }
    }
    if X4 {
        let (a, b, c, d) = (y[3], y[2], y[1], y[0]);
        let t0 = _mm_unpacklo_epi32(a, b);
        let t1 = _mm_unpackhi_epi32(a, b);
        let t2 = _mm_unpacklo_epi32(c, d);
        let t3 = _mm_unpackhi_epi32(c, d);
        let r = [
            _mm_unpacklo_epi64(t0, t2),
            _mm_unpackhi_epi64(t0, t2),
            _mm_unpacklo_epi64(t1, t3),
            _mm_unpackhi_epi64(t1, t3),
        ];
        let bswap = _mm_loadu_si128(BSWAP32.as_ptr().cast());
        for (j, v) in r.into_iter().enumerate() {
            // SAFETY: 256 * W + 16 * j + 16 <= 256 * W + 64 <= out.len().
            _mm_storeu_si128(
                out.as_mut_ptr().add(256 * W + 16 * j).cast(),
                _mm_shuffle_epi8(v, bswap),
            );
        }
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn rol256<const L: i32, const R: i32>(v: __m256i) -> __m256i {
    _mm256_or_si256(_mm256_slli_epi32::<L>(v), _mm256_srli_epi32::<R>(v))
}

/// 8 blocks of keystream (128 bytes) for counters `ctr..ctr+8`.
///
/// # Safety
/// The CPU must support AVX2 and GFNI.
#[target_feature(enable = "avx2,gfni")]
pub unsafe fn keystream8_avx2(rk: &[u32; 32], nonce: &[u8; 12], ctr: u32, out: &mut [u8; 128]) {
    let n = nonce_words(nonce);
    // Lane 4L + j (L = 128-bit lane 0..1) gets counter ctr + 2j + L.
    let lanes = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    let mut x = [
        _mm256_set1_epi32(n[0] as i32),
        _mm256_set1_epi32(n[1] as i32),
        _mm256_set1_epi32(n[2] as i32),
        _mm256_add_epi32(_mm256_set1_epi32(ctr as i32), lanes),
    ];
    let m1 = _mm256_set1_epi64x(M1);
    let m2 = _mm256_set1_epi64x(M2);
    // Constant word indices keep the state in registers (see
    // `keystream_avx512`).
    macro_rules! round {
        ($a:literal, $b:literal, $c:literal, $d:literal, $k:expr) => {
            let t = _mm256_xor_si256(
                _mm256_xor_si256(x[$b], x[$c]),
                _mm256_xor_si256(x[$d], _mm256_set1_epi32($k as i32)),
            );
            let b = _mm256_gf2p8affineinv_epi64_epi8::<C2>(
                _mm256_gf2p8affine_epi64_epi8::<C1>(t, m1),
                m2,
            );
            let l = _mm256_xor_si256(
                _mm256_xor_si256(b, rol256::<2, 30>(b)),
                _mm256_xor_si256(
                    _mm256_xor_si256(rol256::<10, 22>(b), rol256::<18, 14>(b)),
                    rol256::<24, 8>(b),
                ),
            );
            x[$a] = _mm256_xor_si256(x[$a], l);
        };
    }
    for k in rk.chunks_exact(4) {
        round!(0, 1, 2, 3, k[0]);
        round!(1, 2, 3, 0, k[1]);
        round!(2, 3, 0, 1, k[2]);
        round!(3, 0, 1, 2, k[3]);
    }
    let (a, b, c, d) = (x[3], x[2], x[1], x[0]);
    let t0 = _mm256_unpacklo_epi32(a, b);
    let t1 = _mm256_unpackhi_epi32(a, b);
    let t2 = _mm256_unpacklo_epi32(c, d);
    let t3 = _mm256_unpackhi_epi32(c, d);
    let bswap = _mm256_broadcastsi128_si256(_mm_loadu_si128(BSWAP32.as_ptr().cast()));
    // r_j holds, in 128-bit lane L, the block with counter ctr + 2j + L.
    let r = [
        _mm256_unpacklo_epi64(t0, t2),
        _mm256_unpackhi_epi64(t0, t2),
        _mm256_unpacklo_epi64(t1, t3),
        _mm256_unpackhi_epi64(t1, t3),
    ];
    for (j, v) in r.into_iter().enumerate() {
        // SAFETY: 32 * j + 32 <= 128.
        _mm256_storeu_si256(
            out.as_mut_ptr().add(32 * j).cast(),
            _mm256_shuffle_epi8(v, bswap),
        );
    }
}

#[inline]
#[target_feature(enable = "sse2")]
unsafe fn rol128<const L: i32, const R: i32>(v: __m128i) -> __m128i {
    _mm_or_si128(_mm_slli_epi32::<L>(v), _mm_srli_epi32::<R>(v))
}

/// The SM4 S-box on 16 bytes with AES-NI (see module docs).
#[inline]
#[target_feature(enable = "aes,ssse3")]
unsafe fn tau_aesni(x: __m128i) -> __m128i {
    let mask = _mm_set1_epi8(0x0f);
    let lut = |t: &[u8; 16]| _mm_loadu_si128(t.as_ptr().cast());
    let lo = _mm_and_si128(x, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), mask);
    let y = _mm_xor_si128(
        _mm_shuffle_epi8(lut(&PRE_LO), lo),
        _mm_shuffle_epi8(lut(&PRE_HI), hi),
    );
    let y = _mm_shuffle_epi8(y, lut(&INV_SHIFT_ROWS));
    let s = _mm_aesenclast_si128(y, _mm_setzero_si128());
    let lo = _mm_and_si128(s, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(s), mask);
    _mm_xor_si128(
        _mm_shuffle_epi8(lut(&POST_LO), lo),
        _mm_shuffle_epi8(lut(&POST_HI), hi),
    )
}

/// 4 blocks of keystream (64 bytes) for counters `ctr..ctr+4`.
///
/// # Safety
/// The CPU must support AES-NI and SSSE3.
#[target_feature(enable = "aes,ssse3,sse2")]
pub unsafe fn keystream4_aesni(rk: &[u32; 32], nonce: &[u8; 12], ctr: u32, out: &mut [u8; 64]) {
    let n = nonce_words(nonce);
    let mut x = [
        _mm_set1_epi32(n[0] as i32),
        _mm_set1_epi32(n[1] as i32),
        _mm_set1_epi32(n[2] as i32),
        _mm_add_epi32(_mm_set1_epi32(ctr as i32), _mm_setr_epi32(0, 1, 2, 3)),
    ];
    // Constant word indices keep the state in registers (see
    // `keystream_avx512`).
    macro_rules! round {
        ($a:literal, $b:literal, $c:literal, $d:literal, $k:expr) => {
            let t = _mm_xor_si128(
                _mm_xor_si128(x[$b], x[$c]),
                _mm_xor_si128(x[$d], _mm_set1_epi32($k as i32)),
            );
            let b = tau_aesni(t);
            let l = _mm_xor_si128(
                _mm_xor_si128(b, rol128::<2, 30>(b)),
                _mm_xor_si128(
                    _mm_xor_si128(rol128::<10, 22>(b), rol128::<18, 14>(b)),
                    rol128::<24, 8>(b),
                ),
            );
            x[$a] = _mm_xor_si128(x[$a], l);
        };
    }
    for k in rk.chunks_exact(4) {
        round!(0, 1, 2, 3, k[0]);
        round!(1, 2, 3, 0, k[1]);
        round!(2, 3, 0, 1, k[2]);
        round!(3, 0, 1, 2, k[3]);
    }
    let (a, b, c, d) = (x[3], x[2], x[1], x[0]);
    let t0 = _mm_unpacklo_epi32(a, b);
    let t1 = _mm_unpackhi_epi32(a, b);
    let t2 = _mm_unpacklo_epi32(c, d);
    let t3 = _mm_unpackhi_epi32(c, d);
    let bswap = _mm_loadu_si128(BSWAP32.as_ptr().cast());
    let r = [
        _mm_unpacklo_epi64(t0, t2),
        _mm_unpackhi_epi64(t0, t2),
        _mm_unpacklo_epi64(t1, t3),
        _mm_unpackhi_epi64(t1, t3),
    ];
    for (j, v) in r.into_iter().enumerate() {
        // SAFETY: 16 * j + 16 <= 64.
        _mm_storeu_si128(
            out.as_mut_ptr().add(16 * j).cast(),
            _mm_shuffle_epi8(v, bswap),
        );
    }
}
