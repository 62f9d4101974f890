//! The safetensors header of a whole file: never a panic, and every tensor accepted lies inside the
//! file's data section, holds exactly dtype size × shape bytes, and shares no byte with another.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vicuna_weights::fuzzing;

fuzz_target!(|bytes: &[u8]| {
    let Ok(tensors) = fuzzing::safetensors(bytes) else { return };
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut spans = Vec::new();
    for t in &tensors {
        assert!(t.view.is_none());
        assert!(header_end <= t.data.start && t.data.start <= t.data.end && t.data.end <= bytes.len(), "{t:?}");
        let numel: usize = t.shape.iter().product();
        assert_eq!(numel * t.elem_size, t.data.len(), "{t:?}");
        if !t.data.is_empty() {
            spans.push(t.data.clone());
        }
    }
    spans.sort_by_key(|r| r.start);
    for pair in spans.windows(2) {
        assert!(pair[0].end <= pair[1].start, "overlap {pair:?}");
    }
});
