//! LoRA adapters (Hu et al. 2021) for the native model, as PEFT saves them: a folder with `adapter_config.json` and
//! `adapter_model.safetensors` (what `vicuna train sft --lora-rank R` writes, or peft's `save_pretrained`).
//!
//! An adapted projection computes `x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ` with `A: [r, in]` and `B: [out, r]`: the base product is
//! shared by every row of a step, and each sequence's rows add their own adapter's term (see
//! [`QuantLlama::forward_ragged`](super::QuantLlama::forward_ragged)), so one batch mixes adapters and the base on
//! one copy of the base weights, whatever their type. The adapter's math is f32, on the kernels' f32 product.
//!
//! Tensors are named as PEFT names them, `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`. As the
//! model's q and k rows are in GGUF's interleaved RoPE order, the rows of B for q_proj and k_proj are permuted the
//! same way when loading (`P·(W + s·B·A) = P·W + s·(P·B)·A`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;
use vicuna_kernels::{GgmlType, QuantMatrix};
use vicuna_weights::{permute_rows_for_gguf, Checkpoint, LlamaConfig};

use crate::{Error, Result};

/// The projections of a LLaMA layer an adapter may target, by their Hugging Face (PEFT `target_modules`) names.
pub const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// One of [`PROJECTIONS`], by index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Projection {
    Q = 0,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    fn from_index(i: usize) -> Projection {
        [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down][i]
    }

    fn name(self) -> &'static str {
        PROJECTIONS[self as usize]
    }

    /// The module holding it in a Hugging Face LLaMA layer.
    fn module(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            _ => "mlp",
        }
    }

    /// `(out, in)` of its weight under `config`.
    fn shape(self, c: &LlamaConfig) -> (usize, usize) {
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let (q_dim, kv_dim) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        match self {
            Self::Q => (q_dim, h),
            Self::K | Self::V => (kv_dim, h),
            Self::O => (h, q_dim),
            Self::Gate | Self::Up => (inter, h),
            Self::Down => (h, inter),
        }
    }
}

/// The two factors of one adapted projection, as f32 little-endian bytes (what the kernels' f32 product reads).
struct Pair {
    /// `[rank, in]`.
    a: Vec<u8>,
    /// `[out, rank]`, rows in the model's order (q and k: GGUF's).
    b: Vec<u8>,
    in_dim: usize,
    out_dim: usize,
}

/// A LoRA adapter checked against a base model's shapes.
pub struct LoraAdapter {
    id: u64,
    rank: usize,
    /// `lora_alpha / r` (or `/ √r` with rsLoRA).
    scale: f32,
    targets: Vec<String>,
    /// `layers[l][p]`: the factors of projection `p` of layer `l`, if the adapter changes it.
    layers: Vec<[Option<Pair>; 7]>,
    /// Shapes of the base it was checked against: `(layers, hidden, intermediate, q_dim, kv_dim)`.
    base: (usize, usize, usize, usize, usize),
}

/// Source of adapter ids: every adapter loaded gets a new one, so caches of an adapter unloaded and loaded again
/// under the same name are never taken for the new one's.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn base_shape(c: &LlamaConfig) -> (usize, usize, usize, usize, usize) {
    let (q_dim, kv_dim) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    (c.num_hidden_layers, c.hidden_size, c.intermediate_size, q_dim, kv_dim)
}

