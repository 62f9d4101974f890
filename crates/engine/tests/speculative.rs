//! Speculative decoding is exact: greedy output equals decoding without guesses token for token
//! (prompt lookup and a draft model, f16 and f32 KV caches), the cache keeps no position of a
//! rejected guess (a later turn in the same context equals a fresh run), a seeded run repeats,
//! and a draft with another vocabulary is refused by name.

use std::path::PathBuf;

use vicuna_engine::{
    generate, generate_in, generate_speculative, propose_all, Context, Draft, DraftLimits, DraftRequest, Drafter,
    GenerationConfig, SamplingParams,
};
use vicuna_model::native::KvType;
use vicuna_model::{LlamaConfig, QuantLlama};
use vicuna_weights::Checkpoint;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

fn load(rel: &str, kv: Option<KvType>) -> QuantLlama {
    let dir = fixtures().join(rel);
    let config = LlamaConfig::from_dir(&dir).unwrap();
    let tensors =
        vicuna_model::native::OwnedTensors::from_checkpoint(&config, &Checkpoint::open(&dir).unwrap()).unwrap();
    QuantLlama::with_kv_type(config, std::sync::Arc::new(tensors), 2, kv).unwrap()
}

fn greedy(max_new_tokens: usize) -> GenerationConfig {
    GenerationConfig {
        sampling: SamplingParams { do_sample: false, ..Default::default() },
        max_new_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Prompts with repeats in them (where lookup finds matches) and without.
fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![1, 10, 20, 30, 40, 50, 10, 20, 30],
        vec![1, 7, 7, 7, 7, 7, 7],
        vec![1, 100, 200, 300, 400, 500, 100, 200, 300, 400, 500, 100],
        vec![1, 3, 141, 59, 26, 53, 58, 97],
    ]
}

#[test]
fn greedy_output_is_the_same_with_lookup_and_with_a_draft_model() {
    for kv in [KvType::F16, KvType::F32] {
        let model = load("models/tiny-a/safetensors-f32", Some(kv));
        // The same weights in f16: a draft that agrees often but not always.
        let draft_model = load("models/tiny-a/safetensors-f16", Some(kv));
        let config = greedy(48);
        let (mut drafted, mut accepted) = (0, 0);
        for prompt in prompts() {
            let plain = generate(&model, None, &prompt, &config, |_| {}).unwrap();
            for limits in [DraftLimits { max: 4, min: 1, p_min: 0.0 }, DraftLimits { max: 8, min: 2, p_min: 0.0 }] {
                let mut lookup = Drafter::lookup(limits);
                let mut context = Context::new(&model);
                let fast =
                    generate_speculative(&mut context, &model, None, &prompt, &config, Some(&mut lookup), |_| {})
                        .unwrap();
                assert_eq!(fast.ids, plain.ids, "lookup {limits:?}, kv {kv:?}, prompt {prompt:?}");
                assert_eq!(context.len(), prompt.len() + plain.ids.len() - 1, "the cache holds what was decided");
                let mut drafter =
                    Drafter::model(&draft_model, &model, config.sampling.clone(), config.seed, limits).unwrap();
                let mut context = Context::new(&model);
                let fast =
                    generate_speculative(&mut context, &model, None, &prompt, &config, Some(&mut drafter), |_| {})
                        .unwrap();
                assert_eq!(fast.ids, plain.ids, "draft model {limits:?}, kv {kv:?}, prompt {prompt:?}");
                drafted += lookup.drafted + drafter.drafted;
                accepted += lookup.accepted + drafter.accepted;
            }
        }
        // Guesses were made and kept (the test would prove nothing otherwise), and some rejected.
        assert!(accepted > 0 && accepted < drafted, "kv {kv:?}: {accepted} of {drafted} guesses kept");
    }
}

