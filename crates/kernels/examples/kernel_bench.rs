//! Throughput of the matmul kernels on 13B-shaped matrices (LLaMA-13B: hidden 5120, intermediate 13824).
//!
//! ```sh
//! cargo run --release -p vicuna-kernels --example kernel_bench -- [--types q4_0,q8_0,q4_K,q6_K] [--threads 1,2]
//!     [--shapes 13824x5120,5120x5120|13b] [--batch 512] [--isa avx512|avx2|scalar] [--seconds 2]
//!     [--hot 1] [--rows 1,2,3,4,6,8,12,16 [--repeat 3]] [--layout best|ggml]
//! ```
//!
//! `--layout best` (the default) multiplies each matrix in the layout a loaded model uses on this CPU
//! (`Layout::best`: q4_0 interleaved by 16 rows on AVX-512, GGUF's layout otherwise); `--layout ggml` keeps GGUF's.
//!
//! `--hot 1` keeps one copy of each matrix, so that a small one is read from cache: the kernels' compute speed.
//!
//! `--shapes 13b` measures the four matrix shapes of a LLaMA-13B step (5120x5120 q/k/v/o, 13824x5120 gate/up,
//! 5120x13824 down, 32001x5120 output) and adds what they make per token (matrix multiplications only: no
//! attention, norms or activations): a decode step is 40 × (4 + 2 + 1) layer matrices plus the output matrix, at
//! the matvec times; a `--batch`-token prompt the same layer matrices at the matmat times divided by the batch,
//! the output matrix (needed for the last token only) left out.
//!
//! * matvec (one activation row, the decode step): GB/s of weights streamed. Several copies of the matrix, together
//!   twice the last-level cache (and at least 256 MiB), are used in turn so that every call reads its weights from
//!   DRAM, as a decode step over a whole model does. Compare with the STREAM roof of the machine.
//! * matmat (`--batch` activation rows, prompt processing): GOPS, counting a multiply-add as two operations. The
//!   copies are used in turn here too (a prompt pass over a whole model reads every matrix from DRAM once).
//!
//! The `cpu` columns (one thread only) divide by the time the calling thread actually ran, from
//! `/proc/thread-self/schedstat`: on a machine shared with other work they show what the kernel costs when it is not
//! waiting for a CPU. The last column gives the CPUs the process had on average during the matvec and matmat
//! measurements: with two threads on a busy machine it can be near 1, and the two-thread figures are then
//! one-CPU figures.
//!
//! `--rows N,N,...` measures instead the time of one product with each of those numbers of activation rows (a
//! server decoding N sequences together), weights from DRAM as for matvec, by every path `matmul_path` offers:
//! `before` is what `matmul` did before the multi-row kernels (the one-row kernel per activation row below 8 rows,
//! the GEMM from 8 on AVX-512), `row`, `multi` and `gemm` force one path, `auto` is what `matmul` does now. The
//! paths are measured in turn, `--repeat` rounds, and each gets its best round's median (a shared machine's noise
//! only ever adds time). With one thread the calling thread's CPU time is used instead of the wall time.
//!
//! Weights are random bytes with every scale field set to a moderate f16, so the kernels do their real work on
//! them; the values do not matter for speed.

use std::time::{Duration, Instant};

use vicuna_kernels::{
    matmul_path, matmul_with, row_size, GgmlType, Half, Isa, Layout, MatmulPath, PackedMatrix, QuantMatrix,
    ThreadPoolBuilder,
};

/// LLaMA-13B's matrices: rows, columns and how many of them one decode step multiplies.
const THIRTEEN_B: [(usize, usize, usize); 4] =
    [(5120, 5120, 4 * 40), (13824, 5120, 2 * 40), (5120, 13824, 40), (32001, 5120, 1)];

struct Options {
    types: Vec<GgmlType>,
    threads: Vec<usize>,
    shapes: Vec<(usize, usize)>,
    batch: usize,
    isa: Isa,
    seconds: f64,
    /// One copy of each matrix, so that matvec reads it from cache: the kernel's compute speed, not memory's.
    hot: bool,
    /// Activation-row counts for the per-path table (`--rows`); empty: the matvec/matmat table.
    rows: Vec<usize>,
    repeat: usize,
    /// Rewrite the matrices in `Layout::best` (what a loaded model does), or keep GGUF's layout.
    pack: bool,
}

