//! Batch seal and open over items laid out in contiguous buffers.
//!
//! Input items are `(offset, length)` pairs into one buffer, in increasing,
//! non-overlapping order. Outputs are written contiguously in item order into
//! one caller-provided buffer: a sealed item is `nonce || ciphertext || tag`
//! (`len + 28` bytes), an opened item is its plaintext (`len - 28` bytes).
//! Everything is validated before the first byte is written, so a batch either
//! fails as a whole with an error and the index of the offending item, or
//! writes every item.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::aead::{NONCE_LEN, OVERHEAD, TAG_LEN};
use crate::error::Error;
use crate::keyring::{Entry, KeyMap, Keyring};

/// Largest item (plaintext or sealed) accepted: 16 MiB.
pub const MAX_ITEM_LEN: u64 = 1 << 24;
/// Most items in one batch.
pub const MAX_BATCH_ITEMS: usize = 1 << 16;

/// Per-item status of an open.
pub const STATUS_OK: u8 = 0;
pub const STATUS_AUTH_FAILED: u8 = 1;
pub const STATUS_TOO_SHORT: u8 = 2;

/// A view of `n` items in one buffer.
#[derive(Clone)]
pub struct Items<'a> {
    pub buf: &'a [u8],
    pub off: Cow<'a, [u64]>,
    pub len: &'a [u64],
}

impl<'a> Items<'a> {
    /// Items at explicit offsets.
    pub fn new(buf: &'a [u8], off: &'a [u64], len: &'a [u64]) -> Items<'a> {
        Items {
            buf,
            off: Cow::Borrowed(off),
            len,
        }
    }

    /// Items packed back to back from offset 0.
    pub fn packed(buf: &'a [u8], len: &'a [u64]) -> Items<'a> {
        let mut pos = 0u64;
        let off = len
            .iter()
            .map(|l| {
                let o = pos;
                pos = pos.saturating_add(*l);
                o
            })
            .collect();
        Items {
            buf,
            off: Cow::Owned(off),
            len,
        }
    }

    /// Checks that every item lies inside `buf`, is at most `max` long and
    /// that items come in increasing, non-overlapping order.
    pub fn validate(&self, n: usize, max: u64) -> Result<(), (usize, Error)> {
        if self.off.len() != n || self.len.len() != n {
            return Err((0, Error::OutOfRange));
        }
        let total = self.buf.len() as u64;
        let mut prev_end = 0u64;
        for i in 0..n {
            let (o, l) = (self.off[i], self.len[i]);
            if l > max {
                return Err((i, Error::Oversize));
            }
            let end = o.checked_add(l).ok_or((i, Error::OutOfRange))?;
            if end > total {
                return Err((i, Error::OutOfRange));
            }
            if o < prev_end {
                return Err((i, Error::Overlap));
            }
            prev_end = end;
        }
        Ok(())
    }

    #[inline]
    pub fn get(&self, i: usize) -> &[u8] {
        let o = self.off[i] as usize;
        &self.buf[o..o + self.len[i] as usize]
    }
}

fn check_batch(n: usize) -> Result<(), (usize, Error)> {
    if n == 0 {
        return Err((0, Error::EmptyBatch));
    }
    if n > MAX_BATCH_ITEMS {
        return Err((0, Error::BatchTooLarge));
    }
    Ok(())
}

/// Resolves handles, with a one-entry cache for runs of the same key.
fn resolve<'k>(keys: &'k KeyMap, handles: &[u32]) -> Result<Vec<&'k Entry>, (usize, Error)> {
    let mut out: Vec<&Entry> = Vec::with_capacity(handles.len());
    let mut last: Option<(u32, &Entry)> = None;
    for (i, &h) in handles.iter().enumerate() {
        let e = match last {
            Some((lh, le)) if lh == h => le,
            _ => {
                let e: &Entry = keys.get(&h).ok_or((i, Error::UnknownHandle))?;
                last = Some((h, e));
                e
            }
        };
        out.push(e);
    }
    Ok(out)
}

