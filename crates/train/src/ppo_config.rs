//! The PPO run's settings: trlX's key names, the StableVicuna card's values as defaults, read from
//! a YAML file (by `serde_yaml_ng`; sections such as `train:` / `method:` / `gen_kwargs:` may group
//! the keys, only the leaf keys count) and overridden by `--key value` flags. One list of keys
//! (`settings!` below) serves both, and the CLI makes its flags from it.

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_yaml_ng::Value;

use crate::error::{bail, Error, Result};
use crate::optim::AdamWParams;
use crate::params::LoraSpec;
use crate::ppo_math::RewardScaling;
use vicuna_engine::SamplingParams;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PpoConfig {
    // Where things are.
    pub model_path: PathBuf,
    /// A tokenizer file when the model folder has none.
    pub tokenizer_path: Option<PathBuf>,
    pub reward_model_path: PathBuf,
    /// JSONL prompts in any format `data::load` reads.
    pub prompts_path: PathBuf,
    /// Output folder: metrics.jsonl, checkpoint/, the final policy/.
    pub checkpoint_dir: PathBuf,
    // train:
    pub seed: u64,
    /// Rollout-and-learn cycles (trlX `train.epochs`).
    pub epochs: usize,
    /// Optimizer steps at most (trlX `train.total_steps`).
    pub total_steps: usize,
    /// Rollouts per PPO minibatch (trlX `train.batch_size`).
    pub batch_size: usize,
    /// Longest prompt + response, in tokens (trlX `train.seq_length`); prompts are cut from the left.
    pub seq_length: usize,
    /// Save a checkpoint every this many cycles (and always at the end).
    pub checkpoint_interval: usize,
    pub skip_bad_rows: bool,
    // optimizer / scheduler:
    pub lr: f64,
    /// Cosine decay floor over `total_steps` (trlX `scheduler.kwargs.eta_min`); None: constant.
    pub eta_min: Option<f64>,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// 0: no clipping (trlX's PPO does not clip).
    pub max_grad_norm: f64,
    pub lora_rank: Option<usize>,
    pub lora_alpha: f64,
    pub lora_targets: Vec<String>,
    // method: (trlX PPOConfig)
    pub num_rollouts: usize,
    pub chunk_size: usize,
    pub ppo_epochs: usize,
    pub init_kl_coef: f64,
    /// None: fixed KL coefficient.
    pub target: Option<f64>,
    pub horizon: f64,
    pub gamma: f64,
    pub lam: f64,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub scale_reward: RewardScaling,
    /// None or 0: no clipping.
    pub cliprange_reward: Option<f64>,
    // gen_kwargs, with transformers' meanings: `max_length` / `min_length` count the prompt too,
    // `max_new_tokens` / `min_new_tokens` only the response, and take precedence when set.
    /// Longest prompt + response (the card's `max_length`), unless `max_new_tokens` is set.
    pub max_length: Option<usize>,
    /// EOS is banned until prompt + response are this long (the card's `min_length`).
    pub min_length: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: usize,
    pub top_k: usize,
    pub top_p: f32,
    pub temperature: f32,
    pub do_sample: bool,
}

impl Default for PpoConfig {
    /// The StableVicuna card's PPO table where it gives a value, trlX's defaults elsewhere.
    fn default() -> Self {
        let adam = AdamWParams::default();
        PpoConfig {
            model_path: PathBuf::new(),
            tokenizer_path: None,
            reward_model_path: PathBuf::new(),
            prompts_path: PathBuf::new(),
            checkpoint_dir: PathBuf::from("ppo_out"),
            seed: 1000,
            epochs: 100,
            total_steps: 10000,
            batch_size: 16,
            seq_length: 1024,
            checkpoint_interval: 1,
            skip_bad_rows: false,
            lr: 1.0e-6,
            eta_min: None,
            betas: (adam.beta1, adam.beta2),
            eps: adam.eps,
            weight_decay: adam.weight_decay,
            max_grad_norm: 0.0,
            lora_rank: None,
            lora_alpha: 16.0,
            lora_targets: vec!["q_proj".into(), "v_proj".into()],
            num_rollouts: 128,
            chunk_size: 16,
            ppo_epochs: 4,
            init_kl_coef: 0.1,
            target: Some(6.0),
            horizon: 10000.0,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 1.0,
            scale_reward: RewardScaling::None,
            cliprange_reward: Some(10.0),
            max_length: Some(512),
            min_length: Some(48),
            max_new_tokens: None,
            min_new_tokens: 0,
            top_k: 0,
            top_p: 1.0,
            temperature: 1.0,
            do_sample: true,
        }
    }
}

