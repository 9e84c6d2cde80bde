//! Native core of the chat gateway: batched AES-GCM and SM4-GCM with keys
//! kept expanded behind handles, and the fast path of the WebSocket reader,
//! exposed through a C ABI for cffi.
//!
//! Module map:
//! - `cpu`: runtime feature detection and the env overrides of code paths.
//! - `aead`: the `BlockAead` trait every backend implements, and the suites.
//! - `aes`: AES-GCM backends.
//! - `sm4`: SM4 block cipher (portable, AES-NI, GFNI) and SM4-GCM.
//! - `ghash`: GHASH for SM4-GCM (portable, PCLMULQDQ, VPCLMULQDQ).
//! - `keyring`: handles, nonce construction, invocation limits.
//! - `batch`: validation and the batch seal/open loops.
//! - `ffi`: the C ABI.
//! - `wsframe`: WebSocket client-frame parsing and unmasking, the fast path
//!   of the gateway's WebSocket reader.
//! - `cpython`, `pyfast`, `pyws` (feature `cpython-fastpath`): the CPython
//!   C API glue, the crypto list fast path and the WebSocket reader's.

pub mod aead;
pub mod aes;
pub mod batch;
pub mod cpu;
#[cfg(feature = "cpython-fastpath")]
pub mod cpython;
pub mod error;
pub mod ffi;
pub mod fuzzing;
pub mod ghash;
pub mod keyring;
#[cfg(feature = "cpython-fastpath")]
pub mod pyfast;
#[cfg(feature = "cpython-fastpath")]
pub mod pyws;
pub mod sm4;
pub mod wsframe;

pub use aead::{BlockAead, Suite, NONCE_LEN, OVERHEAD, TAG_LEN};
pub use cpu::{AesPath, Sm4Path};
pub use error::Error;
pub use keyring::Keyring;
