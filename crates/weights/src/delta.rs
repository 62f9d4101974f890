//! Weight deltas: `apply` (target = base + delta) and `make` (delta = target − base), the
//! algorithm of the StableVicuna card's `apply_delta.py` (FastChat v0.1.10), streamed.
//!
//! The card loads both models with `torch_dtype=float16` and adds in place, so every input
//! element is first rounded to float16 (a no-op for float16 checkpoints; float32 and bfloat16
//! inputs are rounded to nearest-even, as `.to(torch.float16)` does) and the sum is float16
//! arithmetic: the exact sum rounded once to nearest-even. Computing it as float32 `a + b`
//! rounded to float16 gives that same result bit for bit: a float32 sum of two float16 values
//! is either exact or rounded at a bit far below float16's last one (24 ≥ 2·11 + 2 bits, the
//! condition under which double rounding is innocuous for addition).
//!
//! `model.embed_tokens.weight` and `lm_head.weight` of the base get zero rows appended up to the
//! other side's vocabulary (32000 → 32001 for StableVicuna's `[PAD]`); rows that exist are never
//! touched, and a base with the larger vocabulary is refused. The `rotary_emb.inv_freq` buffers
//! of 2023 checkpoints are not weights and are dropped (the reader never lists them). Every
//! other tensor must be on both sides with the same shape: all differences are reported in one
//! error before anything is written.
//!
//! Memory stays bounded whatever the model's size: tensors are read in windows with positioned
//! reads (never through the memory map, whose touched pages would count as resident), combined
//! chunk by chunk, and written by the streaming safetensors writer.

use crate::checkpoint::Checkpoint;
use crate::config::LlamaConfig;
use crate::dtype::{extend_f32_from_le_bytes, DType};
use crate::error::{bail, Error, Result};
use crate::output::{
    copy_small_file, generation_config, json_file_bytes, verify_written, write_in_background, ChunkSink, JobControl,
    Manifest, StagedDir,
};
use crate::safetensors_writer::{write_small_file, ShardedWriter, TensorSpec};
use half::f16;
use half::slice::HalfFloatSliceExt;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Which way the delta goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaOp {
    /// `out = base + other`, where other is the delta.
    Apply,
    /// `out = other − base`, where other is the fine-tuned model.
    Make,
}

impl DeltaOp {
    /// What the second input is called in messages.
    pub fn other_role(self) -> &'static str {
        match self {
            DeltaOp::Apply => "delta",
            DeltaOp::Make => "target",
        }
    }

    /// What the output is called in messages.
    pub fn out_role(self) -> &'static str {
        match self {
            DeltaOp::Apply => "target",
            DeltaOp::Make => "delta",
        }
    }
}

/// One apply-delta or make-delta run.
#[derive(Clone, Debug)]
pub struct DeltaRequest {
    pub op: DeltaOp,
    /// The base model folder (LLaMA).
    pub base: PathBuf,
    /// The delta (Apply) or the fine-tuned model (Make).
    pub other: PathBuf,
    /// The folder to write.
    pub out: PathBuf,
    /// Replace `out` if it exists.
    pub force: bool,
    /// Read every written tensor back and compare checksums before putting `out` in place.
    pub verify: bool,
    /// Largest shard, in bytes of tensor data.
    pub shard_size: u64,
    /// Threads for the arithmetic (reading and writing have a thread each besides).
    pub threads: usize,
}

/// The tensors whose first dimension is the vocabulary.
const VOCAB_TENSORS: [&str; 2] = ["model.embed_tokens.weight", "lm_head.weight"];