/// One setting: its name (the flag is `--` and the name with dashes), the form of its value and what it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    /// What `--help` shows for the flag's value.
    pub value_name: &'static str,
    pub help: &'static str,
}

/// The one list of keys: the YAML file's leaf keys and the `--key value` flags are both read through it (the
/// compiler checks each type against the field).
macro_rules! settings {
    ($($key:ident: $ty:ty => $help:literal,)*) => {
        /// Every key, with what it means (shown by `vicuna train ppo --help`).
        pub const KEYS: &[Key] =
            &[$(Key { name: stringify!($key), value_name: <$ty as Setting>::VALUE_NAME, help: $help },)*];

        impl PpoConfig {
            /// Set `key` from a YAML value or a flag's text; `Ok(false)` when there is no such key.
            fn assign(&mut self, key: &str, input: Input) -> std::result::Result<bool, String> {
                match key {
                    $(stringify!($key) => self.$key = input.read::<$ty>().map_err(|e| format!("`{key}` {e}"))?,)*
                    _ => return Ok(false),
                }
                Ok(true)
            }
        }
    };
}

settings! {
    model_path: PathBuf => "policy model folder (also the frozen reference)",
    tokenizer_path: Option<PathBuf> => "tokenizer file, when the model folder has none",
    reward_model_path: PathBuf => "reward model folder (from `vicuna train rm`)",
    prompts_path: PathBuf => "JSONL prompts (any data format)",
    checkpoint_dir: PathBuf => "output folder",
    seed: u64 => "random seed",
    epochs: usize => "rollout-and-learn cycles",
    total_steps: usize => "optimizer steps at most",
    batch_size: usize => "rollouts per PPO minibatch",
    seq_length: usize => "longest prompt + response in tokens",
    checkpoint_interval: usize => "cycles between checkpoints",
    skip_bad_rows: bool => "skip bad prompt rows",
    lr: f64 => "learning rate",
    eta_min: Option<f64> => "cosine floor (null: constant lr)",
    betas: (f64, f64) => "AdamW betas",
    eps: f64 => "AdamW eps",
    weight_decay: f64 => "AdamW weight decay",
    max_grad_norm: f64 => "gradient-norm clip (0: off)",
    lora_rank: Option<usize> => "train LoRA adapters of this rank (null: full)",
    lora_alpha: f64 => "LoRA alpha",
    lora_targets: Vec<String> => "LoRA target projections",
    num_rollouts: usize => "rollouts per cycle",
    chunk_size: usize => "prompts generated together",
    ppo_epochs: usize => "updates per minibatch",
    init_kl_coef: f64 => "initial KL coefficient",
    target: Option<f64> => "target KL (null: fixed coefficient)",
    horizon: f64 => "KL controller horizon",
    gamma: f64 => "discount",
    lam: f64 => "GAE lambda",
    cliprange: f64 => "policy ratio clip",
    cliprange_value: f64 => "value clip",
    vf_coef: f64 => "value loss weight",
    scale_reward: RewardScaling => "divide scores by nothing, the running std or the first batch's",
    cliprange_reward: Option<f64> => "score clip (null or 0: off)",
    max_length: Option<usize> => "prompt + response length at most (null: max_new_tokens)",
    min_length: Option<usize> => "EOS banned until prompt + response are this long",
    max_new_tokens: Option<usize> => "response length at most (over max_length)",
    min_new_tokens: usize => "EOS banned before this many response tokens",
    top_k: usize => "top-k (0: off)",
    top_p: f32 => "nucleus mass",
    temperature: f32 => "sampling temperature",
    do_sample: bool => "sample (false: greedy)",
}

/// Where a value comes from: the YAML file (already parsed) or a flag's text.
#[derive(Clone, Copy)]
enum Input<'a> {
    Yaml(&'a Value),
    Flag(&'a str),
}

impl Input<'_> {
    fn read<T: Setting>(self) -> std::result::Result<T, String> {
        match self {
            Input::Yaml(v) => T::from_yaml(v),
            Input::Flag(text) => T::from_flag(text),
        }
    }
}

