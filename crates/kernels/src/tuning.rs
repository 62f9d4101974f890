//! Per-CPU choices that the instruction set alone does not settle: which CPU this is, and what the kernels do
//! differently on it. One table, [`TABLE`], keyed by CPU vendor and family, with the measurement behind each row;
//! the environment can override any choice (for benchmarks, and for checking a row on a new CPU).

use std::sync::OnceLock;

use crate::isa::Isa;
use crate::types::GgmlType;

/// How the row kernels prefetch the weights they will need next ([`Tuning::prefetch`]).
///
/// Decoding streams every weight byte once per token; the row kernels issue a software prefetch 16 KiB ahead of
/// the weights they are multiplying (the kernels of the interleaved layouts, in huge pages, 2 KiB ahead). The hint
/// that helps on one CPU hurts on another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefetch {
    /// `prefetchnta`. On AMD Zen 4/5 the weights come through without pushing the activations out of L1.
    Nta,
    /// `prefetcht0`. On Intel (Sapphire Rapids and later) `prefetchnta` lines skip L2 and are evicted again from
    /// the 48 KiB L1 before the kernel reaches them, so every weight line is fetched twice: `prefetcht0` there took
    /// q4_0 decoding from 3.7–4.0 to 9.2–9.5 GB/s on one core.
    T0,
    /// No software prefetch: the hardware prefetcher alone.
    Off,
}

impl Prefetch {
    /// The value [`Tuning`] reads from `VICUNA_KERNELS_PREFETCH`, and what `vicuna bench --json` reports.
    pub fn name(self) -> &'static str {
        match self {
            Prefetch::Nta => "nta",
            Prefetch::T0 => "t0",
            Prefetch::Off => "off",
        }
    }

    fn parse(s: &str) -> Option<Prefetch> {
        [Prefetch::Nta, Prefetch::T0, Prefetch::Off].into_iter().find(|p| p.name() == s)
    }

    /// The const-generic tag the kernels are instantiated with.
    pub(crate) const fn tag(self) -> u8 {
        self as u8
    }
}

/// The const-generic tags of [`Prefetch`], for `match` arms in kernels instantiated per hint.
pub(crate) const PREFETCH_NTA: u8 = Prefetch::Nta.tag();
pub(crate) const PREFETCH_T0: u8 = Prefetch::T0.tag();
pub(crate) const PREFETCH_OFF: u8 = Prefetch::Off.tag();

/// The CPU, as `cpuid` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cpu {
    /// `AuthenticAMD`, `GenuineIntel`, …; empty off x86.
    pub vendor: String,
    /// The display family and model (family 25 is Zen 3/4, 26 Zen 5; Intel's cores are family 6, model 143
    /// Sapphire Rapids, 207 Emerald Rapids).
    pub family: u32,
    pub model: u32,
    /// The brand string, e.g. `AMD EPYC 9R14 96-Core Processor`.
    pub brand: String,
}

impl Cpu {
    /// The CPU this process runs on.
    pub fn detect() -> Cpu {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid;
            // SAFETY: `cpuid` exists on every x86_64 CPU; leaves past the maximum the CPU reports are not read.
            #[allow(unused_unsafe)]
            unsafe {
                let leaf0 = __cpuid(0);
                let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
                let (mut family, mut model) = (0, 0);
                if leaf0.eax >= 1 {
                    let eax = __cpuid(1).eax;
                    let base_family = (eax >> 8) & 0xF;
                    let base_model = (eax >> 4) & 0xF;
                    family = base_family + if base_family == 0xF { (eax >> 20) & 0xFF } else { 0 };
                    model = base_model
                        | if base_family == 0x6 || base_family == 0xF { ((eax >> 16) & 0xF) << 4 } else { 0 };
                }
                let mut brand = Vec::new();
                if __cpuid(0x8000_0000).eax >= 0x8000_0004 {
                    for leaf in 0x8000_0002u32..=0x8000_0004 {
                        let r = __cpuid(leaf);
                        brand.extend([r.eax, r.ebx, r.ecx, r.edx].iter().flat_map(|r| r.to_le_bytes()));
                    }
                }
                let text = |b: &[u8]| String::from_utf8_lossy(b).trim_matches(char::from(0)).trim().to_string();
                return Cpu { vendor: text(&vendor), family, model, brand: text(&brand) };
            }
        }
        #[allow(unreachable_code)]
        Cpu { vendor: String::new(), family: 0, model: 0, brand: String::new() }
    }
}