/// The tokenizer files copied from the delta (Apply) or the fine-tuned model (Make).
pub const TOKENIZER_FILES: [&str; 5] =
    ["tokenizer.model", "tokenizer.json", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"];

/// Output elements per chunk: 1 MiB of float16 output (inputs ≤ 4 MiB). Small enough that a
/// chunk is still in the CPU's caches when it is hashed and copied into the page cache: with
/// 4 MiB chunks the kernel's copy alone took about twice the time (measured on the 1b bench).
const CHUNK_ELEMENTS: usize = 1 << 19;

/// One output tensor and where its inputs come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedTensor {
    /// The output tensor: float16, the other side's shape.
    pub spec: TensorSpec,
    pub base_dtype: DType,
    pub other_dtype: DType,
    /// Elements the base holds; the rest (appended vocabulary rows) are zeros.
    pub base_elements: usize,
}

/// Pairs the tensors of `base` and `other` and checks them; every problem is listed in the one
/// error. Output order: natural name order (layer 2 before layer 10).
pub fn plan_delta(op: DeltaOp, base: &Checkpoint, other: &Checkpoint) -> Result<Vec<PlannedTensor>> {
    let role = op.other_role();
    let mut problems = Vec::new();
    let mut planned = Vec::new();
    for name in base.names() {
        let b = base.info(name).expect("listed names exist");
        let Some(o) = other.info(name) else {
            problems.push(format!("{name} is missing from the {role} (base shape {:?})", b.shape));
            continue;
        };
        let fits = if VOCAB_TENSORS.contains(&name) {
            // Appending rows is allowed: same trailing dimensions, at most as many rows.
            b.shape.len() == o.shape.len()
                && !b.shape.is_empty()
                && b.shape[1..] == o.shape[1..]
                && b.shape[0] <= o.shape[0]
        } else {
            b.shape == o.shape
        };
        if !fits {
            let why =
                if VOCAB_TENSORS.contains(&name) && b.shape.len() == o.shape.len() && b.shape.first() > o.shape.first()
                {
                    format!(" (the base's vocabulary is larger than the {role}'s: were --base and --{role} swapped?)")
                } else {
                    String::new()
                };
            problems.push(format!("{name}: base shape {:?}, {role} shape {:?}{why}", b.shape, o.shape));
            continue;
        }
        planned.push(PlannedTensor {
            spec: TensorSpec { name: name.to_string(), dtype: DType::F16, shape: o.shape.clone() },
            base_dtype: b.dtype,
            other_dtype: o.dtype,
            base_elements: b.numel(),
        });
    }
    for name in other.names() {
        if base.info(name).is_none() {
            let o = other.info(name).expect("listed names exist");
            problems.push(format!("{name} is in the {role} (shape {:?}) but not in the base", o.shape));
        }
    }
    // Both vocabulary tensors must grow alike, or the result is no model.
    let rows: Vec<(usize, usize)> = planned
        .iter()
        .filter(|t| VOCAB_TENSORS.contains(&t.spec.name.as_str()))
        .map(|t| (t.base_elements / t.spec.shape[1..].iter().product::<usize>().max(1), t.spec.shape[0]))
        .collect();
    if rows.windows(2).any(|w| w[0] != w[1]) {
        problems.push(format!(
            "model.embed_tokens.weight and lm_head.weight disagree on the vocabulary sizes (base → {role} rows: {rows:?})"
        ));
    }
    if !problems.is_empty() {
        bail!(
            "base {} and {role} {} do not fit together ({} problem{}): {}; nothing was written — check that both \
             folders hold the models you meant",
            base.dir().display(),
            other.dir().display(),
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            problems.join("; ")
        );
    }
    planned.sort_by_cached_key(|t| natural_key(&t.spec.name));
    Ok(planned)
}

/// A name split into text and numbers, so that `layers.2` sorts before `layers.10`.
pub(crate) fn natural_key(name: &str) -> Vec<(String, u64)> {
    let mut key = Vec::new();
    let mut text = String::new();
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            let mut number = c.to_digit(10).unwrap_or(0) as u64;
            while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                number = number.saturating_mul(10).saturating_add(d as u64);
                chars.next();
            }
            key.push((std::mem::take(&mut text), number));
        } else {
            text.push(c);
        }
    }
    key.push((text, 0));
    key
}

