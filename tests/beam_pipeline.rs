//! Beam users run the origin's pipeline against the service: the Python client package
//! (clients/python) and its RunInference model handler, on Beam's DirectRunner, caption the
//! example scenes through a real server process and print the origin's blocks; a URL the server
//! may not fetch goes to the failure output and the --output file with its code while the
//! pipeline succeeds; the client retries RESOURCE_EXHAUSTED from a full server (its details
//! carry a RetryInfo) and never INVALID_ARGUMENT. The checks are in
//! tests/beam/test_pipeline.py, run with .venv-beam (`make beam-env`, part of `make test`).

mod common;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{channel, server};

/// Runs `python script args` to completion (at most `limit`); returns (success, stdout, stderr).
fn run_python(python: &Path, script: &Path, args: &[String], limit: Duration) -> (bool, String, String) {
    let dir = std::env::temp_dir().join(format!("cc-beam-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    // Files, not pipes: nobody reads a pipe while we wait, and Beam logs a lot to stderr.
    let mut child = Command::new(python)
        .arg(script)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let (stdout, stderr) = (read(&out), read(&err));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(status.is_some(), "{} ran over {limit:?}; stderr:\n{stderr}\nstdout:\n{stdout}", script.display());
    (status.unwrap().success(), stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_beam_pipeline_runs_against_the_service() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv-beam/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make beam-env` (or `make test`), which creates .venv-beam from \
         tests/beam/requirements.txt and installs clients/python into it",
        python.display()
    );
    let allow = ["--fetch-allow", "127.0.0.1/32"];
    let target = server(&allow).spawn();
    // One admission slot, and time for a parked image fetch to hold it: the retry check.
    let limited = server(&allow).args(&["--max-inflight", "1", "--fetch-timeout-s", "30"]).spawn();
    let (target, limited) = (target.ready().await, limited.ready().await);
    channel(target.addr()).await;
    channel(limited.addr()).await;

    let args = vec!["--target".into(), target.addr().to_string(), "--limited".into(), limited.addr().to_string()];
    let script = root.join("tests/beam/test_pipeline.py");
    let started = Instant::now();
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || run_python(&python, &script, &args, Duration::from_secs(480)))
            .await
            .unwrap();
    eprintln!("beam pipeline test took {:.1} s", started.elapsed().as_secs_f64());
    assert!(ok, "tests/beam/test_pipeline.py failed:\n{stderr}\nstdout:\n{stdout}");
    println!("{stdout}");

    // The script checked everything; its summary is its last line, restated here.
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("a JSON summary line");
    assert_eq!(summary["blocks"], 9, "{summary}");
    assert!(summary["true_top"].as_u64().unwrap() >= 7, "{summary}");
    assert!(summary["retry_real"]["refused_then_retried"].as_u64().unwrap() >= 1, "{summary}");
    assert_eq!(summary["failed"]["code"], "PERMISSION_DENIED", "{summary}");
}
