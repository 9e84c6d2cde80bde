//! CPython fast path of the length-prefixed MessagePack frame decoder
//! (`LengthPrefixedDecoder` in `gateway/protocol/codec.py`; feature
//! `cpython-fastpath`): the downstream link both ways (gateway and
//! desk-sim) and visitors' HTTP/2 streams.
//!
//! [`gw_lp_scan`] walks `u32 BE length + msgpack value` frames and builds
//! each value as Python objects directly, as `msgpack.unpackb(raw=False,
//! strict_map_key=True, max_array_len=N, max_map_len=N, max_ext_len=0)`
//! would: maps to `dict` (string keys interned, later duplicates winning),
//! arrays to `list`, strings to `str` (strict UTF-8), binaries to `bytes`.
//! The Python check of each frame then runs on the result as before.
//!
//! It stops, without consuming it, at the first frame it does not take: a
//! length over the limit, an incomplete frame, or a value it cannot build
//! exactly as msgpack would (invalid UTF-8, an extension, a map key that is
//! not a string or binary, more than `max_len` entries, nesting deeper than
//! [`MAX_DEPTH`], trailing bytes, truncation). The Python decoder handles
//! that frame, so every error keeps its one source there.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::cpython::{
    constant, str_from_utf8, Exported, Gil, PyBytes_FromStringAndSize, PyDict_New, PyDict_SetItem,
    PyErr_Clear, PyFloat_FromDouble, PyList_Append, PyList_New, PyList_SetItem,
    PyLong_FromLongLong, PyLong_FromUnsignedLongLong, PyObject, PySsize, PyUnicode_InternInPlace,
    Py_DecRef, Py_IncRef,
};
use crate::error::Error;
use crate::ffi::GW_ERR_INTERNAL;
use crate::msgpack::{head, Head};
use crate::pyfast::GW_ERR_BAD_RESULT;

/// Containers nested deeper than this go to the Python decoder (msgpack
/// allows more; the frame checks refuse anything past 8 anyway).
pub const MAX_DEPTH: usize = 32;

/// Decodes the frames of the `bytes` or `bytearray` (any object with a
/// contiguous buffer) at address `buf` from
/// offset `pos`, appending each frame's value to the list at address `out`
/// (at most `limit` frames). Frames over `max_frame` bytes, and containers
/// of more than `max_len` entries, are left to the Python decoder. Returns
/// the offset just past the last frame decoded (`pos` if none), or a
/// negative error code (the values appended are then to be discarded). A
/// `buf` without a buffer decodes nothing.
///
/// # Safety
/// Call only from CPython through cffi (GIL released by the call), with the
/// addresses of a live object and a live list that the caller keeps alive
/// during the call.
#[no_mangle]
pub unsafe extern "C" fn gw_lp_scan(
    buf: usize,
    pos: usize,
    max_frame: u64,
    max_len: usize,
    limit: usize,
    out: usize,
) -> i64 {
    if buf == 0 || out == 0 {
        return Error::NullPointer.code().into();
    }
    catch_unwind(AssertUnwindSafe(|| {
        let _gil = Gil::take();
        // SAFETY: the Python wrapper passes id() of objects it holds; the
        // GIL is held for the whole scan, and the export keeps the buffer
        // in place until it is dropped, before the GIL is.
        unsafe {
            let Some(view) = Exported::of(buf as *mut PyObject) else {
                return pos as i64;
            };
            scan(
                view.bytes(),
                pos,
                max_frame,
                max_len,
                limit,
                out as *mut PyObject,
            )
        }
    }))
    .unwrap_or(GW_ERR_INTERNAL.into())
}

/// # Safety
/// GIL held; `out` a live object.
unsafe fn scan(
    data: &[u8],
    pos: usize,
    max_frame: u64,
    max_len: usize,
    limit: usize,
    out: *mut PyObject,
) -> i64 {
    let rules = Rules {
        max_len,
        max_depth: MAX_DEPTH,
        str_keys_only: false,
        budget: usize::MAX,
    };
    let mut at = pos;
    for _ in 0..limit {
        let Some(prefix) = data.get(at..at + 4) else {
            break;
        };
        let n = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        if u64::from(n) > max_frame {
            break;
        }
        let start = at + 4;
        let Some(frame) = start
            .checked_add(n as usize)
            .and_then(|stop| data.get(start..stop))
        else {
            break;
        };
        let mut d = Decoder::new(frame, rules);
        // SAFETY: GIL held (caller).
        let Some(obj) = (unsafe { d.whole() }) else {
            break; // trailing bytes (msgpack's ExtraData) among the rest
        };
        // SAFETY: GIL held; `obj` is our new reference; `out` is live.
        unsafe {
            let rc = PyList_Append(out, obj);
            Py_DecRef(obj);
            if rc != 0 {
                PyErr_Clear();
                return GW_ERR_BAD_RESULT.into();
            }
        }
        at = start + frame.len();
    }
    at as i64
}

