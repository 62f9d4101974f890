//! `config.json` of a Hugging Face LLaMA folder.
//!
//! The JSON is read field by field (rather than through a derived deserializer) so that
//! every complaint can name the file AND the field: "config.json: field `hidden_size`
//! must be a non-negative integer, found "64"" is actionable, serde's "invalid type at
//! line 7 column 20" is not. Defaults follow transformers' `LlamaConfig`, including the
//! fields that 2023 configs (StableVicuna era, transformers 4.28) do not have yet.

use crate::error::{bail, Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::Path;

/// The hyper-parameters of a `LlamaForCausalLM`, with transformers' field names.
///
/// Optional fields of the file are resolved here, once: `num_key_value_heads` and `head_dim`
/// always hold the effective value, `eos_token_id` the first id when the file has a list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Value")]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Absent in 2023 configs: then equal to `num_attention_heads` (plain multi-head attention).
    pub num_key_value_heads: usize,
    /// Absent in older configs: then `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// Absent in 2023 configs: then 10000.0, the value LLaMA 1 and 2 were trained with.
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub bos_token_id: u32,
    /// The first id when the file lists several (newer generation configs do).
    pub eos_token_id: u32,
    pub tie_word_embeddings: bool,
    /// `rope_scaling` as written (null / absent → None); vicuna's model code can refuse
    /// scaled variants it does not implement instead of silently computing the wrong RoPE.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// The dtype the weights were saved in, under its pre-4.56 name ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// ... and under its current name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
}

impl LlamaConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<LlamaConfig> {
        if !dir.is_dir() {
            bail!(
                "model folder {} does not exist or is not a folder; pass the folder that holds config.json and the weights",
                dir.display()
            );
        }
        let path = dir.join("config.json");
        if !path.exists() {
            bail!(
                "{} is missing; a model folder needs the config.json of its Hugging Face repository next to the weights",
                path.display()
            );
        }
        LlamaConfig::from_file(&path)
    }

    /// Reads and validates one config file.
    pub fn from_file(path: &Path) -> Result<LlamaConfig> {
        let text = std::fs::read(path).map_err(|e| Error::new(format!("cannot read {}: {e}", path.display())))?;
        let text = String::from_utf8(text)
            .map_err(|_| Error::new(format!("{} is not UTF-8 text; it should be a JSON file", path.display())))?;
        LlamaConfig::from_json_str(&text, &path.display().to_string())
    }

    /// Parses config JSON; `source` names it in messages (usually the file's path).
    pub fn from_json_str(json: &str, source: &str) -> Result<LlamaConfig> {
        let value: Value = serde_json::from_str(json).map_err(|e| {
            Error::new(format!("{source} is not valid JSON ({e}); restore it from the model's Hugging Face repository"))
        })?;
        LlamaConfig::from_json_value(&value, source)
    }

    /// Reads the fields from already-parsed JSON and validates them.
    pub fn from_json_value(value: &Value, source: &str) -> Result<LlamaConfig> {
        let Some(map) = value.as_object() else {
            bail!("{source} must hold a JSON object, found {}", kind_of(value));
        };
        let f = Fields { map, source };

        let architectures = f.string_list("architectures")?;
        let model_type = f.opt_string("model_type")?;
        let is_llama = model_type.as_deref() == Some("llama") || architectures.iter().any(|a| a == "LlamaForCausalLM");
        if !is_llama {
            let what = if !architectures.is_empty() {
                architectures.join(", ")
            } else if let Some(t) = &model_type {
                format!("(model_type {t:?})")
            } else {
                "(neither `architectures` nor `model_type` is set)".to_string()
            };
            bail!("{source}: architecture {what} is not LLaMA; vicuna runs LlamaForCausalLM models");
        }

        let hidden_size = f.positive("hidden_size", None)?;
        let num_attention_heads = f.positive("num_attention_heads", None)?;
        let num_key_value_heads = f.positive("num_key_value_heads", Some(num_attention_heads))?;
        if hidden_size % num_attention_heads != 0 {
            bail!(
                "{source}: hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}; \
                 a LLaMA layer splits the hidden state evenly among its heads"
            );
        }
        if num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "{source}: num_attention_heads {num_attention_heads} is not divisible by num_key_value_heads \
                 {num_key_value_heads}; each key/value head must serve the same number of query heads"
            );
        }
        let config = LlamaConfig {
            vocab_size: f.positive("vocab_size", None)?,
            hidden_size,
            intermediate_size: f.positive("intermediate_size", None)?,
            num_hidden_layers: f.positive("num_hidden_layers", None)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim: f.positive("head_dim", Some(hidden_size / num_attention_heads))?,
            rms_norm_eps: f.positive_float("rms_norm_eps", 1e-6)?,
            rope_theta: f.positive_float("rope_theta", 10000.0)?,
            max_position_embeddings: f.positive("max_position_embeddings", Some(2048))?,
            bos_token_id: f.token_id("bos_token_id", 1)?,
            eos_token_id: f.token_id("eos_token_id", 2)?,
            tie_word_embeddings: f.boolean("tie_word_embeddings", false)?,
            rope_scaling: f.get("rope_scaling").cloned(),
            torch_dtype: f.opt_string("torch_dtype")?,
            dtype: f.opt_string("dtype")?,
            architectures,
            model_type,
        };
        Ok(config)
    }

    /// The dtype the config says the weights were saved in (`dtype`, else `torch_dtype`).
    pub fn saved_dtype(&self) -> Option<&str> {
        self.dtype.as_deref().or(self.torch_dtype.as_deref())
    }

    /// The tensors of a `LlamaForCausalLM` with this config: Hugging Face names and shapes.
    /// Linear weights are PyTorch's `[out_features, in_features]`.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let inter = self.intermediate_size;
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab_size, h])];
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![inter, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![inter, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, inter]));
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }
}

