//! Portable AES-GCM: RustCrypto `aes-gcm`. Its software AES is fixsliced
//! and its POLYVAL uses constant-time multiplication, so this path has no
//! secret-dependent branches or table lookups. RustCrypto would use AES-NI or
//! ARMv8 crypto extensions by itself where present; the workspace's
//! `.cargo/config.toml` builds it with `--cfg aes_backend="soft"
//! --cfg polyval_backend="soft"`, so this path is software on every CPU and
//! the tests that force it really test software code.

//!
//! A `RUSTFLAGS` environment variable replaces `build.rustflags` of
//! `.cargo/config.toml` instead of adding to it (cargo fuzz sets one, CI
//! often does): such a build compiles with a deprecation warning below, so
//! it cannot go unnoticed (`clippy -D warnings` fails, maturin shows it).
//! The result is still correct AES-GCM; only "portable" then means
//! "RustCrypto with run-time AES-NI/CLMUL detection".

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes128Gcm, Aes256Gcm};

use crate::aead::{BlockAead, NONCE_LEN, TAG_LEN};

#[cfg(not(all(aes_backend = "soft", polyval_backend = "soft")))]
#[deprecated(
    note = "built without `--cfg aes_backend=\"soft\" --cfg polyval_backend=\"soft\"` \
            (a RUSTFLAGS variable overrides .cargo/config.toml): the portable AES-GCM path \
            will use AES-NI/CLMUL where present instead of software"
)]
const fn portable_path_not_software() {}

#[cfg(not(all(aes_backend = "soft", polyval_backend = "soft")))]
const _: () = portable_path_not_software();

pub(super) enum PortableKey {
    A128(Box<Aes128Gcm>),
    A256(Box<Aes256Gcm>),
}

impl PortableKey {
    /// `key` is 16 or 32 bytes (checked by the caller).
    pub(super) fn new(key: &[u8]) -> PortableKey {
        if key.len() == 16 {
            let mut k = [0u8; 16];
            k.copy_from_slice(key);
            let c = Aes128Gcm::new(&k.into());
            zeroize::Zeroize::zeroize(&mut k);
            PortableKey::A128(Box::new(c))
        } else {
            let mut k = [0u8; 32];
            k.copy_from_slice(key);
            let c = Aes256Gcm::new(&k.into());
            zeroize::Zeroize::zeroize(&mut k);
            PortableKey::A256(Box::new(c))
        }
    }
}

impl BlockAead for PortableKey {
    fn seal(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        input: &[u8],
        output: &mut [u8],
    ) -> [u8; TAG_LEN] {
        output.copy_from_slice(input);
        let n = (*nonce).into();
        let tag = match self {
            PortableKey::A128(c) => c.encrypt_inout_detached(&n, aad, output.into()),
            PortableKey::A256(c) => c.encrypt_inout_detached(&n, aad, output.into()),
        };
        // Only fails for inputs over 2^36 bytes, far above the item limit.
        tag.map(|t| t.into()).unwrap_or_else(|_| {
            output.fill(0);
            [0u8; TAG_LEN]
        })
    }

    fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        input: &[u8],
        tag: &[u8; TAG_LEN],
        output: &mut [u8],
    ) -> bool {
        output.copy_from_slice(input);
        let n = (*nonce).into();
        let t = (*tag).into();
        let ok = match self {
            PortableKey::A128(c) => c.decrypt_inout_detached(&n, aad, output.into(), &t),
            PortableKey::A256(c) => c.decrypt_inout_detached(&n, aad, output.into(), &t),
        }
        .is_ok();
        if !ok {
            output.fill(0);
        }
        ok
    }

    fn backend(&self) -> &'static str {
        "portable"
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn built_with_software_aes_and_polyval() {
        // .cargo/config.toml must reach this build: otherwise "portable"
        // would silently run on AES-NI.
        const { assert!(cfg!(aes_backend = "soft")) };
        const { assert!(cfg!(polyval_backend = "soft")) };
    }
}
