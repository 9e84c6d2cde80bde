//! The few msgpack shapes the client writes (maps of short strings, unsigned
//! integers and binary bodies) and a reader for the server's frames: the
//! top-level map's `t`, `id`, `seq`, `ts` and `code`, every other value
//! skipped whatever its type.

/// Appends a map header for `n` entries (n < 16).
pub fn map(out: &mut Vec<u8>, n: usize) {
    debug_assert!(n < 16);
    out.push(0x80 | n as u8);
}

pub fn str(out: &mut Vec<u8>, s: &str) {
    let n = s.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else {
        sized(out, n, [0xd9, 0xda, 0xdb]);
    }
    out.extend_from_slice(s.as_bytes());
}

/// The 8-, 16- or 32-bit length form of a str or bin header.
fn sized(out: &mut Vec<u8>, n: usize, markers: [u8; 3]) {
    if n < 256 {
        out.extend_from_slice(&[markers[0], n as u8]);
    } else if n < 65536 {
        out.push(markers[1]);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(markers[2]);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

pub fn uint(out: &mut Vec<u8>, v: u64) {
    if v < 128 {
        out.push(v as u8);
    } else if v < 256 {
        out.extend_from_slice(&[0xcc, v as u8]);
    } else if v < 65536 {
        out.push(0xcd);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= u32::MAX as u64 {
        out.push(0xce);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

pub fn bin(out: &mut Vec<u8>, b: &[u8]) {
    sized(out, b.len(), [0xc4, 0xc5, 0xc6]);
    out.extend_from_slice(b);
}

/// What the client needs from one server frame.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Frame<'a> {
    pub t: &'a [u8],
    pub id: Option<u64>,
    pub seq: Option<u64>,
    pub ts: Option<i64>,
    pub code: Option<i64>,
    pub retry_after: Option<i64>,
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

const MAX_DEPTH: usize = 32;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.i.checked_add(n)?;
        let s = self.b.get(self.i..end)?;
        self.i = end;
        Some(s)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn be(&mut self, n: usize) -> Option<u64> {
        Some(self.take(n)?.iter().fold(0u64, |a, &x| (a << 8) | x as u64))
    }

    /// A string or binary value's bytes, None for any other type.
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let m = self.byte()?;
        let n = match m {
            0xa0..=0xbf => (m & 0x1f) as usize,
            0xd9 | 0xc4 => self.be(1)? as usize,
            0xda | 0xc5 => self.be(2)? as usize,
            0xdb | 0xc6 => self.be(4)? as usize,
            _ => return None,
        };
        self.take(n)
    }

    /// An integer value (None for other types, which are skipped).
    fn int(&mut self) -> Option<Option<i64>> {
        let m = *self.b.get(self.i)?;
        let v = match m {
            0x00..=0x7f => {
                self.i += 1;
                m as i64
            }
            0xe0..=0xff => {
                self.i += 1;
                m as i8 as i64
            }
            0xcc..=0xcf => {
                self.i += 1;
                let v = self.be(1 << (m - 0xcc))?;
                i64::try_from(v).ok()?
            }
            0xd0..=0xd3 => {
                self.i += 1;
                let n = 1usize << (m - 0xd0);
                let v = self.be(n)?;
                let shift = 64 - 8 * n as u32;
                ((v << shift) as i64) >> shift
            }
            _ => {
                self.skip(0)?;
                return Some(None);
            }
        };
        Some(Some(v))
    }

    fn skip(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        let m = self.byte()?;
        let (fixed, items): (usize, usize) = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * (m & 0x0f) as usize),
            0x90..=0x9f => (0, (m & 0x0f) as usize),
            0xa0..=0xbf => ((m & 0x1f) as usize, 0),
            0xc4 | 0xd9 => (self.be(1)? as usize, 0),
            0xc5 | 0xda => (self.be(2)? as usize, 0),
            0xc6 | 0xdb => (self.be(4)? as usize, 0),
            0xc7 => (self.be(1)? as usize + 1, 0),
            0xc8 => (self.be(2)? as usize + 1, 0),
            0xc9 => (self.be(4)? as usize + 1, 0),
            0xca | 0xce | 0xd2 => (4, 0),
            0xcb | 0xcf | 0xd3 => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, self.be(2)? as usize),
            0xdd => (0, self.be(4)? as usize),
            0xde => (0, 2 * self.be(2)? as usize),
            0xdf => (0, 2 * self.be(4)? as usize),
            0xc1 => return None,
        };
        self.take(fixed)?;
        for _ in 0..items {
            self.skip(depth + 1)?;
        }
        Some(())
    }
}