impl TryFrom<Value> for LlamaConfig {
    type Error = Error;
    fn try_from(value: Value) -> Result<LlamaConfig> {
        LlamaConfig::from_json_value(&value, "config.json")
    }
}

/// Typed access to the fields of one JSON object, with messages naming source and field.
/// A field that is `null` counts as absent (transformers writes nulls for unset options).
struct Fields<'a> {
    map: &'a Map<String, Value>,
    source: &'a str,
}

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn wrong(&self, name: &str, expected: &str, found: &Value) -> Error {
        Error::new(format!("{}: field `{name}` must be {expected}, found {}", self.source, short(found)))
    }

    /// A required (default `None`) or optional integer that must be > 0.
    fn positive(&self, name: &str, default: Option<usize>) -> Result<usize> {
        let Some(v) = self.get(name) else {
            return default.ok_or_else(|| {
                Error::new(format!(
                    "{}: required field `{name}` is missing; restore config.json from the model's Hugging Face repository",
                    self.source
                ))
            });
        };
        match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if n > 0 => Ok(n),
            _ => Err(self.wrong(name, "a positive integer", v)),
        }
    }

    fn positive_float(&self, name: &str, default: f64) -> Result<f64> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => match v.as_f64() {
                Some(x) if x > 0.0 && x.is_finite() => Ok(x),
                _ => Err(self.wrong(name, "a positive number", v)),
            },
        }
    }

    /// A token id: an integer, or (newer configs) a list of them of which the first counts.
    fn token_id(&self, name: &str, default: u32) -> Result<u32> {
        let Some(v) = self.get(name) else {
            return Ok(default);
        };
        let first = match v {
            Value::Array(items) => items.first(),
            other => Some(other),
        };
        first
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.wrong(name, "a token id (an integer or a list of integers)", v))
    }

    fn boolean(&self, name: &str, default: bool) -> Result<bool> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.wrong(name, "true or false", v)),
        }
    }

    fn opt_string(&self, name: &str) -> Result<Option<String>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| self.wrong(name, "a string", v)),
        }
    }

    fn string_list(&self, name: &str) -> Result<Vec<String>> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_str().map(str::to_string).ok_or_else(|| self.wrong(name, "a list of strings", item))
                })
                .collect(),
            Some(v) => Err(self.wrong(name, "a list of strings", v)),
        }
    }
}

/// A JSON value for a message: short, and never the whole of a big object.
fn short(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() <= 40 {
        text
    } else {
        kind_of(v).to_string()
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
