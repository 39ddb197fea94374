//! GSEKit API decoding: process_status (filters, expressions, slices, rows, paging) and
//! operate_process (process_infos resolved against a small registry). The first byte picks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    procagent::fuzzing::gsekit_decode(data);
});
