//! Flags shared by the commands that load a model: the model folder, its tokenizer, the input.

use std::path::{Path, PathBuf};

use clap::Args;
use vicuna_engine::{check_tokenizer_fits, tokenizer_from_gguf, DraftLimits, DraftSource, Drafter, SamplingParams};
use vicuna_model::QuantLlama;
use vicuna_tokenizer::Tokenizer;
use vicuna_weights::hub::{resolve_model, HubKind};
use vicuna_weights::GgufFile;

use crate::output::Display;
use crate::Result;

/// A model input (`--model`, `--base`, `--lora` …) that may be a Hugging Face id (`ORG/NAME[/FILE][@REV]`): a
/// local path that exists is kept as it is; an id becomes its folder (or file) in the Hugging Face cache,
/// downloaded with a progress display when missing (`vicuna_weights::hub`); anything else is kept for the
/// command's own "no such folder" check.
pub fn resolve_input(flag: &str, path: &mut PathBuf, kind: HubKind, quiet: bool) -> Result<()> {
    let mut display = Display::new(quiet);
    let resolved = resolve_model(path, kind, &mut display);
    display.done();
    *path = resolved.map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    Ok(())
}

/// [`resolve_input`] for an optional flag.
pub fn resolve_optional(flag: &str, path: &mut Option<PathBuf>, kind: HubKind) -> Result<()> {
    match path {
        Some(path) => resolve_input(flag, path, kind, false),
        None => Ok(()),
    }
}

/// A `--tokenizer FILE` flag: an id fetches the repo's tokenizer files and becomes its tokenizer.model (else
/// tokenizer.json), the file the flag takes.
pub fn resolve_tokenizer(flag: &str, path: &mut Option<PathBuf>) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let given = path.clone();
    resolve_input(flag, path, HubKind::Tokenizer, false)?;
    if *path != given && path.is_dir() {
        if let Some(file) =
            ["tokenizer.model", "tokenizer.json"].iter().map(|name| path.join(name)).find(|f| f.is_file())
        {
            *path = file;
        }
    }
    Ok(())
}

/// Where the model and its tokenizer come from.
#[derive(Args)]
pub struct ModelArgs {
    /// A Hugging Face model folder (config.json plus safetensors or PyTorch .bin weights), or a GGUF file
    /// (f32, f16, q8_0, q4_0, k-quants …, as llama.cpp reads them), or a Hugging Face Hub id
    /// ORG/NAME[/FILE.gguf][@REV] (from the Hugging Face cache, downloaded into it when missing).
    #[arg(long)]
    pub model: PathBuf,
    /// A tokenizer file (tokenizer.model or tokenizer.json) to use instead of the model's own, or a Hugging Face
    /// Hub id whose tokenizer to use.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

impl ModelArgs {
    /// Hugging Face ids in `--model` and `--tokenizer` become local paths ([`resolve_input`]); `model_kind` is
    /// what `--model` must provide (a command that only tokenizes fetches only the tokenizer files).
    pub fn resolve_ids(&mut self, model_kind: HubKind) -> Result<()> {
        resolve_input("--model", &mut self.model, model_kind, false)?;
        resolve_tokenizer("--tokenizer", &mut self.tokenizer)
    }

    /// The tokenizer alone: `--tokenizer`, else the model's own (a GGUF file's `tokenizer.ggml.*`, a folder's
    /// tokenizer.model / tokenizer.json); `None` if a folder has none.
    pub fn tokenizer(&self) -> Result<Option<Tokenizer>> {
        self.check_exists()?;
        Ok(match &self.tokenizer {
            Some(file) => Some(Tokenizer::from_file(file)?),
            None if self.model.is_file() => Some(tokenizer_from_gguf(&GgufFile::open(&self.model)?)?),
            None => Tokenizer::from_dir(&self.model)?,
        })
    }

    pub fn require_tokenizer(&self) -> Result<Tokenizer> {
        self.tokenizer()?.ok_or_else(|| missing_tokenizer(&self.model))
    }

