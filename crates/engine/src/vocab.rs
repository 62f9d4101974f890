//! The vocabulary a GGUF file carries, built from a Hugging Face tokenizer the way llama.cpp's
//! `convert_hf_to_gguf.py` builds it (`_create_vocab_sentencepiece`): the pieces, scores and types
//! of `tokenizer.model`; added tokens (`added_tokens.json`, e.g. StableVicuna's `[PAD]` = 32000) as
//! user-defined pieces with score -1000; and `[PAD<i>]` unused pieces up to the model's vocabulary
//! size. The reverse: the tokenizer a GGUF file carries. And the check that a tokenizer belongs to
//! a model. (The tokenizer and weights crates do not know each other; this is where they meet, for
//! the command line, the server and the fuzz targets alike.)

use std::path::{Path, PathBuf};

use vicuna_model::{Error, Result};
use vicuna_tokenizer::{SentencePieceBpe, Tokenizer};
use vicuna_weights::{GgufFile, GgufVocab, TOKEN_TYPE_USER_DEFINED};

fn tokenizer_error(e: vicuna_tokenizer::Error) -> Error {
    Error::msg(e.to_string())
}

/// SentencePiece's type code of unused pieces (the converter's padding).
const TOKEN_TYPE_UNUSED: i32 = 5;
/// The score the converter gives added and padding pieces.
const ADDED_SCORE: f32 = -1000.0;

/// The vocabulary of the tokenizer at `path` (a `tokenizer.model` file, or the folder holding it,
/// with its side files), for a model of `vocab_size` embedding rows.
pub fn vocab_from_tokenizer(path: &Path, vocab_size: usize) -> Result<GgufVocab> {
    let model_file: PathBuf = if path.is_dir() { path.join("tokenizer.model") } else { path.to_path_buf() };
    if !model_file.is_file() {
        return Err(Error::msg(format!(
            "{} not found; GGUF needs the SentencePiece tokenizer.model of the model (pass --tokenizer FILE, or --synthetic-vocab for a test model)",
            model_file.display()
        )));
    }
    let dir = model_file.parent().unwrap_or(Path::new("."));
    let bpe = SentencePieceBpe::from_file(&model_file).map_err(tokenizer_error)?;
    // Loads the side files too: added tokens and the pad token.
    let tokenizer = Tokenizer::from_file(&model_file).map_err(tokenizer_error)?;
    let mut tokens = Vec::with_capacity(tokenizer.vocab_size());
    let mut scores = Vec::with_capacity(tokenizer.vocab_size());
    let mut token_types = Vec::with_capacity(tokenizer.vocab_size());
    for id in 0..bpe.len() as u32 {
        let (Some(piece), Some(score), Some(ty)) = (bpe.piece(id), bpe.score(id), bpe.piece_type(id)) else {
            unreachable!("ids below len() have a piece");
        };
        tokens.push(piece.to_string());
        scores.push(score);
        token_types.push(ty.code() as i32);
    }
    for id in bpe.len() as u32..tokenizer.vocab_size() as u32 {
        let piece = tokenizer.id_to_piece(id).expect("ids below vocab_size have a piece");
        tokens.push(piece.to_string());
        scores.push(ADDED_SCORE);
        token_types.push(TOKEN_TYPE_USER_DEFINED);
    }
    if tokens.len() > vocab_size {
        return Err(Error::msg(format!(
            "the tokenizer {} has {} tokens but the model only {vocab_size} embedding rows; use the model's own tokenizer",
            model_file.display(),
            tokens.len()
        )));
    }
    for i in 0..vocab_size - tokens.len() {
        tokens.push(format!("[PAD{i}]"));
        scores.push(ADDED_SCORE);
        token_types.push(TOKEN_TYPE_UNUSED);
    }
    let (add_bos, add_eos) = add_special_tokens(&dir.join("tokenizer_config.json"))?;
    Ok(GgufVocab {
        model: "llama".into(),
        tokens,
        scores,
        token_types,
        bos_id: Some(tokenizer.bos_id()),
        eos_id: Some(tokenizer.eos_id()),
        unk_id: Some(bpe.unk_id()),
        pad_id: tokenizer.pad_id(),
        add_bos,
        add_eos,
        add_space_prefix: bpe.add_dummy_prefix(),
    })
}

/// `add_bos_token` / `add_eos_token` of `tokenizer_config.json` (LLaMA's defaults: true, false).
fn add_special_tokens(path: &Path) -> Result<(bool, bool)> {
    if !path.is_file() {
        return Ok((true, false));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::msg(format!("cannot read {}: {e}", path.display())))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::msg(format!("{} is not valid JSON ({e}); restore it", path.display())))?;
    let flag = |key: &str, default: bool| match json.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => v.as_bool().ok_or_else(|| Error::msg(format!("{}: {key} must be true or false", path.display()))),
    };
    Ok((flag("add_bos_token", true)?, flag("add_eos_token", false)?))
}

/// The tokenizer a GGUF file carries (`tokenizer.ggml.*`): SentencePiece-style vocabularies only (LLaMA's).
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let vocab = file.vocab()?;
    let source = file.path().display();
    if vocab.model != "llama" {
        return Err(Error::msg(format!(
            "{source}: tokenizer.ggml.model is {:?}, but only SentencePiece vocabularies (\"llama\") are supported; pass --tokenizer FILE",
            vocab.model
        )));
    }
    let special = |id: Option<u32>, what: &str, default: u32| {
        id.unwrap_or_else(|| {
            tracing::warn!("{source} names no {what} token; using id {default} (LLaMA's)");
            default
        })
    };
    let ids = [special(vocab.unk_id, "unknown", 0), special(vocab.bos_id, "BOS", 1), special(vocab.eos_id, "EOS", 2)];
    Tokenizer::from_vocab_parts(
        vocab.tokens,
        vocab.scores,
        &vocab.token_types,
        ids,
        vocab.pad_id,
        vocab.add_space_prefix,
    )
    .map_err(|e| Error::msg(format!("{source}: its tokenizer: {e}")))
}

/// A tokenizer with more tokens than the model (`model`, named in the message) has embedding rows
/// would feed it ids it has no row for.
pub fn check_tokenizer_fits(tokenizer: &Tokenizer, vocab_size: usize, model: &str) -> Result<()> {
    if tokenizer.vocab_size() > vocab_size {
        return Err(Error::msg(format!(
            "the tokenizer has {} tokens but the model {model} only {vocab_size}: they do not belong together; use the \
             model's own tokenizer",
            tokenizer.vocab_size()
        )));
    }
    Ok(())
}
