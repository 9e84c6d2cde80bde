//! NIST CAVP AES-GCM known-answer tests (gcmEncryptExtIV / gcmDecrypt,
//! 128- and 256-bit keys, 96-bit IVs, 128-bit tags) on every AES path this
//! CPU supports, plus round-trip / tamper tests and a check that
//! `GATEWAY_AES_BACKEND` caps the process path.
//!
//! The vectors come from the `cryptography-vectors` Python package. Their
//! directory is `$GATEWAY_CRYPTO_VECTORS` if set, else found by asking
//! `../.venv/bin/python` (or `python3`) where the package is installed.

use std::path::PathBuf;
use std::process::Command;

use gateway_native::aes::new_key;
use gateway_native::{AesPath, BlockAead};

fn vectors_dir() -> PathBuf {
    if let Ok(d) = std::env::var("GATEWAY_CRYPTO_VECTORS") {
        return PathBuf::from(d);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let pythons = [venv.to_string_lossy().into_owned(), "python3".to_string()];
    for py in pythons {
        let out = Command::new(&py)
            .args([
                "-c",
                "import cryptography_vectors, os; print(os.path.dirname(cryptography_vectors.__file__))",
            ])
            .output();
        if let Ok(o) = out {
            if o.status.success() {
                let d = String::from_utf8_lossy(&o.stdout).trim().to_string();
                return PathBuf::from(d);
            }
        }
    }
    panic!(
        "AES-GCM test vectors not found: install the `cryptography-vectors` Python package \
         in ../.venv (make test does) or set GATEWAY_CRYPTO_VECTORS to its package directory"
    );
}

struct Vector {
    key: Vec<u8>,
    iv: Vec<u8>,
    pt: Option<Vec<u8>>,
    aad: Vec<u8>,
    ct: Vec<u8>,
    tag: Vec<u8>,
}

fn hex(s: &str) -> Vec<u8> {
    let s = s.trim();
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// Parses a CAVP .rsp file, keeping 96-bit IV, 128-bit tag vectors.
fn parse(name: &str) -> Vec<Vector> {
    let path = vectors_dir().join("ciphers/AES/GCM").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read test vectors {}: {e}", path.display()));
    let (mut ivlen, mut taglen) = (0usize, 0usize);
    let mut out = Vec::new();
    let mut cur: Option<Vector> = None;
    let flush = |cur: &mut Option<Vector>, out: &mut Vec<Vector>, ivlen, taglen| {
        if let Some(v) = cur.take() {
            if ivlen == 96 && taglen == 128 {
                out.push(v);
            }
        }
    };
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("[IVlen = ") {
            flush(&mut cur, &mut out, ivlen, taglen);
            ivlen = v.trim_end_matches(']').parse().unwrap();
        } else if let Some(v) = line.strip_prefix("[Taglen = ") {
            flush(&mut cur, &mut out, ivlen, taglen);
            taglen = v.trim_end_matches(']').parse().unwrap();
        } else if line.starts_with("Count = ") {
            flush(&mut cur, &mut out, ivlen, taglen);
            cur = Some(Vector {
                key: vec![],
                iv: vec![],
                pt: Some(vec![]),
                aad: vec![],
                ct: vec![],
                tag: vec![],
            });
        } else if let Some(v) = cur.as_mut() {
            if line == "FAIL" {
                v.pt = None;
            } else if let Some((k, val)) = line
                .split_once(" = ")
                .or_else(|| line.strip_suffix(" =").map(|k| (k, "")))
            {
                match k {
                    "Key" => v.key = hex(val),
                    "IV" => v.iv = hex(val),
                    "PT" => v.pt = Some(hex(val)),
                    "AAD" => v.aad = hex(val),
                    "CT" => v.ct = hex(val),
                    "Tag" => v.tag = hex(val),
                    _ => {}
                }
            }
        }
    }
    flush(&mut cur, &mut out, ivlen, taglen);
    out
}

fn supported_paths() -> Vec<AesPath> {
    let p: Vec<AesPath> = AesPath::ALL.into_iter().filter(|p| p.supported()).collect();
    eprintln!(
        "AES paths tested: {:?}",
        p.iter().map(|p| p.name()).collect::<Vec<_>>()
    );
    p
}

fn key_on(key: &[u8], path: AesPath) -> Box<dyn BlockAead> {
    let k = new_key(key, path).expect("new_key");
    assert_eq!(
        k.backend(),
        path.name(),
        "key did not run on the asked path"
    );
    k
}

fn run_file(name: &str, key_len: usize) {
    let vectors = parse(name);
    assert!(
        vectors.len() > 100,
        "{name}: only {} vectors",
        vectors.len()
    );
    let (mut ok, mut fail) = (0, 0);
    for path in supported_paths() {
        for v in &vectors {
            assert_eq!(v.key.len(), key_len);
            let k = key_on(&v.key, path);
            let nonce: [u8; 12] = v.iv.as_slice().try_into().unwrap();
            let tag: [u8; 16] = v.tag.as_slice().try_into().unwrap();
            let mut pt = vec![0xAAu8; v.ct.len()];
            let opened = k.open(&nonce, &v.aad, &v.ct, &tag, &mut pt);
            match &v.pt {
                Some(expect) => {
                    assert!(opened, "{name} {}: valid vector rejected", path.name());
                    assert_eq!(&pt, expect, "{name} {}", path.name());
                    let mut ct = vec![0u8; expect.len()];
                    let t = k.seal(&nonce, &v.aad, expect, &mut ct);
                    assert_eq!(ct, v.ct, "{name} {}: ciphertext", path.name());
                    assert_eq!(t, tag, "{name} {}: tag", path.name());
                    ok += 1;
                }
                None => {
                    assert!(!opened, "{name} {}: forged vector accepted", path.name());
                    assert!(pt.iter().all(|b| *b == 0), "plaintext not wiped");
                    fail += 1;
                }
            }
        }
    }
    eprintln!("{name}: {ok} valid and {fail} invalid vectors checked");
}

#[test]
fn nist_encrypt_128() {
    run_file("gcmEncryptExtIV128.rsp", 16);
}

#[test]
fn nist_encrypt_256() {
    run_file("gcmEncryptExtIV256.rsp", 32);
}

#[test]
fn nist_decrypt_128() {
    run_file("gcmDecrypt128.rsp", 16);
}

#[test]
fn nist_decrypt_256() {
    run_file("gcmDecrypt256.rsp", 32);
}

#[test]
fn round_trip_and_tamper_every_path() {
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 31 + 7) as u8).collect();
    for key_len in [16usize, 32] {
        let key: Vec<u8> = (0..key_len as u8).collect();
        for path in supported_paths() {
            let k = key_on(&key, path);
            for len in [0usize, 1, 15, 16, 17, 64, 255, 256, 257, 1024, 4099] {
                let nonce = [len as u8; 12];
                let (pt, aad) = (&data[..len], &data[len..len + 13]);
                let mut ct = vec![0u8; len];
                let tag = k.seal(&nonce, aad, pt, &mut ct);
                let mut out = vec![0u8; len];
                assert!(k.open(&nonce, aad, &ct, &tag, &mut out));
                assert_eq!(out, pt);
                // Flip a bit in the ciphertext, the tag, the AAD, the nonce.
                let mut bad_tag = tag;
                bad_tag[15] ^= 1;
                assert!(!k.open(&nonce, aad, &ct, &bad_tag, &mut out));
                assert!(out.iter().all(|b| *b == 0));
                if len > 0 {
                    let mut bad = ct.clone();
                    bad[len / 2] ^= 0x80;
                    assert!(!k.open(&nonce, aad, &bad, &tag, &mut out));
                }
                assert!(!k.open(&nonce, &aad[1..], &ct, &tag, &mut out));
                let mut bad_nonce = nonce;
                bad_nonce[0] ^= 1;
                assert!(!k.open(&bad_nonce, aad, &ct, &tag, &mut out));
            }
        }
    }
}

