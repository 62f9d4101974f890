//! The restricted pickle VM on a bare `data.pkl`: never a panic, never unbounded work or memory (the
//! campaign's -rss_limit_mb and -timeout watch that), and what it accepts is a state dict of tensors
//! whose sizes and strides pair up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vicuna_weights::fuzzing;

fuzz_target!(|bytes: &[u8]| {
    let Ok(tensors) = fuzzing::pickle_state_dict(bytes) else { return };
    for t in &tensors {
        assert_eq!(t.shape.len(), t.stride.len(), "{t:?}");
        assert!(t.shape.len() <= 64, "{t:?}");
    }
});
