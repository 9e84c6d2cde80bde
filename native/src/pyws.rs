//! CPython fast path of the gateway's WebSocket reader (feature
//! `cpython-fastpath`): `FrameReader` in `gateway/protocol/wsframe.py` hands
//! its buffer (a `bytes` object, by address) to [`gw_ws_scan`], which
//! appends one `(opcode, payload, end)` tuple per whole message or control
//! frame to a list, the payload unmasked straight into a new `bytes` object
//! (a `str` for text). Per frame that is a few hundred nanoseconds instead
//! of the ~1.7 µs the Python parser and its big-integer unmask take.
//!
//! The scan stops, without consuming it, at the first frame the Python
//! reader must handle itself (a fragment, a continuation, invalid UTF-8 in
//! text, any violation): see [`crate::wsframe`]. Python falls back to its
//! own parser on other interpreters or when `GATEWAY_WS_FASTPATH=0`.
//!
//! A reader whose binary messages are the visitor protocol's msgpack frames
//! may ask for them decoded in the same pass: with `frame_max` > 0, a binary
//! message of at most that many bytes that decodes to a frame passing the
//! codec's shape checks (a map with a string `t`, string keys at every
//! level, at most `max_depth` levels and `max_entries` entries in all)
//! comes back as `(OP_FRAME, dict, end)`; any other stays `bytes`, for the
//! Python codec to decode or refuse with its own error.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::cpython::{
    bytes_of, new_bytes, str_from_utf8, Gil, PyBytes_AsString, PyErr_Clear, PyList_Append,
    PyLong_FromSsize_t, PyObject, PySsize, PyTuple_New, PyTuple_SetItem, Py_DecRef,
    GW_ERR_NO_MEMORY,
};
use crate::error::Error;
use crate::ffi::GW_ERR_INTERNAL;
use crate::pyfast::GW_ERR_BAD_RESULT;
use crate::pylink::{Decoder, Rules};
use crate::wsframe::{next_frame, unmask_into, Step, OP_BINARY, OP_TEXT};

/// The pseudo-opcode of a binary message returned decoded as a frame (no
/// WebSocket opcode is over 15).
pub const OP_FRAME: u8 = 0x12;

/// What a binary message must be to come back decoded (see the module
/// documentation).
#[derive(Clone, Copy)]
struct FrameRules {
    frame_max: u64,
    rules: Rules,
}

/// The scan stopped at an incomplete frame or the end of the buffer.
pub const GW_WS_MORE: i32 = 0;
/// The scan stopped at a frame the Python reader must handle.
pub const GW_WS_SLOW: i32 = 1;
/// The scan stopped after `limit` frames.
pub const GW_WS_LIMIT: i32 = 2;

/// Scans the `bytes` object at address `buf` from offset `pos`, appending
/// a tuple `(opcode, payload, end)` for each whole message or control frame
/// (at most `limit`) to the list at address `out`; `end` is the offset just
/// past the frame. Returns `GW_WS_MORE`, `GW_WS_SLOW` or `GW_WS_LIMIT` for
/// where it stopped, or a negative error code (the tuples appended so far
/// are then to be discarded). A `buf` that is not `bytes`, or `pos` past its
/// end, gives `GW_WS_SLOW`. With `frame_max` > 0, binary messages are
/// decoded as frames where they can be (module documentation).
///
/// # Safety
/// Call only from CPython through cffi (GIL released by the call), with the
/// addresses of a live object and a live list that the caller keeps alive
/// during the call.
#[no_mangle]
pub unsafe extern "C" fn gw_ws_scan(
    buf: usize,
    pos: usize,
    max_message: u64,
    limit: usize,
    out: usize,
    frame_max: u64,
    max_entries: usize,
    max_depth: usize,
) -> i32 {
    if buf == 0 || out == 0 {
        return Error::NullPointer.code();
    }
    let frames = (frame_max > 0).then_some(FrameRules {
        frame_max,
        rules: Rules {
            max_len: max_entries,
            max_depth,
            str_keys_only: true,
            budget: max_entries,
        },
    });
    catch_unwind(AssertUnwindSafe(|| {
        let _gil = Gil::take();
        // SAFETY: the Python wrapper passes id() of objects it holds, and
        // the GIL is held for the whole scan.
        unsafe {
            scan(
                buf as *mut PyObject,
                pos,
                max_message,
                limit,
                out as *mut PyObject,
                frames,
            )
        }
    }))
    .unwrap_or(GW_ERR_INTERNAL)
}

