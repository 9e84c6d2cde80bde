//! SM4 (GB/T 32907-2016) and SM4-GCM (NIST SP 800-38D mode with SM4, as in
//! RFC 8998), on three kinds of code path:
//!
//! - `gfni-avx512` / `gfni-avx2`: keystream 16 / 8 blocks at a time with the
//!   S-box as two GFNI affine instructions (`x86.rs`);
//! - `aesni`: keystream 4 blocks at a time with the S-box through AESENCLAST
//!   and nibble-shuffle affine maps (`x86.rs`);
//! - `portable`: constant-time scalar SM4 with the S-box computed
//!   arithmetically (`portable.rs`).
//!
//! None of them indexes memory with secret data. `open` computes the tag
//! over the ciphertext, decrypts in the same CTR pass that yields E(J0),
//! compares in constant time and wipes the output on mismatch. GHASH: the
//! aggregated PCLMULQDQ GHASH of the AES-GCM code (16 blocks per reduction)
//! on the x86 paths (RustCrypto `ghash` where PCLMULQDQ is missing); a
//! constant-time bitwise software GHASH on the portable path.

use universal_hash::UniversalHash;
use zeroize::Zeroize;

use crate::aead::{BlockAead, NONCE_LEN, TAG_LEN};
use crate::cpu::Sm4Path;
use crate::error::Error;

pub mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Expands a 16-byte key for `path` (lowered to what the CPU supports).
pub fn new_key(key: &[u8], path: Sm4Path) -> Result<Box<dyn BlockAead>, Error> {
    let key: &[u8; 16] = key.try_into().map_err(|_| Error::WrongKeySize)?;
    let path = path.min(Sm4Path::detected());
    let rk = portable::expand_key(key);
    let mut h = portable::encrypt_block(&rk, &[0u8; 16]);
    let ghash = if path == Sm4Path::Portable {
        Ghash::Soft(u128::from_be_bytes(h))
    } else {
        hw_ghash(&h)
    };
    h.zeroize();
    Ok(Box::new(Sm4Gcm { rk, ghash, path }))
}

