//! The C ABI that Python reaches through cffi. Every function validates its
//! arguments, never panics across the boundary (a panic is caught and
//! reported as `GW_ERR_INTERNAL`) and returns 0 or a negative error code.

use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::slice;

use crate::aead::Suite;
use crate::batch::{self, Items};
use crate::cpu::{AesPath, Sm4Path};
use crate::error::Error;
use crate::keyring::Keyring;

/// Returned when a Rust panic was caught at the boundary (a bug).
pub const GW_ERR_INTERNAL: i32 = -100;

/// Opaque keyring.
pub struct GwKeyring {
    inner: Keyring,
}

impl GwKeyring {
    /// The keyring behind the handle.
    pub fn keyring(&self) -> &Keyring {
        &self.inner
    }
}

fn guard(f: impl FnOnce() -> i32) -> i32 {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(GW_ERR_INTERNAL)
}

/// A slice from a pointer and length; NULL is accepted only for length 0.
///
/// # Safety
/// `p` must point to `n` readable bytes (or elements) when non-NULL.
unsafe fn view<'a, T>(p: *const T, n: usize) -> Result<&'a [T], Error> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::NullPointer);
    }
    // SAFETY: the caller guarantees `p` points to `n` valid, initialised `T`s
    // that stay alive and unmodified for the duration of the call.
    Ok(unsafe { slice::from_raw_parts(p, n) })
}

/// # Safety
/// `p` must point to `n` writable bytes (or elements) when non-NULL.
unsafe fn view_mut<'a, T>(p: *mut T, n: usize) -> Result<&'a mut [T], Error> {
    if n == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(Error::NullPointer);
    }
    // SAFETY: the caller guarantees `p` points to `n` writable `T`s that no
    // one else accesses during the call.
    Ok(unsafe { slice::from_raw_parts_mut(p, n) })
}

/// Creates a keyring whose nonces start with the 32-bit `fixed` field.
/// Free it with `gw_keyring_free`.
#[no_mangle]
pub extern "C" fn gw_keyring_new(fixed: u32) -> *mut GwKeyring {
    match catch_unwind(|| {
        Box::into_raw(Box::new(GwKeyring {
            inner: Keyring::new(fixed),
        }))
    }) {
        Ok(p) => p,
        Err(_) => std::ptr::null_mut(),
    }
}

/// Frees a keyring and zeroizes every key in it. NULL is ignored.
///
/// # Safety
/// `kr` must come from `gw_keyring_new`, be freed once, and not be in use.
#[no_mangle]
pub unsafe extern "C" fn gw_keyring_free(kr: *mut GwKeyring) {
    if !kr.is_null() {
        // SAFETY: `kr` was produced by `Box::into_raw` in `gw_keyring_new`
        // and the caller hands ownership back exactly once.
        drop(unsafe { Box::from_raw(kr) });
    }
}

/// Adds a key; writes its handle to `*handle_out`. `limit` is the number of
/// seals allowed with this key in this keyring (0 = the 2^32 default).
///
/// # Safety
/// `kr` must be a live keyring, `key` must point to `key_len` bytes and
/// `handle_out` to a writable `u32`.
#[no_mangle]
pub unsafe extern "C" fn gw_keyring_add(
    kr: *const GwKeyring,
    suite: u32,
    key: *const u8,
    key_len: usize,
    limit: u64,
    handle_out: *mut u32,
) -> i32 {
    guard(|| {
        if kr.is_null() || handle_out.is_null() {
            return Error::NullPointer.code();
        }
        // SAFETY: non-NULL and live per the contract above.
        let kr = unsafe { &(*kr).inner };
        let r = (|| {
            let suite = Suite::from_u32(suite)?;
            // SAFETY: `key` points to `key_len` bytes per the contract.
            let key = unsafe { view(key, key_len)? };
            let limit = if limit == 0 {
                crate::keyring::DEFAULT_LIMIT
            } else {
                limit
            };
            kr.add(suite, key, limit)
        })();
        match r {
            Ok(h) => {
                // SAFETY: `handle_out` is non-NULL and writable per contract.
                unsafe { *handle_out = h };
                0
            }
            Err(e) => e.code(),
        }
    })
}