impl LoraAdapter {
    /// Reads a PEFT adapter folder and checks it against the base model's `config`: LoRA with no bias, DoRA or
    /// per-module ranks; every tensor a LoRA factor of a projection named in `target_modules`, of the base's shape
    /// at rank `r`; every targeted projection of every layer present. Errors name the folder and say what to do.
    pub fn load(dir: &Path, config: &LlamaConfig) -> Result<LoraAdapter> {
        let d = dir.display();
        if !dir.is_dir() {
            return Err(Error::msg(format!(
                "LoRA adapter {d}: no such folder; give the folder holding adapter_config.json and \
                 adapter_model.safetensors (what `vicuna train sft --lora-rank R` writes)"
            )));
        }
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| Error::msg(format!("LoRA adapter {d}: cannot read adapter_config.json ({e})")))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::msg(format!("LoRA adapter {d}: adapter_config.json is not valid JSON ({e})")))?;
        let spec = Spec::parse(&json).map_err(|m| Error::msg(format!("LoRA adapter {d}: adapter_config.json: {m}")))?;
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.is_file() {
            return Err(Error::msg(format!(
                "LoRA adapter {d}: adapter_model.safetensors is missing{}",
                if dir.join("adapter_model.bin").is_file() {
                    " (only adapter_model.bin is there: save the adapter with safetensors)"
                } else {
                    ""
                }
            )));
        }
        let checkpoint = Checkpoint::open_safetensors(&weights_path)?;
        Self::from_checkpoint(&spec, &checkpoint, config).map_err(|m| Error::msg(format!("LoRA adapter {d}: {m}")))
    }

    fn from_checkpoint(
        spec: &Spec,
        checkpoint: &Checkpoint,
        config: &LlamaConfig,
    ) -> std::result::Result<Self, String> {
        let n_layers = config.num_hidden_layers;
        let mut factors: Vec<[[Option<Vec<f32>>; 2]; 7]> = (0..n_layers).map(|_| Default::default()).collect();
        for name in checkpoint.names() {
            let (layer, projection, factor) = parse_name(name).ok_or_else(|| {
                format!("tensor {name} is not a LoRA factor of a LLaMA projection (…layers.N.self_attn.q_proj.lora_A.weight)")
            })?;
            if layer >= n_layers {
                return Err(format!(
                    "tensor {name} is for layer {layer}, but the base model has {n_layers} layers: the adapter was \
                     trained on another base model"
                ));
            }
            if !spec.targets.iter().any(|t| t == projection.name()) {
                return Err(format!(
                    "tensor {name} adapts {}, which target_modules ({}) does not name",
                    projection.name(),
                    spec.targets.join(", ")
                ));
            }
            let shape = &checkpoint.info(name).expect("listed by names()").shape;
            let (out_dim, in_dim) = projection.shape(config);
            let (expected, rank_at) = if factor == 0 { ([spec.rank, in_dim], 0) } else { ([out_dim, spec.rank], 1) };
            if shape.len() == 2 && shape[rank_at] != spec.rank && shape[1 - rank_at] == expected[1 - rank_at] {
                return Err(format!(
                    "tensor {name} has rank {} but adapter_config.json says r = {}: the files do not belong together",
                    shape[rank_at], spec.rank
                ));
            }
            if shape[..] != expected {
                return Err(format!(
                    "tensor {name} has shape {shape:?}, but the base model's {} needs {expected:?} at rank {}: the \
                     adapter was trained on another base model",
                    projection.name(),
                    spec.rank
                ));
            }
            factors[layer][projection as usize][factor] =
                Some(checkpoint.to_f32(name).map_err(|e| format!("tensor {name}: {e}"))?);
        }
        let mut layers = Vec::with_capacity(n_layers);
        let mut adapted = 0;
        for (l, layer) in factors.into_iter().enumerate() {
            let wanted = spec.layers.as_ref().is_none_or(|ls| ls.contains(&l));
            let mut pairs: [Option<Pair>; 7] = Default::default();
            for (p, [a, b]) in layer.into_iter().enumerate() {
                let projection = Projection::from_index(p);
                let targeted = wanted && spec.targets.iter().any(|t| t == projection.name());
                let tensor = |f: &str| format!("{}.lora_{f}.weight", hf_stem(l, projection));
                match (a, b) {
                    (Some(a), Some(mut b)) => {
                        let (out_dim, in_dim) = projection.shape(config);
                        if matches!(projection, Projection::Q | Projection::K) {
                            b = permute_rows_for_gguf(&b, spec.rank, config.head_dim);
                        }
                        pairs[p] = Some(Pair { a: f32_bytes(&a), b: f32_bytes(&b), in_dim, out_dim });
                        adapted += 1;
                    }
                    (None, None) if !targeted => {}
                    (Some(_), None) => return Err(format!("tensor {} is missing", tensor("B"))),
                    (None, _) => return Err(format!("tensor {} is missing", tensor("A"))),
                }
            }
            layers.push(pairs);
        }
        if adapted == 0 {
            return Err("adapter_model.safetensors holds no LoRA factors".into());
        }
        Ok(LoraAdapter {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            rank: spec.rank,
            scale: spec.scale as f32,
            targets: spec.targets.clone(),
            layers,
            base: base_shape(config),
        })
    }

    /// Unique to this adapter among all loaded in the process (never 0, which stands for the base model).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The projections it adapts (PEFT's `target_modules`).
    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    /// Whether it was checked against a base of `config`'s shapes.
    pub fn fits(&self, config: &LlamaConfig) -> bool {
        self.base == base_shape(config)
    }

    /// Adds this adapter's term `scale·(x·Aᵀ)·Bᵀ` for projection `p` of layer `l` to `out` (`rows × out`), with
    /// `x` the projection's input rows (`rows × in`); nothing if the adapter leaves that projection alone.
    pub(crate) fn add_to(
        &self,
        l: usize,
        p: Projection,
        x: &[f32],
        rows: usize,
        out: &mut [f32],
        pool: &vicuna_kernels::ThreadPool,
    ) -> Result<()> {
        let Some(pair) = self.layers.get(l).and_then(|layer| layer[p as usize].as_ref()) else { return Ok(()) };
        let a = QuantMatrix::new(GgmlType::F32, self.rank, pair.in_dim, &pair.a)?;
        let b = QuantMatrix::new(GgmlType::F32, pair.out_dim, self.rank, &pair.b)?;
        let mut low = vec![0.0; rows * self.rank];
        vicuna_kernels::matmul(&a, x, rows, &mut low, pool)?;
        low.iter_mut().for_each(|v| *v *= self.scale);
        let mut delta = vec![0.0; rows * pair.out_dim];
        vicuna_kernels::matmul(&b, &low, rows, &mut delta, pool)?;
        super::add(out, &delta);
        Ok(())
    }
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapter")
            .field("id", &self.id)
            .field("rank", &self.rank)
            .field("targets", &self.targets)
            .finish()
    }
}