#[cfg(target_arch = "x86_64")]
fn hw_ghash(h: &[u8; 16]) -> Ghash {
    match crate::aes::x86::GhashKey::new(h) {
        Some(k) => Ghash::Clmul(k),
        None => Ghash::Hw(Box::new(ghash::GHash::new(&(*h).into()))),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn hw_ghash(h: &[u8; 16]) -> Ghash {
    Ghash::Hw(Box::new(ghash::GHash::new(&(*h).into())))
}

enum Ghash {
    /// Our aggregated PCLMULQDQ GHASH (16 blocks per reduction), shared
    /// with AES-GCM.
    #[cfg(target_arch = "x86_64")]
    Clmul(Box<crate::aes::x86::GhashKey>),
    Hw(Box<ghash::GHash>),
    Soft(u128),
}

struct Sm4Gcm {
    rk: [u32; 32],
    ghash: Ghash,
    path: Sm4Path,
}

impl Drop for Sm4Gcm {
    fn drop(&mut self) {
        self.rk.zeroize();
        if let Ghash::Soft(h) = &mut self.ghash {
            h.zeroize();
        }
        // ghash::GHash zeroizes itself on drop (crate feature `zeroize`).
    }
}

/// Constant-time multiplication in GF(2^128) with GCM's bit order
/// (SP 800-38D algorithm 1), without secret-dependent branches.
fn gf128_mul(x: u128, y: u128) -> u128 {
    let mut z = 0u128;
    let mut v = y;
    for i in 0..128 {
        let bit = (x >> (127 - i)) & 1;
        z ^= v & bit.wrapping_neg();
        let lsb = v & 1;
        v = (v >> 1) ^ ((0xe1u128 << 120) & lsb.wrapping_neg());
    }
    z
}

fn soft_ghash(h: u128, aad: &[u8], ct: &[u8]) -> [u8; 16] {
    let mut y = 0u128;
    for data in [aad, ct] {
        for chunk in data.chunks(16) {
            let mut b = [0u8; 16];
            b[..chunk.len()].copy_from_slice(chunk);
            y = gf128_mul(y ^ u128::from_be_bytes(b), h);
        }
    }
    let lens = ((aad.len() as u128 * 8) << 64) | (ct.len() as u128 * 8);
    gf128_mul(y ^ lens, h).to_be_bytes()
}

/// Largest keystream chunk any path produces.
const CHUNK: usize = 1024;

/// Keystream buffer, 8-byte aligned so it can be wiped a word at a time
/// (`zeroize` on bytes does one volatile store per byte: it cost more than
/// the cipher for 256-byte messages).
#[repr(C, align(64))]
struct KsBuf([u8; CHUNK]);

thread_local! {
    static KS_BUF: core::cell::RefCell<KsBuf> =
        const { core::cell::RefCell::new(KsBuf([0u8; CHUNK])) };
}

impl KsBuf {
    /// Zeroizes the first `used` bytes (rounded up to whole words).
    fn wipe(&mut self, used: usize) {
        let words = used.min(CHUNK).div_ceil(8);
        // SAFETY: the buffer is 64-byte aligned and CHUNK bytes long, so its
        // first `words * 8 <= CHUNK` bytes are valid, aligned `u64`s; every
        // bit pattern is a valid u64 and the byte view is not used meanwhile.
        let w: &mut [u64] =
            unsafe { core::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u64>(), words) };
        w.zeroize();
    }
}

impl Sm4Gcm {
    /// Fills `buf` with keystream for counters `ctr..` and returns how many
    /// bytes the path produced (a multiple of 16, at most CHUNK).
    #[inline]
    fn keystream(
        &self,
        nonce: &[u8; NONCE_LEN],
        ctr: u32,
        buf: &mut [u8; CHUNK],
        want: usize,
    ) -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `self.path` was capped to `Sm4Path::detected()` in
            // `new_key`, which checked the features each function needs
            // (gfni-avx512: AVX-512 F/BW/VL + GFNI; gfni-avx2: AVX2 + GFNI;
            // aesni: AES-NI + SSSE3). Buffers have the sizes the functions
            // take by type.
            unsafe {
                match self.path {
                    Sm4Path::GfniAvx512 if want > 512 => {
                        x86::keystream_avx512::<4>(&self.rk, nonce, ctr, buf);
                        return 1024;
                    }
                    Sm4Path::GfniAvx512 if want > 256 => {
                        x86::keystream_avx512::<2>(&self.rk, nonce, ctr, buf);
                        return 512;
                    }
                    Sm4Path::GfniAvx512 if want > 128 => {
                        x86::keystream_avx512::<1>(&self.rk, nonce, ctr, buf);
                        return 256;
                    }
                    Sm4Path::GfniAvx512 | Sm4Path::GfniAvx2 if want > 64 => {
                        let b: &mut [u8; 128] = (&mut buf[..128]).try_into().expect("128");
                        x86::keystream8_avx2(&self.rk, nonce, ctr, b);
                        return 128;
                    }
                    Sm4Path::GfniAvx512 | Sm4Path::GfniAvx2 | Sm4Path::Aesni => {
                        let b: &mut [u8; 64] = (&mut buf[..64]).try_into().expect("64");
                        x86::keystream4_aesni(&self.rk, nonce, ctr, b);
                        return 64;
                    }
                    Sm4Path::Portable => {}
                }
            }
        }
        let n = want.clamp(16, 64).div_ceil(16) * 16;
        portable::keystream(&self.rk, nonce, ctr, &mut buf[..n]);
        n
    }

    /// XORs the keystream (counters from 2) into `output` = `input` ^ KS and
    /// returns E(J0) (counter 1), computed in the same first chunk.
    fn ctr(&self, nonce: &[u8; NONCE_LEN], input: &[u8], output: &mut [u8]) -> [u8; 16] {
        // A per-thread buffer, all zero between calls (each call wipes what
        // it used): no 1 KiB memset per message.
        KS_BUF.with(|cell| match cell.try_borrow_mut() {
            Ok(mut kbuf) => self.ctr_in(&mut kbuf, nonce, input, output),
            Err(_) => self.ctr_in(&mut KsBuf([0u8; CHUNK]), nonce, input, output),
        })
    }

    fn ctr_in(
        &self,
        kbuf: &mut KsBuf,
        nonce: &[u8; NONCE_LEN],
        input: &[u8],
        output: &mut [u8],
    ) -> [u8; 16] {
        let buf = &mut kbuf.0;
        let mut ej0 = [0u8; 16];
        let mut ctr = 1u32;
        let mut pos = 0usize;
        let mut first = true;
        let mut used = 0usize;
        loop {
            let remaining = input.len() - pos;
            let want = remaining + if first { 16 } else { 0 };
            if want == 0 {
                break;
            }
            let got = self.keystream(nonce, ctr, buf, want);
            used = used.max(got);
            ctr = ctr.wrapping_add((got / 16) as u32);
            let mut ks = &buf[..got];
            if first {
                ej0.copy_from_slice(&ks[..16]);
                ks = &ks[16..];
                first = false;
            }
            let take = ks.len().min(remaining);
            for ((o, i), k) in output[pos..pos + take]
                .iter_mut()
                .zip(&input[pos..pos + take])
                .zip(ks)
            {
                *o = i ^ k;
            }
            pos += take;
        }
        kbuf.wipe(used);
        ej0
    }

    fn ghash(&self, aad: &[u8], ct: &[u8]) -> [u8; 16] {
        match &self.ghash {
            #[cfg(target_arch = "x86_64")]
            Ghash::Clmul(k) => k.hash(aad, ct),
            Ghash::Soft(h) => soft_ghash(*h, aad, ct),
            Ghash::Hw(g) => {
                let mut g = (**g).clone();
                g.update_padded(aad);
                g.update_padded(ct);
                let mut lens = [0u8; 16];
                lens[..8].copy_from_slice(&(aad.len() as u64 * 8).to_be_bytes());
                lens[8..].copy_from_slice(&(ct.len() as u64 * 8).to_be_bytes());
                g.update(&[lens.into()]);
                g.finalize().into()
            }
        }
    }
}

