//! GFLOP/s of the f32 GEMM on the trainer's shapes (LLaMA hidden 512, intermediate 1376, 264 tokens a batch): the
//! forward `x·Wᵀ`, and the backward's `g·W` and `gᵀ·x`, per instruction-set level.
//!
//!   cargo run --release -p vicuna-kernels --example sgemm_bench [THREADS] [REPEATS]
//!
//! GFLOP/s are over the time the process ran on a CPU (`/proc/self/task/*/schedstat`), so a machine busy with other
//! work shows what the product costs when it runs, not how long it waited.

use vicuna_kernels::{sgemm_with, Isa, MatRef, ThreadPoolBuilder};

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().map_or(1, |s| s.parse().expect("THREADS"));
    let repeats: usize = args.next().map_or(20, |s| s.parse().expect("REPEATS"));
    let pool = ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let tokens = 264;
    for (name, m, n, k, ta, tb) in [
        ("x·Wᵀ 512→512", tokens, 512, 512, false, true),
        ("x·Wᵀ 512→1376", tokens, 1376, 512, false, true),
        ("x·Wᵀ 1376→512", tokens, 512, 1376, false, true),
        ("g·W 1376→512", tokens, 512, 1376, false, false),
        ("gᵀ·x [1376,512]", 1376, 512, tokens, true, false),
        ("gᵀ·x [512,1376]", 512, 1376, tokens, true, false),
    ] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 97) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 89) as f32 * 0.01).collect();
        let av = if ta { MatRef::row_major(&a, k, m).unwrap().t() } else { MatRef::row_major(&a, m, k).unwrap() };
        let bv = if tb { MatRef::row_major(&b, n, k).unwrap().t() } else { MatRef::row_major(&b, k, n).unwrap() };
        let mut c = vec![0.0; m * n];
        print!("{name:18} {m:5}x{n:5}x{k:5}");
        for isa in [Isa::Avx2, Isa::Avx512] {
            if !isa.is_available() {
                continue;
            }
            pool.install(|| sgemm_with(isa, true, av, bv, &mut c, false)).unwrap();
            let start = on_cpu_ns();
            for _ in 0..repeats {
                pool.install(|| sgemm_with(isa, true, av, bv, &mut c, false)).unwrap();
            }
            let s = (on_cpu_ns() - start) as f64 * 1e-9 / repeats as f64;
            print!("  {isa:?} {:6.1} GFLOP/s", 2.0 * (m * n * k) as f64 / s / 1e9);
        }
        println!();
    }
}

/// Nanoseconds all threads of this process have run on a CPU (the sum of their `schedstat`s).
fn on_cpu_ns() -> u64 {
    let tasks = std::fs::read_dir("/proc/self/task").expect("Linux /proc");
    tasks
        .map(|t| {
            let stat = std::fs::read_to_string(t.unwrap().path().join("schedstat")).unwrap_or_default();
            stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        })
        .sum()
}
