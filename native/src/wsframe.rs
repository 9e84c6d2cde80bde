//! RFC 6455 client frames: the fast path of the gateway's WebSocket reader
//! (`gateway/protocol/wsframe.py`).
//!
//! [`next_frame`] recognises the frames almost every message is: a final
//! (unfragmented) masked text or binary frame within the size limit, or a
//! well-formed control frame. Everything else (a fragment, a continuation,
//! and every protocol violation) comes back as [`Step::Slow`] without being
//! consumed; the Python reader then handles that frame itself, so the close
//! codes and reasons of violations have a single source. [`unmask_into`]
//! removes the client's mask.

/// Text message.
pub const OP_TEXT: u8 = 0x1;
/// Binary message.
pub const OP_BINARY: u8 = 0x2;
/// Close.
pub const OP_CLOSE: u8 = 0x8;
/// Ping.
pub const OP_PING: u8 = 0x9;
/// Pong.
pub const OP_PONG: u8 = 0xA;

/// What the bytes at the front of a buffer hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The next frame is not complete yet.
    More,
    /// The next frame is one for the slow path: a fragment, a continuation
    /// or a violation.
    Slow,
    /// A complete final frame: its opcode, where its masked payload starts,
    /// its length and the mask. It ends at `start + len`.
    Frame {
        op: u8,
        start: usize,
        len: usize,
        mask: [u8; 4],
    },
}

/// The frame at the front of `buf`, for a reader with no fragmented message
/// in progress whose messages may be at most `max_message` bytes.
pub fn next_frame(buf: &[u8], max_message: u64) -> Step {
    if buf.len() < 2 {
        return Step::More;
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 || b1 & 0x80 == 0 {
        return Step::Slow; // reserved bits, or an unmasked client frame
    }
    let fin = b0 & 0x80 != 0;
    let op = b0 & 0x0F;
    let mut n = u64::from(b1 & 0x7F);
    let mut head = 2usize;
    match op {
        OP_CLOSE | OP_PING | OP_PONG => {
            if n > 125 || !fin {
                return Step::Slow;
            }
        }
        OP_TEXT | OP_BINARY if fin => {
            if n == 126 {
                if buf.len() < 4 {
                    return Step::More;
                }
                n = u64::from(u16::from_be_bytes([buf[2], buf[3]]));
                head = 4;
            } else if n == 127 {
                if buf.len() < 10 {
                    return Step::More;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                n = u64::from_be_bytes(b);
                if n >> 63 != 0 {
                    return Step::Slow;
                }
                head = 10;
            }
            if n > max_message {
                return Step::Slow;
            }
        }
        _ => return Step::Slow, // a fragment, a continuation, an unknown opcode
    }
    let start = head + 4;
    // n is at most max_message (or 125) here; a length past the address
    // space could never be complete.
    let Ok(len) = usize::try_from(n) else {
        return Step::More;
    };
    if buf.len() < start || buf.len() - start < len {
        return Step::More;
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[head..start]);
    Step::Frame {
        op,
        start,
        len,
        mask,
    }
}

/// `dst = src` XOR the repeated 4-byte `mask` (the mask's first byte lines
/// up with `src[0]`). The slices have the same length.
pub fn unmask_into(src: &[u8], mask: [u8; 4], dst: &mut [u8]) {
    assert_eq!(src.len(), dst.len(), "unmask_into: lengths differ");
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut s = src.chunks_exact(8);
    let mut d = dst.chunks_exact_mut(8);
    for (a, b) in (&mut s).zip(&mut d) {
        let mut w = [0u8; 8];
        w.copy_from_slice(a);
        b.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    // whole 8-byte words were done, so the tail starts at a mask boundary
    for (i, (a, b)) in s.remainder().iter().zip(d.into_remainder()).enumerate() {
        *b = a ^ mask[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let n = payload.len();
        let mut f = vec![b0];
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n < 65536 {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn payload_of(buf: &[u8], step: Step) -> (u8, Vec<u8>) {
        match step {
            Step::Frame {
                op,
                start,
                len,
                mask,
            } => {
                let mut out = vec![0u8; len];
                unmask_into(&buf[start..start + len], mask, &mut out);
                (op, out)
            }
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn whole_frames_of_every_length_form() {
        for n in [0usize, 1, 7, 8, 9, 125, 126, 127, 65535, 65536, 70000] {
            let body: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
            let f = masked(0x82, &body, [1, 2, 3, 0xFE]);
            let step = next_frame(&f, 1 << 20);
            assert_eq!(payload_of(&f, step), (OP_BINARY, body.clone()), "n={n}");
            if let Step::Frame { start, len, .. } = step {
                assert_eq!(start + len, f.len());
            }
            // every proper prefix is incomplete
            for cut in [0, 1, f.len() / 2, f.len() - 1] {
                if cut < f.len() {
                    assert_eq!(
                        next_frame(&f[..cut], 1 << 20),
                        Step::More,
                        "n={n} cut={cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn control_frames_pass_when_well_formed() {
        for op in [OP_PING, OP_PONG, OP_CLOSE] {
            let f = masked(0x80 | op, b"hi", [9, 8, 7, 6]);
            assert_eq!(payload_of(&f, next_frame(&f, 10)), (op, b"hi".to_vec()));
        }
    }

    #[test]
    fn everything_else_goes_to_the_slow_path() {
        let m = [1, 2, 3, 4];
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("reserved bit", masked(0x92, b"x", m)),
            ("unmasked", vec![0x82, 0x01, b'x']),
            ("fragment start", masked(0x02, b"x", m)),
            ("continuation", masked(0x80, b"x", m)),
            ("unknown data opcode", masked(0x83, b"x", m)),
            ("unknown control opcode", masked(0x8B, b"x", m)),
            ("fragmented ping", masked(0x09, b"x", m)),
            ("long ping", masked(0x89, &[0u8; 126], m)),
            ("over the limit", masked(0x82, &[0u8; 11], m)),
            ("top length bit", {
                let mut f = vec![0x82, 0xFF];
                f.extend_from_slice(&(1u64 << 63).to_be_bytes());
                f
            }),
        ];
        for (name, f) in cases {
            assert_eq!(next_frame(&f, 10), Step::Slow, "{name}");
        }
        // the limit is inclusive
        let f = masked(0x81, &[b'a'; 10], m);
        assert!(matches!(next_frame(&f, 10), Step::Frame { len: 10, .. }));
    }

    #[test]
    fn an_oversized_length_is_refused_before_its_payload_arrives() {
        let mut f = vec![0x82, 0xFF];
        f.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(next_frame(&f, 65536), Step::Slow);
        let mut g = vec![0x82, 0xFE];
        g.extend_from_slice(&60000u16.to_be_bytes());
        assert_eq!(next_frame(&g, 65536), Step::More);
    }

    #[test]
    fn unmask_matches_the_bytewise_definition_at_every_length() {
        let mask = [0xA5, 0x5A, 0x0F, 0xF0];
        for n in 0..70 {
            let src: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
            let mut dst = vec![0u8; n];
            unmask_into(&src, mask, &mut dst);
            let want: Vec<u8> = src
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(dst, want, "n={n}");
        }
    }
}
