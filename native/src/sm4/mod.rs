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
//! None of them indexes memory with secret data. GHASH (`ghash_x86.rs`):
//! aggregated PCLMULQDQ / VPCLMULQDQ (16 blocks per reduction; xmm on
//! `aesni`, ymm on `gfni-avx2`, zmm on `gfni-avx512`), a constant-time
//! bitwise software GHASH on `portable`. The hash runs fused with the CTR
//! pass: each keystream chunk (up to 1 KiB) is XORed and the ciphertext
//! hashed while it is still in L1. `open` hashes the ciphertext in the same
//! CTR pass that yields E(J0), compares in constant time and wipes the
//! output on mismatch.

use zeroize::Zeroize;

use crate::aead::{BlockAead, NONCE_LEN, TAG_LEN};
use crate::cpu::Sm4Path;
use crate::error::Error;

#[cfg(target_arch = "x86_64")]
mod ghash_x86;
pub mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Expands a 16-byte key for `path` (lowered to what the CPU supports).
pub fn new_key(key: &[u8], path: Sm4Path) -> Result<Box<dyn BlockAead>, Error> {
    let key: &[u8; 16] = key.try_into().map_err(|_| Error::WrongKeySize)?;
    let path = path.min(Sm4Path::detected());
    let rk = portable::expand_key(key);
    let mut h = portable::encrypt_block(&rk, &[0u8; 16]);
    let ghash = Ghash::new(&h, path);
    h.zeroize();
    Ok(Box::new(Sm4Gcm { rk, ghash, path }))
}

enum Ghash {
    /// Our aggregated (V)PCLMULQDQ GHASH; the state is in the POLYVAL domain.
    #[cfg(target_arch = "x86_64")]
    X86(Box<ghash_x86::Key>),
    /// Bitwise constant-time GHASH with key `H`; the state is a GCM-order
    /// `u128` (`from_be_bytes`).
    Soft(u128),
}

impl Ghash {
    /// The GHASH matching `path` (software for `portable`, or if the CPU
    /// unexpectedly lacks the instructions).
    fn new(h: &[u8; 16], path: Sm4Path) -> Ghash {
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = ghash_x86::Width::for_path(path).and_then(|w| ghash_x86::Key::new(h, w)) {
            return Ghash::X86(k);
        }
        let _ = path;
        Ghash::Soft(u128::from_be_bytes(*h))
    }

    /// Absorbs `data` (zero-padded to a whole block; only the last call for
    /// a message may pass a length that is not a multiple of 16).
    #[inline]
    fn update(&self, acc: &mut u128, data: &[u8]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Ghash::X86(k) => k.update(acc, data),
            Ghash::Soft(h) => {
                for chunk in data.chunks(16) {
                    let mut b = [0u8; 16];
                    b[..chunk.len()].copy_from_slice(chunk);
                    *acc = gf128_mul(*acc ^ u128::from_be_bytes(b), *h);
                }
            }
        }
    }

    /// Absorbs the length block and returns GCM's `S`.
    fn finish(&self, acc: u128, aad_len: usize, ct_len: usize) -> [u8; 16] {
        match self {
            #[cfg(target_arch = "x86_64")]
            Ghash::X86(k) => k.finish(acc, aad_len, ct_len),
            Ghash::Soft(h) => {
                let lens = ((aad_len as u128 * 8) << 64) | (ct_len as u128 * 8);
                gf128_mul(acc ^ lens, *h).to_be_bytes()
            }
        }
    }

    /// One-shot `S = GHASH(A || pad || C || pad || lengths)`.
    #[cfg(test)]
    fn hash(&self, aad: &[u8], ct: &[u8]) -> [u8; 16] {
        let mut acc = 0u128;
        self.update(&mut acc, aad);
        self.update(&mut acc, ct);
        self.finish(acc, aad.len(), ct.len())
    }
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
        // ghash_x86::Key zeroizes its key powers on drop.
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