fn parse() -> Options {
    let mut o = Options {
        types: vec![GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K],
        threads: vec![1, 2],
        shapes: vec![(13824, 5120), (5120, 5120)],
        batch: 512,
        isa: Isa::detect(),
        seconds: 2.0,
        hot: false,
        rows: Vec::new(),
        repeat: 3,
        pack: true,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).map(String::as_str).unwrap_or_else(|| panic!("{} needs a value", pair[0]));
        match pair[0].as_str() {
            "--types" => {
                o.types = value
                    .split(',')
                    .map(|name| {
                        GgmlType::ALL.into_iter().find(|t| t.name() == name).unwrap_or_else(|| panic!("type {name}"))
                    })
                    .collect()
            }
            "--threads" => o.threads = value.split(',').map(|t| t.parse().unwrap()).collect(),
            "--shapes" if value == "13b" => o.shapes = THIRTEEN_B.iter().map(|&(r, c, _)| (r, c)).collect(),
            "--shapes" => {
                o.shapes = value
                    .split(',')
                    .map(|s| {
                        let (r, c) = s.split_once('x').expect("shape as ROWSxCOLS");
                        (r.parse().unwrap(), c.parse().unwrap())
                    })
                    .collect()
            }
            "--hot" => o.hot = value == "1",
            "--rows" => o.rows = value.split(',').map(|n| n.parse().unwrap()).collect(),
            "--repeat" => o.repeat = value.parse().unwrap(),
            "--layout" => {
                o.pack = match value {
                    "best" => true,
                    "ggml" => false,
                    other => panic!("layout {other}: best or ggml"),
                }
            }
            "--batch" => o.batch = value.parse().unwrap(),
            "--seconds" => o.seconds = value.parse().unwrap(),
            "--isa" => {
                o.isa = match value {
                    "avx512" => Isa::Avx512,
                    "avx2" => Isa::Avx2,
                    "scalar" => Isa::Scalar,
                    other => panic!("isa {other}"),
                }
            }
            other => panic!("unknown option {other}"),
        }
    }
    assert!(o.isa.is_available(), "{:?} is not available on this CPU", o.isa);
    o
}

/// Byte offsets of the f16 scale fields in a block.
fn half_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::Q5_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

