//! TGI's request JSON (`POST /`, `/generate`, `/generate_stream`): never a panic, and every request
//! accepted satisfies the server's limits (see request_checks.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vicuna_server::fuzzing::Route;

#[path = "request_checks.rs"]
mod request_checks;

fuzz_target!(|body: &[u8]| {
    request_checks::check(Route::Tgi, body);
});