/// `dst = src ^ ks` (equal lengths), 16 bytes at a time where possible.
#[inline(always)]
fn xor_into(dst: &mut [u8], src: &[u8], ks: &[u8]) {
    let mut d = dst.chunks_exact_mut(16);
    let mut s = src.chunks_exact(16);
    let mut k = ks.chunks_exact(16);
    for ((d, s), k) in (&mut d).zip(&mut s).zip(&mut k) {
        let x = u128::from_ne_bytes(s.try_into().expect("16"))
            ^ u128::from_ne_bytes(k.try_into().expect("16"));
        d.copy_from_slice(&x.to_ne_bytes());
    }
    for ((d, s), k) in d
        .into_remainder()
        .iter_mut()
        .zip(s.remainder())
        .zip(k.remainder())
    {
        *d = s ^ k;
    }
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
                        x86::keystream_avx512::<4, false>(&self.rk, nonce, ctr, buf);
                        return 1024;
                    }
                    Sm4Path::GfniAvx512 if want > 320 => {
                        x86::keystream_avx512::<2, false>(&self.rk, nonce, ctr, buf);
                        return 512;
                    }
                    Sm4Path::GfniAvx512 if want > 256 => {
                        // 256-byte messages: 17 blocks with E(J0).
                        x86::keystream_avx512::<1, true>(&self.rk, nonce, ctr, buf);
                        return 320;
                    }
                    Sm4Path::GfniAvx512 if want > 128 => {
                        x86::keystream_avx512::<1, false>(&self.rk, nonce, ctr, buf);
                        return 256;
                    }
                    // Short requests too: the 8-block GFNI call (133 ns)
                    // beats the 4-block AES-NI one (227 ns; both latency
                    // bound). This is the 16-byte tail of every message
                    // that is a multiple of 1 KiB (E(J0) takes a block).
                    Sm4Path::GfniAvx512 | Sm4Path::GfniAvx2 => {
                        let b: &mut [u8; 128] = (&mut buf[..128]).try_into().expect("128");
                        x86::keystream8_avx2(&self.rk, nonce, ctr, b);
                        return 128;
                    }
                    Sm4Path::Aesni => {
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

    /// XORs the keystream (counters from 2) into `output` = `input` ^ KS,
    /// hashes the ciphertext into `acc` chunk by chunk while it is in L1
    /// (`output` when sealing, `input` when opening) and returns E(J0)
    /// (counter 1), computed in the same first chunk.
    fn ctr(
        &self,
        nonce: &[u8; NONCE_LEN],
        input: &[u8],
        output: &mut [u8],
        acc: &mut u128,
        sealing: bool,
    ) -> [u8; 16] {
        // A per-thread buffer, all zero between calls (each call wipes what
        // it used): no 1 KiB memset per message.
        KS_BUF.with(|cell| match cell.try_borrow_mut() {
            Ok(mut kbuf) => self.ctr_in(&mut kbuf, nonce, input, output, acc, sealing),
            Err(_) => self.ctr_in(&mut KsBuf([0u8; CHUNK]), nonce, input, output, acc, sealing),
        })
    }

    fn ctr_in(
        &self,
        kbuf: &mut KsBuf,
        nonce: &[u8; NONCE_LEN],
        input: &[u8],
        output: &mut [u8],
        acc: &mut u128,
        sealing: bool,
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
            // `take` is a multiple of 16 except for the last chunk, as
            // `Ghash::update` requires.
            let take = ks.len().min(remaining);
            let (src, dst) = (&input[pos..pos + take], &mut output[pos..pos + take]);
            xor_into(dst, src, &ks[..take]);
            self.ghash.update(acc, if sealing { dst } else { src });
            pos += take;
        }
        kbuf.wipe(used);
        ej0
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
        let mut acc = 0u128;
        self.ghash.update(&mut acc, aad);
        let ej0 = self.ctr(nonce, input, output, &mut acc, true);
        let mut s = self.ghash.finish(acc, aad.len(), input.len());
        acc.zeroize();
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
        // One CTR pass hashes the ciphertext and yields both E(J0) and the
        // candidate plaintext; on a tag mismatch the output is wiped before
        // returning, so no unauthenticated plaintext is ever released.
        let mut acc = 0u128;
        self.ghash.update(&mut acc, aad);
        let ej0 = self.ctr(nonce, input, output, &mut acc, false);
        let s = self.ghash.finish(acc, aad.len(), input.len());
        acc.zeroize();
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

    /// xorshift64 bytes (deterministic "random" test data).
    fn rand_bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Every GHASH the CPU can run: the bitwise one first, then each
    /// (V)PCLMULQDQ width.
    pub(super) fn all_ghashes(h: &[u8; 16]) -> Vec<(&'static str, Ghash)> {
        let mut v = vec![("soft", Ghash::Soft(u128::from_be_bytes(*h)))];
        #[cfg(target_arch = "x86_64")]
        for w in ghash_x86::Width::ALL {
            if let Some(k) = ghash_x86::Key::new(h, w) {
                assert_eq!(k.width(), w);
                v.push((
                    match w {
                        ghash_x86::Width::Xmm => "xmm",
                        ghash_x86::Width::Ymm => "ymm",
                        ghash_x86::Width::Zmm => "zmm",
                    },
                    Ghash::X86(k),
                ));
            }
        }
        v
    }

    /// RustCrypto's `ghash` crate as the independent reference.
    fn crate_ghash(h: &[u8; 16], aad: &[u8], ct: &[u8]) -> [u8; 16] {
        use ghash::universal_hash::UniversalHash;
        let mut g = ghash::GHash::new(&(*h).into());
        g.update_padded(aad);
        g.update_padded(ct);
        let mut lens = [0u8; 16];
        lens[..8].copy_from_slice(&(aad.len() as u64 * 8).to_be_bytes());
        lens[8..].copy_from_slice(&(ct.len() as u64 * 8).to_be_bytes());
        g.update(&[lens.into()]);
        g.finalize().into()
    }

    #[test]
    fn ghash_all_lengths_match_soft_and_ghash_crate() {
        // Random keys and data; ciphertext of every length 0..1000 with a
        // few AAD lengths, on every GHASH width, against the bitwise GHASH
        // and RustCrypto's `ghash`.
        let data = rand_bytes(0x9e37_79b9_7f4a_7c15, 4096);
        for (trial, aad_len) in [0usize, 1, 13, 16, 20, 255, 256, 300, 999]
            .into_iter()
            .enumerate()
        {
            let h: [u8; 16] = rand_bytes(trial as u64 * 77 + 5, 16).try_into().unwrap();
            let gs = all_ghashes(&h);
            let aad = &data[3000..3000 + aad_len];
            for len in 0..1000 {
                let ct = &data[(len * 7) % 1000..][..len];
                let want = crate_ghash(&h, aad, ct);
                for (name, g) in &gs {
                    assert_eq!(g.hash(aad, ct), want, "{name} aad {aad_len} ct {len}");
                }
            }
        }
    }

    #[test]
    fn ghash_split_updates_match_one_shot() {
        // The fused CTR loop feeds the hash in pieces (multiples of 16, the
        // last one any length): every split point must give the same result.
        let h: [u8; 16] = rand_bytes(11, 16).try_into().unwrap();
        let data = rand_bytes(12, 1500);
        for (name, g) in all_ghashes(&h) {
            for len in [0usize, 15, 16, 17, 255, 256, 257, 1008, 1024, 1300, 1500] {
                let ct = &data[..len];
                let want = g.hash(b"ad", ct);
                for cut in (0..=len).step_by(16) {
                    let mut acc = 0u128;
                    g.update(&mut acc, b"ad");
                    g.update(&mut acc, &ct[..cut]);
                    g.update(&mut acc, &ct[cut..]);
                    assert_eq!(g.finish(acc, 2, len), want, "{name} len {len} cut {cut}");
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
        for (want, start) in [
            (64usize, u32::MAX - 1),
            (272, u32::MAX - 17),
            (1024, u32::MAX - 30),
        ] {
            for p in all_paths().into_iter().filter(|p| *p != Sm4Path::Portable) {
                let k = Sm4Gcm {
                    rk,
                    ghash: Ghash::Soft(0),
                    path: p,
                };
                let mut buf = [0u8; CHUNK];
                let got = k.keystream(&[1u8; 12], start, &mut buf, want);
                let mut a = vec![0u8; got];
                portable::keystream(&rk, &[1u8; 12], start, &mut a);
                assert_eq!(&buf[..got], &a[..], "{} want {want} ({got})", p.name());
            }
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
        for want in [16usize, 64, 128, 256, 272, 384, 512] {
            let t = Instant::now();
            let mut got = 0;
            for i in 0..100_000u32 {
                got = k.keystream(&[0; 12], i, &mut buf, want);
            }
            println!(
                "keystream want {want} -> {got}: {:?}/call",
                t.elapsed() / 100_000
            );
        }
        let g = new_key(&[1; 16], Sm4Path::detected()).unwrap();
        let data = vec![0u8; 4096];
        let mut out = vec![0u8; 4096];
        let t = Instant::now();
        for _ in 0..200_000 {
            g.seal(&[0; 12], b"", &data, &mut out);
        }
        println!("seal 4KiB: {:?}/call", t.elapsed() / 200_000);
        for (name, gh) in tests::all_ghashes(&[1u8; 16]) {
            let n = if name == "soft" { 200 } else { 20_000 };
            let t = Instant::now();
            for _ in 0..n {
                std::hint::black_box(gh.hash(b"", std::hint::black_box(&data)));
            }
            println!("ghash {name} 4KiB: {:?}/call", t.elapsed() / n);
        }
    }
}
