//! Runtime CPU feature detection and the environment overrides that force a
//! lower code path (so every path can be tested on one CPU).
//!
//! `GATEWAY_AES_BACKEND` = `vaes-avx512` | `vaes-avx2` | `aesni` | `portable`
//! `GATEWAY_SM4_BACKEND` = `gfni-avx512` | `gfni-avx2` | `aesni` | `portable`
//!
//! A forced value caps the path: the best path at or below it that the CPU
//! supports is used. An unknown value is ignored (the detected path is used).

use std::sync::OnceLock;

/// AES-GCM code paths, best last so `min` caps a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AesPath {
    Portable,
    Aesni,
    VaesAvx2,
    VaesAvx512,
}

/// SM4 code paths, best last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Sm4Path {
    Portable,
    Aesni,
    GfniAvx2,
    GfniAvx512,
}

impl AesPath {
    pub const ALL: [AesPath; 4] = [
        AesPath::Portable,
        AesPath::Aesni,
        AesPath::VaesAvx2,
        AesPath::VaesAvx512,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AesPath::Portable => "portable",
            AesPath::Aesni => "aesni",
            AesPath::VaesAvx2 => "vaes-avx2",
            AesPath::VaesAvx512 => "vaes-avx512",
        }
    }

    pub fn parse(s: &str) -> Option<AesPath> {
        AesPath::ALL.into_iter().find(|p| p.name() == s.trim())
    }

    /// The best path this CPU supports.
    pub fn detected() -> AesPath {
        #[cfg(target_arch = "x86_64")]
        {
            let base = std::arch::is_x86_feature_detected!("aes")
                && std::arch::is_x86_feature_detected!("pclmulqdq")
                && std::arch::is_x86_feature_detected!("ssse3");
            if !base {
                return AesPath::Portable;
            }
            let vaes = std::arch::is_x86_feature_detected!("vaes")
                && std::arch::is_x86_feature_detected!("vpclmulqdq")
                && std::arch::is_x86_feature_detected!("avx2");
            if vaes
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                return AesPath::VaesAvx512;
            }
            if vaes {
                return AesPath::VaesAvx2;
            }
            AesPath::Aesni
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            AesPath::Portable
        }
    }

    /// Whether this CPU can run `self`.
    pub fn supported(self) -> bool {
        self <= AesPath::detected()
    }
}

impl Sm4Path {
    pub const ALL: [Sm4Path; 4] = [
        Sm4Path::Portable,
        Sm4Path::Aesni,
        Sm4Path::GfniAvx2,
        Sm4Path::GfniAvx512,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Sm4Path::Portable => "portable",
            Sm4Path::Aesni => "aesni",
            Sm4Path::GfniAvx2 => "gfni-avx2",
            Sm4Path::GfniAvx512 => "gfni-avx512",
        }
    }

    pub fn parse(s: &str) -> Option<Sm4Path> {
        Sm4Path::ALL.into_iter().find(|p| p.name() == s.trim())
    }

    pub fn detected() -> Sm4Path {
        #[cfg(target_arch = "x86_64")]
        {
            let clmul = std::arch::is_x86_feature_detected!("pclmulqdq")
                && std::arch::is_x86_feature_detected!("ssse3");
            let aes = std::arch::is_x86_feature_detected!("aes") && clmul;
            let gfni = std::arch::is_x86_feature_detected!("gfni")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("vpclmulqdq")
                && aes;
            if gfni
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                return Sm4Path::GfniAvx512;
            }
            if gfni {
                return Sm4Path::GfniAvx2;
            }
            if aes {
                return Sm4Path::Aesni;
            }
            Sm4Path::Portable
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Sm4Path::Portable
        }
    }

    pub fn supported(self) -> bool {
        self <= Sm4Path::detected()
    }
}

fn env_cap<T: Copy + Ord>(var: &str, parse: fn(&str) -> Option<T>, detected: T) -> T {
    match std::env::var(var).ok().as_deref().and_then(parse) {
        Some(forced) => forced.min(detected),
        None => detected,
    }
}

/// The AES path for this process: detected, capped by `GATEWAY_AES_BACKEND`.
pub fn aes_path() -> AesPath {
    static P: OnceLock<AesPath> = OnceLock::new();
    *P.get_or_init(|| env_cap("GATEWAY_AES_BACKEND", AesPath::parse, AesPath::detected()))
}

/// The SM4 path for this process: detected, capped by `GATEWAY_SM4_BACKEND`.
pub fn sm4_path() -> Sm4Path {
    static P: OnceLock<Sm4Path> = OnceLock::new();
    *P.get_or_init(|| env_cap("GATEWAY_SM4_BACKEND", Sm4Path::parse, Sm4Path::detected()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips() {
        for p in AesPath::ALL {
            assert_eq!(AesPath::parse(p.name()), Some(p));
        }
        for p in Sm4Path::ALL {
            assert_eq!(Sm4Path::parse(p.name()), Some(p));
        }
        assert_eq!(AesPath::parse("nope"), None);
    }

    #[test]
    fn portable_always_supported() {
        assert!(AesPath::Portable.supported());
        assert!(Sm4Path::Portable.supported());
    }
}