/// What a decoded value may hold; anything else is left to Python.
#[derive(Clone, Copy)]
pub(crate) struct Rules {
    /// Most entries in one map or array (msgpack's `max_map_len` and
    /// `max_array_len`).
    pub max_len: usize,
    /// Containers at this depth or deeper (the top value is at depth 0)
    /// are refused.
    pub max_depth: usize,
    /// Map keys must be strings (otherwise strings or binaries).
    pub str_keys_only: bool,
    /// Most map entries plus array items in the whole value.
    pub budget: usize,
}

pub(crate) struct Decoder<'a> {
    buf: &'a [u8],
    at: usize,
    rules: Rules,
    budget: usize,
    /// The top-level map's last `t` entry was a string.
    t_is_str: bool,
}

/// A new reference, or None after clearing the Python error that made it
/// NULL.
///
/// # Safety
/// GIL held.
unsafe fn made(o: *mut PyObject) -> Option<*mut PyObject> {
    if o.is_null() {
        // SAFETY: GIL held.
        unsafe { PyErr_Clear() };
        return None;
    }
    Some(o)
}

/// Map keys seen so far, decoded and interned, by their UTF-8 bytes: a
/// protocol's few field names, so a frame's keys cost a hash lookup each
/// instead of a decode and an intern. Bounded: keys longer than
/// [`KEY_CACHE_LEN`] bytes, or past [`KEY_CACHE_SIZE`] distinct ones, are
/// decoded every time. Only touched with the GIL held.
const KEY_CACHE_SIZE: usize = 512;
/// Longest key kept in the cache, in bytes.
const KEY_CACHE_LEN: usize = 24;

thread_local! {
    static KEYS: RefCell<HashMap<Box<[u8]>, usize>> = RefCell::new(HashMap::new());
}

