//! Portable, constant-time SM4 (GB/T 32907-2016; draft-ribose-cfrg-sm4).
//!
//! No table lookups: the S-box is computed as `S(x) = A * inv(A * x + C) + C`
//! over GF(2^8) with the polynomial x^8+x^7+x^6+x^5+x^4+x^2+1 (0x1F5), A the
//! circulant matrix of 0xA7 and C = 0xD3 (the algebraic description of the
//! SM4 S-box by Liu, Ji, Hu et al.). Four bytes are processed at once in a
//! u32 (SWAR); the inversion is x^254 by a fixed square-and-multiply chain,
//! so time does not depend on data. Slow (it is the fallback for CPUs
//! without AES-NI or GFNI), but simple and verifiable.

pub const FK: [u32; 4] = [0xa3b1_bac6, 0x56aa_3350, 0x677d_9197, 0xb270_22dc];

const LO7: u32 = 0x7f7f_7f7f;
const ONES: u32 = 0x0101_0101;

/// Multiplies four byte lanes pairwise in GF(2^8) mod 0x1F5.
#[inline]
fn gf_mul4(mut a: u32, b: u32) -> u32 {
    let mut r = 0u32;
    for i in 0..8 {
        let m = ((b >> i) & ONES).wrapping_mul(0xff);
        r ^= a & m;
        let carry = (a >> 7) & ONES;
        a = ((a & LO7) << 1) ^ carry.wrapping_mul(0xf5);
    }
    r
}

/// Inverse of four byte lanes (0 maps to 0): x^254.
#[inline]
fn gf_inv4(x: u32) -> u32 {
    let x2 = gf_mul4(x, x);
    let x3 = gf_mul4(x2, x);
    let x6 = gf_mul4(x3, x3);
    let x12 = gf_mul4(x6, x6);
    let x14 = gf_mul4(x12, x2);
    let x15 = gf_mul4(x12, x3);
    let x30 = gf_mul4(x15, x15);
    let x60 = gf_mul4(x30, x30);
    let x120 = gf_mul4(x60, x60);
    let x240 = gf_mul4(x120, x120);
    gf_mul4(x240, x14)
}

/// Rotates each byte lane right by `k` bits (bit i takes bit i + k).
#[inline]
fn rotr8x4(x: u32, k: u32) -> u32 {
    let lo = (0xffu32 >> k).wrapping_mul(ONES);
    ((x >> k) & lo) | ((x << (8 - k)) & !lo)
}

/// The affine map A (circulant of 0xA7: out_i = x_i + x_{i+1} + x_{i+2} +
/// x_{i+5} + x_{i+7}) on four byte lanes.
#[inline]
fn affine4(x: u32) -> u32 {
    x ^ rotr8x4(x, 1) ^ rotr8x4(x, 2) ^ rotr8x4(x, 5) ^ rotr8x4(x, 7)
}

/// The SM4 S-box applied to each byte of a word (tau), in constant time.
#[inline]
pub fn tau(x: u32) -> u32 {
    let c = 0xd3u32.wrapping_mul(ONES);
    affine4(gf_inv4(affine4(x) ^ c)) ^ c
}

#[inline]
fn l_enc(b: u32) -> u32 {
    b ^ b.rotate_left(2) ^ b.rotate_left(10) ^ b.rotate_left(18) ^ b.rotate_left(24)
}

#[inline]
fn l_key(b: u32) -> u32 {
    b ^ b.rotate_left(13) ^ b.rotate_left(23)
}

/// Expands a 16-byte key into the 32 round keys.
pub fn expand_key(key: &[u8; 16]) -> [u32; 32] {
    let mut k = [0u32; 4];
    for i in 0..4 {
        k[i] = u32::from_be_bytes([key[4 * i], key[4 * i + 1], key[4 * i + 2], key[4 * i + 3]])
            ^ FK[i];
    }
    let mut rk = [0u32; 32];
    for (i, r) in rk.iter_mut().enumerate() {
        // CK_i: byte j is (4i + j) * 7 mod 256.
        let ck = (0..4).fold(0u32, |acc, j| {
            (acc << 8) | (((4 * i + j) * 7) & 0xff) as u32
        });
        let t = k[(i + 1) % 4] ^ k[(i + 2) % 4] ^ k[(i + 3) % 4] ^ ck;
        let nk = k[i % 4] ^ l_key(tau(t));
        k[i % 4] = nk;
        *r = nk;
    }
    k.iter_mut().for_each(|w| *w = 0);
    rk
}

