//! API request decoding and validation: the first byte picks the API, the rest is its body.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    procagent::fuzzing::api_decode(data);
});