/// One row of [`TABLE`]: the choices for CPUs of a vendor and a range of families.
struct Row {
    vendor: &'static str,
    families: std::ops::RangeInclusive<u32>,
    prefetch: Prefetch,
    /// The hint of the kernels for the kernels' own layouts ([`crate::packed`]), whose weights lie in transparent
    /// huge pages where the system gives them: the hardware prefetcher then streams past every 4 KiB.
    packed_prefetch: Prefetch,
    /// The weight types rewritten at load into the kernels' own layouts ([`crate::packed`]) where the kernels are
    /// AVX-512's,
    pack_avx512: &'static [GgmlType],
    /// and where they are AVX2's.
    pack_avx2: &'static [GgmlType],
}

/// What is rewritten where: q4_0 and q8_0, whose interleaved kernels beat GGUF's layout on Zen 4 from memory (q4_0
/// 19.8 against 14.8 GB/s on one thread, q8_0 28.6–30.5 against 19.1–19.7; `bench/layout_ab.sh`). Not q4_K: its
/// interleaved kernel computes 59 GB/s against 21 with the weights in cache (`kernel_bench --hot 1 --shapes
/// 1024x5120`) but streams only 10.8 against 14.2 from memory on Zen 4, for a reason not found yet (no
/// performance counters in this VM); `VICUNA_KERNELS_PACK=q4_0,q8_0,q4_K` tries it on another CPU. Intel has its
/// own list ([`PACKED_TYPES_XEON`]).
const PACKED_TYPES: &[GgmlType] = &[GgmlType::Q4_0, GgmlType::Q8_0];

/// On AVX2 all three types with a layout of their own, q4_K too: measured on a Zen 4 VM that hides AVX-512
/// (`bench/layout_ab.sh TYPE`, medians of 4 alternated rounds, weights from DRAM; GB/s interleaved against GGUF's
/// layout): q4_0 17.5 against 13.2 on one thread, 28.8 against 20.8 on two; q8_0 24.5 against 17.1 and 30.5
/// against 27.2; q4_K 24.3 against 16.4 and 35.4 against 31.4. With the weights in cache (`kernel_bench --hot 1
/// --shapes 1024x5120`): q4_0 30.0 against 13.4, q8_0 36.9 against 23.7, q4_K 28.7 against 16.8. Unlike the
/// AVX-512 q4_K kernel, this one streams from memory as fast as it computes.
const PACKED_TYPES_AVX2: &[GgmlType] = &[GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K];

/// On Intel all three, q4_K too: measured on a Xeon (family 6 model 167, 2 vCPUs, AVX-512 and AMX), `N=3
/// bench/layout_ab.sh TYPE` (weights from DRAM, medians of 3 alternated rounds, GB/s interleaved against GGUF's
/// layout; `VICUNA_KERNELS_PACK=1` for q4_K): q4_0 10.7 against 9.3 on one thread; q8_0 12.5 against 9.8; q4_K
/// 12.7 against 8.9 on one thread and 22.3 against 16.1 on two (every round apart). Unlike Zen 4's, this CPU
/// streams the interleaved q4_K rows as fast as the others. And q6_K (AVX-512 only), stop 32, the same Xeon, `N=3
/// VICUNA_KERNELS_PACK=1 bench/layout_ab.sh q6_K`: 11.1 against 6.7 GB/s on one thread, 21.1 against 13.9 on two,
/// every round apart, with `bench/read_bandwidth.c` reading 11.4 and 20.8 in that hour (its GGUF-layout kernel is
/// bound by unpacking: 27 GB/s with the weights in L2, against 43 interleaved; `kernel_bench --hot 1 --shapes
/// 256x5120`). Zen 4 has not measured it, so its row keeps q6_K in GGUF's layout.
const PACKED_TYPES_XEON: &[GgmlType] = &[GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K];

