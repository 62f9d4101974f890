//! The generation controls, each checked on a real (tiny) model: EOS and min_new_tokens, stop
//! sequences across token boundaries, seeds, and the repetition penalty's wiring.

use std::path::PathBuf;

use std::sync::Arc;
use vicuna_engine::{
    apply_repetition_penalty, argmax, generate, generate_in, Context, FinishReason, Generation, GenerationConfig,
    SamplingParams,
};

use vicuna_model::native::OwnedTensors;
use vicuna_model::{LlamaConfig, QuantLlama};
use vicuna_tokenizer::Tokenizer;
use vicuna_weights::Checkpoint;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

fn tiny_v32001() -> (QuantLlama, Tokenizer) {
    let model = QuantLlama::load(&fixtures().join("models/tiny-v32001/safetensors-f16"), 2).unwrap();
    let tokenizer = Tokenizer::from_file(&fixtures().join("tokenizer/tokenizer.model")).unwrap();
    (model, tokenizer)
}

fn greedy(max_new_tokens: usize) -> GenerationConfig {
    GenerationConfig {
        sampling: SamplingParams { do_sample: false, ..Default::default() },
        max_new_tokens,
        ..Default::default()
    }
}

/// tiny-a with EOS's lm_head row replaced so that EOS is always by far the most likely token.
fn eos_loving_model() -> QuantLlama {
    let dir = fixtures().join("models/tiny-a/safetensors-f32");
    let config = LlamaConfig::from_dir(&dir).unwrap();
    let mut tensors = OwnedTensors::from_checkpoint(&config, &Checkpoint::open(&dir).unwrap()).unwrap();
    let (ty, dims, mut data) = tensors.remove("output.weight").unwrap();
    // f32 rows of `hidden` values: scaling EOS's row scales its logit; wherever that logit is positive, EOS wins.
    let row_bytes = config.hidden_size * 4;
    let eos = config.eos_token_id as usize;
    for w in data[eos * row_bytes..(eos + 1) * row_bytes].chunks_exact_mut(4) {
        let scaled = f32::from_le_bytes(w.try_into().unwrap()) * 100.0;
        w.copy_from_slice(&scaled.to_le_bytes());
    }
    tensors.insert("output.weight", ty, dims, data);
    QuantLlama::new(config, Arc::new(tensors), 2).unwrap()
}

#[test]
fn eos_ends_generation_unless_min_new_tokens_or_ignore_eos() {
    let model = eos_loving_model();
    let prompt = [1u32, 10, 20];
    let eos = model.config().eos_token_id;
    // The doctored model reaches EOS early; that stop is what min_new_tokens must delay.
    let first = generate(&model, None, &prompt, &greedy(30), |_| {}).unwrap();
    assert_eq!(first.finish_reason, FinishReason::EosToken, "{first:?}");
    let n = first.ids.len() - 1;
    assert_eq!(first.ids[n], eos);

    let min = n + 3;
    let config = GenerationConfig { min_new_tokens: min, ..greedy(30) };
    let g = generate(&model, None, &prompt, &config, |_| {}).unwrap();
    assert!(g.ids.len() > min, "{g:?}");
    assert!(g.ids[..min].iter().all(|&id| id != eos), "EOS before min_new_tokens: {g:?}");
    assert_eq!(g.ids[..n], first.ids[..n], "only EOS is masked");

    let config = GenerationConfig { ignore_eos: true, ..greedy(7) };
    let g = generate(&model, None, &prompt, &config, |_| {}).unwrap();
    assert_eq!(g.ids.len(), 7);
    assert_eq!(g.finish_reason, FinishReason::Length);
}

fn run(model: &QuantLlama, tokenizer: &Tokenizer, prompt: &str, config: &GenerationConfig) -> (Generation, String) {
    let ids = tokenizer.encode(prompt, true);
    let mut streamed = String::new();
    let g = generate(model, Some(tokenizer), &ids, config, |piece| streamed.push_str(piece)).unwrap();
    (g, streamed)
}

#[test]
fn stop_sequences_match_across_tokens_and_are_trimmed() {
    let (model, tokenizer) = tiny_v32001();
    let prompt = "### Human: Tell me about llamas.\n### Assistant:";
    let (full, streamed) = run(&model, &tokenizer, prompt, &greedy(24));
    let text = full.text.clone().unwrap();
    assert_eq!(streamed, text, "streamed text equals the final text");
    assert_eq!(full.finish_reason, FinishReason::Length);

    // A stop string made of the last character of one token's text and the first of the next.
    let text_len_after = |n: usize| tokenizer.decode(&full.ids[..n]).len();
    let k = (1..full.ids.len() - 1)
        .find(|&k| text_len_after(k) - text_len_after(k - 1) >= 2 && text_len_after(k + 1) - text_len_after(k) >= 2)
        .expect("two neighbouring tokens with text");
    let boundary = text_len_after(k);
    let before = text[..boundary].chars().next_back().unwrap().len_utf8();
    let after = text[boundary..].chars().next().unwrap().len_utf8();
    let stop = text[boundary - before..boundary + after].to_string();
    let first_match = text.find(&stop).unwrap();

    let config = GenerationConfig { stop: vec![stop.clone()], ..greedy(24) };
    let (g, streamed) = run(&model, &tokenizer, prompt, &config);
    assert_eq!(g.finish_reason, FinishReason::StopSequence, "stop {stop:?} in {text:?}");
    assert_eq!(g.text.as_deref(), Some(&text[..first_match]));
    assert_eq!(streamed, text[..first_match], "nothing of the stop string was streamed");
    assert_eq!(g.ids[..], full.ids[..g.ids.len()]);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let (model, tokenizer) = tiny_v32001();
    let sample = |seed| GenerationConfig { seed, ..GenerationConfig { max_new_tokens: 16, ..Default::default() } };
    let (a, _) = run(&model, &tokenizer, "Hello", &sample(11));
    let (b, _) = run(&model, &tokenizer, "Hello", &sample(11));
    let (c, _) = run(&model, &tokenizer, "Hello", &sample(12));
    assert_eq!(a.ids, b.ids);
    assert_ne!(a.ids, c.ids);
}

