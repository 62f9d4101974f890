//! Per-token text, for `/tokenize` and for the prompt tokens in TGI's details.

use vicuna_tokenizer::Tokenizer;

/// BOS, EOS and the pad token: tokens that mark structure rather than carry text.
pub fn is_special(tokenizer: &Tokenizer, id: u32) -> bool {
    id == tokenizer.bos_id() || id == tokenizer.eos_id() || Some(id) == tokenizer.pad_id()
}

/// The text each id adds when `ids` are decoded from the start of a text, so that the pieces add up
/// to `decode(ids)`. A character spread over several byte tokens belongs to its last byte; the
/// earlier ones get "".
pub fn token_texts(tokenizer: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut decoder = tokenizer.stream_decoder();
    let mut texts: Vec<String> = ids.iter().map(|&id| decoder.push(id)).collect();
    if let Some(last) = texts.last_mut() {
        last.push_str(&decoder.flush());
    }
    texts
}
