//! Structured output: decoding constrained to a grammar (a JSON schema, a regular expression or a
//! Lark grammar), over our tokenizer's vocabulary, with [`llguidance`].
//!
//! A request's [`GrammarSpec`] is compiled once into a [`Grammar`] (shared by the request's
//! choices); each sequence then walks it with its own [`Constraint`]: before sampling,
//! [`Constraint::mask`] sets every token the grammar does not allow next to -inf, and after
//! sampling [`Constraint::commit`] advances past the chosen token.
//!
//! # Tokens as bytes
//!
//! llguidance sees each token as the bytes it adds to the text, which we take from our own decoder
//! ([`Tokenizer::token_bytes`])
//! so that the text a user receives is exactly the text the grammar matched:
//! - an ordinary piece is its decoded text, `▁` read as a space (`"▁{"` is `b" {"`);
//! - a byte piece `<0xNN>` is that one byte (runs of them form UTF-8 characters, and llguidance's
//!   grammars only accept valid UTF-8, so the decoder never has to replace one);
//! - an added token (e.g. `[PAD]` in another position) is its literal text;
//! - BOS, EOS, the pad token, `<unk>` and every other piece whose decoded text is not its own
//!   (control pieces decode to nothing, `<unk>` to " ⁇ ") are special: llguidance's convention
//!   gives them a leading 0xFF byte, which no grammar here matches, so they are never allowed.
//!   EOS is the trie's end token: allowed exactly when the output so far is complete.
//!
//! Ids the tokenizer does not have (StableVicuna's logits have a row past the 32000 pieces of its
//! `tokenizer.model` when `added_tokens.json` is absent) are always masked out.
//!
//! # Leading whitespace and SentencePiece's space
//!
//! The bytes above are what [`Tokenizer::stream_decoder_after`] streams for a reply that follows a
//! prompt with visible text (our chat prompts end in `"### Assistant:"`): there the reply's first
//! `▁` is a real space, as the grammar sees it. Only a generation after a prompt with no visible
//! text at all (bare BOS) decodes differently: SentencePiece drops that first `▁` as the dummy
//! prefix, so the user gets the grammar's text minus one leading space.
//!
//! JSON grammars (schemas and [`GrammarSpec::JsonObject`]) allow JSON whitespace before the JSON
//! text (llguidance's own JSON grammars do not: we put a Lark rule in front) and between its
//! tokens, so the natural reply `" {\"a\": 1}"` (first token `"▁{"`) is accepted, and dropping a
//! leading space never matters. Whitespace is bounded by [`JSON_WHITESPACE`]
//! per gap: a model that falls into emitting newlines cannot then loop forever inside a JSON
//! value. Regular expressions and Lark grammars get no implicit
//! whitespace: the whole output must match them, so a reply to `[0-9]+` starts with a digit token
//! rather than a space-prefixed one.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use llguidance::api::{ParserLimits, StopReason, TopLevelGrammar};
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use vicuna_tokenizer::Tokenizer;

/// The whitespace JSON grammars allow between two tokens of the JSON text (and before it), as a
/// regex: a space, or one or two newlines and an indent of up to 20 spaces or tabs (llama.cpp's
/// `space` rule of its JSON-schema grammars). Enough for compact and pretty-printed JSON, yet a
/// model that likes whitespace (a small trained one does) cannot pad a reply with hundreds of
/// tokens of it: allowed 32 free characters a gap, the demo model filled 400 tokens.
pub const JSON_WHITESPACE: &str = r"( |\x0A{1,2}[\x20\x09]{0,20})";

/// What a request constrains its output to.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (OpenAI `response_format: {type: json_object}`, TGI `grammar: {type: json}`
    /// without a schema): the schema `{"type": "object"}`, which allows any properties.
    JsonObject,
    /// A JSON schema (OpenAI `json_schema.schema`, TGI `grammar: {type: "json", value: SCHEMA}`).
    /// llguidance's JSON-schema subset: local `$ref`s (`#/...`) only.
    JsonSchema(Value),
    /// A regular expression the whole output must match (TGI `grammar: {type: "regex"}`), Rust
    /// `regex` syntax.
    Regex(String),
    /// A grammar in llguidance's Lark dialect (its native format; GBNF is not converted).
    Lark(String),
}

impl GrammarSpec {
    /// The name used in error messages, as requests spell the kind.
    fn kind(&self) -> &'static str {
        match self {
            GrammarSpec::JsonObject => "json_object",
            GrammarSpec::JsonSchema(_) => "json_schema",
            GrammarSpec::Regex(_) => "regex",
            GrammarSpec::Lark(_) => "lark",
        }
    }
}

/// A grammar compiled for one tokenizer: compile once per request, shared by the request's
/// choices (n > 1), each of which starts its own [`Constraint`].
pub struct Grammar {
    /// A parser at the start of the output; constraints start from deep copies of it. Behind a
    /// mutex because llguidance's parser is `Send` but not `Sync`.
    start: Mutex<Matcher>,
    /// Ids below this are the tokenizer's; the rest are always masked.
    vocab_size: usize,
    eos: u32,
    kind: &'static str,
}

