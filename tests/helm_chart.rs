//! The Helm chart in helm/ lints clean, renders with default and overridden values (and every
//! documented install command) into manifests valid on the Kubernetes versions it claims, and wires
//! the server the way a deployer relies on. The checks live in tests/helm/check_chart.py, which
//! drives Helm's own SDK (no helm binary or cluster needed); `make test` installs its packages from
//! tests/helm/requirements.txt. The chart's `helm test` Pod runs its command, as rendered, against
//! servers of the binary under test (tests/helm/run_hook.py).

mod common;

use std::process::{Command, Output};

fn python(script: &str, args: &[&str]) -> Output {
    let root = env!("CARGO_MANIFEST_DIR");
    let python = format!("{root}/.venv/bin/python");
    Command::new(&python)
        .arg(format!("{root}/tests/helm/{script}"))
        .args(args)
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (make test creates .venv and installs tests/helm/requirements.txt)"))
}

fn assert_ok(what: &str, out: &Output) {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{stderr}{stdout}", out.status);
    println!("{stdout}");
}

#[test]
fn helm_chart_lints_renders_and_validates() {
    assert_ok("chart check", &python("check_chart.py", &[]));
}

/// The test hook with the default values (plaintext, no token), and with TLS and a token: it
/// verifies the server with the CA of the Secret it mounts and sends the first line of the
/// token's key, which during a rotation holds more than one (here the second is one the server
/// refuses, so only the first line gets through).
#[tokio::test]
async fn the_test_hook_captions_through_a_running_server() {
    let tls = common::TlsFiles::new("helm-hook");
    let server_tokens = tls.dir.join("server-tokens");
    std::fs::write(&server_tokens, "current\nprevious\n").unwrap();
    let secret_key = tls.dir.join("secret-key");
    std::fs::write(&secret_key, "current\nnot-a-token-the-server-knows\n").unwrap();
    let (plain, secured) = tokio::join!(
        common::server(&[]).start(),
        common::server(&[
            "--tls-cert",
            &tls.cert,
            "--tls-key",
            &tls.key,
            "--auth-token-file",
            server_tokens.to_str().unwrap()
        ])
        .start(),
    );
    let binary = env!("CARGO_BIN_EXE_caption-cascade");

    let endpoint = format!("127.0.0.1:{}", plain.addr().port());
    assert_ok("the default test hook", &python("run_hook.py", &["--binary", binary, "--endpoint", &endpoint]));

    // The certificate names localhost; the hook dials the endpoint's host.
    let endpoint = format!("localhost:{}", secured.addr().port());
    let values = r#"{"tls": {"secretName": "caption-tls"}, "auth": {"tokenSecretName": "caption-token", "tokenSecretKey": "bearer"}}"#;
    let ca = format!("caption-tls/ca.crt={}", tls.ca);
    let token = format!("caption-token/bearer={}", secret_key.display());
    let args = ["--binary", binary, "--endpoint", &endpoint, "--values", values, "--secret", &ca, "--secret", &token];
    assert_ok("the test hook with TLS and a token", &python("run_hook.py", &args));
}
