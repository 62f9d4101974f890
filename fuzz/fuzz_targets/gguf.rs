//! GGUF: never a panic; every tensor accepted lies inside the file at an aligned offset and holds
//! exactly its type's bytes for its dims; the metadata readers the loaders use (`llama_config`,
//! `vocab`, and the tokenizer built from the vocabulary, as `vicuna` builds it) fail cleanly or give
//! values within their documented bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use vicuna_weights::GgufFile;

fuzz_target!(|bytes: &[u8]| {
    let len = bytes.len();
    let owned = bytes.to_vec();
    // Moving the vector into the file keeps its buffer: tensor slices are offsets from here.
    let base = owned.as_ptr() as usize;
    let Ok(file) = GgufFile::from_bytes(Path::new("fuzz.gguf"), owned) else { return };
    assert!(file.alignment().is_power_of_two());
    assert!(file.data_offset() <= len && file.data_offset() % file.alignment() == 0);
    for t in file.tensors() {
        assert!(!t.dims.is_empty() && t.dims.len() <= 4, "{}", t.name);
        let row_bytes = t.row_len() / t.ty.block_size() * t.ty.block_bytes();
        assert_eq!(t.data.len(), row_bytes * t.rows(), "{}", t.name);
        let start = t.data.as_ptr() as usize - base;
        assert!(start + t.data.len() <= len);
        assert!(start >= file.data_offset() && (start - file.data_offset()) % file.alignment() == 0);
        file.release(t.data).expect("releasing owned bytes is a no-op");
    }
    if let Ok(config) = file.llama_config() {
        assert!(config.num_hidden_layers <= file.tensors().len());
    }
    if let Ok(vocab) = file.vocab() {
        let n = vocab.tokens.len();
        assert!(n > 0 && vocab.scores.len() == n && vocab.token_types.len() == n);
    }
    if let Ok(tokenizer) = vicuna_engine::tokenizer_from_gguf(&file) {
        let ids = tokenizer.encode("Hello world\n\u{4f60}", true);
        assert!(ids.iter().all(|&id| (id as usize) < tokenizer.vocab_size()));
        let _ = tokenizer.decode(&ids);
    }
});