/// Removes a key and zeroizes it.
///
/// # Safety
/// `kr` must be a live keyring.
#[no_mangle]
pub unsafe extern "C" fn gw_keyring_remove(kr: *const GwKeyring, handle: u32) -> i32 {
    guard(|| {
        if kr.is_null() {
            return Error::NullPointer.code();
        }
        // SAFETY: non-NULL and live per the contract.
        let kr = unsafe { &(*kr).inner };
        match kr.remove(handle) {
            Ok(()) => 0,
            Err(e) => e.code(),
        }
    })
}

/// Writes the number of seals used so far with `handle` to `*used_out`.
///
/// # Safety
/// `kr` must be a live keyring and `used_out` a writable `u64`.
#[no_mangle]
pub unsafe extern "C" fn gw_keyring_used(
    kr: *const GwKeyring,
    handle: u32,
    used_out: *mut u64,
) -> i32 {
    guard(|| {
        if kr.is_null() || used_out.is_null() {
            return Error::NullPointer.code();
        }
        // SAFETY: non-NULL and live per the contract.
        let kr = unsafe { &(*kr).inner };
        match kr.get(handle) {
            Ok(e) => {
                // SAFETY: `used_out` is non-NULL and writable per contract.
                unsafe { *used_out = e.used() };
                0
            }
            Err(e) => e.code(),
        }
    })
}

/// Seals `n` items. Item i is `in[in_off[i] .. in_off[i] + in_lens[i]]`
/// with key `handles[i]` and AAD `aad[aad_off[i] ..][.. aad_lens[i]]`.
/// `in_off` may be NULL: items are packed back to back from offset 0
/// (likewise `aad_off`); `aad_lens` NULL means no AAD for any item. Outputs are written back to
/// back into `out` as `nonce || ciphertext || tag`. On success writes the
/// byte count to `*written`; on failure writes the failing item's index to
/// `*err_index` (n when the failure is not tied to one item) and nothing
/// usable to `out`.
///
/// # Safety
/// Every pointer must be valid for the length given with it (`n` elements
/// for the per-item arrays); `out` must not alias any input.
#[no_mangle]
pub unsafe extern "C" fn gw_seal_batch(
    kr: *const GwKeyring,
    n: usize,
    handles: *const u32,
    input: *const u8,
    input_len: usize,
    in_off: *const u64,
    in_lens: *const u64,
    aad: *const u8,
    aad_len: usize,
    aad_off: *const u64,
    aad_lens: *const u64,
    out: *mut u8,
    out_cap: usize,
    written: *mut usize,
    err_index: *mut usize,
) -> i32 {
    guard(|| {
        // SAFETY: pointer validity is the caller's contract, stated above.
        let r = unsafe {
            batch_args(
                kr, n, handles, input, input_len, in_off, in_lens, aad, aad_len, aad_off, aad_lens,
                out, out_cap,
            )
        };
        let res = r.and_then(|(kr, h, items, aad, out)| batch::seal_batch(kr, h, items, aad, out));
        // SAFETY: out-parameters are valid or NULL per the contract.
        unsafe { report(res, written, err_index) }
    })
}