/// Runs apply-delta or make-delta: checks everything, then writes `request.out` (or nothing).
pub fn run_delta(request: &DeltaRequest, control: &mut JobControl) -> Result<Manifest> {
    let op = request.op;
    let role = op.other_role();
    let (base_json, base_config) = read_config(&request.base, "base")?;
    let (other_json, other_config) = read_config(&request.other, role)?;
    refuse_overlap(&request.out, &[&request.base, &request.other])?;
    let base = Checkpoint::open(&request.base)?;
    let other = Checkpoint::open(&request.other)?;
    let planned = plan_delta(op, &base, &other)?;
    base.check_against(&base_config)?;
    other.check_against(&other_config)?;

    // The card saves the base model (resized), so its config; make-delta saves the fine-tuned
    // model's. Either way with the larger vocabulary and float16.
    let mut out_config = match op {
        DeltaOp::Apply => base_json,
        DeltaOp::Make => other_json,
    };
    out_config.insert("vocab_size".to_string(), Value::from(other_config.vocab_size));
    out_config.insert("torch_dtype".to_string(), Value::from("float16"));
    if out_config.contains_key("dtype") {
        out_config.insert("dtype".to_string(), Value::from("float16"));
    }

    let staged = StagedDir::create(&request.out, request.force)?;
    let dir = staged.path().to_path_buf();
    let mut files = Vec::new();
    files.push(write_small_file(&dir, "config.json", &json_file_bytes(&Value::Object(out_config.clone())))?);
    files.push(write_small_file(&dir, "generation_config.json", &json_file_bytes(&generation_config(&out_config)))?);
    files.extend(copy_tokenizer_files(&request.other, &request.base, &dir)?);

    let specs: Vec<TensorSpec> = planned.iter().map(|t| t.spec.clone()).collect();
    let writer = ShardedWriter::create(&dir, specs.clone(), request.shard_size, request.verify)?;
    let bytes_read: u64 = planned
        .iter()
        .map(|t| {
            (t.base_elements * t.base_dtype.size_in_bytes()
                + t.spec.shape.iter().product::<usize>() * t.other_dtype.size_in_bytes()) as u64
        })
        .sum();
    control.progress.phase(
        match op {
            DeltaOp::Apply => "apply-delta",
            DeltaOp::Make => "make-delta",
        },
        bytes_read,
    );
    let threads = request.threads.max(1);
    let target = request.out.clone();
    let written = write_in_background(writer, |sink| {
        stream_combined(op, &base, &other, &planned, threads, &target, control, sink)
    })?;
    files.extend(written.files);
    if let Some(digests) = written.tensor_digests {
        verify_written(&dir, &request.out, &specs, &digests, control)?;
    }
    control.check_cancel(&request.out)?;
    staged.commit()?;
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Manifest { target: request.out.clone(), files, tensors: planned.len(), bytes_read, verified: request.verify })
}

/// `config.json` of a folder, both as written (to copy its other fields) and checked.
fn read_config(dir: &Path, role: &str) -> Result<(serde_json::Map<String, Value>, LlamaConfig)> {
    let config = LlamaConfig::from_dir(dir).map_err(|e| Error::new(format!("{role}: {e}")))?;
    let path = dir.join("config.json");
    let text = std::fs::read(&path).map_err(|e| Error::new(format!("cannot read {}: {e}", path.display())))?;
    let json: Value =
        serde_json::from_slice(&text).map_err(|e| Error::new(format!("{} is not valid JSON ({e})", path.display())))?;
    let Value::Object(map) = json else {
        bail!("{} must hold a JSON object", path.display());
    };
    Ok((map, config))
}

/// Refuses an output folder that is, or contains, one of the inputs: replacing it (--force)
/// would delete the model being read.
fn refuse_overlap(out: &Path, inputs: &[&Path]) -> Result<()> {
    let Ok(out_real) = out.canonicalize() else {
        return Ok(()); // does not exist yet: cannot hold an input
    };
    for input in inputs {
        if let Ok(real) = input.canonicalize() {
            if real.starts_with(&out_real) {
                bail!(
                    "the output folder {} holds the input {}; write the output to another folder",
                    out.display(),
                    input.display()
                );
            }
        }
    }
    Ok(())
}

