//! How long grammar-constrained decoding costs per token: compiles a JSON schema for the LLaMA
//! tokenizer fixture and times `Constraint::mask` (and `commit`) over StableVicuna's 32001 logits
//! along random-logit decodes.
//!
//! `cargo run -p vicuna-engine --example grammar_mask [-- TOKENIZER_PATH]` (dependencies, llguidance
//! included, are optimized in dev builds too).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use vicuna_engine::{argmax, Constraint, Grammar, GrammarSpec, Rng};
use vicuna_tokenizer::Tokenizer;

fn main() -> Result<(), String> {
    let path = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/tokenizer/tokenizer.model"))
    });
    let tokenizer = Tokenizer::from_file(&path).map_err(|e| e.to_string())?;
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "kind": {"enum": ["cat", "dog"]},
            "tags": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
            "owner": {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
        },
        "required": ["name", "kind", "tags", "owner"],
        "additionalProperties": false
    });
    let spec = GrammarSpec::JsonSchema(schema);

    let start = Instant::now();
    let grammar = Grammar::compile(&tokenizer, &spec)?;
    let first = start.elapsed();
    let start = Instant::now();
    let grammar2 = Grammar::compile(&tokenizer, &spec)?;
    let again = start.elapsed();
    drop(grammar2);
    println!("compile: {first:.1?} the first time (tokenizer tables included), {again:.1?} after");

    let (mut mask_time, mut commit_time, mut steps) = (Duration::ZERO, Duration::ZERO, 0u32);
    let mut slowest = Duration::ZERO;
    for seed in 0..20 {
        let mut rng = Rng::new(seed);
        let mut constraint = Constraint::new(&grammar)?;
        for _ in 0..300 {
            let mut logits: Vec<f32> = (0..32001).map(|_| rng.next_f64() as f32).collect();
            let t = Instant::now();
            constraint.mask(&mut logits)?;
            let took = t.elapsed();
            mask_time += took;
            slowest = slowest.max(took);
            steps += 1;
            let id = argmax(&logits);
            let t = Instant::now();
            constraint.commit(id)?;
            commit_time += t.elapsed();
            if id == tokenizer.eos_id() || constraint.is_finished() {
                break;
            }
        }
    }
    println!(
        "{steps} steps: mask {:.1?}/token (slowest {slowest:.1?}), commit {:.1?}/token",
        mask_time / steps,
        commit_time / steps
    );
    Ok(())
}