/// # Safety
/// GIL held; `buf` and `out` live objects.
unsafe fn scan(
    buf: *mut PyObject,
    pos: usize,
    max_message: u64,
    limit: usize,
    out: *mut PyObject,
    frames: Option<FrameRules>,
) -> i32 {
    // SAFETY: `buf` is live and the GIL held (caller); the slice stays
    // valid while `buf` lives, which outlasts this call.
    let Some(data) = (unsafe { bytes_of(buf) }) else {
        return GW_WS_SLOW;
    };
    if pos > data.len() {
        return GW_WS_SLOW;
    }
    let mut at = pos;
    for _ in 0..limit {
        let (op, start, len, mask) = match next_frame(&data[at..], max_message) {
            Step::More => return GW_WS_MORE,
            Step::Slow => return GW_WS_SLOW,
            Step::Frame {
                op,
                start,
                len,
                mask,
            } => (op, at + start, len, mask),
        };
        let src = &data[start..start + len];
        // SAFETY: GIL held.
        let payload = unsafe {
            if op == OP_TEXT {
                text(src, mask)
            } else {
                binary(src, mask)
            }
        };
        let mut payload = match payload {
            Ok(p) => p,
            Err(code) => return code,
        };
        let mut op = op;
        if let Some(f) = frames.filter(|f| op == OP_BINARY && len as u64 <= f.frame_max) {
            // SAFETY: GIL held; `payload` is the bytes object just made.
            if let Some(frame) = unsafe { decode(payload, len, f.rules) } {
                payload = frame;
                op = OP_FRAME;
            }
        }
        at = start + len;
        // SAFETY: GIL held; `payload` is a new reference, which `append`
        // takes over; `out` is live.
        let rc = unsafe { append(out, op, payload, at) };
        if rc != 0 {
            return rc;
        }
    }
    GW_WS_LIMIT
}

/// The unmasked payload as a new `bytes` object.
///
/// # Safety
/// GIL held.
unsafe fn binary(src: &[u8], mask: [u8; 4]) -> Result<*mut PyObject, i32> {
    // SAFETY: GIL held (caller).
    let (o, dst) = unsafe { new_bytes(src.len()) }.ok_or(GW_ERR_NO_MEMORY)?;
    unmask_into(src, mask, dst);
    Ok(o)
}

/// The frame the `bytes` object `payload` (of `len` bytes) decodes to,
/// taking over the reference to `payload`; None, leaving it alone, when it
/// does not decode to one within `rules`.
///
/// # Safety
/// GIL held; `payload` a bytes object we own.
unsafe fn decode(payload: *mut PyObject, len: usize, rules: Rules) -> Option<*mut PyObject> {
    // SAFETY: `payload` is a live bytes object of `len` bytes (caller) that
    // outlives the decoder, and the GIL is held.
    unsafe {
        let data = std::slice::from_raw_parts(PyBytes_AsString(payload) as *const u8, len);
        let frame = Decoder::new(data, rules).frame()?;
        Py_DecRef(payload);
        Some(frame)
    }
}

/// The unmasked payload decoded as strict UTF-8 into a new `str`; text
/// that is not valid UTF-8 stops the scan there (`GW_WS_SLOW`), so the
/// Python reader raises its own close 1007 for it.
///
/// # Safety
/// GIL held.
unsafe fn text(src: &[u8], mask: [u8; 4]) -> Result<*mut PyObject, i32> {
    let mut plain = vec![0u8; src.len()];
    unmask_into(src, mask, &mut plain);
    // SAFETY: GIL held (caller). On failure the UnicodeDecodeError (or
    // MemoryError) is raised again by the Python reader's own decode.
    unsafe { str_from_utf8(&plain) }.ok_or(GW_WS_SLOW)
}

/// Appends `(op, payload, end)` to `out`, taking over `payload`.
///
/// # Safety
/// GIL held; `payload` a new reference; `out` live.
unsafe fn append(out: *mut PyObject, op: u8, payload: *mut PyObject, end: usize) -> i32 {
    // SAFETY: GIL held throughout. PyTuple_SetItem takes over the item's
    // reference even when it fails; the tuple is ours until appended, and
    // PyList_Append takes its own reference.
    unsafe {
        let t = PyTuple_New(3);
        if t.is_null() {
            PyErr_Clear();
            Py_DecRef(payload);
            return GW_ERR_NO_MEMORY;
        }
        let opn = PyLong_FromSsize_t(PySsize::from(op));
        let endn = PyLong_FromSsize_t(end as PySsize);
        let ok = !opn.is_null() && !endn.is_null();
        // a NULL item leaves its slot empty, which Py_DecRef of the tuple
        // handles; the tuple is then dropped
        PyTuple_SetItem(t, 0, opn);
        PyTuple_SetItem(t, 1, payload);
        PyTuple_SetItem(t, 2, endn);
        if !ok {
            PyErr_Clear();
            Py_DecRef(t);
            return GW_ERR_NO_MEMORY;
        }
        let rc = PyList_Append(out, t);
        Py_DecRef(t);
        if rc != 0 {
            PyErr_Clear();
            return GW_ERR_BAD_RESULT;
        }
    }
    0
}
