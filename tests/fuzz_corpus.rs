//! Replays every fuzz corpus input and every crash the fuzzers found (fuzz/corpus/TARGET/,
//! fuzz/regressions/TARGET/) through the same functions the fuzz targets call, on stable, so
//! CI keeps them fixed without running a fuzzer.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if !p.is_file() {
                continue;
            }
            let data = std::fs::read(&p).expect("read input");
            let r = std::panic::catch_unwind(|| f(&data));
            assert!(r.is_ok(), "{} panics", p.display());
            n += 1;
        }
    }
    n
}

#[test]
fn api_decode_corpus_and_crashes_replay() {
    let n = replay("api_decode", procagent::fuzzing::api_decode);
    assert!(
        n >= 10,
        "only {n} inputs found under fuzz/: the corpus is missing"
    );
}

#[test]
fn proc_parsers_corpus_and_crashes_replay() {
    let n = replay("proc_parsers", procagent::fuzzing::proc_parsers);
    assert!(
        n >= 5,
        "only {n} inputs found under fuzz/: the corpus is missing"
    );
}

#[test]
fn gsekit_decode_corpus_and_crashes_replay() {
    let n = replay("gsekit_decode", procagent::fuzzing::gsekit_decode);
    assert!(
        n >= 10,
        "only {n} inputs found under fuzz/: the corpus is missing"
    );
}
