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

/// A token seen alone, as log-probability lists show it, with its bytes: its text in the middle of
/// a sentence (" world"), a special token's piece (`</s>`, with no bytes), and a byte of a
/// multi-byte character as `bytes:\xNN` (OpenAI's spelling, since it is no text by itself).
pub fn token_surface(tokenizer: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    if is_special(tokenizer, id) {
        return (tokenizer.id_to_piece(id).unwrap_or_default().to_string(), Vec::new());
    }
    let bytes = tokenizer.token_bytes(id);
    let text = match std::str::from_utf8(&bytes) {
        Ok(text) => text.to_string(),
        Err(_) => bytes.iter().fold(String::from("bytes:"), |mut s, b| {
            s.push_str(&format!("\\x{b:02x}"));
            s
        }),
    };
    (text, bytes)
}
