//! `vicuna quantize`: a LLaMA model (Hugging Face folder, or a float GGUF) → a GGUF file as llama.cpp
//! writes it, streamed tensor by tensor in bounded memory.
//!
//! What llama.cpp's tools do, and vicuna follows:
//! * names and layout: `convert_hf_to_gguf.py` (`LlamaModel`): `token_embd.weight`,
//!   `blk.N.attn_q.weight` …, `output_norm.weight`, `output.weight`; the q and k projections' rows
//!   permuted to the interleaved (Meta) RoPE order (`LlamaModel.permute`, k with the key/value head
//!   count); `rotary_emb.inv_freq` dropped; 1-D tensors (norms) in f32.
//! * types: `llama-quantize` (`llama_tensor_get_type` in `src/llama-quant.cpp`, llama.cpp master of
//!   2025, unchanged in this respect since b4748): see [`tensor_type`].
//! * order: `llama-quantize` writes tensors sorted by layer, then by name (`weight_name_comparer` of
//!   `llama-model-loader.h`): `output.weight`, `output_norm.weight`, `token_embd.weight`, then for each
//!   block `attn_k`, `attn_norm`, `attn_output`, `attn_q`, `attn_v`, `ffn_down`, `ffn_gate`, `ffn_norm`,
//!   `ffn_up`. Its per-layer counters (`i_attention_wv`, `i_ffn_down`) then equal the layer number,
//!   which is what [`tensor_type`] takes.

use crate::checkpoint::Checkpoint;
use crate::config::LlamaConfig;
use crate::delta::natural_key;
use crate::dtype::extend_f32_from_le_bytes;
use crate::dtype::DType;
use crate::error::{bail, Error, Result};
use crate::gguf::{llama_file_type, GgmlType, GgufFile, GgufTensorPlan, GgufValue, GgufVocab, GgufWriter};
use crate::output::{write_in_background, JobControl, Manifest, StagedFile};
use crate::synth::{random_range_parallel, SynthRequest};
use std::path::{Path, PathBuf};
use vicuna_kernels::{dequantize_row, quantize_row, row_size};

/// The target types of `vicuna quantize`, named as llama.cpp names its file types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizeTarget {
    F32,
    F16,
    Q8_0,
    Q4_0,
    /// q4_K for most tensors, q6_K for some (llama.cpp's `Q4_K_M` mixture).
    Q4KM,
}

impl QuantizeTarget {
    /// The type of tensors no rule singles out.
    pub fn base_type(self) -> GgmlType {
        match self {
            QuantizeTarget::F32 => GgmlType::F32,
            QuantizeTarget::F16 => GgmlType::F16,
            QuantizeTarget::Q8_0 => GgmlType::Q8_0,
            QuantizeTarget::Q4_0 => GgmlType::Q4_0,
            QuantizeTarget::Q4KM => GgmlType::Q4_K,
        }
    }