/// What each CPU gets. The first row matching vendor and family wins; CPUs no row names get [`DEFAULT`].
///
/// * AMD from Zen 3 on: `prefetchnta` 32 KiB ahead took one core from ~21 to 27–37 GB/s on q8_0 rows of 13824
///   values, ~29 to 33–38 on rows of 5120 (Zen 4, `kernel_bench`, one thread, the `cpu` column); `prefetcht0` at
///   that distance was not clearly different, nearer (0.25–4 KiB) it was slower.
/// * Intel family 6 (Xeon, model 207, 2 vCPUs): `kernel_bench --types q4_0,q8_0 --threads 1 --shapes
///   13824x5120,5120x5120`, weights from DRAM, the `cpu` column: q4_0 3.7–4.0 GB/s with `prefetchnta`, 9.2–9.5
///   with `prefetcht0`; q8_0 4.3–4.6 against 10.0–10.6.
///
/// For the interleaved q4_0 rows (in huge pages), on Zen 4: no software prefetch, 19.8 GB/s on one thread (median
/// of 6, best 23.2) against 12.2 with `prefetchnta` (best 17.2); two threads 30.5 against 25.0 (`kernel_bench
/// --types q4_0 --shapes 13824x5120 --threads 1,2`, the layouts and hints alternated, on a shared host whose read
/// roof was 25.6 / 31.9 GB/s that hour). Intel keeps `prefetcht0`, not yet measured with this layout.
const TABLE: &[Row] = &[
    Row {
        vendor: "AuthenticAMD",
        families: 0x19..=0x1F,
        prefetch: Prefetch::Nta,
        packed_prefetch: Prefetch::Off,
        pack_avx512: PACKED_TYPES,
        pack_avx2: PACKED_TYPES_AVX2,
    },
    Row {
        vendor: "GenuineIntel",
        families: 6..=6,
        prefetch: Prefetch::T0,
        packed_prefetch: Prefetch::T0,
        pack_avx512: PACKED_TYPES_XEON,
        pack_avx2: PACKED_TYPES_AVX2,
    },
];

/// For CPUs [`TABLE`] does not name: the ordinary prefetch into every cache level.
const DEFAULT: Prefetch = Prefetch::T0;

/// The choices in force for this process: [`TABLE`]'s row for this CPU, then the environment's overrides.
#[derive(Clone, Debug)]
pub struct Tuning {
    pub cpu: Cpu,
    pub prefetch: Prefetch,
    /// Where `prefetch` came from: `"table"`, `"default"` (no row for this CPU) or `"VICUNA_KERNELS_PREFETCH"`.
    pub prefetch_source: &'static str,
    /// The hint of the kernels for the kernels' own layouts (also set by `VICUNA_KERNELS_PREFETCH`).
    pub packed_prefetch: Prefetch,
    /// The weight types whose matrices are rewritten at load into the kernels' own layouts ([`crate::Layout::best`]).
    pub pack: Pack,
    /// Whether the GEMM takes the integer products of the types that can (q4_0, q8_0) to AMX int8 tiles: only with
    /// `VICUNA_KERNELS_AMX=1`, where the CPU has them and Linux grants their use to this process. Off by default:
    /// on the one AMX machine measured (Intel Xeon, family 6 model 167, 2 vCPUs) the tiles gave the same bits but
    /// not more speed where it counts (`kernel_bench --types q4_0 --shapes 11008x4096 --batch 64 --threads 1`, on-CPU
    /// GOPS, VNNI against AMX: GGUF rows 299–310 against 340–352, interleaved rows 319–333 against 228–264, the
    /// interleaved vectors being scattered to row-major panel rows for the tiles).
    pub amx: bool,
}

/// The weight types rewritten at load, by the instruction set of the kernels that will read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pack {
    pub avx512: Vec<GgmlType>,
    pub avx2: Vec<GgmlType>,
}

impl Pack {
    /// The types rewritten for kernels at `isa` (none for the scalar reference).
    pub fn types(&self, isa: Isa) -> &[GgmlType] {
        match isa {
            Isa::Avx512 => &self.avx512,
            Isa::Avx2 => &self.avx2,
            Isa::Scalar => &[],
        }
    }
}

impl Tuning {
    /// The tuning of this process, decided on first use. `VICUNA_KERNELS_PREFETCH=nta|t0|off` overrides the table
    /// (any other value is ignored, with a warning on stderr).
    pub fn get() -> &'static Tuning {
        static TUNING: OnceLock<Tuning> = OnceLock::new();
        TUNING.get_or_init(|| {
            let mut tuning = Tuning::for_cpu(Cpu::detect(), std::env::var("VICUNA_KERNELS_PREFETCH").ok().as_deref());
            if let Ok(value) = std::env::var("VICUNA_KERNELS_PACK") {
                match parse_pack(&value) {
                    Some(types) => tuning.pack = Pack { avx512: types.clone(), avx2: types },
                    None => eprintln!(
                        "warning: VICUNA_KERNELS_PACK={value:?} is not 0, 1 or a list of types with a layout of \
                         their own (q4_0,q8_0,q4_K); ignored"
                    ),
                }
            }
            #[cfg(target_arch = "x86_64")]
            {
                tuning.amx = std::env::var("VICUNA_KERNELS_AMX").is_ok_and(|v| v == "1")
                    && crate::isa::Isa::Avx512.is_available()
                    && crate::kernels::amx::available();
            }
            tuning
        })
    }

    fn for_cpu(cpu: Cpu, prefetch_override: Option<&str>) -> Tuning {
        let row = TABLE.iter().find(|row| row.vendor == cpu.vendor && row.families.contains(&cpu.family));
        let (mut prefetch, mut packed_prefetch, mut prefetch_source) = match row {
            Some(row) => (row.prefetch, row.packed_prefetch, "table"),
            None => (DEFAULT, DEFAULT, "default"),
        };
        let pack = Pack {
            avx512: row.map_or(PACKED_TYPES, |row| row.pack_avx512).to_vec(),
            avx2: row.map_or(PACKED_TYPES_AVX2, |row| row.pack_avx2).to_vec(),
        };
        if let Some(value) = prefetch_override {
            match Prefetch::parse(value) {
                Some(p) => (prefetch, packed_prefetch, prefetch_source) = (p, p, "VICUNA_KERNELS_PREFETCH"),
                None => eprintln!("warning: VICUNA_KERNELS_PREFETCH={value:?} is not one of nta, t0, off; ignored"),
            }
        }
        Tuning { cpu, prefetch, prefetch_source, packed_prefetch, pack, amx: false }
    }
}