impl fmt::Debug for Grammar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grammar").field("kind", &self.kind).field("vocab_size", &self.vocab_size).finish()
    }
}

impl Grammar {
    /// Compiles `spec` for `tokenizer`. Errors are user-facing messages naming the problem, meant
    /// to be returned as a 422 (e.g. "json_schema: Unknown type: nonsense").
    pub fn compile(tokenizer: &Tokenizer, spec: &GrammarSpec) -> Result<Arc<Grammar>, String> {
        let kind = spec.kind();
        let top = match spec {
            GrammarSpec::JsonObject => json_grammar(serde_json::json!({"type": "object"}))?,
            GrammarSpec::JsonSchema(schema) => json_grammar(schema.clone())?,
            GrammarSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GrammarSpec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let factory = factory_for(tokenizer)?;
        let parser = factory.create_parser(top).map_err(|e| compile_error(spec, &e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(format!("{kind}: {}", first_line(&e)));
        }
        Ok(Arc::new(Grammar {
            start: Mutex::new(matcher),
            vocab_size: tokenizer.vocab_size(),
            eos: tokenizer.eos_id(),
            kind,
        }))
    }
}

/// The grammar for a JSON schema: optional leading whitespace (llguidance's JSON grammars allow
/// whitespace only between tokens of the JSON text, which would rule out a reply's natural first
/// token `"▁{"`), then the JSON text.
fn json_grammar(schema: Value) -> Result<TopLevelGrammar, String> {
    let schema = json_schema(schema)?;
    let schema = serde_json::to_string(&schema).map_err(|e| format!("json_schema: {e}"))?;
    Ok(TopLevelGrammar::from_lark(format!(
        "start: json | LEADING_WS json\n\
         LEADING_WS: /{JSON_WHITESPACE}/\n\
         json: %json {schema}\n"
    )))
}

/// A JSON schema with our whitespace rule: [`JSON_WHITESPACE`] or nothing between tokens
/// (llguidance's default allows unbounded runs). The schema's
/// own `x-guidance` options are refused: they could change the separators and so give output that
/// is not JSON.
fn json_schema(mut schema: Value) -> Result<Value, String> {
    if schema == Value::Bool(true) {
        schema = serde_json::json!({}); // the same schema, in a form that takes options
    }
    let Some(object) = schema.as_object_mut() else {
        // `false` is a schema too; llguidance reports what it makes of anything else.
        return Ok(schema);
    };
    if object.contains_key("x-guidance") {
        return Err("json_schema: `x-guidance` options are not accepted".to_string());
    }
    object.insert(
        "x-guidance".to_string(),
        serde_json::json!({
            "whitespace_flexible": true,
            "whitespace_pattern": JSON_WHITESPACE,
        }),
    );
    Ok(schema)
}

/// A compile error as the user should read it: on one line, and without the position in the Lark
/// grammar we wrap JSON schemas and regexes in (only a Lark grammar's own positions mean anything).
fn compile_error(spec: &GrammarSpec, message: &str) -> String {
    // llguidance follows the message with an excerpt of the grammar, lines `N | ...`.
    let is_excerpt = |line: &str| line.split_once(" |").is_some_and(|(n, _)| n.trim().parse::<u32>().is_ok());
    let message = message
        .lines()
        .map(str::trim)
        .take_while(|line| !is_excerpt(line))
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let mut message = message.as_str();
    if !matches!(spec, GrammarSpec::Lark(_)) {
        message = strip_position(message);
        message = message.strip_prefix("failed to compile JSON schema: ").unwrap_or(message);
    }
    format!("{}: {message}", spec.kind())
}

/// `message` without a leading `at LINE(COLUMN): `.
fn strip_position(message: &str) -> &str {
    let Some(rest) = message.strip_prefix("at ") else { return message };
    match rest.split_once("): ") {
        Some((position, after)) if position.chars().all(|c| c.is_ascii_digit() || c == '(') => after,
        _ => message,
    }
}

/// llguidance's messages may go on with parser state on later lines; the first says what is wrong.
fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_string()
}

/// What a [`Constraint::mask`] left open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Tokens that continue the output (EOS among them when the output so far is complete).
    Tokens,
    /// Only EOS: the output is complete and nothing may follow.
    OnlyEnd,
}

/// One sequence's position in a [`Grammar`].
pub struct Constraint {
    matcher: Matcher,
    vocab_size: usize,
    eos: u32,
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constraint").field("stop_reason", &self.matcher.stop_reason()).finish()
    }
}

impl Constraint {
    /// A constraint at the start of the output.
    pub fn new(grammar: &Arc<Grammar>) -> Result<Constraint, String> {
        let start = grammar.start.lock().map_err(|_| format!("{}: grammar is unusable", grammar.kind))?;
        let matcher = start.deep_clone();
        drop(start);
        if let Some(e) = matcher.get_error() {
            return Err(format!("{}: {}", grammar.kind, first_line(&e)));
        }
        Ok(Constraint { matcher, vocab_size: grammar.vocab_size, eos: grammar.eos })
    }

