//! Grammar-constrained decoding over the real LLaMA vocabulary, checked against independent
//! references: random logits and a tiny random model are decoded under a grammar, the ids decoded
//! by our tokenizer the way the server streams them, and the text checked with the `jsonschema`
//! validator, `serde_json` and the `regex` crate (never with llguidance itself).

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};
use vicuna_engine::{argmax, softmax, Allowed, Constraint, Grammar, GrammarSpec, Rng};
use vicuna_model::QuantLlama;
use vicuna_tokenizer::Tokenizer;

/// StableVicuna's logits: one row past the 32000 pieces of `tokenizer.model` (`[PAD]`).
const LOGITS: usize = 32001;
/// Every run must end well within this.
const MAX_TOKENS: usize = 300;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(&fixtures().join("tokenizer/tokenizer.model")).unwrap()
}

/// What our prompts end in: the reply follows visible text, so its first `▁` is a space.
fn prompt(tokenizer: &Tokenizer) -> Vec<u32> {
    tokenizer.encode("A chat.\n### Human: Give me JSON.\n### Assistant:", true)
}

fn pet_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "kind": {"enum": ["cat", "dog"]},
            "tags": {"type": "array", "items": {"type": "integer", "minimum": -999, "maximum": 999}, "maxItems": 3},
            "owner": {
                "type": "object",
                "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150}},
                "required": ["age"],
                "additionalProperties": false
            }
        },
        "required": ["name", "kind", "tags", "owner"],
        "additionalProperties": false
    })
}

/// Draws a token from softmax(logits) (masked entries are -inf, so never drawn).
fn sample(logits: &[f32], rng: &mut Rng) -> u32 {
    let probs = softmax(logits);
    let mut u = rng.next_f64() as f32;
    for (id, &p) in probs.iter().enumerate() {
        if u < p {
            return id as u32;
        }
        u -= p;
    }
    argmax(logits) // rounding left a sliver at the end
}

/// Runs a constraint with `next_logits` giving each step's raw logits and `pick` choosing among
/// the masked ones, until EOS or the grammar is finished; returns the ids (EOS excluded) and the
/// text as the server streams it after `prompt`.
fn decode_loop(
    tokenizer: &Tokenizer,
    grammar: &Arc<Grammar>,
    mut next_logits: impl FnMut(&[u32]) -> Vec<f32>,
    mut pick: impl FnMut(&[f32]) -> u32,
) -> (Vec<u32>, String) {
    let prompt = prompt(tokenizer);
    let mut constraint = Constraint::new(grammar).unwrap();
    let mut ids = Vec::new();
    loop {
        assert!(ids.len() < MAX_TOKENS, "no end after {MAX_TOKENS} tokens: {:?}", tokenizer.decode(&ids));
        let mut logits = next_logits(&ids);
        let allowed = constraint.mask(&mut logits).unwrap();
        assert_eq!(logits[32000], f32::NEG_INFINITY, "an id past the vocabulary is allowed");
        let open = (0..logits.len()).filter(|&i| logits[i].is_finite()).count();
        assert_eq!(allowed == Allowed::OnlyEnd, open == 1 && logits[tokenizer.eos_id() as usize].is_finite());
        let id = pick(&logits);
        assert!(logits[id as usize].is_finite(), "picked a masked token {id}");
        constraint.commit(id).unwrap();
        if id == tokenizer.eos_id() {
            assert!(constraint.is_finished());
            break;
        }
        ids.push(id);
        if constraint.is_finished() {
            // Nothing may follow but EOS.
            let mut logits = next_logits(&ids);
            assert_eq!(constraint.mask(&mut logits).unwrap(), Allowed::OnlyEnd);
            let allowed: Vec<usize> = (0..logits.len()).filter(|&i| logits[i].is_finite()).collect();
            assert_eq!(allowed, [tokenizer.eos_id() as usize]);
            break;
        }
    }
    let mut decoder = tokenizer.stream_decoder_after(&prompt);
    let mut text: String = ids.iter().map(|&id| decoder.push(id)).collect();
    text.push_str(&decoder.flush());
    (ids, text)
}

fn random_logits(rng: &mut Rng) -> Vec<f32> {
    (0..LOGITS).map(|_| (rng.next_f64() as f32 - 0.5) * 8.0).collect()
}

/// Decodes under `spec` with random logits for 20 seeds; returns the texts.
fn random_texts(spec: &GrammarSpec) -> Vec<String> {
    random_texts_boosting(spec, |_| false)
}

