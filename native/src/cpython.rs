//! The CPython C API the fast paths use (feature `cpython-fastpath`): the
//! declarations, resolved against the running interpreter when the library
//! is loaded into it, and the helpers the fast paths share.
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
    pub fn PyObject_GetBuffer(o: *mut PyObject, view: *mut PyBuffer, flags: c_int) -> c_int;
    pub fn PyBuffer_Release(view: *mut PyBuffer);
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

/// A new, uninitialised `bytes` object of `size` bytes and a writable view
/// of its buffer, to be filled before the object is shared; None (error
/// cleared) when CPython cannot allocate it.
///
/// # Safety
/// GIL held; the view is valid while the object lives.
pub unsafe fn new_bytes(size: usize) -> Option<(*mut PyObject, &'static mut [u8])> {
    // SAFETY: GIL held; a NULL source means "uninitialised, to be filled
    // before the object is shared", as the C API documents.
    let o = unsafe { PyBytes_FromStringAndSize(std::ptr::null(), size as PySsize) };
    if o.is_null() {
        // SAFETY: GIL held.
        unsafe { PyErr_Clear() };
        return None;
    }
    // SAFETY: `o` is a fresh bytes object of `size` bytes that nobody else
    // references until the caller publishes it; its buffer does not move.
    let buf = unsafe { std::slice::from_raw_parts_mut(PyBytes_AsString(o) as *mut u8, size) };
    Some((o, buf))
}

/// A new `str` decoded from `s` as strict UTF-8 (what Python's
/// `bytes.decode("utf-8")` and msgpack accept); None (error cleared) for
/// invalid UTF-8 or when CPython cannot allocate it.
///
/// # Safety
/// GIL held.
pub unsafe fn str_from_utf8(s: &[u8]) -> Option<*mut PyObject> {
    // SAFETY: GIL held; `s` outlives the call, which copies it.
    let o = unsafe {
        PyUnicode_DecodeUTF8(
            s.as_ptr() as *const c_char,
            s.len() as PySsize,
            c"strict".as_ptr(),
        )
    };
    if o.is_null() {
        // SAFETY: GIL held.
        unsafe { PyErr_Clear() };
        return None;
    }
    Some(o)
}

/// CPython's `Py_buffer` (the buffer protocol's view; part of the stable
/// ABI, laid out the same in every CPython 3).
#[repr(C)]
pub struct PyBuffer {
    buf: *mut c_void,
    obj: *mut PyObject,
    len: PySsize,
    itemsize: PySsize,
    readonly: c_int,
    ndim: c_int,
    format: *mut c_char,
    shape: *mut PySsize,
    strides: *mut PySsize,
    suboffsets: *mut PySsize,
    internal: *mut c_void,
}

/// A contiguous buffer export of an object (`bytes`, `bytearray`,
/// `memoryview` ...), released on drop. While it lives the exporter keeps
/// the memory in place: a `bytearray` refuses to resize (BufferError), even
/// from Python code that runs meanwhile (a finalizer during a garbage
/// collection set off by one of our allocations).
pub struct Exported(PyBuffer);

impl Exported {
    /// Exports `o`'s buffer; None (error cleared) when it has none.
    ///
    /// # Safety
    /// `o` is a live object and the GIL is held, at the export and at the
    /// drop.
    pub unsafe fn of(o: *mut PyObject) -> Option<Exported> {
        // SAFETY: an all-zero Py_buffer is a valid "empty" value to fill.
        let mut view: PyBuffer = unsafe { std::mem::zeroed() };
        // SAFETY: `o` is live, the GIL held, `view` writable; PyBUF_SIMPLE
        // (0) asks for a contiguous byte buffer.
        if unsafe { PyObject_GetBuffer(o, &mut view, 0) } != 0 {
            // SAFETY: GIL held; clears the TypeError just raised.
            unsafe { PyErr_Clear() };
            return None;
        }
        Some(Exported(view))
    }

    /// The exported bytes.
    pub fn bytes(&self) -> &[u8] {
        if self.0.len <= 0 || self.0.buf.is_null() {
            return &[];
        }
        // SAFETY: a successful PyBUF_SIMPLE export is `len` contiguous
        // bytes at `buf`, in place until PyBuffer_Release (our drop).
        unsafe { std::slice::from_raw_parts(self.0.buf as *const u8, self.0.len as usize) }
    }
}

impl Drop for Exported {
    fn drop(&mut self) {
        // SAFETY: releases the export made in `of`, with the GIL held (the
        // caller's contract).
        unsafe { PyBuffer_Release(&mut self.0) }
    }
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
