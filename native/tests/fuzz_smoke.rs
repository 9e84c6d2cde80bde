//! Deterministic runs of the fuzz target bodies over pseudo-random inputs,
//! so `cargo test` on stable exercises what `cargo fuzz` does.

use gateway_native::fuzzing::{fuzz_batch, fuzz_frames};

/// Runs `target` on `cases` xorshift inputs of lengths cycling below `max_len`.
fn smoke(seed: u64, cases: u32, max_len: u32, target: fn(&[u8])) {
    let mut x = seed;
    for case in 0..cases {
        let len = (case % max_len) as usize;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        target(&data);
    }
}

#[test]
fn fuzz_batch_smoke() {
    smoke(0x9E37_79B9_7F4A_7C15, 3000, 700, fuzz_batch);
}

#[test]
fn fuzz_frames_smoke() {
    smoke(0x2545_F491_4F6C_DD1D, 3000, 300, fuzz_frames);
}
