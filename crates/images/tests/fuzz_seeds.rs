//! The fuzz target's body over its committed seed corpus, so every test run replays the seeds
//! (and the crashes once found, which are added there) without libFuzzer.

#[path = "../fuzz/exercise.rs"]
mod exercise;

#[test]
fn every_seed_decodes_or_errors_without_panicking() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/decode");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 20, "only {} seeds in {}", files.len(), dir.display());
    let decoded = files.iter().filter(|f| exercise::exercise(&std::fs::read(f).unwrap())).count();
    // The corpus holds good images of every format as well as broken ones.
    assert!(decoded >= 10, "only {decoded} of {} seeds decoded", files.len());
}
