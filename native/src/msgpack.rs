//! MessagePack value heads, for the native decoder of the downstream link's
//! length-prefixed frames (`pylink.rs`).
//!
//! [`head`] reads the type and size of the value at the front of a buffer.
//! Extension types and the reserved byte 0xC1 read as `None`: the gateway
//! refuses extensions (`max_ext_len=0` in `gateway/protocol/codec.py`), so a
//! frame holding one goes to the Python decoder, which raises its own error.

/// The type byte(s) of one value; sizes are those of its payload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Head {
    Nil,
    Bool(bool),
    Int(i64),
    Uint(u64),
    F32(f32),
    F64(f64),
    /// UTF-8 string of this many bytes.
    Str(usize),
    /// Binary of this many bytes.
    Bin(usize),
    /// Array of this many values.
    Array(usize),
    /// Map of this many key-value pairs.
    Map(usize),
}

fn be<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
    let mut b = [0u8; N];
    b.copy_from_slice(buf.get(at..at + N)?);
    Some(b)
}

fn size(buf: &[u8], width: usize) -> Option<usize> {
    match width {
        1 => buf.get(1).map(|&b| usize::from(b)),
        2 => be::<2>(buf, 1).map(|b| usize::from(u16::from_be_bytes(b))),
        _ => be::<4>(buf, 1).and_then(|b| usize::try_from(u32::from_be_bytes(b)).ok()),
    }
}

/// The head of the value at the front of `buf` and the bytes it takes
/// (the payload of a string or binary follows it); `None` when `buf` is
/// empty or too short for the head, or holds an extension or 0xC1.
pub fn head(buf: &[u8]) -> Option<(Head, usize)> {
    let b = *buf.first()?;
    Some(match b {
        0x00..=0x7F => (Head::Uint(u64::from(b)), 1),
        0x80..=0x8F => (Head::Map(usize::from(b & 0x0F)), 1),
        0x90..=0x9F => (Head::Array(usize::from(b & 0x0F)), 1),
        0xA0..=0xBF => (Head::Str(usize::from(b & 0x1F)), 1),
        0xC0 => (Head::Nil, 1),
        0xC2 => (Head::Bool(false), 1),
        0xC3 => (Head::Bool(true), 1),
        0xC4 => (Head::Bin(size(buf, 1)?), 2),
        0xC5 => (Head::Bin(size(buf, 2)?), 3),
        0xC6 => (Head::Bin(size(buf, 4)?), 5),
        0xCA => (Head::F32(f32::from_be_bytes(be(buf, 1)?)), 5),
        0xCB => (Head::F64(f64::from_be_bytes(be(buf, 1)?)), 9),
        0xCC => (Head::Uint(u64::from(*buf.get(1)?)), 2),
        0xCD => (Head::Uint(u64::from(u16::from_be_bytes(be(buf, 1)?))), 3),
        0xCE => (Head::Uint(u64::from(u32::from_be_bytes(be(buf, 1)?))), 5),
        0xCF => (Head::Uint(u64::from_be_bytes(be(buf, 1)?)), 9),
        0xD0 => (Head::Int(i64::from(i8::from_be_bytes(be(buf, 1)?))), 2),
        0xD1 => (Head::Int(i64::from(i16::from_be_bytes(be(buf, 1)?))), 3),
        0xD2 => (Head::Int(i64::from(i32::from_be_bytes(be(buf, 1)?))), 5),
        0xD3 => (Head::Int(i64::from_be_bytes(be(buf, 1)?)), 9),
        0xD9 => (Head::Str(size(buf, 1)?), 2),
        0xDA => (Head::Str(size(buf, 2)?), 3),
        0xDB => (Head::Str(size(buf, 4)?), 5),
        0xDC => (Head::Array(size(buf, 2)?), 3),
        0xDD => (Head::Array(size(buf, 4)?), 5),
        0xDE => (Head::Map(size(buf, 2)?), 3),
        0xDF => (Head::Map(size(buf, 4)?), 5),
        0xE0..=0xFF => (Head::Int(i64::from(b as i8)), 1),
        // 0xC1 (never used), extensions 0xC7-0xC9 and 0xD4-0xD8
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixed_and_sized_form() {
        let cases: Vec<(Vec<u8>, Head, usize)> = vec![
            (vec![0x05], Head::Uint(5), 1),
            (vec![0x7F], Head::Uint(127), 1),
            (vec![0xFF], Head::Int(-1), 1),
            (vec![0xE0], Head::Int(-32), 1),
            (vec![0x83], Head::Map(3), 1),
            (vec![0x9F], Head::Array(15), 1),
            (vec![0xBF], Head::Str(31), 1),
            (vec![0xC0], Head::Nil, 1),
            (vec![0xC3], Head::Bool(true), 1),
            (vec![0xC4, 9], Head::Bin(9), 2),
            (vec![0xC5, 1, 0], Head::Bin(256), 3),
            (vec![0xC6, 0, 1, 0, 0], Head::Bin(65536), 5),
            (vec![0xCA, 0x3F, 0xC0, 0, 0], Head::F32(1.5), 5),
            (
                [vec![0xCB], 2.25f64.to_be_bytes().to_vec()].concat(),
                Head::F64(2.25),
                9,
            ),
            (vec![0xCC, 200], Head::Uint(200), 2),
            (vec![0xCD, 0xFF, 0xFF], Head::Uint(65535), 3),
            (
                vec![0xCE, 0xFF, 0xFF, 0xFF, 0xFF],
                Head::Uint(u32::MAX.into()),
                5,
            ),
            (
                [vec![0xCF], u64::MAX.to_be_bytes().to_vec()].concat(),
                Head::Uint(u64::MAX),
                9,
            ),
            (vec![0xD0, 0x80], Head::Int(-128), 2),
            (vec![0xD1, 0x80, 0], Head::Int(-32768), 3),
            (vec![0xD2, 0x80, 0, 0, 0], Head::Int(i32::MIN.into()), 5),
            (
                [vec![0xD3], i64::MIN.to_be_bytes().to_vec()].concat(),
                Head::Int(i64::MIN),
                9,
            ),
            (vec![0xD9, 40], Head::Str(40), 2),
            (vec![0xDA, 1, 0], Head::Str(256), 3),
            (vec![0xDB, 0, 0, 1, 0], Head::Str(256), 5),
            (vec![0xDC, 0, 16], Head::Array(16), 3),
            (vec![0xDD, 0, 0, 0, 17], Head::Array(17), 5),
            (vec![0xDE, 0, 16], Head::Map(16), 3),
            (vec![0xDF, 0, 0, 0, 17], Head::Map(17), 5),
        ];
        for (bytes, want, taken) in cases {
            assert_eq!(head(&bytes), Some((want, taken)), "{bytes:02x?}");
            // one byte short of the head is never a value
            if taken > 1 {
                assert_eq!(head(&bytes[..taken - 1]), None, "{bytes:02x?}");
            }
        }
    }

    #[test]
    fn extensions_reserved_and_empty_are_refused() {
        assert_eq!(head(&[]), None);
        for b in [0xC1, 0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8] {
            assert_eq!(head(&[b, 1, 1, 1, 1, 1, 1, 1, 1, 1]), None, "{b:02x}");
        }
    }
}