    /// The inference model on `threads` compute threads (default: every core), and its tokenizer (as
    /// [`ModelArgs::tokenizer`]), checked to belong together. A GGUF file is opened once for both.
    pub fn load(&self, threads: Option<usize>) -> Result<(QuantLlama, Option<Tokenizer>)> {
        self.check_exists()?;
        let start = std::time::Instant::now();
        let threads = compute_threads(threads);
        let (model, tokenizer) = match (&self.tokenizer, self.model.is_file()) {
            (None, true) => {
                let file = GgufFile::open(&self.model)?;
                let tokenizer = tokenizer_from_gguf(&file)?;
                (QuantLlama::from_gguf(file, threads)?, Some(tokenizer))
            }
            _ => (QuantLlama::load(&self.model, threads)?, self.tokenizer()?),
        };
        tracing::info!("loaded {} in {:.2?}", self.model.display(), start.elapsed());
        if let Some(tokenizer) = &tokenizer {
            check_tokenizer_fits(tokenizer, model.config().vocab_size, &self.model.display().to_string())?;
        }
        Ok((model, tokenizer))
    }

    /// [`ModelArgs::load`], for commands that cannot run without text.
    pub fn load_with_tokenizer(&self, threads: Option<usize>) -> Result<(QuantLlama, Tokenizer)> {
        let (model, tokenizer) = self.load(threads)?;
        Ok((model, tokenizer.ok_or_else(|| missing_tokenizer(&self.model))?))
    }

    fn check_exists(&self) -> Result<()> {
        if !self.model.exists() {
            return Err(format!(
                "--model {}: no such file or folder; give a Hugging Face model folder or a .gguf file",
                self.model.display()
            )
            .into());
        }
        Ok(())
    }
}

/// `--lora DIR` of the commands that run one model: a LoRA adapter every sequence runs with, on top of the
/// unchanged base weights (quantized or not).
#[derive(Args)]
pub struct LoraArgs {
    /// A LoRA adapter folder (adapter_config.json and adapter_model.safetensors, as `vicuna train sft
    /// --lora-rank R` or peft write them) or its Hugging Face Hub id, applied to --model without merging; it must
    /// fit the base's shapes.
    #[arg(long, value_name = "DIR")]
    pub lora: Option<PathBuf>,
}

impl LoraArgs {
    pub fn resolve_ids(&mut self) -> Result<()> {
        resolve_optional("--lora", &mut self.lora, HubKind::Model)
    }

    /// Makes `model` run the adapter, if one was given.
    pub fn apply(&self, model: &mut QuantLlama) -> Result<()> {
        if let Some(dir) = &self.lora {
            let adapter = model.load_lora(dir)?;
            model.set_lora(Some(std::sync::Arc::new(adapter)))?;
        }
        Ok(())
    }
}

/// Speculative decoding (`--draft-model`, `--lookup`): `generate`, `chat` and `serve`.
#[derive(Args)]
pub struct SpeculativeArgs {
    /// Speculative decoding with this draft model (a folder, GGUF file or Hub id with the model's vocabulary): it guesses
    /// tokens ahead and the model checks them all in one pass. Output is unchanged (greedy: the same tokens).
    #[arg(long, value_name = "MODEL", conflicts_with = "lookup")]
    pub draft_model: Option<PathBuf>,
    /// Speculative decoding by prompt lookup: guess that the text goes on as it did after the latest earlier
    /// occurrence of its last tokens (pays off when the answer copies the prompt). Output is unchanged.
    #[arg(long)]
    pub lookup: bool,
    /// Most tokens guessed per step.
    #[arg(long, default_value_t = 8)]
    pub draft_max: usize,
    /// Fewer guesses than this are not checked (the step decodes one token).
    #[arg(long, default_value_t = 1)]
    pub draft_min: usize,
    /// The draft model stops guessing at a token it gives less probability than this (llama.cpp's
    /// --draft-p-min; 0: always --draft-max guesses). Lookup ignores it.
    #[arg(long, default_value_t = 0.0)]
    pub draft_p_min: f32,
}

impl SpeculativeArgs {
    pub fn resolve_ids(&mut self) -> Result<()> {
        resolve_optional("--draft-model", &mut self.draft_model, HubKind::Model)
    }

    /// Whether decoding speculates (`--lookup` or `--draft-model`).
    pub fn speculates(&self) -> bool {
        self.lookup || self.draft_model.is_some()
    }

    /// The draft model, when one was given (checked against `target`'s vocabulary when the drafter is made).
    pub fn load_draft(&self, threads: Option<usize>) -> Result<Option<QuantLlama>> {
        self.limits()?;
        let Some(path) = &self.draft_model else { return Ok(None) };
        QuantLlama::load(path, compute_threads(threads))
            .map(Some)
            .map_err(|e| format!("--draft-model {}: {e}", path.display()).into())
    }

