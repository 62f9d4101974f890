//! `tokenizer.json` loading: never a panic; a file that loads encodes text (its own load check
//! promises that) with ids inside the vocabulary, and decodes without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use vicuna_tokenizer::Tokenizer;

fuzz_target!(|bytes: &[u8]| {
    let Ok(tokenizer) = Tokenizer::from_bytes(Path::new("tokenizer.json"), bytes) else { return };
    assert!(!tokenizer.is_sentencepiece());
    let ids = tokenizer.encode("Hello world\n\u{4f60}\u{1f999}", true);
    let vocab = tokenizer.vocab_size();
    // BOS is LLaMA's id 1 when the file has no `<s>`, even for a smaller vocabulary.
    assert!(ids[1..].iter().all(|&id| (id as usize) < vocab), "{ids:?} past {vocab}");
    let _ = tokenizer.decode(&ids);
});