impl BlockAead for Sm4Gcm {
    fn seal(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        input: &[u8],
        output: &mut [u8],
    ) -> [u8; TAG_LEN] {
        let ej0 = self.ctr(nonce, input, output);
        let mut s = self.ghash(aad, output);
        for (t, e) in s.iter_mut().zip(ej0) {
            *t ^= e;
        }
        s
    }

    fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        input: &[u8],
        tag: &[u8; TAG_LEN],
        output: &mut [u8],
    ) -> bool {
        let s = self.ghash(aad, input);
        // One CTR pass yields both E(J0) and the candidate plaintext; on a
        // tag mismatch the output is wiped before returning, so no
        // unauthenticated plaintext is ever released.
        let ej0 = self.ctr(nonce, input, output);
        let mut diff = 0u8;
        for i in 0..TAG_LEN {
            diff |= s[i] ^ ej0[i] ^ tag[i];
        }
        if core::hint::black_box(diff) != 0 {
            output.zeroize();
            return false;
        }
        true
    }

    fn backend(&self) -> &'static str {
        self.path.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ghash_implementations_agree() {
        // Our PCLMULQDQ GHASH, RustCrypto's and the bitwise one, on every
        // length split of AAD and ciphertext up to 600 bytes (pseudo-random data).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        let data: Vec<u8> = (0..1200).map(|_| next()).collect();
        for trial in 0..8 {
            let h: [u8; 16] = core::array::from_fn(|i| data[trial * 16 + i] ^ 0x5a);
            let hw = hw_ghash(&h);
            let crate_g = Ghash::Hw(Box::new(ghash::GHash::new(&h.into())));
            let soft = Ghash::Soft(u128::from_be_bytes(h));
            let mk = |g| Sm4Gcm {
                rk: [0; 32],
                ghash: g,
                path: Sm4Path::Portable,
            };
            let (hw, crate_g, soft) = (mk(hw), mk(crate_g), mk(soft));
            for (a, c) in [
                (0, 0),
                (0, 1),
                (13, 0),
                (16, 16),
                (17, 255),
                (256, 256),
                (3, 600),
                (600, 529),
            ] {
                for shift in [0usize, 7] {
                    let aad = &data[shift..shift + a];
                    let ct = &data[600 - shift..600 - shift + c];
                    let want = soft.ghash(aad, ct);
                    assert_eq!(hw.ghash(aad, ct), want, "a={a} c={c}");
                    assert_eq!(crate_g.ghash(aad, ct), want, "a={a} c={c}");
                }
            }
        }
    }

    fn all_paths() -> Vec<Sm4Path> {
        Sm4Path::ALL.into_iter().filter(|p| p.supported()).collect()
    }

    #[test]
    fn keystream_paths_agree_with_portable() {
        let key = [7u8; 16];
        let nonce = [9u8; 12];
        let reference = new_key(&key, Sm4Path::Portable).unwrap();
        for len in (0..700).chain([1023, 1024, 4096, 4111]) {
            let pt: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let mut want = vec![0u8; len];
            let want_tag = reference.seal(&nonce, b"aad", &pt, &mut want);
            for p in all_paths() {
                let k = new_key(&key, p).unwrap();
                assert_eq!(k.backend(), p.name());
                let mut got = vec![0u8; len];
                let tag = k.seal(&nonce, b"aad", &pt, &mut got);
                assert_eq!(got, want, "{} len {len}", p.name());
                assert_eq!(tag, want_tag, "{} len {len}", p.name());
                let mut back = vec![0u8; len];
                assert!(k.open(&nonce, b"aad", &got, &tag, &mut back));
                assert_eq!(back, pt);
            }
        }
    }

    #[test]
    fn counter_wraps_at_32_bits() {
        // A nonce whose counter would wrap is not reachable with 96-bit
        // nonces (J0 counter starts at 1); check the keystream generator's
        // 32-bit increment directly against the portable one.
        let rk = portable::expand_key(&[3u8; 16]);
        let mut a = [0u8; 64];
        portable::keystream(&rk, &[1u8; 12], u32::MAX - 1, &mut a);
        for p in all_paths().into_iter().filter(|p| *p != Sm4Path::Portable) {
            let k = Sm4Gcm {
                rk,
                ghash: Ghash::Soft(0),
                path: p,
            };
            let mut buf = [0u8; CHUNK];
            let got = k.keystream(&[1u8; 12], u32::MAX - 1, &mut buf, 64);
            assert_eq!(&buf[..64], &a[..], "{} ({got})", p.name());
        }
    }

    #[test]
    fn rfc8998_sm4_gcm_vector() {
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let key = hex("0123456789abcdeffedcba9876543210");
        let iv: [u8; 12] = hex("00001234567800000000abcd").try_into().unwrap();
        let aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let pt = hex(concat!(
            "aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbccccccccccccccccdddddddddddddddd",
            "eeeeeeeeeeeeeeeeffffffffffffffffeeeeeeeeeeeeeeeeaaaaaaaaaaaaaaaa"
        ));
        let ct = hex(concat!(
            "17f399f08c67d5ee19d0dc9969c4bb7d5fd46fd3756489069157b282bb200735",
            "d82710ca5c22f0ccfa7cbf93d496ac15a56834cbcf98c397b4024a2691233b8d"
        ));
        let tag = hex("83de3541e4c2b58177e065a9bf7b62ec");
        for p in all_paths() {
            let k = new_key(&key, p).unwrap();
            let mut out = vec![0u8; pt.len()];
            let t = k.seal(&iv, &aad, &pt, &mut out);
            assert_eq!(out, ct, "{}", p.name());
            assert_eq!(t.to_vec(), tag, "{}", p.name());
            let mut bad = t;
            bad[0] ^= 1;
            let mut back = vec![0u8; pt.len()];
            assert!(!k.open(&iv, &aad, &out, &bad, &mut back), "{}", p.name());
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore = "timing probe: cargo test --release sm4_timing -- --ignored --nocapture"]
    fn sm4_timing() {
        let k = Sm4Gcm {
            rk: portable::expand_key(&[1; 16]),
            ghash: Ghash::Soft(0),
            path: Sm4Path::detected(),
        };
        let mut buf = [0u8; CHUNK];
        let t = Instant::now();
        for i in 0..100_000u32 {
            k.keystream(&[0; 12], i, &mut buf, 1024);
        }
        println!("keystream 1KiB: {:?}/call", t.elapsed() / 100_000);
        let g = new_key(&[1; 16], Sm4Path::detected()).unwrap();
        let data = vec![0u8; 4096];
        let mut out = vec![0u8; 4096];
        let t = Instant::now();
        for _ in 0..20_000 {
            g.seal(&[0; 12], b"", &data, &mut out);
        }
        println!("seal 4KiB: {:?}/call", t.elapsed() / 20_000);
        if let Ghash::Hw(h) = &(Sm4Gcm {
            rk: [0; 32],
            ghash: Ghash::Hw(Box::new(ghash::GHash::new(&[1u8; 16].into()))),
            path: Sm4Path::detected(),
        })
        .ghash
        {
            let t = Instant::now();
            for _ in 0..20_000 {
                let mut c = (**h).clone();
                c.update_padded(&data);
                std::hint::black_box(c.finalize());
            }
            println!("ghash 4KiB: {:?}/call", t.elapsed() / 20_000);
        }
    }
}
