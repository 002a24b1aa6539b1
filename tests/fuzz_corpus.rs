//! The fuzz targets' seeds and corpora and every input a fuzzer found crashing (fuzz/regressions),
//! through the same entry points (src/fuzzing.rs): what `scripts/fuzz.sh` explored stays
//! explored in CI, on stable, without libFuzzer.

use latentloop::fuzzing::TARGETS;
use std::path::PathBuf;

#[test]
fn every_corpus_and_regression_input_returns() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (name, parse) in TARGETS {
        let mut seen = 0;
        for sub in ["seeds", "corpus", "regressions"] {
            let Ok(dir) = std::fs::read_dir(root.join(sub).join(name)) else { continue };
            for e in dir {
                let p = e.unwrap().path();
                let data = std::fs::read(&p).unwrap();
                // A panic names the file through the test's output.
                eprintln!("{}", p.display());
                parse(&data);
                seen += 1;
            }
        }
        assert!(seen > 0, "no corpus for the fuzz target {name}");
        replayed += seen;
    }
    eprintln!("replayed {replayed} inputs");
}