/// A setting's type: how a YAML value, or a flag's text, becomes it. Errors say what was expected and found,
/// after the key's name.
trait Setting: Sized {
    const VALUE_NAME: &'static str;
    fn from_yaml(v: &Value) -> std::result::Result<Self, String>;
    /// A flag's text is read as a YAML value (`null`, `1e-6`, `[0.9, 0.95]`, `true` …).
    fn from_flag(text: &str) -> std::result::Result<Self, String> {
        Self::from_yaml(&flag_value(text))
    }
}

fn flag_value(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// A value as an error message quotes it.
fn shown(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a section of keys".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

fn is_null(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => matches!(s.trim(), "None" | "none" | "null" | "~" | ""),
        _ => false,
    }
}

impl Setting for f64 {
    const VALUE_NAME: &'static str = "NUM";
    fn from_yaml(v: &Value) -> std::result::Result<Self, String> {
        v.as_f64().ok_or_else(|| format!("must be a number, found {}", shown(v)))
    }
}

impl Setting for f32 {
    const VALUE_NAME: &'static str = "NUM";
    fn from_yaml(v: &Value) -> std::result::Result<Self, String> {
        f64::from_yaml(v).map(|x| x as f32)
    }
}

impl Setting for u64 {
    const VALUE_NAME: &'static str = "N";
    fn from_yaml(v: &Value) -> std::result::Result<Self, String> {
        // An integer may be written as a float (1.0e4), as the old trlX configs do.
        v.as_u64()
            .or_else(|| {
                v.as_f64().filter(|f| f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(f)).map(|f| f as u64)
            })
            .ok_or_else(|| format!("must be a whole number ≥ 0, found {}", shown(v)))
    }
}

impl Setting for usize {
    const VALUE_NAME: &'static str = "N";
    fn from_yaml(v: &Value) -> std::result::Result<Self, String> {
        u64::from_yaml(v)?.try_into().map_err(|_| format!("is too large, found {}", shown(v)))
    }
}

impl Setting for bool {
    const VALUE_NAME: &'static str = "BOOL";
    fn from_yaml(v: &Value) -> std::result::Result<Self, String> {
        let text = match v {
            Value::Bool(b) => return Ok(*b),
            Value::String(s) => s.to_ascii_lowercase(),
            Value::Number(n) => n.to_string(),
            _ => String::new(),
        };
        match text.as_str() {
            "true" | "yes" | "1" => Ok(true),
            "false" | "no" | "0" => Ok(false),
            _ => Err(format!("must be true or false, found {}", shown(v))),
        }
    }
}

impl Setting for String {
    const VALUE_NAME: &'static str = "TEXT";
    fn from_yaml(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            _ => Err(format!("must be text, found {}", shown(v))),
        }
    }
}

impl Setting for PathBuf {
    const VALUE_NAME: &'static str = "PATH";
    /// null or "": unset.
    fn from_yaml(v: &Value) -> std::result::Result<Self, String> {
        if v.is_null() {
            return Ok(PathBuf::new());
        }
        String::from_yaml(v).map(PathBuf::from).map_err(|_| format!("must be a path, found {}", shown(v)))
    }
    /// A flag's path is taken as written.
    fn from_flag(text: &str) -> std::result::Result<Self, String> {
        Ok(text.into())
    }
}

impl<T: Setting> Setting for Option<T> {
    const VALUE_NAME: &'static str = T::VALUE_NAME;
    fn from_yaml(v: &Value) -> std::result::Result<Self, String> {
        if is_null(v) {
            Ok(None)
        } else {
            T::from_yaml(v).map(Some).map_err(|e| format!("{e} (or null)"))
        }
    }
    fn from_flag(text: &str) -> std::result::Result<Self, String> {
        if is_null(&Value::String(text.to_string())) {
            Ok(None)
        } else {
            T::from_flag(text).map(Some).map_err(|e| format!("{e} (or null)"))
        }
    }
}

/// A list in YAML (`[a, b]`), or written `a,b` (a flag's usual form).
fn list(v: &Value) -> Option<Vec<Value>> {
    match v {
        Value::Sequence(items) => Some(items.clone()),
        Value::String(s) => Some(s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(flag_value).collect()),
        _ => None,
    }
}

impl Setting for (f64, f64) {
    const VALUE_NAME: &'static str = "B1,B2";
    fn from_yaml(v: &Value) -> std::result::Result<Self, String> {
        let bad = || format!("must be a list of two numbers such as [0.9, 0.95], found {}", shown(v));
        match list(v).as_deref() {
            Some([a, b]) => Ok((a.as_f64().ok_or_else(bad)?, b.as_f64().ok_or_else(bad)?)),
            _ => Err(bad()),
        }
    }
}

