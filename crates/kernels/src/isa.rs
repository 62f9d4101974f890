//! Which instruction-set level the kernels run at, detected once per process.

use std::sync::OnceLock;

/// A kernel implementation level. Every level computes the same function; `Scalar` is the reference the others are
/// tested against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, no intrinsics.
    Scalar,
    /// AVX2 + FMA + F16C (Haswell, Zen 1 and later).
    Avx2,
    /// AVX-512 F/BW/VL with VNNI, VBMI and GFNI, plus F16C (Ice Lake, Zen 4 and later).
    Avx512,
}

impl Isa {
    /// Every level, slowest first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    /// The fastest level this CPU supports (detected on first call, then cached).
    ///
    /// The environment variable `VICUNA_KERNELS_ISA` (`scalar`, `avx2`, `avx512`) caps it, for measurements and for
    /// ruling out a kernel when debugging; a level the CPU lacks is never chosen.
    pub fn detect() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let best = Isa::ALL.into_iter().rev().find(|isa| isa.is_available()).unwrap_or(Isa::Scalar);
            let cap = match std::env::var("VICUNA_KERNELS_ISA").as_deref() {
                Ok("scalar") => Isa::Scalar,
                Ok("avx2") => Isa::Avx2,
                _ => Isa::Avx512,
            };
            if (best as u8) <= (cap as u8) {
                best
            } else {
                cap
            }
        })
    }

    /// Whether this CPU can run kernels of this level.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vbmi")
                    && is_x86_feature_detected!("gfni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// Whether this process may use AMX int8 tiles (Intel Sapphire Rapids and later, where Linux grants them): asks
/// Linux for the permission on the first call. The GEMM uses them for q4_0 and q8_0 with `VICUNA_KERNELS_AMX=1`
/// ([`crate::Tuning::amx`]).
pub fn amx_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::kernels::amx::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}
