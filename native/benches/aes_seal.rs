//! Per-message AES-GCM seal cost on every path this CPU supports, and (with
//! `--features bench-compare`) the same for ring, aws-lc-rs and RustCrypto.
//!
//!     cargo bench -p gateway-native --bench aes_seal [--features bench-compare]
//!
//! Prints the median of 7 timed rounds per row (the machine is shared).
//! `AES_BENCH_FILTER=substring` limits the rows.

use std::hint::black_box;
use std::time::Instant;

use gateway_native::aes::new_key;
use gateway_native::AesPath;

const SIZES: [usize; 4] = [64, 256, 1024, 16384];

fn bench(name: &str, len: usize, mut f: impl FnMut(&[u8], &mut [u8]) -> u8) {
    if let Ok(filt) = std::env::var("AES_BENCH_FILTER") {
        if !name.contains(&filt) {
            return;
        }
    }
    let input = vec![0x5au8; len];
    let mut out = vec![0u8; len];
    let iters = (100_000_000 / (len + 100)).max(2000);
    for _ in 0..iters / 4 {
        black_box(f(black_box(&input), &mut out));
    }
    let mut res = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..iters {
            black_box(f(black_box(&input), &mut out));
        }
        res.push(t.elapsed().as_nanos() as f64 / iters as f64);
    }
    res.sort_by(|a, b| a.total_cmp(b));
    let ns = res[3];
    println!(
        "{name:<28} {len:>6} B {ns:>10.1} ns/msg {:>7.2} GB/s",
        len as f64 / ns
    );
}

fn main() {
    let nonce = [1u8; 12];
    for (klen, suite) in [(16usize, "aes-128-gcm"), (32, "aes-256-gcm")] {
        let key = vec![7u8; klen];
        for path in AesPath::ALL.into_iter().filter(|p| p.supported()).rev() {
            let k = new_key(&key, path).expect("key");
            let name = format!("{suite} {}", k.backend());
            for len in SIZES {
                bench(&name, len, |i, o| k.seal(&nonce, &[], i, o)[0]);
            }
        }
        #[cfg(feature = "bench-compare")]
        compare::run(&key, suite, nonce);
    }
}

#[cfg(feature = "bench-compare")]
mod compare {
    use super::{bench, SIZES};

    pub fn run(key: &[u8], suite: &str, nonce: [u8; 12]) {
        {
            use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
            let alg = if key.len() == 16 {
                &AES_128_GCM
            } else {
                &AES_256_GCM
            };
            let k = LessSafeKey::new(UnboundKey::new(alg, key).unwrap());
            for len in SIZES {
                bench(&format!("{suite} ring"), len, |i, o| {
                    o.copy_from_slice(i);
                    let n = Nonce::assume_unique_for_key(nonce);
                    k.seal_in_place_separate_tag(n, Aad::empty(), o)
                        .unwrap()
                        .as_ref()[0]
                });
            }
        }
        {
            use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
            let alg = if key.len() == 16 {
                &AES_128_GCM
            } else {
                &AES_256_GCM
            };
            let k = LessSafeKey::new(UnboundKey::new(alg, key).unwrap());
            for len in SIZES {
                bench(&format!("{suite} aws-lc-rs"), len, |i, o| {
                    o.copy_from_slice(i);
                    let n = Nonce::assume_unique_for_key(nonce);
                    k.seal_in_place_separate_tag(n, Aad::empty(), o)
                        .unwrap()
                        .as_ref()[0]
                });
            }
        }
        {
            use aes_gcm::aead::{AeadInOut, KeyInit};
            use aes_gcm::{Aes128Gcm, Aes256Gcm};
            for len in SIZES {
                let name = format!("{suite} rustcrypto-aes-gcm");
                if key.len() == 16 {
                    let k = Aes128Gcm::new_from_slice(key).unwrap();
                    bench(&name, len, |i, o| {
                        o.copy_from_slice(i);
                        k.encrypt_inout_detached(&nonce.into(), &[], o.into())
                            .unwrap()[0]
                    });
                } else {
                    let k = Aes256Gcm::new_from_slice(key).unwrap();
                    bench(&name, len, |i, o| {
                        o.copy_from_slice(i);
                        k.encrypt_inout_detached(&nonce.into(), &[], o.into())
                            .unwrap()[0]
                    });
                }
            }
        }
    }
}