/// Opens `n` sealed items (same layout as `gw_seal_batch`'s output items,
/// each addressed by offset/length). Plaintexts are written back to back
/// into `out` (item i takes `in_lens[i] - 28` bytes; items shorter than 28
/// take none). `status[i]` is 0 when item i authenticated, 1 when it did not
/// (its output is zeroed), 2 when it is too short to be a sealed item.
///
/// # Safety
/// As for `gw_seal_batch`; `status` must point to `n` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn gw_open_batch(
    kr: *const GwKeyring,
    n: usize,
    handles: *const u32,
    input: *const u8,
    input_len: usize,
    in_off: *const u64,
    in_lens: *const u64,
    aad: *const u8,
    aad_len: usize,
    aad_off: *const u64,
    aad_lens: *const u64,
    out: *mut u8,
    out_cap: usize,
    status: *mut u8,
    written: *mut usize,
    err_index: *mut usize,
) -> i32 {
    guard(|| {
        // SAFETY: pointer validity is the caller's contract, stated above.
        let r = unsafe {
            batch_args(
                kr, n, handles, input, input_len, in_off, in_lens, aad, aad_len, aad_off, aad_lens,
                out, out_cap,
            )
        }
        .and_then(|args| {
            // SAFETY: `status` points to `n` writable bytes per the contract.
            let st = unsafe { view_mut(status, n) }.map_err(|e| (n, e))?;
            Ok((args, st))
        });
        let res = r.and_then(|((kr, h, items, aad, out), st)| {
            batch::open_batch(kr, h, items, aad, out, st)
        });
        // SAFETY: out-parameters are valid or NULL per the contract.
        unsafe { report(res, written, err_index) }
    })
}

/// Items from a buffer, optional offsets (NULL: packed back to back) and
/// lengths.
///
/// # Safety
/// Pointers valid for their lengths (`n` for `off` and `lens`).
unsafe fn items_view<'a>(
    buf: *const u8,
    buf_len: usize,
    off: *const u64,
    lens: *const u64,
    n: usize,
) -> Result<Items<'a>, Error> {
    // SAFETY: forwarded caller contract.
    unsafe {
        let buf = view(buf, buf_len)?;
        let lens = view(lens, n)?;
        if off.is_null() {
            Ok(Items::packed(buf, lens))
        } else {
            Ok(Items::new(buf, view(off, n)?, lens))
        }
    }
}

type BatchArgs<'a> = (
    &'a Keyring,
    &'a [u32],
    Items<'a>,
    Option<Items<'a>>,
    &'a mut [u8],
);

/// # Safety
/// See `gw_seal_batch`.
#[allow(clippy::too_many_arguments)]
unsafe fn batch_args<'a>(
    kr: *const GwKeyring,
    n: usize,
    handles: *const u32,
    input: *const u8,
    input_len: usize,
    in_off: *const u64,
    in_lens: *const u64,
    aad: *const u8,
    aad_len: usize,
    aad_off: *const u64,
    aad_lens: *const u64,
    out: *mut u8,
    out_cap: usize,
) -> Result<BatchArgs<'a>, (usize, Error)> {
    let e = |err| (n, err);
    if kr.is_null() {
        return Err(e(Error::NullPointer));
    }
    // SAFETY: each pointer is valid for its length per the caller's contract.
    unsafe {
        let kr = &(*kr).inner;
        let h = view(handles, n).map_err(e)?;
        let items = items_view(input, input_len, in_off, in_lens, n).map_err(e)?;
        let aad = if aad_lens.is_null() {
            None
        } else {
            Some(items_view(aad, aad_len, aad_off, aad_lens, n).map_err(e)?)
        };
        let out = view_mut(out, out_cap).map_err(e)?;
        Ok((kr, h, items, aad, out))
    }
}

/// # Safety
/// `written` and `err_index` must each be NULL or writable.
unsafe fn report(
    res: Result<usize, (usize, Error)>,
    written: *mut usize,
    err_index: *mut usize,
) -> i32 {
    match res {
        Ok(w) => {
            if !written.is_null() {
                // SAFETY: non-NULL and writable per the contract.
                unsafe { *written = w };
            }
            0
        }
        Err((i, err)) => {
            if !err_index.is_null() {
                // SAFETY: non-NULL and writable per the contract.
                unsafe { *err_index = i };
            }
            err.code()
        }
    }
}

fn static_str(s: &'static [u8]) -> *const c_char {
    s.as_ptr().cast()
}