fn random_weights(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let bytes = rows * row_size(ty, cols).unwrap();
    let mut state = seed;
    let mut data: Vec<u8> = (0..bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let scale = Half::from_f32(0.01).0;
    if ty.is_quantized() {
        for block in data.chunks_exact_mut(ty.block_bytes()) {
            for &at in half_fields(ty) {
                block[at..at + 2].copy_from_slice(&scale);
            }
        }
    } else if ty == GgmlType::F16 {
        for v in data.chunks_exact_mut(2) {
            v.copy_from_slice(&scale);
        }
    }
    data
}

/// Nanoseconds this thread has run on a CPU (Linux `schedstat`), or `None` elsewhere.
fn thread_cpu_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

/// Nanoseconds all threads of this process have run on a CPU (the sum of their `schedstat`s), or `None`.
fn process_cpu_ns() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Calls `f` until `seconds` have passed (at least 3 times after one warm-up call). Returns the median wall time
/// per call; where known, the mean time per call this thread spent on a CPU (on a shared machine it tells what a
/// single-threaded call costs when it is not waiting for a CPU); and how many CPUs the process had on average
/// (on a shared machine, two threads may get only one CPU's worth between them).
fn time(seconds: f64, mut f: impl FnMut()) -> (Duration, Option<Duration>, Option<f64>) {
    f();
    let start = Instant::now();
    let cpu_start = thread_cpu_ns();
    let process_start = process_cpu_ns();
    let mut times = Vec::new();
    while times.len() < 3 || start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    let cpu = match (cpu_start, thread_cpu_ns()) {
        (Some(a), Some(b)) => Some(Duration::from_nanos((b - a) / times.len() as u64)),
        _ => None,
    };
    let cpus = match (process_start, process_cpu_ns()) {
        (Some(a), Some(b)) => Some((b - a) as f64 / 1e9 / start.elapsed().as_secs_f64()),
        _ => None,
    };
    times.sort();
    (times[times.len() / 2], cpu, cpus)
}

fn main() {
    let o = parse();
    if !o.rows.is_empty() {
        return rows_table(&o);
    }
    println!("isa {:?}, batch {}, {:.1} s per measurement, {}", o.isa, o.batch, o.seconds, layouts(&o));
    println!(
        "{:<6} {:>11} {:>7} {:>12} {:>10} {:>12} {:>10} {:>12}",
        "type", "shape", "threads", "matvec µs", "GB/s", "matmat ms", "GOPS", "CPUs v/m"
    );
    for &ty in &o.types {
        // Per thread count: seconds per decode step and per prompt token, summed over the 13B shapes.
        let mut step = vec![(0.0f64, 0.0f64, 0.0f64); o.threads.len()];
        for &(rows, cols) in &o.shapes {
            let weights = weight_copies(ty, rows, cols, o.hot);
            let matrix_bytes = weights[0].len();
            let packed = packed_copies(&weights, ty, rows, cols, &o);
            let matrices = matrices(&weights, &packed, ty, rows, cols);
            let x = random_activations(o.batch * cols);
            let mut out = vec![0f32; o.batch * rows];
            for (ti, &threads) in o.threads.iter().enumerate() {
                let pool = ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut next = 0;
                let (matvec, matvec_cpu, matvec_cpus) = time(o.seconds, || {
                    next = (next + 1) % matrices.len();
                    matmul_with(o.isa, &matrices[next], &x[..cols], 1, &mut out[..rows], &pool).unwrap();
                });
                let (matmat, matmat_cpu, matmat_cpus) = time(o.seconds, || {
                    next = (next + 1) % matrices.len();
                    matmul_with(o.isa, &matrices[next], &x, o.batch, &mut out, &pool).unwrap();
                });
                let gbps = |t: Duration| matrix_bytes as f64 / t.as_secs_f64() / 1e9;
                let gops = |t: Duration| 2.0 * (rows * cols * o.batch) as f64 / t.as_secs_f64() / 1e9;
                // With one thread all work runs on this thread, so its CPU time is the cost of the call.
                let on_cpu = |t: Option<Duration>, rate: &dyn Fn(Duration) -> f64| match t {
                    Some(t) if threads == 1 => format!("{:.1}", rate(t)),
                    _ => "-".to_string(),
                };
                println!(
                    "{:<6} {:>11} {:>7} {:>11.1} {:>8.1} {:>8} {:>11.2} {:>8.1} {:>8} {:>12}",
                    ty.name(),
                    format!("{rows}x{cols}"),
                    threads,
                    matvec.as_secs_f64() * 1e6,
                    gbps(matvec),
                    on_cpu(matvec_cpu, &gbps),
                    matmat.as_secs_f64() * 1e3,
                    gops(matmat),
                    on_cpu(matmat_cpu, &gops),
                    match (matvec_cpus, matmat_cpus) {
                        (Some(v), Some(m)) => format!("{v:.2}/{m:.2}"),
                        _ => "-".to_string(),
                    },
                );
                if let Some(&(_, _, count)) = THIRTEEN_B.iter().find(|s| (s.0, s.1) == (rows, cols)) {
                    let s = &mut step[ti];
                    s.0 += count as f64 * matvec.as_secs_f64();
                    s.1 += count as f64 * matrix_bytes as f64;
                    // The prompt computes the output matrix for its last token only.
                    let per_token = if count == 1 { 0.0 } else { matmat.as_secs_f64() / o.batch as f64 };
                    s.2 += count as f64 * per_token;
                }
            }
        }
        if o.shapes.len() == THIRTEEN_B.len() && THIRTEEN_B.iter().all(|s| o.shapes.contains(&(s.0, s.1))) {
            for (&threads, &(decode, bytes, prompt)) in o.threads.iter().zip(&step) {
                println!(
                    "{:<6} 13b step, {threads} threads: decode {:.2} tok/s ({:.1} GB/s), prompt {:.2} tok/s",
                    ty.name(),
                    1.0 / decode,
                    bytes / decode / 1e9,
                    1.0 / prompt
                );
            }
        }
    }
}

/// The `--rows` table: per type, shape, thread count and number of activation rows, the milliseconds of one product
/// by each path (see the top of this file).
fn rows_table(o: &Options) {
    const PATHS: [(&str, Option<MatmulPath>); 5] = [
        ("before", None),
        ("row", Some(MatmulPath::RowByRow)),
        ("multi", Some(MatmulPath::MultiRow)),
        ("gemm", Some(MatmulPath::Gemm)),
        ("auto", Some(MatmulPath::Auto)),
    ];
    println!(
        "isa {:?}; ms per product, best of {} rounds of {:.1} s per path; {}",
        o.isa,
        o.repeat,
        o.seconds,
        layouts(o)
    );
    print!("{:<6} {:>11} {:>7} {:>4}", "type", "shape", "threads", "n");
    for (name, _) in PATHS {
        print!(" {name:>8}");
    }
    println!(" {:>14}", "before/auto");
    for &ty in &o.types {
        for &(rows, cols) in &o.shapes {
            let weights = weight_copies(ty, rows, cols, o.hot);
            let packed = packed_copies(&weights, ty, rows, cols, o);
            let matrices = matrices(&weights, &packed, ty, rows, cols);
            let max_n = o.rows.iter().copied().max().unwrap();
            let x = random_activations(max_n * cols);
            let mut out = vec![0f32; max_n * rows];
            for &threads in &o.threads {
                let pool = ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                for &n in &o.rows {
                    let mut best = [f64::INFINITY; PATHS.len()];
                    for _ in 0..o.repeat {
                        for (i, &(_, path)) in PATHS.iter().enumerate() {
                            // Before the multi-row kernels: row by row below 8 rows, the GEMM (on AVX-512) from 8.
                            let path = path.unwrap_or(if n < 8 { MatmulPath::RowByRow } else { MatmulPath::Gemm });
                            let mut next = 0;
                            let (wall, cpu, _) = time(o.seconds / o.repeat as f64, || {
                                next = (next + 1) % matrices.len();
                                let (x, out) = (&x[..n * cols], &mut out[..n * rows]);
                                matmul_path(o.isa, path, &matrices[next], x, n, out, &pool).unwrap();
                            });
                            let t = match cpu {
                                Some(cpu) if threads == 1 => cpu,
                                _ => wall,
                            };
                            best[i] = best[i].min(t.as_secs_f64() * 1e3);
                        }
                    }
                    print!("{:<6} {:>11} {:>7} {:>4}", ty.name(), format!("{rows}x{cols}"), threads, n);
                    for t in best {
                        print!(" {t:>8.3}");
                    }
                    println!(" {:>14.2}", best[0] / best[4]);
                }
            }
        }
    }
}

/// Which layout each type is multiplied in.
fn layouts(o: &Options) -> String {
    let layout = |ty| if o.pack { Layout::best(ty, o.isa) } else { Layout::Ggml };
    let each: Vec<String> = o.types.iter().map(|&ty| format!("{ty} {}", layout(ty).name())).collect();
    format!("layouts: {}", each.join(", "))
}

/// The copies rewritten in `Layout::best`, where that is not GGUF's layout and `--layout` allows it.
fn packed_copies(
    weights: &[Vec<u8>],
    ty: GgmlType,
    rows: usize,
    cols: usize,
    o: &Options,
) -> Vec<Option<PackedMatrix>> {
    let layout = if o.pack { Layout::best(ty, o.isa) } else { Layout::Ggml };
    weights.iter().map(|d| PackedMatrix::new(&QuantMatrix::new(ty, rows, cols, d).unwrap(), layout)).collect()
}

/// The matrices to multiply: the packed copy where there is one.
fn matrices<'a>(
    weights: &'a [Vec<u8>],
    packed: &'a [Option<PackedMatrix>],
    ty: GgmlType,
    rows: usize,
    cols: usize,
) -> Vec<QuantMatrix<'a>> {
    weights
        .iter()
        .zip(packed)
        .map(|(d, p)| p.as_ref().map_or_else(|| QuantMatrix::new(ty, rows, cols, d).unwrap(), PackedMatrix::matrix))
        .collect()
}