/// Rejected guesses leave no K/V behind: the next turn, in the same context, reads the cache of
/// the first and must equal the whole conversation generated from scratch.
#[test]
fn a_turn_after_speculation_equals_a_fresh_run() {
    let model = load("models/tiny-a/safetensors-f32", None);
    let draft_model = load("models/tiny-b/safetensors-f32", None);
    let config = greedy(40);
    let mut context = Context::new(&model);
    let mut conversation = prompts()[2].clone();
    let (mut drafted, mut accepted) = (0, 0);
    for turn in 0..3 {
        let mut lookup = Drafter::lookup(DraftLimits { max: 6, min: 1, p_min: 0.0 });
        let reply = generate_speculative(&mut context, &model, None, &conversation, &config, Some(&mut lookup), |_| {})
            .unwrap();
        let fresh = generate(&model, None, &conversation, &config, |_| {}).unwrap();
        assert_eq!(reply.ids, fresh.ids, "turn {turn}");
        (drafted, accepted) = (drafted + lookup.drafted, accepted + lookup.accepted);
        conversation.extend(&reply.ids);
        conversation.extend([5, 6, 7 + turn]);
    }
    assert!(accepted > 0 && accepted < drafted, "guesses kept and rejected: {accepted} of {drafted}");
    // Plain decoding in the context speculation left behind.
    let reply = generate_in(&mut context, &model, None, &conversation, &config, |_| {}).unwrap();
    assert_eq!(reply.ids, generate(&model, None, &conversation, &config, |_| {}).unwrap().ids);
    // tiny-b has 1000 tokens, tiny-a 512: refused, with both sizes named.
    let refused = Drafter::model(&draft_model, &model, config.sampling.clone(), 0, DraftLimits::default());
    let message = refused.err().expect("a draft with another vocabulary is refused").to_string();
    assert!(message.contains("1000") && message.contains("512"), "{message}");
}

#[test]
fn seeded_speculative_sampling_repeats_and_respects_the_limits() {
    let model = load("models/tiny-a/safetensors-f32", None);
    let draft_model = load("models/tiny-a/safetensors-f16", None);
    let config = GenerationConfig {
        sampling: SamplingParams { do_sample: true, temperature: 0.7, top_k: 40, ..Default::default() },
        max_new_tokens: 30,
        seed: 5,
        ignore_eos: true,
        ..Default::default()
    };
    let prompt = prompts()[0].clone();
    let run = || {
        let mut drafter =
            Drafter::model(&draft_model, &model, config.sampling.clone(), config.seed, DraftLimits::default()).unwrap();
        let mut context = Context::new(&model);
        let out =
            generate_speculative(&mut context, &model, None, &prompt, &config, Some(&mut drafter), |_| {}).unwrap();
        (out.ids, drafter.drafted, drafter.accepted)
    };
    let (a, drafted, accepted) = run();
    assert_eq!(a.len(), 30, "max_new_tokens holds with guesses");
    assert!(accepted > 0, "{accepted} of {drafted}");
    assert_eq!(run().0, a, "same seed, same tokens");
}

/// `p_min` (llama.cpp's `--draft-p-min`) ends a draft at a token the draft model is unsure of: fewer guesses are
/// checked, and the greedy tokens stay the same; limits out of range are refused, naming the flag.
#[test]
fn an_unsure_draft_stops_guessing_at_p_min() {
    let model = load("models/tiny-a/safetensors-f32", None);
    let draft_model = load("models/tiny-a/safetensors-f16", None);
    let config = greedy(48);
    let run = |p_min: f32| {
        let limits = DraftLimits { max: 8, min: 1, p_min }.check().unwrap();
        let (mut drafted, mut accepted) = (0, 0);
        let mut outputs = Vec::new();
        for prompt in prompts() {
            let mut drafter = Drafter::model(&draft_model, &model, config.sampling.clone(), 0, limits).unwrap();
            let mut context = Context::new(&model);
            let out =
                generate_speculative(&mut context, &model, None, &prompt, &config, Some(&mut drafter), |_| {}).unwrap();
            outputs.push(out.ids);
            (drafted, accepted) = (drafted + drafter.drafted, accepted + drafter.accepted);
        }
        (outputs, drafted, accepted)
    };
    // The random tiny model is unsure of everything: its top tokens have a few % of the mass, so a p_min of 2%
    // cuts some drafts short and keeps others.
    let (all, drafted_all, _) = run(0.0);
    let (sure, drafted_sure, _) = run(0.02);
    assert_eq!(sure, all, "p_min changes how many guesses are checked, not the tokens");
    assert!(0 < drafted_sure && drafted_sure < drafted_all, "{drafted_sure} guesses with p_min, {drafted_all} without");
    assert_eq!(run(0.5).1, 0, "no token is that sure");
    for bad in [-0.1, 1.0, f32::NAN] {
        let error = DraftLimits { max: 8, min: 1, p_min: bad }.check().unwrap_err().to_string();
        assert!(error.contains("--draft-p-min"), "{error}");
    }
}

