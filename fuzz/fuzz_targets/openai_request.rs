//! OpenAI's request JSON: the first byte picks the route (even: `/v1/completions`, odd:
//! `/v1/chat/completions`), the rest is the body. Never a panic; every request accepted satisfies the
//! server's limits (see request_checks.rs) and OpenAI's temperature range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vicuna_server::fuzzing::Route;

#[path = "request_checks.rs"]
mod request_checks;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let route = if selector % 2 == 0 { Route::Completions } else { Route::Chat };
    let Some(accepted) = request_checks::check(route, body) else { return };
    let sampling = &accepted.valid.config.sampling;
    if sampling.do_sample {
        assert!(sampling.temperature > 0.0 && sampling.temperature <= 2.0, "{sampling:?}");
    }
});