/// Groups items by key, reserves one counter range per key and returns, per
/// item, the index of its key's range, plus each range's first counter.
#[allow(clippy::type_complexity)]
fn reserve_nonces(entries: &[&Entry]) -> Result<(Vec<u32>, Vec<u64>), (usize, Error)> {
    let mut keys: Vec<*const Entry> = Vec::new();
    let mut counts: Vec<u64> = Vec::new();
    let mut firsts: Vec<usize> = Vec::new();
    let mut index: HashMap<*const Entry, u32> = HashMap::new();
    let mut slots = Vec::with_capacity(entries.len());
    let mut last: Option<(*const Entry, u32)> = None;
    for (i, e) in entries.iter().enumerate() {
        let p: *const Entry = *e;
        let slot = match last {
            Some((lp, ls)) if lp == p => ls,
            _ => {
                let found = if keys.len() <= 16 {
                    keys.iter().position(|k| *k == p).map(|x| x as u32)
                } else {
                    index.get(&p).copied()
                };
                let s = match found {
                    Some(s) => s,
                    None => {
                        keys.push(p);
                        counts.push(0);
                        firsts.push(i);
                        let s = (keys.len() - 1) as u32;
                        if keys.len() == 17 {
                            index.extend(keys.iter().enumerate().map(|(j, k)| (*k, j as u32)));
                        } else if keys.len() > 17 {
                            index.insert(p, s);
                        }
                        s
                    }
                };
                last = Some((p, s));
                s
            }
        };
        counts[slot as usize] += 1;
        slots.push(slot);
    }
    let mut next = Vec::with_capacity(keys.len());
    for (s, c) in counts.iter().enumerate() {
        let first = firsts[s];
        next.push(entries[first].reserve(*c).map_err(|e| (first, e))?);
    }
    Ok((slots, next))
}

/// Output bytes a seal of these plaintext lengths needs.
pub fn sealed_size(len: &[u64]) -> u64 {
    len.iter().map(|l| l + OVERHEAD as u64).sum()
}

/// Output bytes an open of these sealed lengths needs.
pub fn opened_size(len: &[u64]) -> u64 {
    len.iter().map(|l| l.saturating_sub(OVERHEAD as u64)).sum()
}

/// Splits `out` into consecutive item slices of the given sizes.
fn carve(out: &mut [u8], sizes: impl Iterator<Item = usize>) -> Vec<&mut [u8]> {
    let mut rest = out;
    let mut v = Vec::new();
    for s in sizes {
        let (a, b) = std::mem::take(&mut rest).split_at_mut(s);
        v.push(a);
        rest = b;
    }
    v
}

fn views<'a>(items: &'a Items<'_>, n: usize) -> Vec<&'a [u8]> {
    (0..n).map(|i| items.get(i)).collect()
}

/// Seals every item; returns the bytes written to `out`.
pub fn seal_batch(
    kr: &Keyring,
    handles: &[u32],
    input: Items<'_>,
    aad: Option<Items<'_>>,
    out: &mut [u8],
) -> Result<usize, (usize, Error)> {
    let n = handles.len();
    check_batch(n)?;
    input.validate(n, MAX_ITEM_LEN)?;
    if let Some(a) = &aad {
        a.validate(n, MAX_ITEM_LEN)?;
    }
    let need = sealed_size(input.len);
    if need > out.len() as u64 {
        return Err((n, Error::OutputTooSmall));
    }
    let ins = views(&input, n);
    let aads = aad.as_ref().map(|a| views(a, n));
    let mut outs = carve(out, input.len.iter().map(|l| *l as usize + OVERHEAD));
    seal_slices(kr, handles, &ins, aads.as_deref(), &mut outs)?;
    Ok(need as usize)
}

/// Seals `inputs[i]` into `outputs[i]` (exactly `inputs[i].len() + 28`
/// bytes each), all validated before anything is written.
pub fn seal_slices(
    kr: &Keyring,
    handles: &[u32],
    inputs: &[&[u8]],
    aads: Option<&[&[u8]]>,
    outputs: &mut [&mut [u8]],
) -> Result<(), (usize, Error)> {
    let n = handles.len();
    check_batch(n)?;
    if inputs.len() != n || outputs.len() != n || aads.is_some_and(|a| a.len() != n) {
        return Err((n, Error::OutOfRange));
    }
    for (i, (pt, o)) in inputs.iter().zip(outputs.iter()).enumerate() {
        if pt.len() as u64 > MAX_ITEM_LEN || aads.is_some_and(|a| a[i].len() as u64 > MAX_ITEM_LEN)
        {
            return Err((i, Error::Oversize));
        }
        if o.len() != pt.len() + OVERHEAD {
            return Err((i, Error::OutputTooSmall));
        }
    }
    let fixed = kr.fixed();
    kr.with_keys(|keys| {
        let entries = resolve(keys, handles)?;
        // Reserve every nonce before writing anything, one range per key, so
        // an exhausted key fails the batch before any output exists and
        // without burning invocations.
        let (slots, mut next) = reserve_nonces(&entries)?;
        for i in 0..n {
            let pt = inputs[i];
            let a = aads.map(|a| a[i]).unwrap_or(&[]);
            let (nonce_out, rest) = outputs[i].split_at_mut(NONCE_LEN);
            let (ct, tag_out) = rest.split_at_mut(pt.len());
            let slot = slots[i] as usize;
            let nonce = Entry::nonce(fixed, next[slot]);
            next[slot] += 1;
            nonce_out.copy_from_slice(&nonce);
            let tag = entries[i].aead.seal(&nonce, a, pt, ct);
            tag_out.copy_from_slice(&tag);
        }
        Ok(())
    })
}

