//! `vicuna train sft|rm|ppo`, `vicuna reward` and `vicuna plot`: fine-tuning the card's way.

use std::path::{Path, PathBuf};

use crate::synth::DTypeArg;
use clap::{Arg, ArgMatches, Args, FromArgMatches, Subcommand};
use serde_json::json;
use vicuna_model::candle_core::Device;
use vicuna_train::data::{self, Conversation, Turn};
use vicuna_train::io::copy_tokenizer_files;
use vicuna_train::params::{LoraSpec, TrainableLlama};
use vicuna_train::ppo::{read_metrics, PpoTrainer};
use vicuna_train::ppo_config::{PpoConfig, KEYS};
use vicuna_train::reward::{reward_input, reward_input_text, train_rm, RewardModel, RmOptions};
use vicuna_train::sft::{pad_id, train_sft, SftOptions};

use crate::common::{resolve_input, resolve_tokenizer, ModelArgs};
use crate::Result;
use vicuna_weights::hub::HubKind;

#[derive(Args)]
pub struct TrainArgs {
    #[command(subcommand)]
    pub stage: Stage,
}

#[derive(Subcommand)]
pub enum Stage {
    /// Supervised fine-tuning on chat data (assistant tokens only), full or LoRA.
    Sft(SftArgs),
    /// Train a reward model (LLaMA trunk + scalar head) on preference pairs.
    Rm(RmArgs),
    /// PPO against a reward model, trlX's recipe (settings from a YAML file and flags).
    Ppo(PpoArgs),
}

/// Flags shared by the supervised stages.
#[derive(Args)]
pub struct DataArgs {
    /// JSONL data: Alpaca, OASST1 messages, HH-RLHF, SHP, {prompt, response}, {messages}…
    #[arg(long)]
    pub data: PathBuf,
    /// Skip rows that cannot be read (and report how many) instead of stopping.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Output model folder.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Share of the data held out to report the loss / accuracy before and after.
    #[arg(long, default_value_t = 0.05)]
    pub eval_fraction: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
}

#[derive(Args)]
pub struct SftArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Train LoRA adapters of this rank instead of every weight.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    pub lora_targets: Vec<String>,
    /// Fold the LoRA adapters into the saved weights.
    #[arg(long)]
    pub merge: bool,
    /// Element type of the saved weights (training keeps f32 master weights either way); f16 is
    /// what a base for `make-delta` / `apply-delta` is published in.
    #[arg(long, value_enum, default_value = "f32")]
    pub save_dtype: DTypeArg,
}

#[derive(Args)]
pub struct RmArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
}

#[derive(Args)]
pub struct PpoArgs {
    /// YAML settings (trlX key names; sections optional). Flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue from CHECKPOINT_DIR/checkpoint (only epochs, total_steps, paths may change).
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub keys: PpoKeyFlags,
}

/// One `--key value` flag per PPO setting, generated from the settings table.
pub struct PpoKeyFlags {
    pub values: Vec<(String, String)>,
}

