//! CPython fast path for `Keyring.seal_many` / `open_many` (feature
//! `cpython-fastpath`, enabled in the maturin build).
//!
//! Marshalling a list of `(handle, bytes, bytes)` tuples into flat buffers in
//! Python costs more than sealing a 256-byte message. Here the native core
//! reads the list and builds the result `bytes` objects itself through the
//! CPython C API: Python passes the list and a pre-sized result list by
//! address (`id()`, which is the object address on CPython). cffi calls us
//! with the GIL released; we take it back with `PyGILState_Ensure` to copy
//! the inputs, release it for the cryptography, and take it again to build
//! the results. The symbols resolve against the running interpreter, as for
//! any extension module. Python falls back to its own marshalling on other
//! interpreters or when `GATEWAY_CRYPTO_FASTPATH=0`.

use std::ffi::c_ulong;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::aead::OVERHEAD;
use crate::batch::{open_slices, opened_len, seal_slices, STATUS_OK};
use crate::error::Error;
use crate::ffi::{GwKeyring, GW_ERR_INTERNAL};

pub use crate::cpython::GW_ERR_NO_MEMORY;
use crate::cpython::{
    bytes_of, new_bytes, Gil, PyErr_Clear, PyErr_Occurred, PyList_GetItem, PyList_SetItem,
    PyList_Size, PyLong_AsUnsignedLong, PyObject, PySsize, PyTuple_GetItem, PyTuple_Size,
    Py_DecRef, Py_IncRef,
};

/// An item that is not a `(int, bytes, bytes)` tuple.
pub const GW_ERR_BAD_ITEM: i32 = -20;
/// The result list is not a list of the right size.
pub const GW_ERR_BAD_RESULT: i32 = -21;

/// Borrowed views of the items of a Python list, kept alive by a reference
/// on each item tuple (tuples are immutable, so their bytes stay put), so no
/// Python object is touched while the GIL is released.
struct Views {
    held: Vec<*mut PyObject>,
    handles: Vec<u32>,
    data: Vec<&'static [u8]>,
    aad: Vec<&'static [u8]>,
}

impl Views {
    /// Drops the references taken in `read_items`. GIL must be held.
    ///
    /// # Safety
    /// GIL held; called once.
    unsafe fn release(&mut self) {
        for t in self.held.drain(..) {
            // SAFETY: each pointer had its count raised in `read_items`.
            unsafe { Py_DecRef(t) };
        }
    }
}

/// # Safety
/// `list` must be the address of a live Python list; GIL held.
unsafe fn read_items(list: *mut PyObject, v: &mut Views) -> Result<(), (usize, i32)> {
    // SAFETY: `list` is a live list (caller contract).
    let n = unsafe { PyList_Size(list) };
    if n < 0 {
        // SAFETY: GIL held.
        unsafe { PyErr_Clear() };
        return Err((0, GW_ERR_BAD_ITEM));
    }
    let n = n as usize;
    v.held.reserve(n);
    v.handles.reserve(n);
    v.data.reserve(n);
    v.aad.reserve(n);
    let bad = |i: usize| (i, GW_ERR_BAD_ITEM);
    for i in 0..n {
        // SAFETY: 0 <= i < len; borrowed reference, GIL held throughout; the
        // tuple's count is raised before its contents are used later
        // without the GIL.
        unsafe {
            let t = PyList_GetItem(list, i as PySsize);
            if t.is_null() || PyTuple_Size(t) != 3 {
                PyErr_Clear();
                return Err(bad(i));
            }
            let h = PyLong_AsUnsignedLong(PyTuple_GetItem(t, 0));
            if !PyErr_Occurred().is_null() || h > u64::from(u32::MAX) as c_ulong {
                PyErr_Clear();
                return Err(bad(i));
            }
            let d = bytes_of(PyTuple_GetItem(t, 1)).ok_or(bad(i))?;
            let a = bytes_of(PyTuple_GetItem(t, 2)).ok_or(bad(i))?;
            Py_IncRef(t);
            v.held.push(t);
            v.handles.push(h as u32);
            v.data.push(d);
            v.aad.push(a);
        }
    }
    Ok(())
}