/// `VICUNA_KERNELS_PACK`: `0` (none), `1` (every type with a layout of its own) or a comma-separated list of such
/// types by ggml name.
fn parse_pack(value: &str) -> Option<Vec<GgmlType>> {
    let packable = || GgmlType::ALL.into_iter().filter(|&ty| crate::kernels::traits(ty).packed.is_some());
    match value {
        "0" => Some(Vec::new()),
        "1" => Some(packable().collect()),
        list => list.split(',').map(|name| packable().find(|ty| ty.name() == name.trim())).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(vendor: &str, family: u32, model: u32) -> Cpu {
        Cpu { vendor: vendor.into(), family, model, brand: String::new() }
    }

    #[test]
    fn the_table_picks_by_vendor_and_family_and_the_environment_overrides_it() {
        let zen4 = Tuning::for_cpu(cpu("AuthenticAMD", 0x19, 0x11), None);
        assert_eq!(
            (zen4.prefetch, zen4.packed_prefetch, zen4.prefetch_source),
            (Prefetch::Nta, Prefetch::Off, "table")
        );
        let xeon = Tuning::for_cpu(cpu("GenuineIntel", 6, 207), None);
        assert_eq!((xeon.prefetch, xeon.prefetch_source), (Prefetch::T0, "table"));
        let other = Tuning::for_cpu(cpu("HygonGenuine", 0x18, 0), None);
        assert_eq!((other.prefetch, other.prefetch_source), (DEFAULT, "default"));
        let forced = Tuning::for_cpu(cpu("GenuineIntel", 6, 207), Some("off"));
        assert_eq!((forced.prefetch, forced.prefetch_source), (Prefetch::Off, "VICUNA_KERNELS_PREFETCH"));
        assert_eq!(forced.packed_prefetch, Prefetch::Off);
        let bad = Tuning::for_cpu(cpu("AuthenticAMD", 0x1A, 0), Some("fast"));
        assert_eq!((bad.prefetch, bad.prefetch_source), (Prefetch::Nta, "table"));
    }

    #[test]
    fn the_packed_types_parse() {
        assert_eq!(parse_pack("0"), Some(vec![]));
        assert_eq!(parse_pack("1"), Some(vec![GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K]));
        assert_eq!(parse_pack("q4_K, q4_0"), Some(vec![GgmlType::Q4_K, GgmlType::Q4_0]));
        assert_eq!(parse_pack("q6_K"), Some(vec![GgmlType::Q6_K]));
        assert_eq!(parse_pack("q5_K"), None, "no layout of its own");
        assert_eq!(parse_pack("fast"), None);
        let zen4 = Tuning::for_cpu(cpu("AuthenticAMD", 0x19, 0x11), None);
        assert_eq!(zen4.pack.types(Isa::Avx512), PACKED_TYPES);
        assert_eq!(zen4.pack.types(Isa::Avx2), PACKED_TYPES_AVX2);
        assert!(zen4.pack.types(Isa::Scalar).is_empty());
        let xeon = Tuning::for_cpu(cpu("GenuineIntel", 6, 167), None);
        assert_eq!(xeon.pack.types(Isa::Avx512), PACKED_TYPES_XEON);
    }

    #[test]
    fn this_cpu_is_identified() {
        let cpu = Cpu::detect();
        if cfg!(target_arch = "x86_64") {
            assert!(!cpu.vendor.is_empty() && cpu.family > 0, "{cpu:?}");
        }
        for p in [Prefetch::Nta, Prefetch::T0, Prefetch::Off] {
            assert_eq!(Prefetch::parse(p.name()), Some(p));
        }
    }
}
