//! Native core of the chat gateway: batched AES-GCM and SM4-GCM with keys
//! kept expanded behind handles, and the fast paths of the WebSocket reader
//! and the msgpack frame decoder, exposed through a C ABI for cffi.
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
//! - `msgpack`: MessagePack value heads, for the link-frame decoder.
//! - `cpython`, `pyfast`, `pyws`, `pylink` (feature `cpython-fastpath`): the
//!   CPython C API glue, and the fast paths of the crypto lists, the
//!   WebSocket reader and the length-prefixed msgpack frame decoder.

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
pub mod msgpack;
#[cfg(feature = "cpython-fastpath")]
pub mod pyfast;
#[cfg(feature = "cpython-fastpath")]
pub mod pylink;
#[cfg(feature = "cpython-fastpath")]
pub mod pyws;
pub mod sm4;
pub mod wsframe;

pub use aead::{BlockAead, Suite, NONCE_LEN, OVERHEAD, TAG_LEN};
pub use cpu::{AesPath, Sm4Path};
pub use error::Error;
pub use keyring::Keyring;
