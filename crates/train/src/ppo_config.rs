//! The PPO run's settings: trlX's key names, the StableVicuna card's values as defaults, read from
//! a small YAML file (sections such as `train:` / `method:` / `gen_kwargs:` may group the keys;
//! only the leaf keys count) and overridden by `--key value` flags. One table of keys serves both.

use std::path::PathBuf;

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

/// Every key, with what it means (shown by `vicuna train ppo --help`).
pub const KEYS: &[(&str, &str)] = &[
    ("model_path", "policy model folder (also the frozen reference)"),
    ("tokenizer_path", "tokenizer file, when the model folder has none"),
    ("reward_model_path", "reward model folder (from `vicuna train rm`)"),
    ("prompts_path", "JSONL prompts (any data format)"),
    ("checkpoint_dir", "output folder"),
    ("seed", "random seed"),
    ("epochs", "rollout-and-learn cycles"),
    ("total_steps", "optimizer steps at most"),
    ("batch_size", "rollouts per PPO minibatch"),
    ("seq_length", "longest prompt + response in tokens"),
    ("checkpoint_interval", "cycles between checkpoints"),
    ("skip_bad_rows", "skip bad prompt rows"),
    ("lr", "learning rate"),
    ("eta_min", "cosine floor (null: constant lr)"),
    ("betas", "AdamW betas [b1, b2]"),
    ("eps", "AdamW eps"),
    ("weight_decay", "AdamW weight decay"),
    ("max_grad_norm", "gradient-norm clip (0: off)"),
    ("lora_rank", "train LoRA adapters of this rank (null: full)"),
    ("lora_alpha", "LoRA alpha"),
    ("lora_targets", "LoRA target projections"),
    ("num_rollouts", "rollouts per cycle"),
    ("chunk_size", "prompts generated together"),
    ("ppo_epochs", "updates per minibatch"),
    ("init_kl_coef", "initial KL coefficient"),
    ("target", "target KL (null: fixed coefficient)"),
    ("horizon", "KL controller horizon"),
    ("gamma", "discount"),
    ("lam", "GAE lambda"),
    ("cliprange", "policy ratio clip"),
    ("cliprange_value", "value clip"),
    ("vf_coef", "value loss weight"),
    ("scale_reward", "none, running or ref"),
    ("cliprange_reward", "score clip (null: off)"),
    ("max_length", "prompt + response length at most (null: max_new_tokens)"),
    ("min_length", "EOS banned until prompt + response are this long"),
    ("max_new_tokens", "response length at most (over max_length)"),
    ("min_new_tokens", "EOS banned before this many response tokens"),
    ("top_k", "top-k (0: off)"),
    ("top_p", "nucleus mass"),
    ("temperature", "sampling temperature"),
    ("do_sample", "sample (false: greedy)"),
];

fn is_null(v: &str) -> bool {
    matches!(v, "null" | "None" | "none" | "~" | "")
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    if v.len() >= 2 && ((v.starts_with('"') && v.ends_with('"')) || (v.starts_with('\'') && v.ends_with('\''))) {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

fn list(v: &str) -> Vec<String> {
    let v = v.trim();
    let inner = v.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(v);
    inner.split(',').map(|s| unquote(s).to_string()).filter(|s| !s.is_empty()).collect()
}

fn num<T: std::str::FromStr>(key: &str, v: &str) -> std::result::Result<T, String> {
    // YAML writes 1.0e-6 and 1e-6 alike; integers may be written as 1.0e4.
    v.parse::<T>().or_else(|_| {
        v.parse::<f64>()
            .ok()
            .filter(|f| f.fract() == 0.0)
            .and_then(|f| format!("{}", f as i64).parse::<T>().ok())
            .ok_or_else(|| format!("`{key}` must be a number, found {v:?}"))
    })
}

fn boolean(key: &str, v: &str) -> std::result::Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(format!("`{key}` must be true or false, found {v:?}")),
    }
}