/// [`random_texts`], with the tokens whose piece passes `boost` made more likely (a grammar with
/// unbounded strings only ends under random logits if closing them is likely enough).
fn random_texts_boosting(spec: &GrammarSpec, boost: impl Fn(&str) -> bool) -> Vec<String> {
    let tokenizer = tokenizer();
    let grammar = Grammar::compile(&tokenizer, spec).unwrap();
    let boosted: Vec<usize> =
        (0..tokenizer.vocab_size()).filter(|&id| tokenizer.id_to_piece(id as u32).is_some_and(&boost)).collect();
    (0..20u64)
        .map(|seed| {
            let mut rng = Rng::new(seed);
            let mut draw = Rng::new(seed + 1000);
            let next_logits = |_: &[u32]| {
                let mut logits = random_logits(&mut rng);
                for &id in &boosted {
                    logits[id] += 8.0;
                }
                logits
            };
            let (_, text) = decode_loop(&tokenizer, &grammar, next_logits, |l| sample(l, &mut draw));
            text
        })
        .collect()
}

#[test]
fn random_logits_follow_a_json_schema() {
    let schema = pet_schema();
    let validator = jsonschema::validator_for(&schema).unwrap();
    for text in random_texts(&GrammarSpec::JsonSchema(schema.clone())) {
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}: {text:?}");
    }
}

/// A model that prefers whitespace to anything (a small trained one can) still ends a schema reply
/// soon: each gap takes a space, or one or two newlines and an indent of at most 20.
#[test]
fn a_model_that_loves_whitespace_cannot_pad_a_json_reply() {
    let whitespace = |piece: &str| {
        matches!(piece, "<0x0A>" | "<0x09>" | "<0x0D>") || (!piece.is_empty() && piece.chars().all(|c| c == '\u{2581}'))
    };
    let tokenizer = tokenizer();
    let schema = pet_schema();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let grammar = Grammar::compile(&tokenizer, &GrammarSpec::JsonSchema(schema)).unwrap();
    let loved: Vec<usize> =
        (0..tokenizer.vocab_size()).filter(|&id| tokenizer.id_to_piece(id as u32).is_some_and(whitespace)).collect();
    assert!(loved.len() > 10, "whitespace pieces: {loved:?}");
    for seed in 0..5 {
        let mut rng = Rng::new(seed);
        let mut draw = Rng::new(seed + 1000);
        let next_logits = |_: &[u32]| {
            let mut logits = random_logits(&mut rng);
            for &id in &loved {
                logits[id] += 30.0;
            }
            logits
        };
        let (ids, text) = decode_loop(&tokenizer, &grammar, next_logits, |l| sample(l, &mut draw));
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(validator.iter_errors(&value).next().is_none(), "{text:?}");
        // Whitespace inside strings is the model's own; between JSON tokens it keeps to the rule.
        let outside_strings: String = text.split('"').step_by(2).collect::<Vec<_>>().join("\"\"");
        for gap in outside_strings.split(|c: char| !c.is_whitespace()).filter(|g| !g.is_empty()) {
            let newlines = gap.matches('\n').count();
            assert!(gap.len() <= 22 && newlines <= 2 && gap != "  ", "seed {seed}: gap {gap:?} in {text:?}");
        }
        assert!(ids.len() < 300, "seed {seed}: {} tokens: {text:?}", ids.len());
    }
}

#[test]
fn random_logits_follow_a_regex() {
    let rx = regex::Regex::new("^[0-9]{3}-[a-z]{2}$").unwrap();
    for text in random_texts(&GrammarSpec::Regex("[0-9]{3}-[a-z]{2}".into())) {
        assert!(rx.is_match(&text), "{text:?}");
    }
}

#[test]
fn random_logits_give_a_json_object() {
    // Keys and values are unbounded: make closing quotes and braces likely.
    let closing = |piece: &str| !piece.is_empty() && piece.chars().all(|c| matches!(c, '"' | '}' | '\u{2581}'));
    for text in random_texts_boosting(&GrammarSpec::JsonObject, closing) {
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(value.is_object(), "{text:?}");
    }
}

#[test]
fn lark_grammar() {
    let lark = r#"start: "yes" | "no" | "maybe " NUMBER
NUMBER: /[0-9]/"#;
    for text in random_texts(&GrammarSpec::Lark(lark.into())) {
        assert!(["yes", "no"].contains(&text.as_str()) || text.len() == 7 && text.starts_with("maybe "), "{text:?}");
    }
}