/// Copies of one random `rows × cols` matrix of type `ty`: enough distinct ones to exceed the last-level cache
/// twice over, and at least 256 MiB (one when `hot`), so that products read their weights from memory. (A Xeon
/// here reports 480 MiB of L3: 256 MiB of copies measured q4_0 above the machine's read roof.)
fn weight_copies(ty: GgmlType, rows: usize, cols: usize, hot: bool) -> Vec<Vec<u8>> {
    let matrix_bytes = rows * row_size(ty, cols).unwrap();
    let total = (256usize << 20).max(2 * last_level_cache_bytes());
    let copies = if hot { 1 } else { total.div_ceil(matrix_bytes).max(2) };
    (0..copies).map(|i| random_weights(ty, rows, cols, 0x9E37 + i as u64)).collect()
}

/// The largest cache of CPU 0 that Linux describes (`/sys/devices/system/cpu/cpu0/cache/index*/size`, e.g.
/// `491520K`); 0 where it describes none.
fn last_level_cache_bytes() -> usize {
    let sizes =
        std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").into_iter().flatten().flatten().filter_map(|e| {
            let text = std::fs::read_to_string(e.path().join("size")).ok()?;
            let text = text.trim();
            let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
            let shift = match unit {
                "" => 0,
                "K" => 10,
                "M" => 20,
                "G" => 30,
                _ => return None,
            };
            Some(digits.parse::<usize>().ok()? << shift)
        });
    sizes.max().unwrap_or(0)
}

/// `len` activations in [-0.5, 0.5), the same for every run.
fn random_activations(len: usize) -> Vec<f32> {
    let mut state = 7u64;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}