/// Opens every item; `status[i]` tells whether item i authenticated. The
/// output of an item that failed is zeroed. Returns the bytes laid out in
/// `out` (failed items keep their slot).
pub fn open_batch(
    kr: &Keyring,
    handles: &[u32],
    input: Items<'_>,
    aad: Option<Items<'_>>,
    out: &mut [u8],
    status: &mut [u8],
) -> Result<usize, (usize, Error)> {
    let n = handles.len();
    check_batch(n)?;
    input.validate(n, MAX_ITEM_LEN + OVERHEAD as u64)?;
    if let Some(a) = &aad {
        a.validate(n, MAX_ITEM_LEN)?;
    }
    let need = opened_size(input.len);
    if need > out.len() as u64 {
        return Err((n, Error::OutputTooSmall));
    }
    let ins = views(&input, n);
    let aads = aad.as_ref().map(|a| views(a, n));
    let mut outs = carve(out, input.len.iter().map(|l| opened_len(*l as usize)));
    open_slices(kr, handles, &ins, aads.as_deref(), &mut outs, status)?;
    Ok(need as usize)
}

/// Plaintext length of a sealed item of `len` bytes (0 when too short).
pub fn opened_len(len: usize) -> usize {
    len.saturating_sub(OVERHEAD)
}

/// Opens `inputs[i]` into `outputs[i]` (exactly `opened_len` bytes each);
/// `status[i]` tells whether item i authenticated; a failed item's output is
/// zeroed.
pub fn open_slices(
    kr: &Keyring,
    handles: &[u32],
    inputs: &[&[u8]],
    aads: Option<&[&[u8]]>,
    outputs: &mut [&mut [u8]],
    status: &mut [u8],
) -> Result<(), (usize, Error)> {
    let n = handles.len();
    check_batch(n)?;
    if status.len() < n {
        return Err((n, Error::OutputTooSmall));
    }
    if inputs.len() != n || outputs.len() != n || aads.is_some_and(|a| a.len() != n) {
        return Err((n, Error::OutOfRange));
    }
    for (i, (s, o)) in inputs.iter().zip(outputs.iter()).enumerate() {
        if s.len() as u64 > MAX_ITEM_LEN + OVERHEAD as u64
            || aads.is_some_and(|a| a[i].len() as u64 > MAX_ITEM_LEN)
        {
            return Err((i, Error::Oversize));
        }
        if o.len() != opened_len(s.len()) {
            return Err((i, Error::OutputTooSmall));
        }
    }
    kr.with_keys(|keys| {
        let entries = resolve(keys, handles)?;
        for i in 0..n {
            let sealed = inputs[i];
            if sealed.len() < OVERHEAD {
                status[i] = STATUS_TOO_SHORT;
                continue;
            }
            let a = aads.map(|a| a[i]).unwrap_or(&[]);
            let ct_len = sealed.len() - OVERHEAD;
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(&sealed[..NONCE_LEN]);
            let ct = &sealed[NONCE_LEN..NONCE_LEN + ct_len];
            let mut tag = [0u8; TAG_LEN];
            tag.copy_from_slice(&sealed[NONCE_LEN + ct_len..]);
            let pt = &mut *outputs[i];
            if entries[i].aead.open(&nonce, a, ct, &tag, pt) {
                status[i] = STATUS_OK;
            } else {
                pt.fill(0);
                status[i] = STATUS_AUTH_FAILED;
            }
        }
        Ok(())
    })
}