/// Encrypts one block.
pub fn encrypt_block(rk: &[u32; 32], block: &[u8; 16]) -> [u8; 16] {
    let mut x = [0u32; 4];
    for i in 0..4 {
        x[i] = u32::from_be_bytes([
            block[4 * i],
            block[4 * i + 1],
            block[4 * i + 2],
            block[4 * i + 3],
        ]);
    }
    for (i, k) in rk.iter().enumerate() {
        let t = x[(i + 1) % 4] ^ x[(i + 2) % 4] ^ x[(i + 3) % 4] ^ k;
        x[i % 4] ^= l_enc(tau(t));
    }
    let mut out = [0u8; 16];
    for i in 0..4 {
        out[4 * i..4 * i + 4].copy_from_slice(&x[3 - i].to_be_bytes());
    }
    out
}

/// CTR keystream for `n` blocks starting at counter `ctr` (32-bit, wrapping)
/// after the 12-byte `nonce`.
pub fn keystream(rk: &[u32; 32], nonce: &[u8; 12], ctr: u32, out: &mut [u8]) {
    let mut block = [0u8; 16];
    block[..12].copy_from_slice(nonce);
    for (i, chunk) in out.chunks_mut(16).enumerate() {
        block[12..].copy_from_slice(&ctr.wrapping_add(i as u32).to_be_bytes());
        let ks = encrypt_block(rk, &block);
        chunk.copy_from_slice(&ks[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Non-constant-time scalar reference of the algebraic S-box, for
    /// cross-checking the SWAR version on all inputs.
    fn sbox_ref(x: u8) -> u8 {
        fn mul(mut a: u16, mut b: u16) -> u16 {
            let mut r = 0;
            while b != 0 {
                if b & 1 == 1 {
                    r ^= a;
                }
                b >>= 1;
                a <<= 1;
                if a & 0x100 != 0 {
                    a ^= 0x1f5;
                }
            }
            r
        }
        let aff = |v: u8| -> u8 {
            (0..8).fold(0u8, |o, i| {
                let row = 0xa7u8.rotate_left(i);
                o | ((((row & v).count_ones() & 1) as u8) << i)
            })
        };
        let y = aff(x) ^ 0xd3;
        let inv = (1..256u16).find(|c| mul(y as u16, *c) == 1).unwrap_or(0) as u8;
        aff(inv) ^ 0xd3
    }

    #[test]
    fn sbox_matches_reference_and_standard() {
        // First S-box entries from the standard.
        assert_eq!(sbox_ref(0), 0xd6);
        assert_eq!(sbox_ref(1), 0x90);
        assert_eq!(sbox_ref(0xff), 0x48);
        for x in 0..=255u32 {
            let w = x | (x ^ 0x5a) << 8 | (255 - x) << 16 | ((x * 7) & 0xff) << 24;
            let got = tau(w).to_le_bytes();
            let want = w.to_le_bytes().map(sbox_ref);
            assert_eq!(got, want, "x = {x}");
        }
    }

    #[test]
    fn standard_block_vector() {
        let k: [u8; 16] = [
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54,
            0x32, 0x10,
        ];
        let rk = expand_key(&k);
        let c = encrypt_block(&rk, &k);
        assert_eq!(
            c,
            [
                0x68, 0x1e, 0xdf, 0x34, 0xd2, 0x06, 0x96, 0x5e, 0x86, 0xb3, 0xe9, 0x4f, 0x53, 0x6e,
                0x42, 0x46
            ]
        );
    }
}