/// A server drafts for all its sequences at once (`propose_all`: one ragged pass of the draft model a round):
/// every sequence gets the guesses, and for a sampling draft the distributions, it gets drafting alone, round
/// after round as the contexts grow (the draft caches reused), with lookup drafters and sequences without room
/// mixed in.
#[test]
fn drafting_for_many_sequences_at_once_equals_drafting_for_each_alone() {
    let model = load("models/tiny-a/safetensors-f32", None);
    let draft_model = load("models/tiny-a/safetensors-f16", None);
    let sampled = SamplingParams { do_sample: true, temperature: 0.8, top_k: 20, ..Default::default() };
    let greedy_params = SamplingParams { do_sample: false, ..Default::default() };
    let limits = [
        DraftLimits { max: 4, min: 1, p_min: 0.0 },
        DraftLimits { max: 6, min: 2, p_min: 0.0 },
        DraftLimits { max: 8, min: 1, p_min: 0.02 },
    ];
    // Per sequence: prompt, sampling, limits, whether a lookup drafter, seed.
    let specs: Vec<(Vec<u32>, SamplingParams, DraftLimits, bool, u64)> = prompts()
        .into_iter()
        .enumerate()
        .flat_map(|(i, prompt)| {
            let (sampled, greedy_params) = (sampled.clone(), greedy_params.clone());
            [
                (prompt.clone(), greedy_params, limits[i % 3], false, i as u64),
                (prompt.clone(), sampled, limits[(i + 1) % 3], false, 10 + i as u64),
                (prompt, SamplingParams::default(), limits[0], true, 0),
            ]
        })
        .collect();
    let drafters = || -> Vec<Drafter> {
        specs
            .iter()
            .map(|(_, params, limits, lookup, seed)| {
                if *lookup {
                    Drafter::lookup(*limits)
                } else {
                    Drafter::model(&draft_model, &model, params.clone(), *seed, *limits).unwrap()
                }
            })
            .collect()
    };
    let (mut alone, mut together) = (drafters(), drafters());
    let mut contexts: Vec<Vec<u32>> = specs.iter().map(|s| s.0.clone()).collect();
    let mut guesses = 0;
    for round in 0..4 {
        // One sequence has no room left this round: it is asked for nothing, alone or together.
        let room = |i: usize| if (i + round).is_multiple_of(5) { 0 } else { 16 };
        let one_by_one: Vec<Draft> = alone
            .iter_mut()
            .enumerate()
            .map(|(i, d)| d.propose(&contexts[i], specs[i].0.len(), room(i)).unwrap())
            .collect();
        let mut requests: Vec<DraftRequest> = together
            .iter_mut()
            .enumerate()
            .map(|(i, drafter)| DraftRequest {
                drafter,
                context: &contexts[i],
                prompt_len: specs[i].0.len(),
                room: room(i),
            })
            .collect();
        let batched: Vec<Draft> = propose_all(&mut requests).into_iter().map(Result::unwrap).collect();
        for (i, (a, b)) in one_by_one.iter().zip(&batched).enumerate() {
            assert_eq!(a.ids, b.ids, "round {round}, sequence {i}");
            assert_eq!(a.probs, b.probs, "round {round}, sequence {i}");
            guesses += a.ids.len();
        }
        // The contexts grow as a checking pass would leave them: the first guess kept (or a token of its own).
        for (i, draft) in one_by_one.iter().enumerate() {
            let next = draft.ids.first().copied().unwrap_or(17 + i as u32);
            contexts[i].extend([next, 5 + round as u32]);
        }
    }
    assert!(guesses > 40, "the drafters guessed ({guesses} guesses)");
}
