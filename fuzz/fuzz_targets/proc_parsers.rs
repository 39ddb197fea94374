//! The pid-file text parser and the /proc/PID/stat parser on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    procagent::fuzzing::proc_parsers(data);
});