impl Setting for Vec<String> {
    const VALUE_NAME: &'static str = "A,B,…";
    fn from_yaml(v: &Value) -> std::result::Result<Self, String> {
        let items = list(v).ok_or_else(|| format!("must be a list such as [q_proj, v_proj], found {}", shown(v)))?;
        items.iter().map(String::from_yaml).collect()
    }
}

impl Setting for RewardScaling {
    const VALUE_NAME: &'static str = "none|running|ref";
    fn from_yaml(v: &Value) -> std::result::Result<Self, String> {
        let text = if v.is_null() { "" } else { v.as_str().unwrap_or("?") };
        RewardScaling::parse(text).ok_or_else(|| format!("must be null, running or ref, found {}", shown(v)))
    }
}

fn unknown_key(key: &str) -> String {
    format!("unknown key `{key}`; known keys: {}", KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", "))
}

impl PpoConfig {
    /// Set one key from a flag's text (`--num-rollouts 64`: key `num_rollouts` or `num-rollouts`, text `64`).
    pub fn set(&mut self, key: &str, text: &str) -> std::result::Result<(), String> {
        self.set_from(&key.replace('-', "_"), Input::Flag(text))
    }

    fn set_from(&mut self, key: &str, input: Input) -> std::result::Result<(), String> {
        if !self.assign(key, input)? {
            return Err(unknown_key(key));
        }
        // A score clip of 0 is none, as in trlX.
        self.cliprange_reward = self.cliprange_reward.filter(|&c| c != 0.0);
        Ok(())
    }

    /// Apply a YAML file: `key: value` pairs, grouped under any sections (trlX's `train:`, `method:`,
    /// `gen_kwargs:` …; only the leaf keys count). Errors name the file and the value's line.
    pub fn apply_yaml(&mut self, text: &str, file: &str) -> Result<()> {
        let mut reader = Reader { config: self, failure: None };
        let result = Node { reader: &mut reader, key: None }.deserialize(serde_yaml_ng::Deserializer::from_str(text));
        result.map_err(|e| {
            // Our own message as we wrote it; the YAML parser's (a syntax error) as it says it.
            let what = reader.failure.take().unwrap_or_else(|| e.to_string());
            match e.location() {
                Some(at) => Error::new(format!("{file}:{}: {what}", at.line())),
                None => Error::new(format!("{file}: {what}")),
            }
        })
    }

    /// Refuse settings that cannot run, before any work.
    pub fn validate(&self) -> Result<()> {
        for (path, key) in [
            (&self.model_path, "model_path"),
            (&self.reward_model_path, "reward_model_path"),
            (&self.prompts_path, "prompts_path"),
        ] {
            if path.as_os_str().is_empty() {
                bail!("`{key}` is not set; give it in the config file or as --{}", key.replace('_', "-"));
            }
        }
        for (v, key) in [
            (self.batch_size, "batch_size"),
            (self.num_rollouts, "num_rollouts"),
            (self.chunk_size, "chunk_size"),
            (self.ppo_epochs, "ppo_epochs"),
            (self.max_new_tokens.unwrap_or(1), "max_new_tokens"),
            (self.max_length.unwrap_or(1), "max_length"),
            (self.checkpoint_interval, "checkpoint_interval"),
        ] {
            if v == 0 {
                bail!("`{key}` must be at least 1");
            }
        }
        match (self.max_new_tokens, self.max_length) {
            (None, None) => bail!("set `max_length` (prompt + response) or `max_new_tokens` (response)"),
            (Some(new), _) if self.seq_length <= new => {
                bail!("`seq_length` ({}) must exceed `max_new_tokens` ({new})", self.seq_length)
            }
            (None, Some(total)) if total < 2 || total > self.seq_length => {
                bail!("`max_length` ({total}) must be between 2 and `seq_length` ({})", self.seq_length)
            }
            _ => {}
        }
        // The rollouts' sampling goes through the engine's one check, as the CLI's and the server's do.
        if let Err(message) = self.sampling().validate(usize::MAX) {
            bail!("{message}");
        }
        if let Some(lora) = self.lora() {
            lora.validate()?;
        }
        Ok(())
    }