impl FromArgMatches for PpoKeyFlags {
    fn from_arg_matches(matches: &ArgMatches) -> std::result::Result<Self, clap::Error> {
        let values = KEYS
            .iter()
            .filter_map(|key| matches.get_one::<String>(key.name).map(|v| (key.name.to_string(), v.clone())))
            .collect();
        Ok(PpoKeyFlags { values })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> std::result::Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for PpoKeyFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        KEYS.iter().fold(cmd, |cmd, key| {
            // clap wants `'static` names; the dashed spelling of each of the few keys is made once.
            let long: &'static str = Box::leak(key.name.replace('_', "-").into_boxed_str());
            cmd.arg(Arg::new(key.name).long(long).value_name(key.value_name).help(key.help))
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

#[derive(Args)]
pub struct RewardArgs {
    /// A reward model folder (from `vicuna train rm`).
    #[arg(long)]
    pub model: PathBuf,
    /// A tokenizer file, when the folder has none.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Text scored as given (BOS prepended).
    #[arg(long, conflicts_with_all = ["prompt", "response"], required_unless_present = "prompt")]
    pub text: Option<String>,
    /// A user message; with --response it is rendered as `### Human: …\n### Assistant: …\n`.
    #[arg(long, requires = "response")]
    pub prompt: Option<String>,
    #[arg(long)]
    pub response: Option<String>,
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct PlotArgs {
    /// metrics.jsonl of a PPO run.
    pub metrics: PathBuf,
    /// The PNG to write.
    #[arg(short, long)]
    pub output: PathBuf,
}

pub fn run_train(args: TrainArgs) -> Result<()> {
    keep_freed_memory();
    // The stage runs on a worker of the rayon pool its parallel loops use, so a loop does not hand its work to
    // another thread and wait for it (58M shape, 1 thread, Intel Xeon family 6 model 167: 281-291 -> 340
    // tokens/s).
    rayon::scope(|_| run_stage(args).map_err(|e| e.to_string())).map_err(Into::into)
}

fn run_stage(args: TrainArgs) -> Result<()> {
    match args.stage {
        Stage::Sft(a) => run_sft(a),
        Stage::Rm(a) => run_rm(a),
        Stage::Ppo(a) => run_ppo(a),
    }
}

/// Training allocates and frees tensors of tens to hundreds of megabytes at every step (logits over a 32000-token
/// vocabulary, activations, gradients). glibc hands blocks that large to `mmap` and returns them to the kernel
/// when freed, and trims the heap top the same way, so every step page-faults its memory back in: on a tiny model
/// that was more than half the run's time, in the kernel. Keeping freed memory for reuse cut a hidden-64 model's
/// SFT (bench/quant_quality.sh's run, 1 thread) from 325 s to 67 s, and its peak RSS on 40 rows from 2.7 to 0.6 GB.
/// Those thresholds govern the main arena only: the pool's workers would each get an arena of their own, whose
/// heaps hold no block over 64 MB and shrink when freed, so all threads share the main one (58M shape, 10 steps,
/// Intel Xeon family 6 model 167: 8.6 -> 8.0 s on 1 thread, 6.7 -> 5.8 s on 2). Called before the pool starts.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's thresholds; called before any training allocation.
    unsafe {
        const ONE_GIB: libc::c_int = 1 << 30;
        libc::mallopt(libc::M_MMAP_THRESHOLD, ONE_GIB);
        libc::mallopt(libc::M_TRIM_THRESHOLD, ONE_GIB);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn load_data(args: &DataArgs) -> Result<data::Dataset> {
    let data = data::load(&args.data, args.skip_bad_rows)?;
    if data.skipped_rows > 0 {
        eprintln!("skipped {} bad rows of {}", data.skipped_rows, args.data.display());
    }
    Ok(data)
}

/// Folder the tokenizer files are copied from: the --tokenizer file's, else the model's.
fn tokenizer_dir(model: &ModelArgs) -> PathBuf {
    match &model.tokenizer {
        Some(file) => file.parent().map(Path::to_path_buf).unwrap_or_default(),
        None => model.model.clone(),
    }
}

fn run_sft(args: SftArgs) -> Result<()> {
    let tokenizer = args.model.require_tokenizer()?;
    let data = load_data(&args.data)?;
    let conversations = data.sft_conversations();
    if conversations.is_empty() {
        return Err(format!("{} holds no conversations to train on", args.data.data.display()).into());
    }
    let lora = args.lora_rank.map(|rank| LoraSpec { rank, alpha: args.lora_alpha, targets: args.lora_targets.clone() });
    if args.merge && lora.is_none() {
        return Err("--merge needs --lora-rank: there are no adapters to fold in".into());
    }
    let d = &args.data;
    let model = TrainableLlama::load(&args.model.model, lora, d.seed, &Device::Cpu)?;
    let opts = SftOptions {
        epochs: d.epochs,
        lr: args.lr,
        batch_size: d.batch_size,
        grad_accum: args.grad_accum,
        max_seq_len: d.max_seq_len,
        warmup_steps: d.warmup_steps,
        seed: d.seed,
        max_grad_norm: d.max_grad_norm,
        eval_fraction: d.eval_fraction,
        adamw: vicuna_train::optim::AdamWParams { weight_decay: d.weight_decay, ..Default::default() },
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let report = train_sft(&model, &tokenizer, &conversations, &opts, |s| {
        eprintln!("step {} epoch {} loss {:.4} lr {:.3e} grad_norm {:.3}", s.step, s.epoch, s.loss, s.lr, s.grad_norm)
    })?;
    let train_seconds = started.elapsed().as_secs_f64();
    model.save(&d.out, &args.model.model.join("config.json"), args.merge, args.save_dtype.into())?;
    copy_tokenizer_files(&tokenizer_dir(&args.model), &d.out)?;
    let mut out = serde_json::to_value(&report)?;
    out["skipped_rows"] = json!(data.skipped_rows);
    out["out"] = json!(d.out.display().to_string());
    // Training alone (tokenizing, steps and held-out losses; not loading or saving), for throughput.
    out["train_seconds"] = json!(train_seconds);
    println!("{out}");
    Ok(())
}

fn run_rm(args: RmArgs) -> Result<()> {
    let tokenizer = args.model.require_tokenizer()?;
    let data = load_data(&args.data)?;
    if data.preferences.is_empty() {
        return Err(format!(
            "{} holds no preference pairs (HH-RLHF {{chosen, rejected}}, SHP, or {{prompt, chosen, rejected}})",
            args.data.data.display()
        )
        .into());
    }
    let d = &args.data;
    let rm = RewardModel::from_causal_lm(&args.model.model, None, d.seed, &Device::Cpu)?;
    let opts = RmOptions {
        epochs: d.epochs,
        lr: args.lr,
        batch_size: d.batch_size,
        max_seq_len: d.max_seq_len,
        warmup_steps: d.warmup_steps,
        seed: d.seed,
        max_grad_norm: d.max_grad_norm,
        eval_fraction: d.eval_fraction,
        adamw: vicuna_train::optim::AdamWParams { weight_decay: d.weight_decay, ..Default::default() },
        ..Default::default()
    };
    let report = train_rm(&rm, &tokenizer, &data.preferences, &opts, |s| {
        eprintln!("step {} loss {:.4} accuracy {:.3} lr {:.3e}", s.step, s.loss, s.accuracy, s.lr)
    })?;
    rm.save(&d.out, &args.model.model.join("config.json"))?;
    copy_tokenizer_files(&tokenizer_dir(&args.model), &d.out)?;
    let mut out = serde_json::to_value(&report)?;
    out["skipped_rows"] = json!(data.skipped_rows);
    out["out"] = json!(d.out.display().to_string());
    println!("{out}");
    Ok(())
}

fn run_ppo(args: PpoArgs) -> Result<()> {
    let mut config = PpoConfig::default();
    if let Some(file) = &args.config {
        let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        config.apply_yaml(&text, &file.display().to_string())?;
    }
    for (key, value) in &args.keys.values {
        config.set(key, value).map_err(|e| format!("--{}: {e}", key.replace('_', "-")))?;
    }
    // The settings may name Hugging Face ids: local paths from here on.
    resolve_input("model_path", &mut config.model_path, HubKind::Model, false)?;
    resolve_input("reward_model_path", &mut config.reward_model_path, HubKind::Model, false)?;
    resolve_tokenizer("tokenizer_path", &mut config.tokenizer_path)?;
    let mut trainer = if args.resume { PpoTrainer::resume(config)? } else { PpoTrainer::new(config)? };
    trainer.run(|m| {
        eprintln!(
            "cycle {} step {} score {:.4} kl {:.4} beta {:.4} loss {:.4}",
            m.iteration, m.step, m.mean_score, m.mean_kl, m.kl_coef, m.loss.loss
        )
    })?;
    let dir = &trainer.config.checkpoint_dir;
    // The picture `vicuna plot` draws, ready at the end of every run.
    if trainer.iteration > 0 {
        plot(&dir.join("metrics.jsonl"), &dir.join("curves.png"))?;
    }
    let out = dir.join("policy");
    trainer.save_policy(&out)?;
    println!(
        "{}",
        json!({"cycles": trainer.iteration, "steps": trainer.step, "kl_coef": trainer.kl.value, "policy": out.display().to_string()})
    );
    Ok(())
}

pub fn run_reward(args: RewardArgs) -> Result<()> {
    let tokenizer = match &args.tokenizer {
        Some(file) => vicuna_tokenizer::Tokenizer::from_file(file)?,
        None => vicuna_tokenizer::Tokenizer::from_dir(&args.model)?.ok_or_else(|| {
            format!(
                "{} has no tokenizer (tokenizer.model or tokenizer.json): pass --tokenizer FILE",
                args.model.display()
            )
        })?,
    };
    let rm = RewardModel::load(&args.model, &Device::Cpu)?;
    let ids = match (&args.text, &args.prompt, &args.response) {
        (Some(text), _, _) => reward_input_text(&tokenizer, text, args.max_seq_len),
        (None, Some(prompt), Some(response)) => {
            let chat =
                Conversation { system: None, turns: vec![Turn { user: prompt.clone(), assistant: response.clone() }] };
            reward_input(&tokenizer, &chat, args.max_seq_len)
        }
        _ => return Err("give --text, or --prompt with --response".into()),
    };
    let score = rm.score_ids(std::slice::from_ref(&ids), 1, pad_id(&tokenizer))?[0];
    if args.json {
        println!("{}", json!({"score": score, "tokens": ids.len()}));
    } else {
        println!("{score}");
    }
    Ok(())
}

pub fn run_plot(args: PlotArgs) -> Result<()> {
    plot(&args.metrics, &args.output)
}

/// Draws a run's `metrics.jsonl` into a PNG.
fn plot(metrics: &Path, png: &Path) -> Result<()> {
    let rows = read_metrics(metrics)?;
    if rows.is_empty() {
        return Err(format!("{} holds no metrics yet", metrics.display()).into());
    }
    let png_bytes = vicuna_train::plot::render_png(&vicuna_train::plot::ppo_series(&rows));
    vicuna_train::io::write_bytes_atomic(png, &png_bytes)?;
    Ok(())
}
