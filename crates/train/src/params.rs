//! A LLaMA whose weights are training variables: every weight (full fine-tuning) or only LoRA
//! adapters beside frozen weights. The forward pass is always the model crate's `Llama`, built
//! from these tensors, so training and inference run the very same code.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use vicuna_engine::Rng;
use vicuna_model::Llama;
use vicuna_weights::{Checkpoint, LlamaConfig};

use crate::error::{bail, Error, Result};
use crate::io::{write_json_atomic, write_safetensors_as, write_safetensors_atomic};

/// LoRA (Hu et al. 2021): `W + (alpha/r)·B·A` for the target projections, `A: [r, in]` with
/// PEFT's Kaiming-uniform start, `B: [out, r]` starting at zero so training starts from `W`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Projection names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub targets: Vec<String>,
}

const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

impl LoraSpec {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("--lora-rank must be at least 1");
        }
        if self.targets.is_empty() {
            bail!("--lora-targets names no projection; give e.g. q_proj,v_proj");
        }
        for t in &self.targets {
            if !PROJECTIONS.contains(&t.as_str()) {
                bail!("--lora-targets: unknown projection {t:?}; choose from {}", PROJECTIONS.join(", "));
            }
        }
        Ok(())
    }

    fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    fn targets_weight(&self, name: &str) -> bool {
        name.starts_with("model.layers.") && self.targets.iter().any(|t| name.ends_with(&format!(".{t}.weight")))
    }
}

/// One LoRA adapter pair for the weight it is named after.
struct Adapter {
    a: Var,
    b: Var,
}

/// Weights for training: the config, frozen tensors, and the variables the optimizer updates.
pub struct TrainableLlama {
    pub config: LlamaConfig,
    device: Device,
    /// Every weight by Hugging Face name. For full fine-tuning these are the variables' tensors
    /// (sharing storage, so optimizer updates show through).
    weights: HashMap<String, Tensor>,
    /// Full fine-tuning: one variable per weight, in `expected_shapes` order.
    full: Vec<(String, Var)>,
    lora: Option<(LoraSpec, Vec<(String, Adapter)>)>,
}

impl TrainableLlama {
    /// Load a model folder in f32. With `lora`, the weights stay frozen and adapters are created
    /// (A drawn from `seed`); without it every weight becomes a variable.
    pub fn load(dir: &Path, lora: Option<LoraSpec>, seed: u64, device: &Device) -> Result<Self> {
        let config = LlamaConfig::from_dir(dir)?;
        let checkpoint = Checkpoint::open(dir)?;
        checkpoint.check_against(&config)?;
        let mut weights = HashMap::new();
        for (name, shape) in config.expected_shapes() {
            let data = checkpoint.to_f32(&name)?;
            weights.insert(name, Tensor::from_vec(data, shape, device)?);
        }
        Self::from_weights(config, weights, lora, seed, device)
    }