#[test]
fn top_k_one_equals_greedy() {
    let (model, tokenizer) = tiny_v32001();
    let top1 = GenerationConfig {
        sampling: SamplingParams { top_k: 1, temperature: 0.7, ..Default::default() },
        max_new_tokens: 12,
        seed: 3,
        ..Default::default()
    };
    let (a, _) = run(&model, &tokenizer, "The llama", &top1);
    let (b, _) = run(&model, &tokenizer, "The llama", &greedy(12));
    assert_eq!(a.ids, b.ids);
}

/// Greedy with a repetition penalty equals a hand-written loop that applies transformers' rule
/// to the full context (prompt and generated) before each argmax — and differs from plain greedy.
#[test]
fn repetition_penalty_covers_prompt_and_generated_tokens() {
    let model = QuantLlama::load(&fixtures().join("models/tiny-a/safetensors-f32"), 2).unwrap();
    let prompt = vec![1u32, 7, 7, 300, 42];
    let penalty = 3.0;
    let config = GenerationConfig {
        sampling: SamplingParams { do_sample: false, repetition_penalty: penalty, ..Default::default() },
        max_new_tokens: 20,
        ignore_eos: true,
        ..Default::default()
    };
    let got = generate(&model, None, &prompt, &config, |_| {}).unwrap().ids;
    let mut context = prompt.clone();
    for _ in 0..20 {
        let mut last = model.next_token_logits(&context, &mut model.new_cache()).unwrap();
        apply_repetition_penalty(&mut last, &context, penalty);
        context.push(argmax(&last));
    }
    assert_eq!(got, context[prompt.len()..]);
    let plain = generate(&model, None, &prompt, &GenerationConfig { ignore_eos: true, ..greedy(20) }, |_| {}).unwrap();
    assert_ne!(plain.ids, got, "the penalty changed nothing: the test would prove nothing");
}

/// A chat's turns in one context: each turn reads only the prompt tokens past what the context already holds (the
/// previous prompt and reply), and gives the same tokens as the same prompt generated from scratch, greedy and
/// seeded; a prompt that departs early (a new conversation) recomputes from there.
#[test]
fn a_kept_context_reads_only_the_new_part_of_the_prompt_and_changes_nothing() {
    let (model, tokenizer) = tiny_v32001();
    let seeded = GenerationConfig {
        sampling: SamplingParams { do_sample: true, temperature: 0.8, ..Default::default() },
        max_new_tokens: 12,
        seed: 11,
        ..Default::default()
    };
    for config in [greedy(12), seeded] {
        let mut context = Context::new(&model);
        let mut conversation = tokenizer.encode("### Human: Hello there, llama!\n### Assistant:", true);
        for turn in 0..4 {
            let fresh = generate(&model, Some(&tokenizer), &conversation, &config, |_| {}).unwrap();
            let held = context.len();
            let kept = generate_in(&mut context, &model, Some(&tokenizer), &conversation, &config, |_| {}).unwrap();
            assert_eq!(kept.ids, fresh.ids, "turn {turn}: another reply with a kept context");
            if turn == 0 {
                assert_eq!(context.reused(), 0);
            } else {
                // The context held the previous prompt and all but the last reply token: the new prompt starts
                // with both.
                assert_eq!(context.reused(), held, "turn {turn}");
            }
            // The context now holds this prompt and the reply but its last token.
            assert_eq!(context.len(), conversation.len() + kept.ids.len() - 1);
            conversation.extend(&kept.ids);
            conversation.extend(tokenizer.encode(&format!("\n### Human: Turn {turn}?\n### Assistant:"), false));
        }
        let restart = tokenizer.encode("### Human: Something else\n### Assistant:", true);
        let fresh = generate(&model, Some(&tokenizer), &restart, &config, |_| {}).unwrap();
        let kept = generate_in(&mut context, &model, Some(&tokenizer), &restart, &config, |_| {}).unwrap();
        assert_eq!(kept.ids, fresh.ids);
        let common = restart.iter().zip(&conversation).take_while(|(a, b)| a == b).count();
        assert_eq!(context.reused(), common, "only the common start is reused");
    }
}