impl PpoConfig {
    /// Set one key from its text (a YAML value or a flag's argument).
    pub fn set(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
        let key = key.replace('-', "_");
        let v = unquote(value);
        let opt_f64 = |v: &str| -> std::result::Result<Option<f64>, String> {
            if is_null(v) {
                Ok(None)
            } else {
                num::<f64>(&key, v).map(Some)
            }
        };
        match key.as_str() {
            "model_path" => self.model_path = v.into(),
            "tokenizer_path" => self.tokenizer_path = (!is_null(v)).then(|| v.into()),
            "reward_model_path" => self.reward_model_path = v.into(),
            "prompts_path" => self.prompts_path = v.into(),
            "checkpoint_dir" => self.checkpoint_dir = v.into(),
            "seed" => self.seed = num(&key, v)?,
            "epochs" => self.epochs = num(&key, v)?,
            "total_steps" => self.total_steps = num(&key, v)?,
            "batch_size" => self.batch_size = num(&key, v)?,
            "seq_length" => self.seq_length = num(&key, v)?,
            "checkpoint_interval" => self.checkpoint_interval = num(&key, v)?,
            "skip_bad_rows" => self.skip_bad_rows = boolean(&key, v)?,
            "lr" => self.lr = num(&key, v)?,
            "eta_min" => self.eta_min = opt_f64(v)?,
            "betas" => {
                let parts = list(v);
                let [b1, b2] = parts.as_slice() else {
                    return Err(format!("`betas` must be a list of two numbers, found {v:?}"));
                };
                self.betas = (num(&key, b1)?, num(&key, b2)?);
            }
            "eps" => self.eps = num(&key, v)?,
            "weight_decay" => self.weight_decay = num(&key, v)?,
            "max_grad_norm" => self.max_grad_norm = num(&key, v)?,
            "lora_rank" => self.lora_rank = if is_null(v) { None } else { Some(num(&key, v)?) },
            "lora_alpha" => self.lora_alpha = num(&key, v)?,
            "lora_targets" => self.lora_targets = list(v),
            "num_rollouts" => self.num_rollouts = num(&key, v)?,
            "chunk_size" => self.chunk_size = num(&key, v)?,
            "ppo_epochs" => self.ppo_epochs = num(&key, v)?,
            "init_kl_coef" => self.init_kl_coef = num(&key, v)?,
            "target" => self.target = opt_f64(v)?,
            "horizon" => self.horizon = num(&key, v)?,
            "gamma" => self.gamma = num(&key, v)?,
            "lam" => self.lam = num(&key, v)?,
            "cliprange" => self.cliprange = num(&key, v)?,
            "cliprange_value" => self.cliprange_value = num(&key, v)?,
            "vf_coef" => self.vf_coef = num(&key, v)?,
            "scale_reward" => {
                self.scale_reward = RewardScaling::parse(v)
                    .ok_or_else(|| format!("`scale_reward` must be null, running or ref, found {v:?}"))?
            }
            "cliprange_reward" => self.cliprange_reward = opt_f64(v)?.filter(|&c| c != 0.0),
            "max_length" => self.max_length = if is_null(v) { None } else { Some(num(&key, v)?) },
            "min_length" => self.min_length = if is_null(v) { None } else { Some(num(&key, v)?) },
            "max_new_tokens" => self.max_new_tokens = if is_null(v) { None } else { Some(num(&key, v)?) },
            "min_new_tokens" => self.min_new_tokens = num(&key, v)?,
            "top_k" => self.top_k = num(&key, v)?,
            "top_p" => self.top_p = num(&key, v)?,
            "temperature" => self.temperature = num(&key, v)?,
            "do_sample" => self.do_sample = boolean(&key, v)?,
            _ => {
                return Err(format!(
                    "unknown key `{key}`; known keys: {}",
                    KEYS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
                ))
            }
        }
        Ok(())
    }

    /// Apply a YAML file: `key: value` lines, optionally grouped under `section:` lines; `#`
    /// starts a comment. Errors name the file and line.
    pub fn apply_yaml(&mut self, text: &str, file: &str) -> Result<()> {
        for (index, raw) in text.lines().enumerate() {
            let line = strip_comment(raw);
            if line.trim().is_empty() || line.trim() == "---" {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                bail!("{file}:{}: expected `key: value`, found {:?}", index + 1, raw.trim());
            };
            let (key, value) = (key.trim(), value.trim());
            if value.is_empty() {
                continue; // a section header
            }
            self.set(key, value).map_err(|e| Error::new(format!("{file}:{}: {e}", index + 1)))?;
        }
        Ok(())
    }

    /// Apply `--key value` / `--key=value` pairs.
    pub fn apply_flags(&mut self, args: &[String]) -> Result<()> {
        let mut i = 0;
        while i < args.len() {
            let Some(flag) = args[i].strip_prefix("--") else {
                bail!("expected a --key value flag, found {:?}", args[i]);
            };
            let (key, value) = match flag.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => {
                    i += 1;
                    let Some(v) = args.get(i) else {
                        bail!("--{flag} needs a value");
                    };
                    (flag.to_string(), v.clone())
                }
            };
            self.set(&key, &value).map_err(|e| Error::new(format!("--{key}: {e}")))?;
            i += 1;
        }
        Ok(())
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

fn strip_comment(line: &str) -> String {
    let mut out = String::new();
    let mut quote = None;
    for c in line.chars() {
        match (c, quote) {
            ('#', None) => break,
            ('"' | '\'', None) => quote = Some(c),
            (q, Some(open)) if q == open => quote = None,
            _ => {}
        }
        out.push(c);
    }
    out
}
