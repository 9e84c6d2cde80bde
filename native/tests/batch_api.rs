//! Batch validation, nonce reservation and all-or-nothing output, through
//! the public Rust API (the C ABI is a thin shell over it).

use gateway_native::batch::{open_batch, seal_batch, Items, MAX_BATCH_ITEMS, MAX_ITEM_LEN};
use gateway_native::{AesPath, Error, Keyring, Sm4Path, Suite, OVERHEAD};

fn ring() -> (Keyring, u32, u32) {
    let kr = Keyring::with_paths(0xABCD_0001, AesPath::detected(), Sm4Path::detected());
    let a = kr.add(Suite::Aes128Gcm, &[7; 16], 1 << 32).unwrap();
    let s = kr.add(Suite::Sm4Gcm, &[8; 16], 1 << 32).unwrap();
    (kr, a, s)
}

#[test]
fn round_trip_mixed_keys_with_aad() {
    let (kr, a, s) = ring();
    let buf = b"hello worldsecond item";
    let (off, len) = ([0u64, 11], [11u64, 11]);
    let aad = b"AB";
    let (aoff, alen) = ([0u64, 1], [1u64, 1]);
    let mut out = vec![0u8; 22 + 2 * OVERHEAD];
    let w = seal_batch(
        &kr,
        &[a, s],
        Items::new(buf, &off, &len),
        Some(Items::new(aad, &aoff, &alen)),
        &mut out,
    )
    .unwrap();
    assert_eq!(w, out.len());
    // nonce = fixed || counter, per key counters start at 0
    assert_eq!(&out[..12], &[0xAB, 0xCD, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut plain = vec![0u8; 22];
    let mut st = [9u8; 2];
    let sl = [11 + OVERHEAD as u64, 11 + OVERHEAD as u64];
    open_batch(
        &kr,
        &[a, s],
        Items::packed(&out, &sl),
        Some(Items::new(aad, &aoff, &alen)),
        &mut plain,
        &mut st,
    )
    .unwrap();
    assert_eq!(st, [0, 0]);
    assert_eq!(&plain, buf);
    // Swapped AAD: both fail, independently, outputs zeroed.
    let mut st = [9u8; 2];
    let swapped_aad = b"BA";
    open_batch(
        &kr,
        &[a, s],
        Items::packed(&out, &sl),
        Some(Items::new(swapped_aad, &aoff, &alen)),
        &mut plain,
        &mut st,
    )
    .unwrap();
    assert_eq!(st, [1, 1]);
    assert!(plain.iter().all(|b| *b == 0));
}

fn seal_err(
    kr: &Keyring,
    h: &[u32],
    buf: &[u8],
    off: &[u64],
    len: &[u64],
    cap: usize,
) -> (usize, Error) {
    let mut out = vec![0x5Au8; cap];
    let r = seal_batch(kr, h, Items::new(buf, off, len), None, &mut out);
    assert!(out.iter().all(|b| *b == 0x5A), "no partial output on error");
    r.unwrap_err()
}

#[test]
fn rejects_bad_batches_before_writing() {
    let (kr, a, _) = ring();
    let buf = [0u8; 64];
    assert_eq!(seal_err(&kr, &[], &buf, &[], &[], 100).1, Error::EmptyBatch);
    assert_eq!(
        seal_err(&kr, &[a, a], &buf, &[0, 60], &[8, 8], 200),
        (1, Error::OutOfRange)
    );
    assert_eq!(
        seal_err(&kr, &[a, a], &buf, &[0, 4], &[8, 8], 200),
        (1, Error::Overlap)
    );
    assert_eq!(
        seal_err(&kr, &[a, a], &buf, &[8, 0], &[8, 8], 200),
        (1, Error::Overlap)
    );
    assert_eq!(
        seal_err(&kr, &[a], &buf, &[u64::MAX], &[2], 200),
        (0, Error::OutOfRange)
    );
    assert_eq!(
        seal_err(&kr, &[a], &buf, &[0], &[MAX_ITEM_LEN + 1], 200),
        (0, Error::Oversize)
    );
    assert_eq!(
        seal_err(&kr, &[a], &buf, &[0], &[8], 8 + OVERHEAD - 1).1,
        Error::OutputTooSmall
    );
    assert_eq!(
        seal_err(&kr, &[a, 999], &buf, &[0, 8], &[8, 8], 200),
        (1, Error::UnknownHandle)
    );
    let many = vec![a; MAX_BATCH_ITEMS + 1];
    let z = vec![0u64; MAX_BATCH_ITEMS + 1];
    assert_eq!(
        seal_err(&kr, &many, &buf, &z, &z, 10).1,
        Error::BatchTooLarge
    );
}

#[test]
fn exhausted_key_fails_whole_batch_without_burning() {
    let kr = Keyring::with_paths(1, AesPath::detected(), Sm4Path::detected());
    let h = kr.add(Suite::Aes256Gcm, &[1; 32], 3).unwrap();
    let other = kr.add(Suite::Aes256Gcm, &[2; 32], 100).unwrap();
    let buf = [0u8; 4];
    let mut out = vec![0u8; 5 * OVERHEAD];
    let e = seal_batch(
        &kr,
        &[other, h, h, h, h],
        Items::packed(&buf, &[0; 5]),
        None,
        &mut out,
    )
    .unwrap_err();
    assert_eq!(e, (1, Error::KeyExhausted));
    assert_eq!(kr.get(h).unwrap().used(), 0);
    seal_batch(
        &kr,
        &[h, h, h],
        Items::packed(&buf, &[0; 3]),
        None,
        &mut out,
    )
    .unwrap();
    assert_eq!(kr.get(h).unwrap().used(), 3);
    let e = seal_batch(&kr, &[h], Items::packed(&buf, &[0]), None, &mut out).unwrap_err();
    assert_eq!(e.1, Error::KeyExhausted);
}

#[test]
fn wrong_key_sizes_and_removal() {
    let kr = Keyring::with_paths(1, AesPath::Portable, Sm4Path::Portable);
    assert_eq!(
        kr.add(Suite::Aes128Gcm, &[0; 32], 1).unwrap_err(),
        Error::WrongKeySize
    );
    assert_eq!(
        kr.add(Suite::Aes256Gcm, &[0; 16], 1).unwrap_err(),
        Error::WrongKeySize
    );
    assert_eq!(
        kr.add(Suite::Sm4Gcm, &[0; 15], 1).unwrap_err(),
        Error::WrongKeySize
    );
    let h = kr.add(Suite::Sm4Gcm, &[0; 16], 1).unwrap();
    kr.remove(h).unwrap();
    assert_eq!(kr.remove(h).unwrap_err(), Error::UnknownHandle);
    let h2 = kr.add(Suite::Sm4Gcm, &[0; 16], 1).unwrap();
    assert_ne!(h, h2);
}