/// Reads a server frame: a map with a string `t`. None when it is not one.
pub fn read_frame(b: &[u8]) -> Option<Frame<'_>> {
    let mut r = Reader { b, i: 0 };
    let m = r.byte()?;
    let n = match m {
        0x80..=0x8f => (m & 0x0f) as usize,
        0xde => r.be(2)? as usize,
        0xdf => r.be(4)? as usize,
        _ => return None,
    };
    let mut f = Frame::default();
    let mut has_t = false;
    for _ in 0..n {
        let key = r.bytes()?;
        match key {
            b"t" => {
                f.t = r.bytes()?;
                has_t = true;
            }
            b"id" => f.id = r.int()?.and_then(|v| u64::try_from(v).ok()),
            b"seq" => f.seq = r.int()?.and_then(|v| u64::try_from(v).ok()),
            b"ts" => f.ts = r.int()?,
            b"code" => f.code = r.int()?,
            b"retry_after" => f.retry_after = r.int()?,
            _ => r.skip(0)?,
        }
    }
    has_t.then_some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_smallest_forms() {
        let mut o = Vec::new();
        uint(&mut o, 5);
        uint(&mut o, 200);
        uint(&mut o, 70000);
        uint(&mut o, 1 << 40);
        assert_eq!(o[0], 5);
        assert_eq!(&o[1..3], &[0xcc, 200]);
        assert_eq!(&o[3..8], &[0xce, 0, 1, 0x11, 0x70]);
        assert_eq!(o[8], 0xcf);
        let mut s = Vec::new();
        str(&mut s, "msg");
        str(&mut s, &"x".repeat(40));
        assert_eq!(&s[..4], b"\xa3msg");
        assert_eq!(&s[4..6], &[0xd9, 40]);
        let mut b = Vec::new();
        bin(&mut b, &[7; 300]);
        assert_eq!(&b[..3], &[0xc5, 1, 44]);
        assert_eq!(b.len(), 303);
    }

    #[test]
    fn reads_what_it_needs_and_skips_the_rest() {
        // {"t": "ack", "sid": "abc", "meta": {"x": [1, -3, 2.5, null]}, "id": 300, "seq": 7}
        let mut o = Vec::new();
        map(&mut o, 5);
        str(&mut o, "t");
        str(&mut o, "ack");
        str(&mut o, "sid");
        str(&mut o, "abc");
        str(&mut o, "meta");
        map(&mut o, 1);
        str(&mut o, "x");
        o.extend_from_slice(&[0x94, 0x01, 0xfd, 0xcb]);
        o.extend_from_slice(&2.5f64.to_be_bytes());
        o.push(0xc0);
        str(&mut o, "id");
        uint(&mut o, 300);
        str(&mut o, "seq");
        uint(&mut o, 7);
        let f = read_frame(&o).unwrap();
        assert_eq!(f.t, b"ack");
        assert_eq!(
            (f.id, f.seq, f.ts, f.code),
            (Some(300), Some(7), None, None)
        );
        // signed ints, and a non-integer id is ignored
        let mut e = Vec::new();
        map(&mut e, 4);
        str(&mut e, "retry_after");
        uint(&mut e, 1500);
        str(&mut e, "t");
        str(&mut e, "error");
        str(&mut e, "code");
        e.extend_from_slice(&[0xd1, 0x0f, 0xbd]); // int16 4029
        str(&mut e, "id");
        str(&mut e, "nope");
        let f = read_frame(&e).unwrap();
        assert_eq!((f.t, f.code, f.id), (&b"error"[..], Some(4029), None));
        assert_eq!(f.retry_after, Some(1500));
    }

    #[test]
    fn refuses_truncated_and_non_map_input() {
        let mut o = Vec::new();
        map(&mut o, 2);
        str(&mut o, "t");
        str(&mut o, "deliver");
        str(&mut o, "seq");
        uint(&mut o, 1 << 20);
        for cut in 0..o.len() {
            assert!(read_frame(&o[..cut]).is_none(), "cut at {cut}");
        }
        assert!(read_frame(&o).is_some());
        assert!(read_frame(b"\x93\x01\x02\x03").is_none());
        // no "t": not a frame
        assert!(read_frame(b"\x81\xa2id\x01").is_none());
        // nesting deeper than MAX_DEPTH is refused, not recursed into
        // {"t": "x", "y": [[[...[1]...]]]}
        let mut deep = vec![0x82, 0xa1, b't', 0xa1, b'x', 0xa1, b'y'];
        deep.extend(std::iter::repeat_n(0x91, 100));
        deep.push(0x01);
        assert!(read_frame(&deep).is_none());
        let mut shallow = vec![0x82, 0xa1, b't', 0xa1, b'x', 0xa1, b'y'];
        shallow.extend(std::iter::repeat_n(0x91, 10));
        shallow.push(0x01);
        assert!(read_frame(&shallow).is_some());
    }
}
