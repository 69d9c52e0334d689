//! A client written in another language: Python stubs generated from our proto call each service
//! and see the same captions, orderings and status codes a Rust caller sees — in plaintext, and
//! over TLS with a bearer token as a deployment that turns both on is called. And the Python
//! client package (clients/python), pip-installed into a fresh venv, captions a path, a
//! pathlib.Path, bytes, a file object and a URL, and reads the server's error details.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use common::{channel, server_addr};

/// Runs the Python client against `addr` with `extra` arguments; returns what it saw.
async fn python_client(addr: SocketAddr, extra: Vec<String>) -> serde_json::Value {
    let root = env!("CARGO_MANIFEST_DIR");
    let python = format!("{root}/.venv/bin/python");
    let image = format!("{root}/examples/images/scene_1.png");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .args([&format!("{root}/tests/clients/python_client.py"), &addr.to_string(), &image])
            .args(extra)
            .output()
            .unwrap_or_else(|e| panic!("{python}: {e} (make test installs tests/clients/requirements.txt)"))
    })
    .await
    .unwrap();
    assert!(out.status.success(), "python client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What every run must have seen, checked against the same call from a Rust client.
async fn check(seen: &serde_json::Value) {
    let rust = common::reference_caption().await;
    assert_eq!(seen["caption"][0]["text"], rust.captions[0].text.as_str());
    assert!(seen["key"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(seen["candidates"].as_array().unwrap().len(), 4);
    let rank = seen["rank"].as_array().unwrap();
    assert_eq!(rank[0]["index"], 0, "the true caption ranks first: {rank:?}");
    let total: f64 = rank.iter().map(|r| r["probability"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-4);
    assert_eq!(seen["bad_image"]["code"], "INVALID_ARGUMENT");
    assert_eq!(seen["bad_param"]["code"], "INVALID_ARGUMENT");
    assert!(seen["bad_param"]["details"].as_str().unwrap().starts_with("top_p"));
}

#[tokio::test]
async fn python_stubs_call_every_service() {
    let addr = server_addr();
    channel(addr).await; // ready
    let seen = python_client(addr, vec![]).await;
    check(&seen).await;
}

#[tokio::test]
async fn python_stubs_call_over_tls_with_a_bearer_token() {
    let tls = common::TlsFiles::new("py-tls");
    let server = common::spawn_server(
        &["--tls-cert", &tls.cert, "--tls-key", &tls.key],
        &[("CAPTION_AUTH_TOKEN", "python-secret")],
    )
    .await;
    let addr = server.addr();
    let seen =
        python_client(addr, vec!["--tls-ca".into(), tls.ca.clone(), "--token".into(), "python-secret".into()]).await;
    drop(server);
    check(&seen).await;
    assert_eq!(seen["no_token"]["code"], "UNAUTHENTICATED", "{}", seen["no_token"]);
}

/// `pip install ./clients/python` into a fresh venv, as the package README says, from a copy of
/// the package and the proto (as a fresh clone has them, without this checkout's build output).
/// Offline: the venv sees .venv's packages (grpcio, protobuf, grpcio-tools, setuptools) through a
/// `.pth` file, as `--system-site-packages` would show a system's, and pip is told `--no-index`.
/// Returns the venv's directory (inside `dir`).
fn install_in_fresh_venv(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (make test installs .venv)"));
        assert!(
            out.status.success(),
            "{cmd:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let src = dir.join("src");
    copy_tree(&root.join("proto"), &src.join("proto"));
    copy_tree(&root.join("clients/python"), &src.join("clients/python"));
    let venv = dir.join("venv");
    run(Command::new(&python).args(["-m", "venv", "--without-pip"]).arg(&venv));
    let site = |prefix: &Path| {
        let lib = prefix.join("lib");
        let version =
            std::fs::read_dir(&lib).unwrap().flatten().find(|e| e.file_name().to_string_lossy().starts_with("python3"));
        lib.join(version.unwrap_or_else(|| panic!("no python3* in {}", lib.display())).file_name())
            .join("site-packages")
    };
    std::fs::write(site(&venv).join("project-venv.pth"), format!("{}\n", site(&root.join(".venv")).display())).unwrap();
    run(Command::new(venv.join("bin/python"))
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index", "--no-build-isolation"])
        .arg(src.join("clients/python"))
        .current_dir(dir));
    venv
}

/// Copies a source tree, leaving out build output (generated stubs, build/, egg-info, caches).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if matches!(name.as_ref(), "build" | "_pb" | "__pycache__") || name.ends_with(".egg-info") {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

#[tokio::test]
async fn the_package_installs_in_a_fresh_venv_and_captions_what_users_have() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let images = root.join("examples/images");
    let server =
        common::spawn_server(&["--allow-file-dir", images.to_str().unwrap(), "--max-message-bytes", "65536"], &[])
            .await;
    let addr = server.addr();
    let dir = std::env::temp_dir().join(format!("cc-py-package-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let script = root.join("tests/clients/python_package.py");
    // The package README's snippet, as written but for the server's port.
    let readme = std::fs::read_to_string(root.join("clients/python/README.md")).unwrap();
    let snippet = readme.split("```python\n").nth(1).and_then(|rest| rest.split("```").next()).expect("a python block");
    assert!(snippet.contains("localhost:50051"), "{snippet}");
    let snippet = snippet.replace("localhost:50051", &addr.to_string());
    let (out, readme_out, dir) = tokio::task::spawn_blocking(move || {
        let venv = install_in_fresh_venv(&dir);
        // From outside the checkout, so the import can only find the installed package.
        let out = Command::new(venv.join("bin/python"))
            .arg(&script)
            .args([addr.to_string(), images.display().to_string(), venv.display().to_string()])
            .current_dir(&dir)
            .output()
            .unwrap();
        // The README says to run it from the repository's root.
        let readme_out =
            Command::new(venv.join("bin/python")).args(["-c", &snippet]).current_dir(root).output().unwrap();
        (out, readme_out, dir)
    })
    .await
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success(), "the installed package failed:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        readme_out.status.success(),
        "the README's snippet failed:\n{}",
        String::from_utf8_lossy(&readme_out.stderr)
    );
    let printed = String::from_utf8_lossy(&readme_out.stdout);
    // Two images, each its key and then its captions (up to three: identical ones are merged).
    let (captions, keys): (Vec<&str>, Vec<&str>) = printed.lines().partition(|l| l.starts_with("  "));
    assert!(keys.len() == 2 && keys[0].starts_with("sha256:") && keys[1].starts_with("file://"), "{printed}");
    assert!((2..=6).contains(&captions.len()) && captions.iter().all(|l| l.contains("  cosine ")), "{printed}");
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["bad_image"], serde_json::json!({"code": "INVALID_ARGUMENT", "reason": "IMAGE_UNDECODABLE"}));
    assert_eq!(
        seen["too_large"],
        serde_json::json!({"code": "RESOURCE_EXHAUSTED", "reason": "MESSAGE_TOO_LARGE", "retries": 0, "flag": "--max-message-bytes"})
    );
    // Greedy decoding: the same top caption a Rust caller gets, with its cosine.
    let rust = common::reference_caption().await;
    assert_eq!(seen["caption"]["text"], rust.captions[0].text.as_str());
    assert!((seen["caption"]["cosine"].as_f64().unwrap() - f64::from(rust.captions[0].cosine)).abs() < 1e-4, "{seen}");
}
