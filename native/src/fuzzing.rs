//! The bodies of the fuzz targets (batch parsing; the frame parsers), shared by `native/fuzz`
//! (cargo fuzz, libFuzzer) and a deterministic smoke run in `cargo test`.
//!
//! The input bytes are read as: a batch size, then per item a handle choice,
//! an offset and a length (arbitrary, often out of range or overlapping), and
//! the rest as the input buffer. Whatever comes in, a batch must either fail
//! with an error code or succeed and round-trip; it must never panic, read
//! or write out of bounds, or report success for a partial write.

use crate::aead::{Suite, OVERHEAD};
use crate::batch::{open_batch, seal_batch, Items, MAX_ITEM_LEN};
use crate::cpu::{AesPath, Sm4Path};
use crate::keyring::Keyring;

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self
            .0
            .split_first()
            .map(|(b, r)| (*b, r))
            .unwrap_or((0, &[]));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
}

/// Runs one fuzz case. Panics only if an invariant is broken.
pub fn fuzz_batch(data: &[u8]) {
    let kr = Keyring::with_paths(9, AesPath::detected(), Sm4Path::detected());
    let handles = [
        kr.add(Suite::Aes128Gcm, &[1; 16], 1 << 20)
            .expect("aes key"),
        kr.add(Suite::Sm4Gcm, &[2; 16], 1 << 20).expect("sm4 key"),
        kr.add(Suite::Aes256Gcm, &[3; 32], 1 << 20)
            .expect("aes256 key"),
    ];
    let mut r = Reader(data);
    let n = (r.byte() % 9) as usize;
    let mut hs = Vec::with_capacity(n);
    let mut off = Vec::with_capacity(n);
    let mut len = Vec::with_capacity(n);
    for _ in 0..n {
        let c = r.byte();
        hs.push(if c < 240 {
            handles[(c % 3) as usize]
        } else {
            u32::from(c)
        });
        let o = u64::from(r.u16());
        let l = u64::from(r.u16());
        // Now and then, absurd values that must be rejected without overflow.
        off.push(if c % 31 == 0 { u64::MAX - 3 } else { o });
        len.push(if c % 37 == 0 { MAX_ITEM_LEN + 1 } else { l });
    }
    let buf = r.0;
    let out_cap = (r.byte() as usize) * 64;
    let mut out = vec![0xAAu8; out_cap.max(buf.len() + n * OVERHEAD)];
    let cap = if data.len().is_multiple_of(2) {
        out.len()
    } else {
        out_cap.min(out.len())
    };
    let items = Items::new(buf, &off, &len);
    match seal_batch(&kr, &hs, items.clone(), None, &mut out[..cap]) {
        Ok(written) => {
            // Success means every item was valid and fully written: open it.
            let expect: u64 = len.iter().map(|l| l + OVERHEAD as u64).sum();
            assert_eq!(written as u64, expect);
            let sealed_len: Vec<u64> = len.iter().map(|l| l + OVERHEAD as u64).collect();
            let sealed = Items::packed(&out[..written], &sealed_len);
            let mut plain = vec![0u8; len.iter().sum::<u64>() as usize];
            let mut status = vec![9u8; n];
            open_batch(&kr, &hs, sealed, None, &mut plain, &mut status).expect("open");
            assert!(status.iter().all(|s| *s == 0));
            let mut pos = 0;
            for (i, l) in len.iter().enumerate() {
                let l = *l as usize;
                assert_eq!(&plain[pos..pos + l], items.get(i));
                pos += l;
            }
        }
        Err((i, _e)) => assert!(i <= n),
    }
    // Opening arbitrary bytes never succeeds by accident and never panics.
    let mut plain = vec![0u8; buf.len()];
    let mut status = vec![9u8; n];
    if open_batch(&kr, &hs, items, None, &mut plain, &mut status).is_ok() {
        assert!(status.iter().all(|s| *s != 0));
    }
}

/// The frame parsers' fuzz case: the WebSocket frame scanner and the
/// msgpack head reader over arbitrary bytes, at every offset. They must
/// never panic, a frame or head must lie within the input, and unmasking
/// twice must give the input back.
pub fn fuzz_frames(data: &[u8]) {
    use crate::msgpack::head;
    use crate::wsframe::{next_frame, unmask_into, Step};

    let max_message = u64::from(data.first().copied().unwrap_or(0)) * 97;
    for at in 0..data.len() {
        let rest = &data[at..];
        if let Step::Frame {
            start, len, mask, ..
        } = next_frame(rest, max_message)
        {
            assert!(start + len <= rest.len(), "frame past the input");
            assert!(len as u64 <= max_message.max(125), "frame over the limit");
            let src = &rest[start..start + len];
            let mut once = vec![0u8; len];
            let mut twice = vec![0u8; len];
            unmask_into(src, mask, &mut once);
            unmask_into(&once, mask, &mut twice);
            assert_eq!(twice, src, "unmask is not an involution");
        }
        if let Some((_, taken)) = head(rest) {
            assert!(taken >= 1 && taken <= rest.len(), "head past the input");
        }
    }
}
