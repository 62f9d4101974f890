//! `vicuna apply-delta` and `vicuna make-delta`: StableVicuna is published as a delta to be
//! added to LLaMA-13B; these rebuild it (and make such deltas) in bounded memory.

use std::path::PathBuf;

use clap::Args;
use vicuna_weights::{run_delta, DeltaOp, DeltaRequest};

use crate::common::compute_threads;
use crate::output::{require_dir, run_job, WriteArgs};
use crate::Result;

#[derive(Args)]
pub struct ApplyDeltaArgs {
    /// The base model folder (LLaMA-13B in Hugging Face format: .bin or safetensors, sharded or not), or a
    /// Hugging Face Hub id ORG/NAME[@REV] (from the Hugging Face cache, downloaded into it when missing).
    #[arg(long)]
    pub base: PathBuf,
    /// The delta folder, or its Hugging Face Hub id (e.g. CarperAI/stable-vicuna-13b-delta, optionally @REV).
    #[arg(long)]
    pub delta: PathBuf,
    /// The folder to write: sharded float16 safetensors, config and tokenizer files.
    #[arg(long)]
    pub target: PathBuf,
    /// Read every written tensor back and compare checksums before putting the target in place.
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub write: WriteArgs,
}

#[derive(Args)]
pub struct MakeDeltaArgs {
    /// The base model folder the fine-tune started from (or a Hugging Face Hub id ORG/NAME[@REV]).
    #[arg(long)]
    pub base: PathBuf,
    /// The fine-tuned model folder (or a Hugging Face Hub id ORG/NAME[@REV]).
    #[arg(long)]
    pub target: PathBuf,
    /// The folder to write the delta into.
    #[arg(long)]
    pub delta: PathBuf,
    /// Read every written tensor back and compare checksums before putting the delta in place.
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub write: WriteArgs,
}

pub fn run_apply_delta(args: ApplyDeltaArgs, threads_flag: Option<usize>) -> Result<()> {
    require_dir("--base", &args.base)?;
    require_dir("--delta", &args.delta)?;
    let request = DeltaRequest {
        op: DeltaOp::Apply,
        base: args.base,
        other: args.delta,
        out: args.target,
        force: args.write.force,
        verify: args.verify,
        shard_size: args.write.shard_size,
        threads: compute_threads(threads_flag),
    };
    run_job(args.write.quiet, |control| run_delta(&request, control))
}

pub fn run_make_delta(args: MakeDeltaArgs, threads_flag: Option<usize>) -> Result<()> {
    require_dir("--base", &args.base)?;
    require_dir("--target", &args.target)?;
    let request = DeltaRequest {
        op: DeltaOp::Make,
        base: args.base,
        other: args.target,
        out: args.delta,
        force: args.write.force,
        verify: args.verify,
        shard_size: args.write.shard_size,
        threads: compute_threads(threads_flag),
    };
    run_job(args.write.quiet, |control| run_delta(&request, control))
}
