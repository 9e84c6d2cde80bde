//! WebSocket client framing (RFC 6455): masked frames out, the server's
//! unmasked frames in, and the upgrade request and response.

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xa;

/// Largest server frame accepted (the gateway's frames are far smaller).
pub const MAX_FRAME: usize = 16 << 20;

/// xorshift64*: masking keys only need to be unpredictable to proxies,
/// not secret (RFC 6455 section 10.3).
pub struct Masker(u64);

impl Masker {
    pub fn new(seed: u64) -> Self {
        Masker(seed | 1)
    }

    fn next(&mut self) -> [u8; 4] {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32).to_ne_bytes()[..4]
            .try_into()
            .unwrap_or([1, 2, 3, 4])
    }
}

/// Appends one masked, final frame.
pub fn frame(out: &mut Vec<u8>, op: u8, payload: &[u8], masker: &mut Masker) {
    out.push(0x80 | op);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n < 65536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    let key = masker.next();
    out.extend_from_slice(&key);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole frame: opcode, payload range in the buffer, bytes used.
    Frame(u8, std::ops::Range<usize>, usize),
    NeedMore,
    /// Masked server frame, reserved bits, fragmented or oversize.
    Bad(&'static str),
}

/// Parses the frame at the start of `b`.
pub fn parse(b: &[u8]) -> Parsed {
    if b.len() < 2 {
        return Parsed::NeedMore;
    }
    let (b0, b1) = (b[0], b[1]);
    if b0 & 0x70 != 0 {
        return Parsed::Bad("reserved bits set");
    }
    if b0 & 0x80 == 0 {
        return Parsed::Bad("fragmented frame");
    }
    if b1 & 0x80 != 0 {
        return Parsed::Bad("masked server frame");
    }
    let (len, head) = match b1 & 0x7f {
        126 => {
            if b.len() < 4 {
                return Parsed::NeedMore;
            }
            (u16::from_be_bytes([b[2], b[3]]) as usize, 4)
        }
        127 => {
            if b.len() < 10 {
                return Parsed::NeedMore;
            }
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[2..10]);
            let v = u64::from_be_bytes(x);
            if v > MAX_FRAME as u64 {
                return Parsed::Bad("frame too large");
            }
            (v as usize, 10)
        }
        n => (n as usize, 2),
    };
    if len > MAX_FRAME {
        return Parsed::Bad("frame too large");
    }
    if b.len() < head + len {
        return Parsed::NeedMore;
    }
    Parsed::Frame(b0 & 0x0f, head..head + len, head + len)
}

/// The upgrade request (a fixed key: the client does not check the accept
/// value, only the status).
pub fn upgrade_request(authority: &str, path: &str, origin: Option<&str>) -> Vec<u8> {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n"
    );
    if let Some(o) = origin {
        r.push_str(&format!("Origin: {o}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// For a response head in `b`: Ok(Some(head length)) once complete with
/// status 101, Ok(None) while incomplete, Err(status) otherwise.
pub fn upgrade_response(b: &[u8]) -> Result<Option<usize>, u16> {
    let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if b.len() > 16384 { Err(0) } else { Ok(None) };
    };
    let status = b
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(0);
    if !b.starts_with(b"HTTP/1.1 ") || status != 101 {
        return Err(status);
    }
    Ok(Some(end + 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unmask(f: &[u8]) -> (u8, Vec<u8>) {
        assert_eq!(f[0] & 0x80, 0x80);
        assert_eq!(f[1] & 0x80, 0x80, "client frames are masked");
        let (len, at) = match f[1] & 0x7f {
            126 => (u16::from_be_bytes([f[2], f[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(f[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let key = &f[at..at + 4];
        let body = f[at + 4..at + 4 + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i & 3]);
        (f[0] & 0x0f, body.collect())
    }

    #[test]
    fn masked_frames_round_trip_at_every_length_form() {
        let mut m = Masker::new(42);
        for n in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            let mut out = Vec::new();
            frame(&mut out, OP_BINARY, &payload, &mut m);
            assert_eq!(unmask(&out), (OP_BINARY, payload), "length {n}");
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        frame(&mut a, OP_TEXT, b"same", &mut m);
        frame(&mut b, OP_TEXT, b"same", &mut m);
        assert_ne!(a[2..6], b[2..6], "a new key per frame");
    }

    #[test]
    fn parses_server_frames_and_refuses_bad_ones() {
        let mut f = vec![0x82, 126, 0x01, 0x00];
        f.extend(std::iter::repeat_n(9, 256));
        f.extend_from_slice(&[0x89, 0x00]);
        for cut in 0..260 {
            assert_eq!(parse(&f[..cut]), Parsed::NeedMore);
        }
        assert_eq!(parse(&f), Parsed::Frame(OP_BINARY, 4..260, 260));
        assert_eq!(parse(&f[260..]), Parsed::Frame(OP_PING, 2..2, 2));
        assert_eq!(parse(&[0x81, 0x85]), Parsed::Bad("masked server frame"));
        assert_eq!(parse(&[0xc1, 0x00]), Parsed::Bad("reserved bits set"));
        assert_eq!(parse(&[0x01, 0x00]), Parsed::Bad("fragmented frame"));
        let mut big = vec![0x82, 127];
        big.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(parse(&big), Parsed::Bad("frame too large"));
    }

    #[test]
    fn upgrade_status() {
        assert_eq!(upgrade_response(b"HTTP/1.1 101 Switching"), Ok(None));
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00";
        assert_eq!(upgrade_response(ok), Ok(Some(ok.len() - 2)));
        assert_eq!(upgrade_response(b"HTTP/1.1 429 Too Many\r\n\r\n"), Err(429));
        let req = upgrade_request("h:1", "/v1/ws", Some("https://a.example"));
        let text = String::from_utf8(req).unwrap();
        assert!(text.starts_with("GET /v1/ws HTTP/1.1\r\nHost: h:1\r\n"));
        assert!(text.contains("Origin: https://a.example\r\n") && text.ends_with("\r\n\r\n"));
    }
}
