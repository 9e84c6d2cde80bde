//! The CPython C API the fast paths use (feature `cpython-fastpath`): the
//! declarations, resolved against the running interpreter when the library
//! is loaded into it, and the two helpers every fast path needs.
//!
//! cffi calls our functions with the GIL released; a fast path that touches
//! Python objects takes it back with [`Gil::take`] for as long as it does.

use std::ffi::{c_char, c_int, c_ulong, c_void};

pub type PyObject = c_void;
pub type PySsize = isize;

/// CPython could not allocate a result object.
pub const GW_ERR_NO_MEMORY: i32 = -22;

extern "C" {
    pub fn PyGILState_Ensure() -> c_int;
    pub fn PyGILState_Release(state: c_int);
    pub fn PyList_Size(list: *mut PyObject) -> PySsize;
    pub fn PyList_GetItem(list: *mut PyObject, i: PySsize) -> *mut PyObject;
    pub fn PyList_SetItem(list: *mut PyObject, i: PySsize, item: *mut PyObject) -> c_int;
    pub fn PyList_Append(list: *mut PyObject, item: *mut PyObject) -> c_int;
    pub fn PyTuple_New(n: PySsize) -> *mut PyObject;
    pub fn PyTuple_Size(t: *mut PyObject) -> PySsize;
    pub fn PyTuple_GetItem(t: *mut PyObject, i: PySsize) -> *mut PyObject;
    pub fn PyTuple_SetItem(t: *mut PyObject, i: PySsize, item: *mut PyObject) -> c_int;
    pub fn PyLong_AsUnsignedLong(o: *mut PyObject) -> c_ulong;
    pub fn PyLong_FromSsize_t(v: PySsize) -> *mut PyObject;
    pub fn PyBytes_AsStringAndSize(
        o: *mut PyObject,
        buf: *mut *mut c_char,
        len: *mut PySsize,
    ) -> c_int;
    pub fn PyBytes_FromStringAndSize(v: *const c_char, len: PySsize) -> *mut PyObject;
    pub fn PyBytes_AsString(o: *mut PyObject) -> *mut c_char;
    pub fn PyUnicode_DecodeUTF8(
        s: *const c_char,
        len: PySsize,
        errors: *const c_char,
    ) -> *mut PyObject;
    pub fn PyList_New(n: PySsize) -> *mut PyObject;
    pub fn PyDict_New() -> *mut PyObject;
    pub fn PyDict_SetItem(d: *mut PyObject, k: *mut PyObject, v: *mut PyObject) -> c_int;
    pub fn PyLong_FromLongLong(v: i64) -> *mut PyObject;
    pub fn PyLong_FromUnsignedLongLong(v: u64) -> *mut PyObject;
    pub fn PyFloat_FromDouble(v: f64) -> *mut PyObject;
    pub fn PyUnicode_InternInPlace(s: *mut *mut PyObject);
    pub fn PyByteArray_Size(o: *mut PyObject) -> PySsize;
    pub fn PyByteArray_AsString(o: *mut PyObject) -> *mut c_char;
    pub fn Py_IncRef(o: *mut PyObject);
    pub fn Py_DecRef(o: *mut PyObject);
    pub fn PyErr_Occurred() -> *mut PyObject;
    pub fn PyErr_Clear();
    pub static mut _Py_NoneStruct: PyObject;
    pub static mut _Py_TrueStruct: PyObject;
    pub static mut _Py_FalseStruct: PyObject;
}

/// Holds the GIL for its lifetime.
pub struct Gil(c_int);

impl Gil {
    pub fn take() -> Gil {
        // SAFETY: called on a thread that has a Python thread state (cffi
        // released the GIL around this call, keeping the state), which is
        // the documented use of PyGILState_Ensure.
        Gil(unsafe { PyGILState_Ensure() })
    }
}

impl Drop for Gil {
    fn drop(&mut self) {
        // SAFETY: pairs with the Ensure in `take` on the same thread.
        unsafe { PyGILState_Release(self.0) }
    }
}

/// Reads `bytes` out of a borrowed object; None (error cleared) when it is
/// not a `bytes` object.
///
/// # Safety
/// `o` is a live object and the GIL is held; the returned slice is valid
/// while `o` is alive.
pub unsafe fn bytes_of(o: *mut PyObject) -> Option<&'static [u8]> {
    let mut p: *mut c_char = std::ptr::null_mut();
    let mut n: PySsize = 0;
    // SAFETY: `o` is live (caller); out-pointers are valid locals.
    if unsafe { PyBytes_AsStringAndSize(o, &mut p, &mut n) } != 0 {
        // SAFETY: GIL held; clears the TypeError just raised.
        unsafe { PyErr_Clear() };
        return None;
    }
    // SAFETY: CPython guarantees `p` points to `n` bytes owned by `o`,
    // immutable and valid while `o` lives (the caller holds a reference).
    Some(unsafe { std::slice::from_raw_parts(p as *const u8, n as usize) })
}

/// Reads the contents of a borrowed `bytes` or `bytearray`; None (error
/// cleared) for anything else.
///
/// # Safety
/// As for [`bytes_of`]; and nothing may resize a `bytearray` while the
/// slice is in use, which holding the GIL throughout guarantees.
pub unsafe fn buffer_of(o: *mut PyObject) -> Option<&'static [u8]> {
    // SAFETY: forwarded contract.
    if let Some(b) = unsafe { bytes_of(o) } {
        return Some(b);
    }
    // SAFETY: `o` is live and the GIL held; a non-bytearray gives -1 and
    // a TypeError, cleared here.
    let n = unsafe { PyByteArray_Size(o) };
    if n < 0 {
        // SAFETY: GIL held.
        unsafe { PyErr_Clear() };
        return None;
    }
    // SAFETY: `o` is a bytearray of `n` bytes; its buffer stays put while
    // the GIL is held and nobody resizes it (caller).
    let p = unsafe { PyByteArray_AsString(o) };
    if n == 0 {
        return Some(&[]);
    }
    // SAFETY: as above; `p` is non-NULL for a non-empty bytearray.
    Some(unsafe { std::slice::from_raw_parts(p as *const u8, n as usize) })
}

/// A new reference to `None`, `True` or `False`.
///
/// # Safety
/// GIL held.
pub unsafe fn constant(which: Option<bool>) -> *mut PyObject {
    // SAFETY: the three singletons are static objects of the running
    // interpreter; taking their address reads nothing, and Py_IncRef on
    // them is what Py_RETURN_NONE / Py_RETURN_TRUE do.
    unsafe {
        let o = match which {
            None => std::ptr::addr_of_mut!(_Py_NoneStruct),
            Some(true) => std::ptr::addr_of_mut!(_Py_TrueStruct),
            Some(false) => std::ptr::addr_of_mut!(_Py_FalseStruct),
        };
        Py_IncRef(o);
        o
    }
}