    /// `general.file_type` (llama.cpp's `enum llama_ftype`: `LLAMA_FTYPE_MOSTLY_Q4_K_M` is 15).
    pub fn file_type(self) -> u32 {
        match self {
            QuantizeTarget::Q4KM => 15,
            other => llama_file_type(other.base_type()).expect("the base types have llama.cpp file types"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantizeTarget::F32 => "f32",
            QuantizeTarget::F16 => "f16",
            QuantizeTarget::Q8_0 => "q8_0",
            QuantizeTarget::Q4_0 => "q4_0",
            QuantizeTarget::Q4KM => "q4_k_m",
        }
    }
}

/// The type llama.cpp gives tensor `name` (GGUF name, ggml `dims`) of a model with `n_layer` blocks
/// for `target` — `llama_tensor_get_type` for the file types vicuna writes, no importance matrix:
/// * 1-D tensors (norms) stay f32; f32 / f16 targets convert every other tensor to that type.
/// * `output.weight` (or `token_embd.weight` when the output is tied to it): q8_0 when its rows are
///   not a whole number of the base type's blocks, else q6_K unless the base type is q8_0.
/// * q4_k_m: `attn_v.weight` and `ffn_down` of the layers where `use_more_bits(layer, n_layer)`
///   (the first and last eighth, and every third in between) get q6_K.
/// * a row length that is not a whole number of blocks falls back as llama.cpp's
///   `convert_incompatible_tensor` does: q4_K → q5_0, q6_K → q8_0, then f16 if still ragged; q4_0
///   and q8_0 go to f16 directly (the llama.cpp bundled with llama-cpp-python 0.3.36 does so, "must
///   use F16 due to unusual shape"; some older versions refused such tensors instead).
///
/// `bench/gguf_interop.sh` checks the result against that llama.cpp's own quantizer: same type and
/// same bytes for every tensor.
pub fn tensor_type(target: QuantizeTarget, name: &str, dims: &[usize], n_layer: usize, has_output: bool) -> GgmlType {
    if dims.len() < 2 || name.ends_with("_norm.weight") {
        return GgmlType::F32;
    }
    let base = target.base_type();
    if !base.is_quantized() {
        return base;
    }
    let row_len = dims[0];
    let layer = name.strip_prefix("blk.").and_then(|rest| rest.split('.').next()).and_then(|n| n.parse::<usize>().ok());
    let more_bits = |layer: usize| {
        layer < n_layer / 8 || layer >= 7 * n_layer / 8 || (layer as i64 - (n_layer / 8) as i64) % 3 == 2
    };
    let mut ty = base;
    if name == "output.weight" || (!has_output && name == "token_embd.weight") {
        if !row_len.is_multiple_of(base.block_size()) {
            ty = GgmlType::Q8_0;
        } else if base != GgmlType::Q8_0 {
            ty = GgmlType::Q6_K;
        }
    } else if target == QuantizeTarget::Q4KM
        && (name.contains("attn_v.weight") || name.contains("ffn_down"))
        && layer.is_some_and(more_bits)
    {
        ty = GgmlType::Q6_K;
    }
    if !row_len.is_multiple_of(ty.block_size()) {
        ty = match ty {
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q5_K => GgmlType::Q5_1,
            GgmlType::Q6_K => GgmlType::Q8_0,
            _ => GgmlType::F16,
        };
        if !row_len.is_multiple_of(ty.block_size()) {
            ty = GgmlType::F16;
        }
    }
    ty
}

/// The GGUF name of a Hugging Face LLaMA tensor (`convert_hf_to_gguf.py`'s mapping), or `None` for
/// names that are not part of a LLaMA model.
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let short = match part {
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.weight"))
}

/// `llama-quantize`'s tensor order: by layer (tensors outside blocks first), then by name.
fn llama_quantize_order(name: &str) -> (i64, String) {
    let layer = name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse::<i64>().ok());
    (layer.unwrap_or(-1), name.to_string())
}

/// The rows of a q or k projection (whole heads of `head_dim` rows of `cols`), from Hugging Face
/// order (each head's first rotary halves, then its second) to GGUF's interleaved order:
/// `convert_hf_to_gguf.py`'s `permute`, `w.reshape(heads, 2, head_dim / 2, cols).swapaxes(1, 2)`.
pub fn permute_rows_for_gguf(hf_rows: &[f32], cols: usize, head_dim: usize) -> Vec<f32> {
    reorder_rows_within_heads(hf_rows, cols, head_dim, true)
}

/// The inverse of [`permute_rows_for_gguf`]: GGUF's interleaved rows back to Hugging Face order.
pub fn unpermute_rows_from_gguf(gguf_rows: &[f32], cols: usize, head_dim: usize) -> Vec<f32> {
    reorder_rows_within_heads(gguf_rows, cols, head_dim, false)
}