/// A static, NUL-terminated description of an error code.
#[no_mangle]
pub extern "C" fn gw_error_message(code: i32) -> *const c_char {
    let all = [
        Error::NullPointer,
        Error::EmptyBatch,
        Error::UnknownHandle,
        Error::OutOfRange,
        Error::Overlap,
        Error::OutputTooSmall,
        Error::Oversize,
        Error::BatchTooLarge,
        Error::KeyExhausted,
        Error::WrongKeySize,
        Error::UnknownSuite,
        Error::TooShort,
        Error::KeyringFull,
    ];
    match all.into_iter().find(|e| e.code() == code) {
        Some(e) => crate::error::c_message(e),
        None if code == GW_ERR_INTERNAL => static_str(b"internal error (caught panic)\0"),
        None => static_str(b"unknown error code\0"),
    }
}

fn path_name(s: &'static str) -> *const c_char {
    crate::error::c_name(s)
}

/// The AES-GCM code path this keyring's AES keys run on.
///
/// # Safety
/// `kr` must be a live keyring or NULL (then the process default is given).
#[no_mangle]
pub unsafe extern "C" fn gw_keyring_aes_backend(kr: *const GwKeyring) -> *const c_char {
    if kr.is_null() {
        return path_name(crate::cpu::aes_path().name());
    }
    // SAFETY: non-NULL and live per the contract.
    path_name(unsafe { &(*kr).inner }.aes_path().name())
}

/// The SM4-GCM code path this keyring's SM4 keys run on.
///
/// # Safety
/// `kr` must be a live keyring or NULL (then the process default is given).
#[no_mangle]
pub unsafe extern "C" fn gw_keyring_sm4_backend(kr: *const GwKeyring) -> *const c_char {
    if kr.is_null() {
        return path_name(crate::cpu::sm4_path().name());
    }
    // SAFETY: non-NULL and live per the contract.
    path_name(unsafe { &(*kr).inner }.sm4_path().name())
}

/// The best AES-GCM path this CPU supports (ignoring overrides).
#[no_mangle]
pub extern "C" fn gw_detected_aes_backend() -> *const c_char {
    path_name(AesPath::detected().name())
}

/// The best SM4 path this CPU supports (ignoring overrides).
#[no_mangle]
pub extern "C" fn gw_detected_sm4_backend() -> *const c_char {
    path_name(Sm4Path::detected().name())
}

/// Largest item accepted by the batch calls, in bytes.
#[no_mangle]
pub extern "C" fn gw_max_item_len() -> u64 {
    batch::MAX_ITEM_LEN
}

/// Most items accepted in one batch.
#[no_mangle]
pub extern "C" fn gw_max_batch_items() -> u64 {
    batch::MAX_BATCH_ITEMS as u64
}

/// Writes a Python `struct` format describing `n` consecutive byte strings of
/// lengths `lens[i] + delta` (clamped at 0), e.g. `"284s284s"`, into `out`;
/// returns the bytes written, or a negative error code when `out` is too
/// small. Lets Python split a batch output into `bytes` objects in one call.
///
/// # Safety
/// `lens` must point to `n` values and `out` to `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn gw_struct_format(
    lens: *const u64,
    n: usize,
    delta: i64,
    out: *mut u8,
    cap: usize,
) -> i64 {
    let r = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: validity for the given lengths is the caller's contract.
        let (lens, out) = unsafe { (view(lens, n)?, view_mut(out, cap)?) };
        let mut pos = 0usize;
        let mut digits = [0u8; 20];
        for &l in lens {
            let mut v = (l as i128 + delta as i128).max(0) as u64;
            let mut k = 0;
            loop {
                digits[k] = b'0' + (v % 10) as u8;
                v /= 10;
                k += 1;
                if v == 0 {
                    break;
                }
            }
            if pos + k + 1 > out.len() {
                return Err(Error::OutputTooSmall);
            }
            for j in 0..k {
                out[pos + j] = digits[k - 1 - j];
            }
            out[pos + k] = b's';
            pos += k + 1;
        }
        Ok(pos as i64)
    }));
    match r {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => i64::from(e.code()),
        Err(_) => i64::from(GW_ERR_INTERNAL),
    }
}