#[test]
fn wrong_key_sizes_rejected() {
    for len in [0usize, 15, 17, 24, 31, 33] {
        assert!(new_key(&vec![0u8; len], AesPath::Portable).is_err());
    }
}

/// Runs this test binary again with `GATEWAY_AES_BACKEND` set, so the
/// process-wide path selection (read once per process) is checked per path.
#[test]
fn env_override_caps_process_path() {
    let exe = std::env::current_exe().unwrap();
    for path in AesPath::ALL {
        let expect = path.min(AesPath::detected());
        let st = Command::new(&exe)
            .args(["--exact", "env_override_child", "--include-ignored"])
            .env("GATEWAY_AES_BACKEND", path.name())
            .env("AES_CHILD_EXPECT", expect.name())
            .status()
            .unwrap();
        assert!(st.success(), "child for {} failed", path.name());
    }
}

#[test]
#[ignore = "run by env_override_caps_process_path"]
fn env_override_child() {
    let expect = std::env::var("AES_CHILD_EXPECT").expect("run by the parent test");
    let path = gateway_native::cpu::aes_path();
    assert_eq!(path.name(), expect);
    let k = new_key(&[1u8; 16], path).unwrap();
    assert_eq!(k.backend(), expect);
    let kr = gateway_native::Keyring::new(7);
    assert_eq!(kr.aes_path().name(), expect);
}