/// Row `j * head_dim / 2 + i` of each Hugging Face head is row `2 * i + j` of the GGUF head.
fn reorder_rows_within_heads(rows: &[f32], cols: usize, head_dim: usize, to_gguf: bool) -> Vec<f32> {
    let mut out = vec![0.0f32; rows.len()];
    let half = head_dim / 2;
    for (head_in, head_out) in rows.chunks_exact(head_dim * cols).zip(out.chunks_exact_mut(head_dim * cols)) {
        for i in 0..half {
            for j in 0..2 {
                let (hf, gguf) = ((j * half + i) * cols, (2 * i + j) * cols);
                let (from, to) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                head_out[to..to + cols].copy_from_slice(&head_in[from..from + cols]);
            }
        }
    }
    out
}

/// One `vicuna quantize` run.
#[derive(Clone, Debug)]
pub struct QuantizeRequest {
    /// A Hugging Face folder, or a GGUF file with float tensors.
    pub model: PathBuf,
    pub target: QuantizeTarget,
    /// The vocabulary to embed; required for a folder, taken from the file for a GGUF.
    pub vocab: Option<GgufVocab>,
    /// `general.name` (default: the source's folder or file name).
    pub name: Option<String>,
    pub out: PathBuf,
    pub force: bool,
    pub threads: usize,
}

/// Where the f32 values of the tensors come from.
enum Source {
    Folder(Checkpoint),
    Gguf(GgufFile),
    /// `vicuna synth`'s random weights (seed), keyed by the folder's tensor order.
    Synth(u64),
}

/// A tensor to write and how to get its rows.
struct Planned {
    plan: GgufTensorPlan,
    /// The tensor's name in the source (Hugging Face name, or GGUF name).
    source_name: String,
    /// For folder and synth sources: index in the folder's natural order (synth's generator key).
    source_index: u64,
    /// q and k projections from Hugging Face order: the head size, to permute rows within heads.
    permute_head_dim: Option<usize>,
}

/// Quantizes `request.model` into `request.out`.
pub fn run_quantize(request: &QuantizeRequest, control: &mut JobControl) -> Result<Manifest> {
    let model = &request.model;
    if model.is_dir() {
        let config = LlamaConfig::from_dir(model)?;
        let checkpoint = Checkpoint::open(model)?;
        checkpoint.check_against(&config)?;
        let Some(vocab) = &request.vocab else {
            bail!("no vocabulary for {}: the GGUF needs the model's tokenizer", model.display());
        };
        let name = request.name.clone().unwrap_or_else(|| display_name(model));
        let metadata = llama_metadata(&config, &name, request.target, vocab, &model.display().to_string())?;
        let planned = plan_from_config(&config, request.target);
        write_gguf(
            &Source::Folder(checkpoint),
            "quantize",
            planned,
            &metadata,
            &request.out,
            request.force,
            request.threads,
            control,
        )
    } else if model.is_file() {
        let file = GgufFile::open(model)?;
        if request.vocab.is_some() {
            bail!("a GGUF source carries its own vocabulary; do not pass another one for {}", model.display());
        }
        let config = file.llama_config()?;
        let planned = plan_from_gguf(&file, &config, request.target)?;
        let mut metadata: Vec<(String, GgufValue)> = file
            .metadata()
            .iter()
            .filter(|(k, _)| {
                !matches!(k.as_str(), "general.file_type" | "general.quantization_version" | "general.alignment")
            })
            .cloned()
            .collect();
        if let Some(name) = &request.name {
            metadata.retain(|(k, _)| k != "general.name");
            metadata.push(("general.name".into(), GgufValue::String(name.clone())));
        }
        metadata.push(("general.file_type".into(), GgufValue::U32(request.target.file_type())));
        metadata.push(("general.quantization_version".into(), GgufValue::U32(2)));
        let source = Source::Gguf(file);
        write_gguf(&source, "quantize", planned, &metadata, &request.out, request.force, request.threads, control)
    } else {
        bail!("--model {} does not exist; pass a Hugging Face model folder or a .gguf file", model.display())
    }
}

