//! `config.json`: never a panic, and an accepted config holds the invariants the model code relies on
//! (positive sizes, heads that divide the hidden size and each other, finite positive floats).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vicuna_weights::LlamaConfig;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let Ok(c) = LlamaConfig::from_json_str(text, "config.json") else { return };
    for size in [c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.head_dim] {
        assert!(size > 0, "{c:?}");
    }
    assert!(c.num_attention_heads > 0 && c.num_key_value_heads > 0, "{c:?}");
    assert_eq!(c.hidden_size % c.num_attention_heads, 0, "{c:?}");
    assert_eq!(c.num_attention_heads % c.num_key_value_heads, 0, "{c:?}");
    assert!(c.max_position_embeddings > 0, "{c:?}");
    for x in [c.rms_norm_eps, c.rope_theta] {
        assert!(x.is_finite() && x > 0.0, "{c:?}");
    }
    // What it writes back reads back the same (the CLI and quantizer save configs).
    let again: LlamaConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).expect("round trip");
    assert_eq!(again, c);
});