/// The reply a model naturally writes after "### Assistant:" starts with `"▁{"`, a space: JSON
/// grammars accept it, and EOS only once the object is complete.
#[test]
fn space_prefixed_json_reply_is_accepted() {
    let tokenizer = tokenizer();
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
    let grammar = Grammar::compile(&tokenizer, &GrammarSpec::JsonSchema(schema)).unwrap();
    let ids = tokenizer.encode("{\"a\": 1}", false);
    assert!(tokenizer.id_to_piece(ids[0]).unwrap().starts_with("▁{"), "{:?}", tokenizer.pieces(&ids));
    let mut constraint = Constraint::new(&grammar).unwrap();
    let eos = tokenizer.eos_id() as usize;
    for &id in &ids {
        let mut logits = vec![0.0; LOGITS];
        constraint.mask(&mut logits).unwrap();
        assert!(logits[id as usize].is_finite(), "{:?} not allowed", tokenizer.id_to_piece(id));
        assert_eq!(logits[eos], f32::NEG_INFINITY, "EOS before the object is complete");
        constraint.commit(id).unwrap();
    }
    let mut logits = vec![0.0; LOGITS];
    // The object is complete and nothing may follow it.
    assert_eq!(constraint.mask(&mut logits).unwrap(), Allowed::OnlyEnd);
    assert!(logits[eos].is_finite(), "EOS after the object");
    constraint.commit(eos as u32).unwrap();
    assert!(constraint.is_finished());
}

#[test]
fn a_token_the_grammar_forbids_is_an_error() {
    let tokenizer = tokenizer();
    let grammar = Grammar::compile(&tokenizer, &GrammarSpec::Regex("[0-9]+".into())).unwrap();
    let mut constraint = Constraint::new(&grammar).unwrap();
    let letter = tokenizer.piece_to_id("a").unwrap();
    let mut logits = vec![0.0; LOGITS];
    constraint.mask(&mut logits).unwrap();
    assert_eq!(logits[letter as usize], f32::NEG_INFINITY);
    assert!(constraint.commit(letter).is_err());
    assert!(constraint.commit(32000).unwrap_err().contains("not in the tokenizer's vocabulary"));
    // The shared grammar is untouched: a new constraint starts afresh.
    let mut fresh = Constraint::new(&grammar).unwrap();
    fresh.commit(tokenizer.piece_to_id("1").unwrap()).unwrap();
}

#[test]
fn bad_grammars_are_errors_naming_the_problem() {
    let tokenizer = tokenizer();
    let cases = [
        (GrammarSpec::JsonSchema(json!({"type": "nonsense"})), "nonsense"),
        (GrammarSpec::JsonSchema(json!({"$ref": "https://example.com/schema.json"})), "example.com"),
        (GrammarSpec::JsonSchema(json!({"type": "object", "x-guidance": {"lenient": true}})), "x-guidance"),
        (GrammarSpec::Regex("[0-9".into()), "unclosed character class"),
        (GrammarSpec::Lark("start: undefined_rule".into()), "undefined_rule"),
    ];
    for (spec, named) in cases {
        let err = Grammar::compile(&tokenizer, &spec).unwrap_err();
        assert!(err.contains(named), "{spec:?}: {err}");
        assert!(!err.contains('\n') && !err.contains("at 3("), "{err}");
    }
}

fn tiny_v32001() -> QuantLlama {
    QuantLlama::load(&fixtures().join("models/tiny-v32001/safetensors-f16"), 2).unwrap()
}

/// The tiny random model, greedy and sampled, under a schema: the text validates.
#[test]
fn tiny_model_follows_a_schema() {
    let tokenizer = tokenizer();
    let model = tiny_v32001();
    let schema = json!({
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
            "word": {"type": "string", "maxLength": 8}
        },
        "required": ["ok", "n", "word"],
        "additionalProperties": false
    });
    let validator = jsonschema::validator_for(&schema).unwrap();
    let grammar = Grammar::compile(&tokenizer, &GrammarSpec::JsonSchema(schema)).unwrap();
    let prompt = prompt(&tokenizer);
    for seed in [None, Some(1), Some(2), Some(3)] {
        let mut cache = model.new_cache();
        let mut fed = 0;
        let next_logits = |ids: &[u32]| {
            let context: Vec<u32> = prompt.iter().chain(ids).copied().collect();
            let logits = model.next_token_logits(&context[fed..], &mut cache).unwrap();
            fed = context.len();
            assert_eq!(logits.len(), LOGITS);
            logits
        };
        let mut rng = Rng::new(seed.unwrap_or(0));
        let pick = |logits: &[f32]| match seed {
            None => argmax(logits),
            Some(_) => sample(logits, &mut rng),
        };
        let (_, text) = decode_loop(&tokenizer, &grammar, next_logits, pick);
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{seed:?}: {e}: {text:?}"));
        assert!(validator.is_valid(&value), "{seed:?}: {text:?}");
    }
}
