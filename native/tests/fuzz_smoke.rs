//! Deterministic run of the fuzz target body over pseudo-random inputs, so
//! `cargo test` on stable exercises the same batch parsing as `cargo fuzz`.

use gateway_native::fuzzing::fuzz_batch;

#[test]
fn fuzz_batch_smoke() {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for case in 0..3000u32 {
        let len = (case % 700) as usize;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        fuzz_batch(&data);
    }
}