    /// Longest prompt a rollout keeps (longer ones lose their start): room for at least one new token.
    pub fn max_prompt_tokens(&self) -> usize {
        match (self.max_new_tokens, self.max_length) {
            (Some(new), _) => self.seq_length - new,
            (None, total) => total.unwrap_or(self.seq_length).min(self.seq_length) - 1,
        }
    }

    /// (max_new_tokens, min_new_tokens) of a rollout after a prompt of `prompt_len` tokens, as transformers
    /// reads `gen_kwargs`: the `*_new_tokens` keys if set, else `max_length` / `min_length` less the prompt.
    pub fn response_lengths(&self, prompt_len: usize) -> (usize, usize) {
        let max = self.max_new_tokens.unwrap_or_else(|| self.max_length.unwrap_or(0).saturating_sub(prompt_len).max(1));
        let from_min_length = self.min_length.unwrap_or(0).saturating_sub(prompt_len);
        let min = if self.min_new_tokens > 0 { self.min_new_tokens } else { from_min_length };
        (max, min.min(max))
    }

    /// How rollouts sample (trlX's `gen_kwargs`).
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            do_sample: self.do_sample,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            ..SamplingParams::default()
        }
    }

    pub fn lora(&self) -> Option<LoraSpec> {
        self.lora_rank.map(|rank| LoraSpec { rank, alpha: self.lora_alpha, targets: self.lora_targets.clone() })
    }

    pub fn adamw(&self) -> AdamWParams {
        AdamWParams { beta1: self.betas.0, beta2: self.betas.1, eps: self.eps, weight_decay: self.weight_decay }
    }

    /// Keys a resumed run may change: how long it goes on, and where it reads its inputs from.
    pub fn same_run_as(&self, other: &PpoConfig) -> bool {
        let strip = |c: &PpoConfig| PpoConfig {
            epochs: 0,
            total_steps: 0,
            checkpoint_interval: 0,
            model_path: PathBuf::new(),
            tokenizer_path: None,
            reward_model_path: PathBuf::new(),
            prompts_path: PathBuf::new(),
            checkpoint_dir: PathBuf::new(),
            ..c.clone()
        };
        strip(self) == strip(other)
    }
}

/// The YAML document being applied, and the message of the first failure (the parser adds the line).
struct Reader<'c> {
    config: &'c mut PpoConfig,
    failure: Option<String>,
}

/// One value of the document: under `key` (None: the document itself). A section's keys are applied one by
/// one as the parser reaches them, so every error points at its own line.
struct Node<'r, 'c> {
    reader: &'r mut Reader<'c>,
    key: Option<String>,
}

impl Node<'_, '_> {
    fn fail<E: de::Error>(self, message: String) -> std::result::Result<(), E> {
        let error = E::custom(&message);
        self.reader.failure = Some(message);
        Err(error)
    }

    fn leaf<E: de::Error>(self, value: Value) -> std::result::Result<(), E> {
        let Some(key) = &self.key else {
            return match value {
                Value::Null => Ok(()), // an empty file
                _ => self.fail(format!("expected `key: value` lines, found {}", shown(&value))),
            };
        };
        let message = match self.reader.config.set_from(key, Input::Yaml(&value)) {
            Ok(()) => return Ok(()),
            // `epochs 2` (no colon) under a section reads as the section's text.
            Err(_) if value.as_str().and_then(|s| s.split_whitespace().next()).is_some_and(is_key) => {
                format!("expected `key: value` under `{key}:`, found {}", shown(&value))
            }
            Err(message) => message,
        };
        self.fail(message)
    }
}

fn is_key(name: &str) -> bool {
    KEYS.iter().any(|k| k.name == name)
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> std::result::Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a setting's value or a section of `key: value` lines")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<(), E> {
        self.leaf(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<(), E> {
        self.leaf(Value::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<(), E> {
        self.leaf(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<(), E> {
        self.leaf(Value::Number(v.into()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<(), E> {
        self.leaf(Value::String(v.to_string()))
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<(), E> {
        self.leaf(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> std::result::Result<(), E> {
        self.leaf(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        self.leaf(Value::Sequence(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        if let Some(key) = self.key.as_deref().filter(|k| is_key(k)) {
            let message = format!("`{key}` takes a value, not a section of keys");
            return self.fail(message);
        }
        while let Some(key) = map.next_key::<String>()? {
            map.next_value_seed(Node { reader: &mut *self.reader, key: Some(key) })?;
        }
        Ok(())
    }
}
