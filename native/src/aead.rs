//! The interface every cipher backend implements, and the suite registry.

use crate::cpu::{AesPath, Sm4Path};
use crate::error::Error;

/// Length of the nonce that prefixes every sealed item.
pub const NONCE_LEN: usize = 12;
/// Length of the GCM tag that ends every sealed item.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed item adds to its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// One expanded key of one suite. Implementations keep their round keys and
/// GHASH key powers inside and zeroize them on drop.
pub trait BlockAead: Send + Sync {
    /// Encrypts `input` into `output` (same length) and returns the tag.
    /// `output.len() == input.len()` is guaranteed by the caller.
    fn seal(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        input: &[u8],
        output: &mut [u8],
    ) -> [u8; TAG_LEN];

    /// Verifies `tag` over `aad` and the ciphertext `input`, and on success
    /// decrypts into `output` (same length) and returns true. On failure it
    /// returns false; the caller wipes `output`.
    fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        input: &[u8],
        tag: &[u8; TAG_LEN],
        output: &mut [u8],
    ) -> bool;

    /// Name of the code path this key runs on, e.g. "vaes-avx512".
    fn backend(&self) -> &'static str;
}

/// The suites the keyring accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Suite {
    Aes128Gcm = 1,
    Aes256Gcm = 2,
    Sm4Gcm = 3,
}

impl Suite {
    pub fn from_u32(v: u32) -> Result<Suite, Error> {
        match v {
            1 => Ok(Suite::Aes128Gcm),
            2 => Ok(Suite::Aes256Gcm),
            3 => Ok(Suite::Sm4Gcm),
            _ => Err(Error::UnknownSuite),
        }
    }

    pub fn key_len(self) -> usize {
        match self {
            Suite::Aes128Gcm => 16,
            Suite::Aes256Gcm => 32,
            Suite::Sm4Gcm => 16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Suite::Aes128Gcm => "aes-128-gcm",
            Suite::Aes256Gcm => "aes-256-gcm",
            Suite::Sm4Gcm => "sm4-gcm",
        }
    }
}

/// Expands `key` for `suite` on the given code paths.
pub fn expand(
    suite: Suite,
    key: &[u8],
    aes: AesPath,
    sm4: Sm4Path,
) -> Result<Box<dyn BlockAead>, Error> {
    if key.len() != suite.key_len() {
        return Err(Error::WrongKeySize);
    }
    match suite {
        Suite::Aes128Gcm | Suite::Aes256Gcm => crate::aes::new_key(key, aes),
        Suite::Sm4Gcm => crate::sm4::new_key(key, sm4),
    }
}
