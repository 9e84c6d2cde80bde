//! AES-GCM backends (AES-128-GCM and AES-256-GCM, 96-bit nonces, 16-byte
//! tags), selectable per key:
//!
//! - `vaes-avx512`: VAES + VPCLMULQDQ on 512-bit vectors (`x86`).
//! - `vaes-avx2`: VAES + VPCLMULQDQ on 256-bit vectors (`x86`).
//! - `aesni`: AES-NI + PCLMULQDQ on 128-bit vectors (`x86`).
//! - `portable`: RustCrypto `aes-gcm` (constant-time fixsliced AES and
//!   constant-time POLYVAL when built or run without hardware support).
//!
//! The hardware paths are our own code (see `x86.rs`); every path can run in
//! one process, so `new_key` honours the `path` it is given (capped to what
//! the CPU supports).

use crate::aead::{BlockAead, NONCE_LEN, TAG_LEN};
use crate::cpu::AesPath;
use crate::error::Error;

mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Expands a 16-byte (AES-128) or 32-byte (AES-256) key for `path`. A path
/// the CPU lacks is lowered to the best one it has.
pub fn new_key(key: &[u8], path: AesPath) -> Result<Box<dyn BlockAead>, Error> {
    if key.len() != 16 && key.len() != 32 {
        return Err(Error::WrongKeySize);
    }
    let path = path.min(AesPath::detected());
    #[cfg(target_arch = "x86_64")]
    {
        if path != AesPath::Portable && std::arch::is_x86_feature_detected!("sse4.1") {
            // SAFETY: `path` is at most `AesPath::detected()`, and every
            // non-portable path requires AES-NI, PCLMULQDQ and SSSE3,
            // which `detected()` checked; SSE4.1 is checked just above.
            let keys = unsafe { x86::new_keys(key) };
            return Ok(Box::new(HwKey {
                keys,
                path,
                aes256: key.len() == 32,
            }));
        }
    }
    Ok(Box::new(portable::PortableKey::new(key)))
}

#[cfg(target_arch = "x86_64")]
struct HwKey {
    keys: Box<x86::Keys>,
    path: AesPath,
    aes256: bool,
}

#[cfg(target_arch = "x86_64")]
impl HwKey {
    #[inline]
    fn run<const ENC: bool>(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        input: &[u8],
        output: &mut [u8],
    ) -> [u8; TAG_LEN] {
        assert_eq!(input.len(), output.len());
        let k = &*self.keys;
        // SAFETY: `self.path` was capped to `AesPath::detected()` in
        // `new_key`, so the CPU has every feature the selected function is
        // compiled for (aesni: AES-NI, PCLMULQDQ, SSSE3, SSE4.1; vaes-avx2:
        // plus AVX2, VAES, VPCLMULQDQ; vaes-avx512: plus AVX-512 F/BW/VL).
        // The functions only access `input`/`output` within their lengths.
        unsafe {
            match (self.path, self.aes256) {
                (AesPath::VaesAvx512, false) => {
                    x86::crypt_avx512::<10, ENC>(k, nonce, aad, input, output)
                }
                (AesPath::VaesAvx512, true) => {
                    x86::crypt_avx512::<14, ENC>(k, nonce, aad, input, output)
                }
                (AesPath::VaesAvx2, false) => {
                    x86::crypt_avx2::<10, ENC>(k, nonce, aad, input, output)
                }
                (AesPath::VaesAvx2, true) => {
                    x86::crypt_avx2::<14, ENC>(k, nonce, aad, input, output)
                }
                (_, false) => x86::crypt_aesni::<10, ENC>(k, nonce, aad, input, output),
                (_, true) => x86::crypt_aesni::<14, ENC>(k, nonce, aad, input, output),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl BlockAead for HwKey {
    fn seal(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        input: &[u8],
        output: &mut [u8],
    ) -> [u8; TAG_LEN] {
        self.run::<true>(nonce, aad, input, output)
    }

    fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        input: &[u8],
        tag: &[u8; TAG_LEN],
        output: &mut [u8],
    ) -> bool {
        // Decrypting and hashing in one pass, then wiping the plaintext on a
        // mismatch: the caller never sees unauthenticated plaintext.
        let mut expected = self.run::<false>(nonce, aad, input, output);
        let ok = ct_eq(&expected, tag);
        zeroize::Zeroize::zeroize(&mut expected);
        if !ok {
            output.fill(0);
        }
        ok
    }

    fn backend(&self) -> &'static str {
        self.path.name()
    }
}

/// Constant-time comparison of two tags.
#[inline]
pub(crate) fn ct_eq(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    let d = u128::from_ne_bytes(*a) ^ u128::from_ne_bytes(*b);
    core::hint::black_box(d) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_agree_on_every_length() {
        let key16 = [0x42u8; 16];
        let key32 = [0x24u8; 32];
        let nonce = [9u8; 12];
        let data: Vec<u8> = (0..1200u32).map(|i| (i * 7 + 3) as u8).collect();
        for key in [&key16[..], &key32[..]] {
            let reference = new_key(key, AesPath::Portable).unwrap();
            for path in AesPath::ALL.into_iter().filter(|p| p.supported()) {
                let k = new_key(key, path).unwrap();
                assert_eq!(k.backend(), path.name());
                for len in (0..600).chain([1023, 1024, 1025, 1200]) {
                    for alen in [0usize, 1, 16, 17, 300] {
                        let (pt, aad) = (&data[..len], &data[..alen]);
                        let mut c1 = vec![0u8; len];
                        let mut c2 = vec![0u8; len];
                        let t1 = reference.seal(&nonce, aad, pt, &mut c1);
                        let t2 = k.seal(&nonce, aad, pt, &mut c2);
                        assert_eq!(c1, c2, "{} len {len} aad {alen}", path.name());
                        assert_eq!(t1, t2, "{} len {len} aad {alen}", path.name());
                        let mut p = vec![0u8; len];
                        assert!(k.open(&nonce, aad, &c2, &t2, &mut p));
                        assert_eq!(p, pt);
                    }
                }
            }
        }
    }
}