    /// The drafter for one generation (None without speculation).
    pub fn drafter<'m>(
        &self,
        draft: Option<&'m QuantLlama>,
        target: &QuantLlama,
        params: &SamplingParams,
        seed: u64,
    ) -> Result<Option<Drafter<'m>>> {
        let source = match (draft, &self.draft_model) {
            (Some(draft), Some(_)) => DraftSource::Model(draft),
            _ if self.lookup => DraftSource::Lookup,
            _ => return Ok(None),
        };
        let drafter =
            source.drafter(target, params.clone(), seed, self.limits()?).map_err(|e| match &self.draft_model {
                Some(path) => format!("--draft-model {}: {e}", path.display()),
                None => e.to_string(),
            })?;
        Ok(Some(drafter))
    }

    pub fn limits(&self) -> Result<DraftLimits> {
        Ok(DraftLimits { max: self.draft_max, min: self.draft_min, p_min: self.draft_p_min }.check()?)
    }
}

/// `--threads`, or every core the process may use.
pub fn compute_threads(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1)
}

/// The input text or ids of a command.
#[derive(Args)]
pub struct InputArgs {
    /// Token ids, comma separated, used exactly as given (no BOS added).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub ids: Option<Vec<u32>>,
}

pub fn missing_tokenizer(model: &Path) -> Box<dyn std::error::Error> {
    format!(
        "{} has no tokenizer (tokenizer.model or tokenizer.json): pass --tokenizer FILE, or give --ids",
        model.display()
    )
    .into()
}

/// The ids to run: `--ids` as given, or the text encoded with BOS.
pub fn input_ids(
    text: Option<&str>,
    ids: Option<Vec<u32>>,
    tokenizer: Option<&Tokenizer>,
    model: &Path,
) -> Result<Vec<u32>> {
    match (text, ids) {
        (_, Some(ids)) => Ok(ids),
        (Some(text), None) => match tokenizer {
            Some(t) => Ok(t.encode(text, true)),
            None => Err(missing_tokenizer(model)),
        },
        (None, None) => Err("give the input as text or as --ids".into()),
    }
}

/// The sampling flags of `generate` and `chat`. The defaults written here are `generate`'s; a
/// command that wants others overrides them on its own struct, e.g.
/// `#[command(mut_arg("temperature", |a| a.default_value("0.7")))]`, so `--help` shows them too.
#[derive(Args)]
pub struct SamplingArgs {
    /// Longest output, in new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Locally typical sampling mass (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub typical_p: f32,
    /// Penalize tokens already present (1.0 = off), as transformers does.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// OpenAI's presence penalty (-2..2): subtracted from every token generated so far.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty (-2..2): subtracted once per time a token was generated.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// ID=BIAS (repeatable): add BIAS (-100..100) to token ID's logit; -100 bans it.
    #[arg(long, value_name = "ID=BIAS", value_parser = parse_logit_bias, allow_hyphen_values = true)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Random seed; the same seed gives the same output (default: a new one each time).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Always pick the most likely token (no sampling).
    #[arg(long)]
    pub greedy: bool,
}

impl SamplingArgs {
    /// The engine's sampling parameters, checked by the engine's one validation (a bad value
    /// names its flag's setting); `vocab_size` is the model's.
    pub fn to_params(&self, vocab_size: usize) -> Result<SamplingParams> {
        let params = SamplingParams {
            do_sample: !self.greedy,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            typical_p: self.typical_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.clone(),
        };
        params.validate(vocab_size).map_err(|e| format!("--{}", e.replacen('_', "-", 1)))?;
        Ok(params)
    }
}

/// `ID=BIAS` of `--logit-bias`.
fn parse_logit_bias(text: &str) -> std::result::Result<(u32, f32), String> {
    let (id, bias) = text.split_once('=').ok_or_else(|| format!("`{text}` is not ID=BIAS (e.g. 13=-100)"))?;
    let id = id.trim().parse().map_err(|_| format!("`{id}` is not a token id"))?;
    let bias = bias.trim().parse().map_err(|_| format!("`{bias}` is not a number"))?;
    Ok((id, bias))
}
