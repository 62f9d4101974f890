//! Fine-tuning LLaMA models the way StableVicuna was made: supervised fine-tuning (optionally
//! LoRA), a pairwise reward model, and PPO with trlX's formulas and defaults.

pub mod data;
mod error;
pub mod fused;
pub mod io;
pub mod lm;
pub mod optim;
pub mod params;
pub mod plot;
pub mod ppo;
pub mod ppo_config;
pub mod ppo_math;
pub mod reward;
pub mod sft;

pub use error::{Error, Result};
