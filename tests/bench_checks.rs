//! The GPU run's pass/fail checks (`bench/compare.py check`, which `bench/run_cuda.sh` relies on)
//! on synthetic records: all-failed runs, runs without candidates and caption-bench's failed
//! requests must fail. Runs `bench/test_compare.py` with the system Python (standard library only).

use std::process::Command;

#[test]
fn compare_py_checks_fail_failed_runs() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .args(["-m", "unittest", "-v", "test_compare"])
        .current_dir(format!("{root}/bench"))
        .output()
        .expect("python3 runs bench/test_compare.py");
    assert!(
        out.status.success(),
        "bench/test_compare.py failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
