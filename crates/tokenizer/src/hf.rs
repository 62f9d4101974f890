//! The `tokenizer.json` backend: encoding through the Hugging Face
//! `tokenizers` crate, decoding through this crate's SentencePiece rules.
//!
//! Encoding calls `encode(text, add_special_tokens = false)`, so the file's
//! post-processor does not add BOS; [`crate::Tokenizer::encode`] adds it, the
//! same way for both backends.
//!
//! One known difference from SentencePiece: `tokenizers` treats special
//! tokens written in the text (literal `<s>`, `</s>`, `<unk>`) as those
//! tokens, and gives the text around them their own dummy `▁` prefix. This is
//! what transformers does too; SentencePiece treats them as plain text.

use std::path::Path;

use serde_json::Value;
use tokenizers::AddedToken;

use crate::bpe::{parse_byte_piece, SPACE_SYMBOL};
use crate::decode::{DecodeTable, TokenKind};
use crate::proto::DEFAULT_UNK_SURFACE;
use crate::{Error, Result};

pub(crate) struct HfBackend {
    tokenizer: tokenizers::Tokenizer,
}

impl std::fmt::Debug for HfBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfBackend").field("vocab_size", &self.tokenizer.get_vocab_size(true)).finish()
    }
}

const FIX: &str = "re-download tokenizer.json (a Hugging Face tokenizers file)";

impl HfBackend {
    /// Loads `tokenizer.json` from its text.
    pub(crate) fn from_json(path: &Path, text: &str) -> Result<HfBackend> {
        let tokenizer: tokenizers::Tokenizer =
            text.parse().map_err(|e| Error::in_file(path, format_args!("invalid tokenizer.json ({e})"), FIX))?;
        let total = tokenizer.get_vocab_size(true);
        if total == 0 {
            return Err(Error::in_file(path, "tokenizer.json has an empty vocabulary", FIX));
        }
        // Ids are table indices (decoding, the model's embedding rows): a vocabulary with gaps would
        // encode to ids past the `total` entries the decode table and vocab_size know of.
        if let Some((piece, id)) = tokenizer.get_vocab(true).into_iter().find(|&(_, id)| id as usize >= total) {
            return Err(Error::in_file(
                path,
                format_args!("tokenizer.json gives {piece:?} id {id}, but it has {total} tokens: ids must run from 0 without gaps"),
                FIX,
            ));
        }
        let backend = HfBackend { tokenizer };
        // Fail at load time, not on the first call to encode, if the file's
        // pipeline cannot encode ordinary text.
        backend
            .encode("Hello world\n\u{4f60}\u{1f999}")
            .map_err(|e| Error::in_file(path, format_args!("tokenizer.json cannot encode text ({e})"), FIX))?;
        Ok(backend)
    }

    pub(crate) fn encode(&self, text: &str) -> tokenizers::Result<Vec<u32>> {
        Ok(self.tokenizer.encode_fast(text, false)?.get_ids().to_vec())
    }

    pub(crate) fn token_to_id(&self, piece: &str) -> Option<u32> {
        self.tokenizer.token_to_id(piece)
    }

    /// Adds `added_tokens.json` entries the file does not already have, as
    /// special tokens (matched whole in the text, like transformers does).
    pub(crate) fn add_tokens(&mut self, side_path: &Path, tokens: &[(String, u32)]) -> Result<()> {
        for (text, id) in tokens {
            match self.tokenizer.token_to_id(text) {
                Some(existing) if existing == *id => continue,
                Some(existing) => {
                    return Err(Error::in_file(
                        side_path,
                        format_args!("{text:?} is given id {id} but tokenizer.json has it as {existing}"),
                        "make added_tokens.json agree with tokenizer.json",
                    ))
                }
                None => {}
            }
            let next = self.tokenizer.get_vocab_size(true) as u32;
            if *id != next {
                return Err(Error::in_file(
                    side_path,
                    format_args!("added token {text:?} has id {id}, but the next free id is {next}"),
                    "added token ids must follow the vocabulary without gaps",
                ));
            }
            self.tokenizer.add_special_tokens(&[AddedToken::from(text.clone(), true)]);
            if self.tokenizer.token_to_id(text) != Some(*id) {
                return Err(Error::in_file(
                    side_path,
                    format_args!("could not add token {text:?} as id {id}"),
                    "make added_tokens.json agree with tokenizer.json",
                ));
            }
        }
        Ok(())
    }

    /// The id → piece table for decoding. Ids of the model's own vocabulary
    /// decode like SentencePiece pieces (special ones as control or unknown);
    /// tokens added on top of it decode to their literal text.
    pub(crate) fn decode_table(&self, json: &Value) -> DecodeTable {
        let model = &json["model"];
        let unk_token = model["unk_token"].as_str();
        let byte_fallback = model["byte_fallback"].as_bool().unwrap_or(false);
        let added = self.tokenizer.get_added_tokens_decoder();
        let base = self.tokenizer.get_vocab_size(false) as u32;
        let total = self.tokenizer.get_vocab_size(true) as u32;

        let mut table = DecodeTable::new(adds_dummy_prefix(json), DEFAULT_UNK_SURFACE);
        for id in 0..total {
            let piece = self.tokenizer.id_to_token(id).unwrap_or_default();
            let special = added.get(&id).is_some_and(|t| t.special);
            let kind = if Some(piece.as_str()) == unk_token {
                TokenKind::Unknown
            } else if id >= base {
                TokenKind::Literal
            } else if special || piece.is_empty() {
                TokenKind::Control
            } else if let Some(byte) = parse_byte_piece(&piece).filter(|_| byte_fallback) {
                TokenKind::Byte(byte)
            } else {
                TokenKind::Text
            };
            table.push(piece, kind);
        }
        table
    }
}

/// Whether the file's pipeline puts a `▁` in front of the text (a `Prepend`
/// normalizer, or a `Metaspace` pre-tokenizer that prepends), in which case
/// decoding drops it again.
fn adds_dummy_prefix(json: &Value) -> bool {
    fn any(value: &Value, test: &dyn Fn(&Value) -> bool) -> bool {
        test(value)
            || match value {
                Value::Array(items) => items.iter().any(|v| any(v, test)),
                Value::Object(map) => map.values().any(|v| any(v, test)),
                _ => false,
            }
    }
    let prepend = |v: &Value| v["type"] == "Prepend" && v["prepend"] == SPACE_SYMBOL;
    let metaspace = |v: &Value| {
        v["type"] == "Metaspace"
            && (v["add_prefix_space"] == true || v["prepend_scheme"].as_str().is_some_and(|s| s != "never"))
    };
    any(&json["normalizer"], &prepend) || any(&json["pre_tokenizer"], &metaspace)
}