impl<'a> Decoder<'a> {
    pub(crate) fn new(buf: &'a [u8], rules: Rules) -> Decoder<'a> {
        Decoder {
            buf,
            at: 0,
            rules,
            budget: rules.budget,
            t_is_str: false,
        }
    }

    /// The whole buffer as one value with nothing after it; None for
    /// anything the Python decoder must handle.
    ///
    /// # Safety
    /// GIL held.
    pub(crate) unsafe fn whole(&mut self) -> Option<*mut PyObject> {
        // SAFETY: GIL held (caller).
        let obj = unsafe { self.value(0) }?;
        if self.at != self.buf.len() {
            // SAFETY: GIL held; our reference.
            unsafe { Py_DecRef(obj) };
            return None;
        }
        Some(obj)
    }

    /// A frame for the visitor protocol: a map whose `t` is a string.
    ///
    /// # Safety
    /// GIL held.
    pub(crate) unsafe fn frame(&mut self) -> Option<*mut PyObject> {
        if !matches!(head(self.buf), Some((Head::Map(_), _))) {
            return None;
        }
        // SAFETY: GIL held (caller).
        let obj = unsafe { self.whole() }?;
        if !self.t_is_str {
            // SAFETY: GIL held; our reference.
            unsafe { Py_DecRef(obj) };
            return None;
        }
        Some(obj)
    }

    /// Takes `n` entries of a container at `depth` out of the budget.
    fn admit(&mut self, n: usize, depth: usize) -> Option<()> {
        if n > self.rules.max_len || depth >= self.rules.max_depth || n > self.budget {
            return None;
        }
        self.budget -= n;
        Some(())
    }

    /// The string map key of `n` bytes whose head (`taken` bytes) is at
    /// the front, as a new reference to its interned `str`.
    ///
    /// # Safety
    /// GIL held.
    unsafe fn key(&mut self, n: usize, taken: usize) -> Option<*mut PyObject> {
        let raw = self.buf.get(self.at + taken..)?.get(..n)?;
        let cached = n <= KEY_CACHE_LEN;
        let hit = if cached {
            KEYS.with(|k| k.borrow().get(raw).copied())
        } else {
            None
        };
        let o = match hit {
            Some(o) => {
                let o = o as *mut PyObject;
                // SAFETY: GIL held; the cache holds a reference on `o`.
                unsafe { Py_IncRef(o) };
                o
            }
            None => {
                // SAFETY: GIL held (caller); `k` is our new reference to a
                // str, interned as msgpack does.
                let o = unsafe {
                    let mut k = str_from_utf8(raw)?;
                    PyUnicode_InternInPlace(&mut k);
                    k
                };
                if cached {
                    KEYS.with(|k| {
                        let mut k = k.borrow_mut();
                        if k.len() < KEY_CACHE_SIZE {
                            // SAFETY: GIL held; the cache's own reference,
                            // kept for the life of the process.
                            unsafe { Py_IncRef(o) };
                            k.insert(raw.into(), o as usize);
                        }
                    });
                }
                o
            }
        };
        self.at += taken + n;
        Some(o)
    }

    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    /// The next value as a new reference; None for anything the Python
    /// decoder must handle.
    ///
    /// # Safety
    /// GIL held.
    unsafe fn value(&mut self, depth: usize) -> Option<*mut PyObject> {
        let (h, taken) = head(&self.buf[self.at..])?;
        self.at += taken;
        // SAFETY: GIL held throughout (caller); every object made here is
        // either returned or released on the way out.
        unsafe {
            match h {
                Head::Nil => Some(constant(None)),
                Head::Bool(b) => Some(constant(Some(b))),
                Head::Int(i) => made(PyLong_FromLongLong(i)),
                Head::Uint(u) => made(PyLong_FromUnsignedLongLong(u)),
                Head::F32(f) => made(PyFloat_FromDouble(f64::from(f))),
                Head::F64(f) => made(PyFloat_FromDouble(f)),
                Head::Str(n) => str_from_utf8(self.take(n)?),
                Head::Bin(n) => {
                    let s = self.take(n)?;
                    made(PyBytes_FromStringAndSize(
                        s.as_ptr() as *const c_char,
                        s.len() as PySsize,
                    ))
                }
                Head::Array(n) => self.array(n, depth),
                Head::Map(n) => self.map(n, depth),
            }
        }
    }

    /// # Safety
    /// GIL held.
    unsafe fn array(&mut self, n: usize, depth: usize) -> Option<*mut PyObject> {
        self.admit(n, depth)?;
        // SAFETY: GIL held; the list owns each item set (SetItem takes the
        // reference) and its unset slots are NULL, which its deallocation
        // skips, so dropping it on failure releases exactly what was made.
        unsafe {
            let list = made(PyList_New(n as PySsize))?;
            for i in 0..n {
                let Some(v) = self.value(depth + 1) else {
                    Py_DecRef(list);
                    return None;
                };
                PyList_SetItem(list, i as PySsize, v);
            }
            Some(list)
        }
    }

    /// # Safety
    /// GIL held.
    unsafe fn map(&mut self, n: usize, depth: usize) -> Option<*mut PyObject> {
        self.admit(n, depth)?;
        // SAFETY: GIL held; PyDict_SetItem takes its own references, so
        // ours on each key and value are dropped after it, and the dict on
        // failure.
        unsafe {
            let dict = made(PyDict_New())?;
            for _ in 0..n {
                // strict_map_key: a key is a string or a binary
                let (key, is_t) = match self.buf.get(self.at..).and_then(head) {
                    Some((Head::Str(n), taken)) => {
                        let is_t = n == 1 && self.buf.get(self.at + taken) == Some(&b't');
                        (self.key(n, taken), is_t)
                    }
                    Some((Head::Bin(_), _)) if !self.rules.str_keys_only => {
                        (self.value(depth + 1), false)
                    }
                    _ => (None, false),
                };
                let Some(k) = key else {
                    Py_DecRef(dict);
                    return None;
                };
                if depth == 0 && is_t {
                    // the last `t` wins, as in the dict
                    self.t_is_str = matches!(
                        self.buf.get(self.at..).and_then(head),
                        Some((Head::Str(_), _))
                    );
                }
                let Some(v) = self.value(depth + 1) else {
                    Py_DecRef(k);
                    Py_DecRef(dict);
                    return None;
                };
                let rc = PyDict_SetItem(dict, k, v);
                Py_DecRef(k);
                Py_DecRef(v);
                if rc != 0 {
                    PyErr_Clear();
                    Py_DecRef(dict);
                    return None;
                }
            }
            Some(dict)
        }
    }
}