    /// Build from tensors already in memory (names as `LlamaConfig::expected_shapes`).
    pub fn from_weights(
        config: LlamaConfig,
        mut weights: HashMap<String, Tensor>,
        lora: Option<LoraSpec>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut full = Vec::new();
        let lora = match lora {
            None => {
                for (name, _) in config.expected_shapes() {
                    let t = weights.get(&name).ok_or_else(|| Error::new(format!("weight {name} is missing")))?;
                    let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
                    weights.insert(name.clone(), var.as_tensor().clone());
                    full.push((name, var));
                }
                None
            }
            Some(spec) => {
                spec.validate()?;
                let mut rng = Rng::new(seed);
                let mut adapters = Vec::new();
                for (name, shape) in config.expected_shapes() {
                    if !spec.targets_weight(&name) {
                        continue;
                    }
                    let (out_dim, in_dim) = (shape[0], shape[1]);
                    // PEFT: kaiming_uniform_(a=√5) on A, i.e. U(−1/√in, 1/√in); B = 0.
                    let bound = 1.0 / (in_dim as f64).sqrt();
                    let a: Vec<f32> =
                        (0..spec.rank * in_dim).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
                    let a = Var::from_tensor(&Tensor::from_vec(a, (spec.rank, in_dim), device)?)?;
                    let b = Var::zeros((out_dim, spec.rank), DType::F32, device)?;
                    adapters.push((name, Adapter { a, b }));
                }
                Some((spec, adapters))
            }
        };
        Ok(TrainableLlama { config, device: device.clone(), weights, full, lora })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The variables the optimizer updates, with stable names (LoRA: PEFT's `…lora_A.weight`).
    pub fn vars(&self) -> Vec<(String, Var)> {
        match &self.lora {
            None => self.full.clone(),
            Some((_, adapters)) => adapters
                .iter()
                .flat_map(|(name, ad)| {
                    let stem = name.trim_end_matches(".weight");
                    [(format!("{stem}.lora_A.weight"), ad.a.clone()), (format!("{stem}.lora_B.weight"), ad.b.clone())]
                })
                .collect(),
        }
    }

    /// The weight the forward pass uses for `name`: frozen or variable, plus the LoRA update.
    fn effective(&self, name: &str) -> Result<Tensor> {
        let w = self.weights.get(name).ok_or_else(|| Error::new(format!("weight {name} is missing")))?;
        if let Some((spec, adapters)) = &self.lora {
            if let Some((_, ad)) = adapters.iter().find(|(n, _)| n == name) {
                let delta = (ad.b.as_tensor().matmul(ad.a.as_tensor())? * spec.scale())?;
                return Ok((w + delta)?);
            }
        }
        Ok(w.clone())
    }

    /// The model for a forward pass. Build it again after each optimizer step when LoRA is on
    /// (the adapted weights are computed here); full fine-tuning tensors update in place.
    pub fn model(&self) -> Result<Llama> {
        Ok(Llama::new(&self.config, &self.device, |name, _| self.effective(name).map_err(to_model_error))?)
    }

    /// The model with no gradient tracking (for generation and scoring without backprop).
    pub fn frozen_model(&self) -> Result<Llama> {
        Ok(Llama::new(&self.config, &self.device, |name, _| {
            self.effective(name).map(|t| t.detach()).map_err(to_model_error)
        })?)
    }

    /// Every weight with LoRA folded in (`W + (alpha/r)·B·A`), by Hugging Face name.
    pub fn merged_weights(&self) -> Result<Vec<(String, Tensor)>> {
        self.config
            .expected_shapes()
            .into_iter()
            .map(|(name, _)| Ok((name.clone(), self.effective(&name)?.detach())))
            .collect()
    }

    /// The weights as stored before any adapter (what an unmerged LoRA folder keeps).
    pub fn base_weights(&self) -> Vec<(String, Tensor)> {
        self.config
            .expected_shapes()
            .into_iter()
            .map(|(name, _)| (name.clone(), self.weights[&name].detach()))
            .collect()
    }

    /// Write a Hugging Face folder: `config.json` (from `source_config`, with `dtype`'s
    /// `torch_dtype`), `model.safetensors` in `dtype`, and for an unmerged LoRA run
    /// `adapter_model.safetensors` (f32) with PEFT's `adapter_config.json`. `merge` folds the
    /// adapters into the saved weights.
    pub fn save(&self, out: &Path, source_config: &Path, merge: bool, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| Error::new(format!("cannot create {}: {e}", out.display())))?;
        write_config_as(source_config, &out.join("config.json"), None, dtype)?;
        let weights = if merge || self.lora.is_none() { self.merged_weights()? } else { self.base_weights() };
        write_safetensors_as(&out.join("model.safetensors"), &weights, dtype)?;
        if let (Some((spec, _)), false) = (&self.lora, merge) {
            let adapters: Vec<(String, Tensor)> = self
                .vars()
                .into_iter()
                .map(|(name, var)| (format!("base_model.model.{name}"), var.as_detached_tensor()))
                .collect();
            write_safetensors_atomic(&out.join("adapter_model.safetensors"), &adapters)?;
            let peft = serde_json::json!({
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": spec.rank,
                "lora_alpha": spec.alpha,
                "lora_dropout": 0.0,
                "bias": "none",
                "target_modules": spec.targets,
            });
            write_json_atomic(&out.join("adapter_config.json"), &peft)?;
        }
        Ok(())
    }

    /// Overwrite the variables with saved values (resuming a run).
    pub fn load_vars(&self, saved: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.vars() {
            let t = saved.get(&name).ok_or_else(|| Error::new(format!("checkpoint has no tensor {name}")))?;
            var.set(t)?;
        }
        Ok(())
    }
}

/// Back into the model crate's error, keeping the wrapped error where it has a variant for it.
fn to_model_error(e: Error) -> vicuna_model::Error {
    match e {
        Error::Model(e) => e,
        Error::Weights(e) => e.into(),
        Error::Tensor(e) => e.into(),
        other => vicuna_model::Error::msg(other.to_string()),
    }
}

/// Copy `config.json`, declaring float32 weights and optionally replacing fields.
pub fn write_config(source: &Path, dest: &Path, overrides: Option<&serde_json::Value>) -> Result<()> {
    write_config_as(source, dest, overrides, DType::F32)
}

/// Copy `config.json`, declaring `dtype` weights and optionally replacing fields.
pub fn write_config_as(source: &Path, dest: &Path, overrides: Option<&serde_json::Value>, dtype: DType) -> Result<()> {
    let torch_dtype = match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F32 => "float32",
        other => bail!("weights are saved as f32, f16 or bf16, not {other:?}"),
    };
    let text =
        std::fs::read_to_string(source).map_err(|e| Error::new(format!("cannot read {}: {e}", source.display())))?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::new(format!("{} is not valid JSON ({e})", source.display())))?;
    let Some(map) = json.as_object_mut() else {
        bail!("{} must hold a JSON object", source.display());
    };
    // transformers reads `torch_dtype` (v4) or `dtype` (v5): always the first, the second where the source has it.
    map.insert("torch_dtype".to_string(), torch_dtype.into());
    if map.contains_key("dtype") {
        map.insert("dtype".to_string(), torch_dtype.into());
    }
    if let Some(serde_json::Value::Object(extra)) = overrides {
        for (k, v) in extra {
            map.insert(k.clone(), v.clone());
        }
    }
    write_json_atomic(dest, &json)
}
