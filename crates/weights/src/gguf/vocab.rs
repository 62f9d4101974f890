//! The vocabulary a LLaMA GGUF carries in its `tokenizer.ggml.*` metadata, as plain data: the
//! tokenizer crate builds a tokenizer from it, and the quantizer writes it (the two crates stay
//! independent of each other).

use super::{GgufFile, GgufValue, GgufValueType};
use crate::error::{bail, Error, Result};

/// SentencePiece-style vocabulary: `tokens[i]`, `scores[i]` and `token_types[i]` describe id `i`;
/// types use SentencePiece's numbering (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
/// 6 byte), as GGUF does.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: "llama" for SentencePiece BPE.
    pub model: String,
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub token_types: Vec<i32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// Whether a BOS token starts every encoded text (LLaMA: yes).
    pub add_bos: bool,
    /// Whether an EOS token ends every encoded text (LLaMA: no).
    pub add_eos: bool,
    /// `tokenizer.ggml.add_space_prefix`: whether text gets a leading `▁` (SentencePiece's
    /// `add_dummy_prefix`; llama.cpp's default, and LLaMA's, is yes).
    pub add_space_prefix: bool,
}

/// The token type code of user-defined pieces (added tokens such as `[PAD]`).
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;

impl GgufVocab {
    /// A made-up SentencePiece vocabulary of `size` unique tokens that llama.cpp accepts, for
    /// synthetic models: `<unk>`, `<s>`, `</s>`, the 256 byte pieces `<0x00>`…`<0xFF>` (llama.cpp's
    /// SPM loader looks some up, e.g. `<0x0A>` for newline), then pieces `▁t<i>` with falling scores.
    pub fn synthetic(size: usize) -> Result<GgufVocab> {
        const FIXED: usize = 3 + 256;
        if size < FIXED {
            bail!("a synthetic vocabulary needs at least {FIXED} tokens (unk, bos, eos and 256 bytes), not {size}");
        }
        let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
        let mut token_types = vec![2, 3, 3];
        for byte in 0..=255u8 {
            tokens.push(format!("<0x{byte:02X}>"));
            token_types.push(6);
        }
        for i in 0..size - FIXED {
            tokens.push(format!("\u{2581}t{i}"));
            token_types.push(1);
        }
        let scores = (0..size).map(|i| if i < FIXED { 0.0 } else { -((i - FIXED) as f32) }).collect();
        Ok(GgufVocab {
            model: "llama".into(),
            tokens,
            scores,
            token_types,
            bos_id: Some(1),
            eos_id: Some(2),
            unk_id: Some(0),
            pad_id: None,
            add_bos: true,
            add_eos: false,
            add_space_prefix: true,
        })
    }

    /// Checks that the vectors are parallel and the special ids inside the vocabulary.
    pub fn validate(&self, source: &str) -> Result<()> {
        let n = self.tokens.len();
        if n == 0 {
            bail!("{source}: the vocabulary is empty");
        }
        if self.scores.len() != n || self.token_types.len() != n {
            bail!(
                "{source}: the vocabulary has {n} tokens but {} scores and {} token types; they must match one to one",
                self.scores.len(),
                self.token_types.len()
            );
        }
        for (what, id) in
            [("bos", self.bos_id), ("eos", self.eos_id), ("unknown", self.unk_id), ("padding", self.pad_id)]
        {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                bail!("{source}: the {what} token id {id} is outside the vocabulary of {n} tokens");
            }
        }
        Ok(())
    }

    /// The metadata pairs llama.cpp's converter writes for this vocabulary (`tokenizer.ggml.*`).
    pub fn metadata(&self) -> Vec<(String, GgufValue)> {
        let strings = self.tokens.iter().map(|t| GgufValue::String(t.clone())).collect();
        let scores = self.scores.iter().map(|&s| GgufValue::F32(s)).collect();
        let types = self.token_types.iter().map(|&t| GgufValue::I32(t)).collect();
        let mut out = vec![
            ("tokenizer.ggml.model".to_string(), GgufValue::String(self.model.clone())),
            ("tokenizer.ggml.tokens".to_string(), GgufValue::Array(GgufValueType::String, strings)),
            ("tokenizer.ggml.scores".to_string(), GgufValue::Array(GgufValueType::F32, scores)),
            ("tokenizer.ggml.token_type".to_string(), GgufValue::Array(GgufValueType::I32, types)),
        ];
        for (key, id) in [
            ("bos_token_id", self.bos_id),
            ("eos_token_id", self.eos_id),
            ("unknown_token_id", self.unk_id),
            ("padding_token_id", self.pad_id),
        ] {
            if let Some(id) = id {
                out.push((format!("tokenizer.ggml.{key}"), GgufValue::U32(id)));
            }
        }
        out.push(("tokenizer.ggml.add_bos_token".to_string(), GgufValue::Bool(self.add_bos)));
        out.push(("tokenizer.ggml.add_eos_token".to_string(), GgufValue::Bool(self.add_eos)));
        if !self.add_space_prefix {
            // Written only where it differs from llama.cpp's default, as its converter does.
            out.push(("tokenizer.ggml.add_space_prefix".to_string(), GgufValue::Bool(false)));
        }
        out
    }
}

impl GgufFile {
    /// The vocabulary of `tokenizer.ggml.*`. Scores default to 0 and types to normal when absent, as
    /// llama.cpp's loader does.
    pub fn vocab(&self) -> Result<GgufVocab> {
        let shown = self.path().display().to_string();
        let model = self.get_str("tokenizer.ggml.model")?.ok_or_else(|| {
            Error::new(format!("{shown} has no tokenizer (tokenizer.ggml.model is missing); pass a tokenizer folder"))
        })?;
        let tokens = self
            .get_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| Error::new(format!("{shown}: tokenizer.ggml.tokens is missing")))?;
        let tokens: Vec<String> = tokens
            .iter()
            .map(|t| t.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| Error::new(format!("{shown}: tokenizer.ggml.tokens must be an array of strings")))?;
        let scores = match self.get_array("tokenizer.ggml.scores")? {
            None => vec![0.0; tokens.len()],
            Some(items) => items
                .iter()
                .map(|v| v.as_f64().map(|x| x as f32))
                .collect::<Option<_>>()
                .ok_or_else(|| Error::new(format!("{shown}: tokenizer.ggml.scores must be an array of numbers")))?,
        };
        let token_types = match self.get_array("tokenizer.ggml.token_type")? {
            None => vec![1; tokens.len()],
            Some(items) => items
                .iter()
                .map(|v| v.as_i128().and_then(|i| i32::try_from(i).ok()))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    Error::new(format!("{shown}: tokenizer.ggml.token_type must be an array of integers"))
                })?,
        };
        let vocab = GgufVocab {
            model: model.to_string(),
            tokens,
            scores,
            token_types,
            bos_id: self.get_u32("tokenizer.ggml.bos_token_id")?,
            eos_id: self.get_u32("tokenizer.ggml.eos_token_id")?,
            unk_id: self.get_u32("tokenizer.ggml.unknown_token_id")?,
            pad_id: self.get_u32("tokenizer.ggml.padding_token_id")?,
            add_bos: self.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(true),
            add_eos: self.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
            add_space_prefix: self.get_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true),
        };
        vocab.validate(&shown)?;
        Ok(vocab)
    }
}
