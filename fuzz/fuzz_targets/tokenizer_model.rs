//! `tokenizer.model` (SentencePiece protobuf): never a panic; a model that loads encodes and decodes
//! text (ids inside the vocabulary, streaming decode equal to a whole decode).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use vicuna_tokenizer::Tokenizer;

fuzz_target!(|bytes: &[u8]| {
    let Ok(tokenizer) = Tokenizer::from_bytes(Path::new("tokenizer.model"), bytes) else { return };
    assert!(tokenizer.is_sentencepiece());
    check_round_trip(&tokenizer);
});

fn check_round_trip(tokenizer: &Tokenizer) {
    let vocab = tokenizer.vocab_size();
    assert!((tokenizer.bos_id() as usize) < vocab && (tokenizer.eos_id() as usize) < vocab);
    let ids = tokenizer.encode(" Hello  world\n\u{4f60}\u{1f999} <s>", true);
    assert!(ids.iter().all(|&id| (id as usize) < vocab), "{ids:?} past {vocab}");
    let whole = tokenizer.decode(&ids);
    let mut stream = tokenizer.stream_decoder();
    let mut streamed: String = ids.iter().map(|&id| stream.push(id)).collect();
    streamed.push_str(&stream.flush());
    assert_eq!(streamed, whole);
}