/// Copies the tokenizer files of the fine-tuned side (`from`). A folder without a
/// tokenizer.model or tokenizer.json gets the base's tokenizer.model: LLaMA fine-tunes share
/// the base's SentencePiece model and list their extra tokens in added_tokens.json.
fn copy_tokenizer_files(from: &Path, base: &Path, dir: &Path) -> Result<Vec<crate::WrittenFile>> {
    let mut files = Vec::new();
    for name in TOKENIZER_FILES {
        let path = from.join(name);
        if path.is_file() {
            files.push(copy_small_file(&path, dir, name)?);
        }
    }
    let has_model = files.iter().any(|f| f.name == "tokenizer.model" || f.name == "tokenizer.json");
    let base_model = base.join("tokenizer.model");
    if !has_model && base_model.is_file() {
        files.push(copy_small_file(&base_model, dir, "tokenizer.model")?);
    }
    Ok(files)
}

/// Inputs of one output chunk.
struct Chunk {
    tensor: usize,
    base: Vec<u8>,
    other: Vec<u8>,
}

/// Reads the inputs window by window on a thread of its own, combines them on `threads` worker
/// threads (chunk i on worker i mod threads, so collecting round-robin keeps the order), and
/// hands each output chunk to `sink`. Input buffers go back to the reader once combined.
#[allow(clippy::too_many_arguments)]
fn stream_combined(
    op: DeltaOp,
    base: &Checkpoint,
    other: &Checkpoint,
    planned: &[PlannedTensor],
    threads: usize,
    target: &Path,
    control: &mut JobControl,
    sink: &mut ChunkSink,
) -> Result<()> {
    let cancel = control.cancel;
    let (tx, rx) = mpsc::sync_channel::<Result<Chunk>>(2);
    let (give_back, returned) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let buffer = |len: usize| {
                let mut buffer = returned.try_recv().unwrap_or_default();
                buffer.resize(len, 0);
                buffer
            };
            for (index, t) in planned.iter().enumerate() {
                let numel: usize = t.spec.shape.iter().product();
                let mut start = 0;
                while start < numel {
                    let end = (start + CHUNK_ELEMENTS).min(numel);
                    let read = || -> Result<Chunk> {
                        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                            bail!("interrupted");
                        }
                        let name = &t.spec.name;
                        let base_end = end.min(t.base_elements);
                        let base_len = base_end.saturating_sub(start) * t.base_dtype.size_in_bytes();
                        let mut base_bytes = buffer(base_len);
                        if base_len > 0 {
                            base.read_bytes_at(name, start * t.base_dtype.size_in_bytes(), &mut base_bytes)?;
                        }
                        let es = t.other_dtype.size_in_bytes();
                        let mut other_bytes = buffer((end - start) * es);
                        other.read_bytes_at(name, start * es, &mut other_bytes)?;
                        Ok(Chunk { tensor: index, base: base_bytes, other: other_bytes })
                    };
                    let chunk = read();
                    let failed = chunk.is_err();
                    if tx.send(chunk).is_err() || failed {
                        return;
                    }
                    start = end;
                }
            }
        });
        // Each worker: chunks in, (chunk, output) out. Dropping `workers` ends them.
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                let (work_tx, work_rx) = mpsc::sync_channel::<(Chunk, Vec<u8>)>(1);
                let (done_tx, done_rx) = mpsc::sync_channel::<(Chunk, Vec<u8>)>(1);
                scope.spawn(move || {
                    for (chunk, mut out) in work_rx {
                        let t = &planned[chunk.tensor];
                        combine(op, &chunk.base, t.base_dtype, &chunk.other, t.other_dtype, &mut out);
                        if done_tx.send((chunk, out)).is_err() {
                            return;
                        }
                    }
                });
                (work_tx, done_rx)
            })
            .collect();
        let mut in_flight = std::collections::VecDeque::new();
        let collect = |worker: usize, sink: &mut ChunkSink, control: &mut JobControl| -> Result<()> {
            let (chunk, out) =
                workers[worker].1.recv().map_err(|_| Error::new("internal error: a worker thread stopped"))?;
            sink.send(out)?;
            control.progress.advance((chunk.base.len() + chunk.other.len()) as u64);
            let _ = give_back.send(chunk.base);
            let _ = give_back.send(chunk.other);
            Ok(())
        };
        for (index, chunk) in rx.into_iter().enumerate() {
            control.check_cancel(target)?;
            let chunk = chunk?;
            let elements = chunk.other.len() / planned[chunk.tensor].other_dtype.size_in_bytes();
            let out = sink.buffer(elements * 2);
            if in_flight.len() == workers.len() {
                let worker = in_flight.pop_front().expect("in flight");
                collect(worker, sink, control)?;
            }
            let worker = index % workers.len();
            workers[worker].0.send((chunk, out)).map_err(|_| Error::new("internal error: a worker thread stopped"))?;
            in_flight.push_back(worker);
        }
        while let Some(worker) = in_flight.pop_front() {
            collect(worker, sink, control)?;
        }
        control.check_cancel(target)
    })
}

