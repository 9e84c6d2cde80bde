//! Log-linear histogram of microsecond values: exact below 256 µs, then
//! 128 buckets per power of two (under 0.8% apart). Exported as
//! `[value, count]` pairs (each bucket's midpoint) for the Python side to
//! load into an HdrHistogram.

const LINEAR: u64 = 256;
const SUB: u64 = 128;

pub struct Hist {
    counts: Vec<u64>,
    total: u64,
}

fn index(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let e = 63 - v.leading_zeros() as u64; // >= 8
    let sub = (v >> (e - 7)) & (SUB - 1);
    (LINEAR + (e - 8) * SUB + sub) as usize
}

fn value(i: usize) -> u64 {
    let i = i as u64;
    if i < LINEAR {
        return i;
    }
    let e = (i - LINEAR) / SUB + 8;
    let sub = (i - LINEAR) % SUB;
    let low = (SUB + sub) << (e - 7);
    low + ((1u64 << (e - 7)) >> 1)
}

impl Hist {
    pub fn new() -> Self {
        Hist {
            counts: vec![0; index(u64::MAX) + 1],
            total: 0,
        }
    }

    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// `[[value, count], ...]` for the non-empty buckets, as JSON.
    pub fn json(&self) -> String {
        let mut s = String::from("[");
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 {
                if s.len() > 1 {
                    s.push(',');
                }
                s.push_str(&format!("[{},{}]", value(i), c));
            }
        }
        s.push(']');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_exact_then_within_one_percent() {
        for v in 0..LINEAR {
            assert_eq!(value(index(v)), v);
        }
        let mut v = LINEAR;
        while v < 1 << 40 {
            let m = value(index(v));
            assert!(m.abs_diff(v) * 100 <= v, "{v} -> {m}");
            assert!(index(v) <= index(v + 1));
            v = v * 9 / 8 + 1;
        }
        assert!(index(u64::MAX) < 8000);
    }

    #[test]
    fn json_lists_non_empty_buckets() {
        let mut h = Hist::new();
        for v in [3, 3, 1000, 1001, 5_000_000] {
            h.record(v);
        }
        assert_eq!(h.total(), 5);
        let j = h.json();
        assert!(j.starts_with("[[3,2],[1002,2],["), "{j}");
        assert_eq!(j.matches('[').count(), 4);
    }
}
