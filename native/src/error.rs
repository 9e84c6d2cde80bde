//! Error codes shared by the Rust API and the C ABI (negative return values).

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Error {
    NullPointer = -1,
    EmptyBatch = -2,
    UnknownHandle = -3,
    OutOfRange = -4,
    Overlap = -5,
    OutputTooSmall = -6,
    Oversize = -7,
    BatchTooLarge = -8,
    KeyExhausted = -9,
    WrongKeySize = -10,
    UnknownSuite = -11,
    TooShort = -12,
    KeyringFull = -13,
}

impl Error {
    pub fn code(self) -> i32 {
        self as i32
    }

    pub fn message(self) -> &'static str {
        match self {
            Error::NullPointer => "a required pointer argument is NULL",
            Error::EmptyBatch => "empty batch",
            Error::UnknownHandle => "unknown or removed key handle",
            Error::OutOfRange => "item offset/length outside its buffer",
            Error::Overlap => "items overlap or are not in increasing offset order",
            Error::OutputTooSmall => "output buffer too small",
            Error::Oversize => "item larger than the per-item limit",
            Error::BatchTooLarge => "batch has more items than the per-batch limit",
            Error::KeyExhausted => "key reached its invocation limit; rotate the key",
            Error::WrongKeySize => "wrong key size for the suite",
            Error::UnknownSuite => "unknown suite",
            Error::TooShort => "sealed item shorter than nonce + tag",
            Error::KeyringFull => "keyring holds the maximum number of keys",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Error {}

/// NUL-terminated copies of the messages and path names for the C ABI.
pub(crate) fn c_message(e: Error) -> *const std::ffi::c_char {
    c_name(e.message())
}

/// Interns a static string as a NUL-terminated C string (leaked once).
pub(crate) fn c_name(s: &'static str) -> *const std::ffi::c_char {
    use std::collections::HashMap;
    use std::ffi::CString;
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashMap<&'static str, &'static CString>>> = OnceLock::new();
    let m = NAMES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
    let c = m.entry(s).or_insert_with(|| {
        Box::leak(Box::new(
            CString::new(s).unwrap_or_else(|_| CString::default()),
        ))
    });
    c.as_ptr()
}