    /// Sets the logit of every token the grammar does not allow next to -inf. EOS is allowed
    /// exactly when the output so far is complete; once the grammar can only end, only EOS remains.
    /// Ids past the tokenizer's vocabulary are always masked. Says whether EOS is the one token
    /// left (the grammar can only end). Errs when the parser is in an error state (a token that was
    /// not allowed was committed) or no token of `logits` is allowed.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<Allowed, String> {
        let allowed =
            self.matcher.compute_mask_or_eos().map_err(|e| format!("grammar: {}", first_line(&e.to_string())))?;
        let known = logits.len().min(self.vocab_size).min(allowed.len());
        let mut count = 0usize;
        for (id, logit) in logits[..known].iter_mut().enumerate() {
            if allowed.get(id) {
                count += 1;
            } else {
                *logit = f32::NEG_INFINITY;
            }
        }
        logits[known..].fill(f32::NEG_INFINITY);
        match count {
            0 => Err("grammar: no token of the vocabulary can continue the output".to_string()),
            1 if (self.eos as usize) < known && allowed.get(self.eos as usize) => Ok(Allowed::OnlyEnd),
            _ => Ok(Allowed::Tokens),
        }
    }

    /// Advances past the chosen token, which must have been allowed by the last [`mask`](Self::mask).
    /// EOS is accepted when the output is complete and ends the constraint.
    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        if token as usize >= self.vocab_size {
            return Err(format!("grammar: token {token} is not in the tokenizer's vocabulary"));
        }
        if token == self.eos && self.is_finished() {
            return Ok(());
        }
        if self.matcher.is_stopped() {
            return Err(format!("grammar: token {token} after the end of the output"));
        }
        self.matcher.consume_token(token).map_err(|e| format!("grammar: {}", first_line(&e.to_string())))
    }

    /// True once the output is complete and nothing more may follow, EOS included once committed
    /// (the caller then ends the generation as if EOS).
    pub fn is_finished(&self) -> bool {
        matches!(
            self.matcher.stop_reason(),
            StopReason::NoExtension | StopReason::NoExtensionBias | StopReason::EndOfSentence
        )
    }
}

/// The parser factories made so far, by vocabulary fingerprint. A factory precomputes token-set
/// slices over the whole vocabulary (tens of milliseconds), so requests share it; a server has one
/// tokenizer, and the few kept here cover tests that load several.
static FACTORIES: Mutex<Vec<(u64, Arc<ParserFactory>)>> = Mutex::new(Vec::new());
const FACTORIES_KEPT: usize = 4;

fn factory_for(tokenizer: &Tokenizer) -> Result<Arc<ParserFactory>, String> {
    let (words, info) = token_bytes(tokenizer);
    let mut hasher = DefaultHasher::new();
    words.hash(&mut hasher);
    info.tok_eos.hash(&mut hasher);
    let key = hasher.finish();
    let mut cache = FACTORIES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, factory)) = cache.iter().find(|(k, _)| *k == key) {
        return Ok(factory.clone());
    }
    let trie = TokTrie::from(&info, &words);
    // Not canonical: our tokenizer is SentencePiece BPE, which the trie's greedy tokenization only
    // approximates, so llguidance must not force tokens it would pick by tokenizing forced bytes.
    let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("grammar: tokenizer: {e}"))?;
    factory.quiet();
    *factory.limits_mut() = ParserLimits { verbose_errors: false, ..ParserLimits::default() };
    let factory = Arc::new(factory);
    if cache.len() >= FACTORIES_KEPT {
        cache.remove(0);
    }
    cache.push((key, factory.clone()));
    Ok(factory)
}

/// Each id's bytes as llguidance sees them (see the module docs), and the trie's token info.
fn token_bytes(tokenizer: &Tokenizer) -> (Vec<Vec<u8>>, TokRxInfo) {
    let vocab = tokenizer.vocab_size();
    let eos = tokenizer.eos_id();
    let bos = tokenizer.bos_id();
    let pad = tokenizer.pad_id();
    let words = (0..vocab as u32)
        .map(|id| {
            // What the token adds in the middle of a text: `▁` a space, a byte piece its byte.
            let bytes = tokenizer.token_bytes(id);
            if id == eos || id == bos || Some(id) == pad || tokenizer.is_control(id) || bytes.is_empty() {
                return special(tokenizer.id_to_piece(id).unwrap_or_default());
            }
            bytes
        })
        .collect();
    let info = TokRxInfo {
        vocab_size: vocab as u32,
        tok_eos: eos,
        tok_bos: Some(bos),
        tok_pad: pad,
        tok_unk: None,
        tok_end_of_turn: None,
    };
    (words, info)
}

/// llguidance's form of a special token: 0xFF, then its name.
fn special(piece: &str) -> Vec<u8> {
    let mut bytes = vec![TokTrie::SPECIAL_TOKEN_MARKER];
    bytes.extend_from_slice(piece.as_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn grammar_is_send_sync_and_constraint_is_send() {
        assert_send_sync::<Grammar>();
        fn assert_send<T: Send>() {}
        assert_send::<Constraint>();
    }
}