/// What `adapter_config.json` says, as far as serving needs.
struct Spec {
    rank: usize,
    scale: f64,
    targets: Vec<String>,
    /// PEFT's `layers_to_transform` (`None`: every layer).
    layers: Option<Vec<usize>>,
}

impl Spec {
    fn parse(json: &Value) -> std::result::Result<Spec, String> {
        let field = |key: &str| json.get(key).filter(|v| !v.is_null());
        if let Some(kind) = field("peft_type") {
            if kind.as_str() != Some("LORA") {
                return Err(format!("peft_type is {kind}, only LORA adapters can be served"));
            }
        }
        let rank = match field("r").and_then(Value::as_u64) {
            Some(r) if r > 0 => r as usize,
            _ => return Err("`r` (the rank) must be a positive integer".into()),
        };
        let alpha = match field("lora_alpha") {
            None => 8.0, // PEFT's default
            Some(v) => v.as_f64().ok_or("`lora_alpha` must be a number")?,
        };
        for (key, why) in [("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layers")] {
            if field(key).and_then(Value::as_bool) == Some(true) {
                return Err(format!("{why} is not supported; train a plain LoRA adapter"));
            }
        }
        if let Some(bias) = field("bias").and_then(Value::as_str).filter(|b| *b != "none") {
            return Err(format!("bias {bias:?} is not supported: only bias \"none\" adapters (LLaMA has no biases)"));
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if field(key).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
                return Err(format!("`{key}` (per-module ranks) is not supported: give every module rank r"));
            }
        }
        if field("modules_to_save").and_then(Value::as_array).is_some_and(|m| !m.is_empty()) {
            return Err("`modules_to_save` (fully trained modules) is not supported: merge such an adapter".into());
        }
        let targets: Vec<String> = match field("target_modules") {
            Some(Value::Array(list)) => list
                .iter()
                .map(|t| t.as_str().map(str::to_string).ok_or("`target_modules` must hold names"))
                .collect::<std::result::Result<_, _>>()?,
            // PEFT's shorthand for every linear layer but the output one.
            Some(Value::String(one)) if one == "all-linear" => PROJECTIONS.iter().map(|p| p.to_string()).collect(),
            Some(Value::String(one)) => vec![one.clone()],
            _ => {
                return Err(
                    "`target_modules` is missing: name the adapted projections, e.g. [\"q_proj\", \"v_proj\"]".into()
                )
            }
        };
        if let Some(bad) = targets.iter().find(|t| !PROJECTIONS.contains(&t.as_str())) {
            return Err(format!(
                "target module {bad:?} is not a LLaMA projection; adapters may target {}",
                PROJECTIONS.join(", ")
            ));
        }
        let layers = match field("layers_to_transform") {
            None => None,
            Some(Value::Number(n)) => {
                Some(vec![n.as_u64().ok_or("`layers_to_transform` must be layer indices")? as usize])
            }
            Some(Value::Array(list)) => Some(
                list.iter()
                    .map(|v| v.as_u64().map(|n| n as usize).ok_or("`layers_to_transform` must be layer indices"))
                    .collect::<std::result::Result<_, _>>()?,
            ),
            Some(_) => return Err("`layers_to_transform` must be layer indices".into()),
        };
        let rslora = field("use_rslora").and_then(Value::as_bool) == Some(true);
        let scale = if rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 };
        Ok(Spec { rank, scale, targets, layers })
    }
}

/// `model.layers.N.MODULE.PROJ` of a layer's projection.
fn hf_stem(layer: usize, p: Projection) -> String {
    format!("base_model.model.model.layers.{layer}.{}.{}", p.module(), p.name())
}

/// `(layer, projection, 0 for A / 1 for B)` of a PEFT tensor name (`base_model.model.` prefix optional).
fn parse_name(name: &str) -> Option<(usize, Projection, usize)> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name).strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let (module, rest) = rest.split_once('.')?;
    let (projection, factor) = rest.split_once('.')?;
    let p = Projection::from_index(PROJECTIONS.iter().position(|&n| n == projection)?);
    if p.module() != module {
        return None;
    }
    let factor = match factor {
        "lora_A.weight" => 0,
        "lora_B.weight" => 1,
        _ => return None,
    };
    Some((layer, p, factor))
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
