//! A PyTorch zip checkpoint (`.bin`): the zip reader on its own, then the whole reader (zip, restricted
//! unpickler, storage checks). Never a panic; every entry and tensor lies inside the file; every strided
//! view reaches only its storage (its elements are gathered, as `Checkpoint::bytes` would).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vicuna_weights::fuzzing;

/// Views up to this size are gathered (a view with stride 0 may legitimately expand a small storage).
const MAX_GATHER: usize = 1 << 20;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(entries) = fuzzing::zip_entries(bytes) {
        for (name, range) in &entries {
            assert!(range.start <= range.end && range.end <= bytes.len(), "{name}: {range:?}");
        }
    }
    let Ok(tensors) = fuzzing::pytorch(bytes) else { return };
    for t in &tensors {
        assert!(t.data.start <= t.data.end && t.data.end <= bytes.len(), "{t:?}");
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).expect("numel checked by the reader");
        match &t.view {
            None => assert_eq!(t.data.len(), numel * t.elem_size, "{t:?}"),
            Some((offset, stride)) => {
                assert_eq!(stride.len(), t.shape.len());
                // The last element the view touches lies inside the storage.
                let last: usize = offset + t.shape.iter().zip(stride).map(|(&d, &s)| (d - 1) * s).sum::<usize>();
                assert!((last + 1) * t.elem_size <= t.data.len(), "{t:?}");
                if numel.saturating_mul(t.elem_size) <= MAX_GATHER {
                    assert_eq!(fuzzing::gather_view(bytes, t).len(), numel * t.elem_size);
                }
            }
        }
    }
});
