//! Keyring: expanded keys behind opaque integer handles, with the nonce
//! counters that make every sealed nonce unique.
//!
//! Nonce construction (SP 800-38D section 8.2.1, deterministic): the 96-bit
//! nonce is `fixed(32 bits, big-endian) || invocation counter(64 bits,
//! big-endian)`. The fixed field is given when the keyring is created and must
//! be unique per process instance for the lifetime of a key (the Python layer
//! allocates it from a persistent, file-locked epoch counter, with the node id
//! in its top bits). The counter starts at 0 for each key in each keyring and
//! never wraps: once `limit` invocations are used, sealing with that key fails
//! with `KeyExhausted`, which forces rotation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::aead::{expand, BlockAead, Suite, NONCE_LEN};
use crate::cpu::{aes_path, sm4_path, AesPath, Sm4Path};
use crate::error::Error;

/// Default invocation limit per key per keyring: 2^32, the SP 800-38D
/// section 8.3 bound. Callers may lower it (tests) or raise it up to 2^64 - 1.
pub const DEFAULT_LIMIT: u64 = 1 << 32;

/// Maximum number of live keys in one keyring.
pub const MAX_KEYS: usize = 1 << 20;

pub struct Entry {
    pub suite: Suite,
    pub aead: Box<dyn BlockAead>,
    counter: AtomicU64,
    limit: u64,
}

impl Entry {
    /// Reserves `count` consecutive invocations for this key and returns the
    /// first counter value, or fails (reserving nothing) when that would pass
    /// the limit.
    pub fn reserve(&self, count: u64) -> Result<u64, Error> {
        let limit = self.limit;
        self.counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                c.checked_add(count).filter(|end| *end <= limit)
            })
            .map_err(|_| Error::KeyExhausted)
    }

    /// The nonce for counter value `c` under fixed field `fixed`.
    #[inline]
    pub fn nonce(fixed: u32, c: u64) -> [u8; NONCE_LEN] {
        let mut n = [0u8; NONCE_LEN];
        n[..4].copy_from_slice(&fixed.to_be_bytes());
        n[4..].copy_from_slice(&c.to_be_bytes());
        n
    }

    /// Invocations used so far.
    pub fn used(&self) -> u64 {
        self.counter.load(Ordering::Relaxed)
    }
}

/// Handle -> expanded key.
pub type KeyMap = HashMap<u32, Arc<Entry>>;

pub struct Keyring {
    fixed: u32,
    next_handle: AtomicU64,
    keys: RwLock<KeyMap>,
    aes: AesPath,
    sm4: Sm4Path,
}

impl Keyring {
    /// A keyring on the process's selected code paths.
    pub fn new(fixed: u32) -> Keyring {
        Keyring::with_paths(fixed, aes_path(), sm4_path())
    }

    /// A keyring on explicit code paths (each capped to what the CPU has).
    pub fn with_paths(fixed: u32, aes: AesPath, sm4: Sm4Path) -> Keyring {
        Keyring {
            fixed,
            next_handle: AtomicU64::new(1),
            keys: RwLock::new(HashMap::new()),
            aes: aes.min(AesPath::detected()),
            sm4: sm4.min(Sm4Path::detected()),
        }
    }

    pub fn fixed(&self) -> u32 {
        self.fixed
    }

    pub fn aes_path(&self) -> AesPath {
        self.aes
    }

    pub fn sm4_path(&self) -> Sm4Path {
        self.sm4
    }

    /// Expands and stores a key; returns its handle (never 0, never reused).
    pub fn add(&self, suite: Suite, key: &[u8], limit: u64) -> Result<u32, Error> {
        let aead = expand(suite, key, self.aes, self.sm4)?;
        let entry = Arc::new(Entry {
            suite,
            aead,
            counter: AtomicU64::new(0),
            limit,
        });
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if keys.len() >= MAX_KEYS {
            return Err(Error::KeyringFull);
        }
        let h = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let h = u32::try_from(h).map_err(|_| Error::KeyringFull)?;
        keys.insert(h, entry);
        Ok(h)
    }

    /// Removes a key. The expanded key is zeroized once the last batch using
    /// it has finished (the entry is reference counted).
    pub fn remove(&self, handle: u32) -> Result<(), Error> {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        keys.remove(&handle).map(|_| ()).ok_or(Error::UnknownHandle)
    }

    pub fn get(&self, handle: u32) -> Result<Arc<Entry>, Error> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.get(&handle).cloned().ok_or(Error::UnknownHandle)
    }

    /// Runs `f` with a lookup function over a consistent view of the keys:
    /// keys added or removed meanwhile wait until `f` returns.
    pub fn with_keys<R>(&self, f: impl FnOnce(&KeyMap) -> R) -> R {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        f(&keys)
    }

    pub fn len(&self) -> usize {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