/// New, uninitialised `bytes` objects of the given sizes (private to us
/// until inserted in the result list), with writable views of their
/// buffers.
///
/// # Safety
/// GIL held.
unsafe fn new_outputs(
    sizes: impl Iterator<Item = usize>,
) -> Result<(Vec<*mut PyObject>, Vec<&'static mut [u8]>), i32> {
    let mut objs = Vec::new();
    let mut bufs = Vec::new();
    for size in sizes {
        // SAFETY: GIL held (caller).
        let Some((o, buf)) = (unsafe { new_bytes(size) }) else {
            // SAFETY: GIL held; drop what was made so far.
            unsafe {
                for o in objs {
                    Py_DecRef(o);
                }
            }
            return Err(GW_ERR_NO_MEMORY);
        };
        objs.push(o);
        bufs.push(buf);
    }
    Ok((objs, bufs))
}

fn run(
    kr: *const GwKeyring,
    items: usize,
    result: usize,
    err_index: *mut usize,
    seal: bool,
) -> i32 {
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<(), (usize, i32)> {
        if kr.is_null() || items == 0 || result == 0 {
            return Err((0, Error::NullPointer.code()));
        }
        // SAFETY: `kr` is a live keyring (caller contract of the wrappers).
        let kr = unsafe { (*kr).keyring() };
        let (items, result) = (items as *mut PyObject, result as *mut PyObject);
        let mut v = Views {
            held: Vec::new(),
            handles: Vec::new(),
            data: Vec::new(),
            aad: Vec::new(),
        };
        let prepared = {
            let _gil = Gil::take();
            // SAFETY: the Python wrapper passes id() of lists it holds; GIL held.
            unsafe {
                let r = read_items(items, &mut v).and_then(|()| {
                    if PyList_Size(result) != v.handles.len() as PySsize {
                        PyErr_Clear();
                        return Err((0, GW_ERR_BAD_RESULT));
                    }
                    let sizes: Vec<usize> = if seal {
                        v.data.iter().map(|d| d.len() + OVERHEAD).collect()
                    } else {
                        v.data.iter().map(|d| opened_len(d.len())).collect()
                    };
                    new_outputs(sizes.into_iter()).map_err(|e| (v.handles.len(), e))
                });
                if r.is_err() {
                    v.release();
                }
                r?
            }
        };
        let (objs, mut bufs) = prepared;
        let n = v.handles.len();
        let any_aad = v.aad.iter().any(|a| !a.is_empty());
        let aads = any_aad.then_some(&v.aad[..]);
        let mut status = vec![STATUS_OK; n];
        let res = if seal {
            seal_slices(kr, &v.handles, &v.data, aads, &mut bufs)
        } else {
            open_slices(kr, &v.handles, &v.data, aads, &mut bufs, &mut status)
        };
        drop(bufs);
        let _gil = Gil::take();
        // SAFETY: GIL held; every object in `objs` is ours (count 1) and the
        // result list was checked to have `n` slots.
        unsafe {
            v.release();
            let mut failed = false;
            for (i, o) in objs.into_iter().enumerate() {
                if res.is_err() || failed || status[i] != STATUS_OK {
                    Py_DecRef(o);
                } else if PyList_SetItem(result, i as PySsize, o) != 0 {
                    PyErr_Clear();
                    failed = true;
                }
            }
            if failed {
                return Err((n, GW_ERR_BAD_RESULT));
            }
        }
        res.map_err(|(i, e)| (i, e.code()))
    }));
    match r {
        Ok(Ok(())) => 0,
        Ok(Err((i, code))) => {
            if !err_index.is_null() {
                // SAFETY: non-NULL and writable per the wrappers' contract.
                unsafe { *err_index = i };
            }
            code
        }
        Err(_) => GW_ERR_INTERNAL,
    }
}

/// Seals the list `items` (address of a `list[tuple[int, bytes, bytes]]`)
/// into `result` (address of a list of the same length, filled with the
/// sealed `bytes`). Returns 0 or a negative code, with the failing item's
/// index in `*err_index`.
///
/// # Safety
/// Call only from CPython through cffi (GIL released by the call), with the
/// addresses of two live lists the caller keeps alive during the call, and
/// `kr` a live keyring; `err_index` writable or NULL.
#[no_mangle]
pub unsafe extern "C" fn gw_seal_list(
    kr: *const GwKeyring,
    items: usize,
    result: usize,
    err_index: *mut usize,
) -> i32 {
    run(kr, items, result, err_index, true)
}

/// Opens the list `items` into `result`; items that fail authentication keep
/// the `None` the caller put there.
///
/// # Safety
/// As for `gw_seal_list`.
#[no_mangle]
pub unsafe extern "C" fn gw_open_list(
    kr: *const GwKeyring,
    items: usize,
    result: usize,
    err_index: *mut usize,
) -> i32 {
    run(kr, items, result, err_index, false)
}
