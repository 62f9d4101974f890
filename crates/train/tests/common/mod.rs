//! Shared fixtures of the training tests: the tiny 32001-token LLaMA with the real tokenizer, and
//! a synthetic preference task (answers naming a target fruit are preferred).

#![allow(dead_code)]

use std::path::PathBuf;

use vicuna_tokenizer::Tokenizer;
use vicuna_train::data::{Conversation, Preference, Turn};

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

pub fn model_dir() -> PathBuf {
    fixtures().join("models/tiny-v32001/safetensors-f16")
}

pub fn tokenizer_path() -> PathBuf {
    fixtures().join("tokenizer/tokenizer.model")
}

pub fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&tokenizer_path()).unwrap()
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vicuna-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub const TARGET: &str = "banana";
pub const OTHERS: [&str; 4] = ["apple", "cherry", "grape", "lemon"];
pub const NON_FRUITS: [&str; 4] = ["stone", "car", "blue", "yes"];
pub const PROMPTS: [&str; 4] = ["Name a fruit.", "Which fruit do you like?", "Pick a fruit.", "Say a fruit."];

/// Preferences: the answer with the target fruit beats the same answer with another fruit.
pub fn fruit_preferences(n: usize) -> Vec<Preference> {
    (0..n)
        .map(|i| {
            // Other fruits, and now and then a word that is no fruit at all.
            let other = if i % 5 == 4 { NON_FRUITS[(i / 5) % NON_FRUITS.len()] } else { OTHERS[i % OTHERS.len()] };
            let swap_frame = (i / OTHERS.len()).is_multiple_of(2);
            let frame = |fruit: &str| if swap_frame { format!("I like {fruit}.") } else { format!("{fruit}.") };
            Preference {
                context: Conversation::default(),
                user: PROMPTS[i % PROMPTS.len()].to_string(),
                chosen: frame(TARGET),
                rejected: frame(other),
            }
        })
        .collect()
}

/// SFT chats answering with every fruit equally often: a policy with room to improve.
pub fn fruit_chats(n: usize) -> Vec<Conversation> {
    let fruits: Vec<&str> = std::iter::once(TARGET).chain(OTHERS).collect();
    (0..n)
        .map(|i| Conversation {
            system: None,
            turns: vec![Turn {
                user: PROMPTS[i % PROMPTS.len()].to_string(),
                assistant: format!("{}.", fruits[(i / 4) % fruits.len()]),
            }],
        })
        .collect()
}