/// `vicuna synth` into a GGUF: `request`'s shape with its random weights (the values `vicuna synth`
/// writes into a folder with the same seed), converted to `target`, with `vocab`.
pub fn run_synth_gguf(
    request: &SynthRequest,
    target: QuantizeTarget,
    vocab: &GgufVocab,
    control: &mut JobControl,
) -> Result<Manifest> {
    let config_json = request.shape.config_json(request.vocab, DType::F32);
    let config = LlamaConfig::from_json_value(&config_json, "synth config")?;
    let name = format!("vicuna-synth-{:?}", request.shape).to_lowercase();
    let metadata = llama_metadata(&config, &name, target, vocab, "synth")?;
    let planned = plan_from_config(&config, target);
    let source = Source::Synth(request.seed);
    write_gguf(&source, "synth", planned, &metadata, &request.out, request.force, request.threads, control)
}

fn display_name(path: &Path) -> String {
    path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "llama".into())
}

/// The metadata `convert_hf_to_gguf.py` writes for a LLaMA model, with `general.file_type` and
/// `general.quantization_version` as `llama-quantize` sets them.
fn llama_metadata(
    config: &LlamaConfig,
    name: &str,
    target: QuantizeTarget,
    vocab: &GgufVocab,
    source: &str,
) -> Result<Vec<(String, GgufValue)>> {
    vocab.validate(source)?;
    if vocab.tokens.len() != config.vocab_size {
        bail!(
            "{source}: the tokenizer has {} tokens but the model's vocabulary is {}; llama.cpp needs one token per embedding row — use the model's own tokenizer",
            vocab.tokens.len(),
            config.vocab_size
        );
    }
    if config.head_dim * config.num_attention_heads != config.hidden_size {
        bail!("{source}: head_dim {} × {} heads differs from hidden_size {}; llama.cpp's llama architecture cannot express it", config.head_dim, config.num_attention_heads, config.hidden_size);
    }
    let u32_of = |what: &str, v: usize| {
        u32::try_from(v)
            .map(GgufValue::U32)
            .map_err(|_| Error::new(format!("{source}: {what} {v} does not fit GGUF's uint32")))
    };
    let mut out = vec![
        ("general.architecture".to_string(), GgufValue::String("llama".into())),
        ("general.type".to_string(), GgufValue::String("model".into())),
        ("general.name".to_string(), GgufValue::String(name.to_string())),
        ("llama.block_count".to_string(), u32_of("num_hidden_layers", config.num_hidden_layers)?),
        ("llama.context_length".to_string(), u32_of("max_position_embeddings", config.max_position_embeddings)?),
        ("llama.embedding_length".to_string(), u32_of("hidden_size", config.hidden_size)?),
        ("llama.feed_forward_length".to_string(), u32_of("intermediate_size", config.intermediate_size)?),
        ("llama.attention.head_count".to_string(), u32_of("num_attention_heads", config.num_attention_heads)?),
        ("llama.attention.head_count_kv".to_string(), u32_of("num_key_value_heads", config.num_key_value_heads)?),
        ("llama.rope.freq_base".to_string(), GgufValue::F32(config.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon".to_string(), GgufValue::F32(config.rms_norm_eps as f32)),
        ("general.file_type".to_string(), GgufValue::U32(target.file_type())),
        ("llama.vocab_size".to_string(), u32_of("vocab_size", config.vocab_size)?),
        ("llama.rope.dimension_count".to_string(), u32_of("head_dim", config.head_dim)?),
    ];
    if let Some(scaling) = config.rope_scaling.as_ref().filter(|v| !v.is_null()) {
        let kind = scaling.get("type").or_else(|| scaling.get("rope_type")).and_then(|v| v.as_str());
        match (kind, scaling.get("factor").and_then(|v| v.as_f64())) {
            (Some("linear"), Some(factor)) => {
                out.push(("llama.rope.scaling.type".into(), GgufValue::String("linear".into())));
                out.push(("llama.rope.scaling.factor".into(), GgufValue::F32(factor as f32)));
            }
            _ => bail!("{source}: rope_scaling {scaling} is not supported (only linear scaling is)"),
        }
    }
    out.extend(vocab.metadata());
    out.push(("general.quantization_version".to_string(), GgufValue::U32(2)));
    Ok(out)
}

/// The tensors of `config` in GGUF names, types and order.
fn plan_from_config(config: &LlamaConfig, target: QuantizeTarget) -> Vec<Planned> {
    let mut hf = config.expected_shapes();
    hf.sort_by_cached_key(|(name, _)| natural_key(name));
    let has_output = !config.tie_word_embeddings;
    let mut planned: Vec<Planned> = hf
        .into_iter()
        .enumerate()
        .map(|(index, (hf_name, shape))| {
            let name = gguf_tensor_name(&hf_name).expect("expected_shapes names LLaMA tensors");
            let dims: Vec<usize> = shape.iter().rev().copied().collect();
            let permute = hf_name.ends_with("q_proj.weight") || hf_name.ends_with("k_proj.weight");
            Planned {
                plan: GgufTensorPlan {
                    ty: tensor_type(target, &name, &dims, config.num_hidden_layers, has_output),
                    name,
                    dims,
                },
                source_name: hf_name,
                source_index: index as u64,
                permute_head_dim: permute.then_some(config.head_dim),
            }
        })
        .collect();
    planned.sort_by_cached_key(|p| llama_quantize_order(&p.plan.name));
    planned
}

/// The tensors of a float GGUF, checked against its config, requantized to `target`.
fn plan_from_gguf(file: &GgufFile, config: &LlamaConfig, target: QuantizeTarget) -> Result<Vec<Planned>> {
    let shown = file.path().display();
    let mut planned = plan_from_config(config, target);
    let mut problems = Vec::new();
    for p in &mut planned {
        p.source_name = p.plan.name.clone();
        p.permute_head_dim = None; // already in GGUF's order
        match file.tensor(&p.plan.name) {
            None => problems.push(format!("{} is missing", p.plan.name)),
            Some(t) if t.dims != p.plan.dims => {
                problems.push(format!("{} has dims {:?}, the metadata implies {:?}", t.name, t.dims, p.plan.dims))
            }
            Some(t) if t.ty.is_quantized() => problems.push(format!(
                "{} is already quantized ({}); requantizing loses quality — quantize from the f16/f32 model",
                t.name, t.ty
            )),
            Some(_) => {}
        }
    }
    for t in file.tensors() {
        if !planned.iter().any(|p| p.plan.name == t.name) {
            problems.push(format!("unexpected tensor {}", t.name));
        }
    }
    if !problems.is_empty() {
        bail!("{shown} cannot be quantized: {}", problems.join("; "));
    }
    Ok(planned)
}

/// Elements converted per chunk: small enough to bound memory, large enough to keep threads busy.
const CHUNK_ELEMENTS: usize = 1 << 20;

/// Writes the planned tensors, converted from `source`, into the GGUF file `out`; `phase` names the
/// job in the progress display.
#[allow(clippy::too_many_arguments)] // one private call per job kind
fn write_gguf(
    source: &Source,
    phase: &str,
    planned: Vec<Planned>,
    metadata: &[(String, GgufValue)],
    out: &Path,
    force: bool,
    threads: usize,
    control: &mut JobControl,
) -> Result<Manifest> {
    let staged = StagedFile::create(out, force)?;
    let (dir, name) = staged.dir_and_name();
    let plans: Vec<GgufTensorPlan> = planned.iter().map(|p| p.plan.clone()).collect();
    let writer = GgufWriter::create(dir, name, metadata, plans)?; // checks every plan's size first
    let total: u64 = planned.iter().map(|p| p.plan.byte_len() as u64).sum();
    control.progress.phase(phase, total);
    let mut bytes_read = 0u64;
    let written = write_in_background(writer, |sink| {
        for p in &planned {
            let row_len = p.plan.dims[0];
            let rows: usize = p.plan.dims[1..].iter().product();
            let row_bytes = row_size(p.plan.ty, row_len).expect("tensor_type gives whole blocks");
            let unit = p.permute_head_dim.unwrap_or(1);
            let chunk_rows = (CHUNK_ELEMENTS / row_len.max(1)).max(1).next_multiple_of(unit);
            let mut start = 0;
            while start < rows {
                control.check_cancel(out)?;
                let end = (start + chunk_rows).min(rows);
                let (values, read) = read_rows(source, p, start..end, threads)?;
                bytes_read += read;
                let mut buffer = sink.buffer((end - start) * row_bytes);
                quantize_rows(p.plan.ty, &values, row_len, &mut buffer, threads)
                    .map_err(|e| Error::new(format!("cannot convert tensor {} to {}: {e}", p.plan.name, p.plan.ty)))?;
                control.progress.advance(buffer.len() as u64);
                sink.send(buffer)?;
                start = end;
            }
        }
        Ok(())
    })?;
    control.check_cancel(out)?;
    let target = staged.target().to_path_buf();
    staged.commit()?;
    Ok(Manifest { target, files: vec![written], tensors: planned.len(), bytes_read, verified: false })
}

/// Rows `rows` of a planned tensor as f32, in GGUF order, and the bytes read for them.
fn read_rows(source: &Source, p: &Planned, rows: std::ops::Range<usize>, threads: usize) -> Result<(Vec<f32>, u64)> {
    let row_len = p.plan.dims[0];
    let numel: usize = p.plan.dims.iter().product();
    let (values, read) = match source {
        Source::Folder(checkpoint) => {
            let info = checkpoint.info(&p.source_name).expect("checked against the config");
            let es = info.dtype.size_in_bytes();
            let mut bytes = vec![0u8; rows.len() * row_len * es];
            checkpoint.read_bytes_at(&p.source_name, rows.start * row_len * es, &mut bytes)?;
            let mut values = Vec::with_capacity(rows.len() * row_len);
            extend_f32_from_le_bytes(info.dtype, &bytes, &mut values);
            (values, bytes.len() as u64)
        }
        Source::Synth(seed) => {
            let is_norm = p.source_name.ends_with("norm.weight");
            let elements = rows.start * row_len..rows.end * row_len;
            (random_range_parallel(*seed, p.source_index, is_norm, numel, elements, threads), 0)
        }
        Source::Gguf(file) => {
            let t = file.tensor(&p.source_name).expect("checked when planned");
            let row_bytes = row_size(t.ty, row_len).expect("the reader checked whole blocks");
            let data = &t.data[rows.start * row_bytes..rows.end * row_bytes];
            let mut values = vec![0.0f32; rows.len() * row_len];
            for (src, dst) in data.chunks_exact(row_bytes).zip(values.chunks_exact_mut(row_len)) {
                dequantize_row(t.ty, src, dst)
                    .map_err(|e| Error::new(format!("{}: tensor {}: {e}", file.path().display(), t.name)))?;
            }
            file.release(data)?;
            (values, data.len() as u64)
        }
    };
    let values = match p.permute_head_dim {
        Some(head_dim) => permute_rows_for_gguf(&values, row_len, head_dim),
        None => values,
    };
    Ok((values, read))
}

/// Quantizes whole rows, split among `threads` threads.
fn quantize_rows(
    ty: GgmlType,
    values: &[f32],
    row_len: usize,
    out: &mut [u8],
    threads: usize,
) -> std::result::Result<(), String> {
    let rows = values.len() / row_len.max(1);
    let row_bytes = out.len() / rows.max(1);
    let per_thread = rows.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = values
            .chunks(per_thread * row_len)
            .zip(out.chunks_mut(per_thread * row_bytes))
            .map(|(src, dst)| {
                scope.spawn(move || {
                    for (s, d) in src.chunks_exact(row_len).zip(dst.chunks_exact_mut(row_bytes)) {
                        quantize_row(ty, s, d).map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|_| Err("a quantizing thread panicked".into())))
    })
}