/// Combines little-endian inputs into float16 output bytes, element by element:
/// `f16(f16(base) + f16(other))` for Apply, `f16(f16(other) − f16(base))` for Make. `base` may
/// hold fewer elements than `out` (appended vocabulary rows): the missing ones are zeros.
pub fn combine(op: DeltaOp, base: &[u8], base_dtype: DType, other: &[u8], other_dtype: DType, out: &mut [u8]) {
    const BLOCK: usize = 4096;
    let elements = out.len() / 2;
    debug_assert_eq!(other.len(), elements * other_dtype.size_in_bytes());
    let base_elements = base.len() / base_dtype.size_in_bytes();
    let mut a = Vec::with_capacity(BLOCK);
    let mut b = Vec::with_capacity(BLOCK);
    let mut halves = [f16::ZERO; BLOCK];
    for start in (0..elements).step_by(BLOCK) {
        let end = (start + BLOCK).min(elements);
        a.clear();
        b.clear();
        let base_end = end.min(base_elements);
        if start < base_end {
            let es = base_dtype.size_in_bytes();
            widen_as_f16(base_dtype, &base[start * es..base_end * es], &mut a, &mut halves);
        }
        a.resize(end - start, 0.0);
        let es = other_dtype.size_in_bytes();
        widen_as_f16(other_dtype, &other[start * es..end * es], &mut b, &mut halves);
        match op {
            DeltaOp::Apply => a.iter_mut().zip(&b).for_each(|(x, y)| *x += *y),
            DeltaOp::Make => a.iter_mut().zip(&b).for_each(|(x, y)| *x = *y - *x),
        }
        let n = end - start;
        halves[..n].convert_from_f32_slice(&a);
        for (dst, h) in out[start * 2..end * 2].chunks_exact_mut(2).zip(&halves[..n]) {
            dst.copy_from_slice(&h.to_bits().to_le_bytes());
        }
    }
}

/// Appends the elements of `bytes` to `out` as f32 values of float16 precision: what loading
/// with `torch_dtype=float16` makes of them (float32 / bfloat16 are rounded to nearest-even).
fn widen_as_f16(dtype: DType, bytes: &[u8], out: &mut Vec<f32>, scratch: &mut [f16]) {
    let start = out.len();
    extend_f32_from_le_bytes(dtype, bytes, out);
    if dtype != DType::F16 {
        let values = &mut out[start..];
        let scratch = &mut scratch[..values.len()];
        scratch.convert_from_f32_slice(values);
        scratch.convert_to_f32_slice(values);
    }
}
