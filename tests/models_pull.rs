//! `models pull`: offline from a hub cache laid out as the hub's tools write it, and clear
//! failures when the hub cannot be reached or the cache lacks a file.

use std::{path::Path, process::Command};

fn pull(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_caption-cascade"))
        .args(["models", "pull"])
        .args(args)
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_HUB_OFFLINE")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("cc-pull-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A hub cache holding `source`'s files as `owner/name` at revision main.
fn fake_cache(cache: &Path, repo: &str, source: &Path) {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), commit).unwrap();
    let snapshot = folder.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(source).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, snapshot.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn offline_pull_lays_out_a_loadable_checkpoint_folder() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = scratch("offline");
    let cache = dir.join("cache");
    fake_cache(&cache, "acme/shapes-blip", &root.join("models/shapes-blip"));
    let models = dir.join("models");
    let (ok, stdout, stderr) = pull(&[
        "acme/shapes-blip",
        "--offline",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--models-dir",
        models.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let folder = models.join("shapes-blip");
    assert_eq!(stdout.trim(), folder.display().to_string());
    for f in ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"] {
        let pulled = std::fs::read(folder.join(f)).unwrap();
        assert_eq!(pulled, std::fs::read(root.join("models/shapes-blip").join(f)).unwrap(), "{f}");
    }
    // The pulled folder serves: caption a sample with it.
    let out = Command::new(env!("CARGO_BIN_EXE_caption-cascade"))
        .args(["caption", "--device", "cpu", "--greedy", "-n", "1", "--blip-model", folder.to_str().unwrap()])
        .arg(root.join("examples/images/scene_1.png"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn offline_pull_names_the_file_the_cache_lacks() {
    let dir = scratch("missing");
    let (ok, _, stderr) = pull(&["acme/absent", "--offline", "--cache-dir", dir.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("offline: config.json of acme/absent is not in the hub cache"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unreachable_hub_is_a_clear_error() {
    let dir = scratch("unreachable");
    // Nothing listens on the discard port of loopback.
    let (ok, _, stderr) = pull(&[
        "acme/shapes-blip",
        "--endpoint",
        "http://127.0.0.1:9",
        "--cache-dir",
        dir.to_str().unwrap(),
        "--models-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("cannot reach the model hub at http://127.0.0.1:9"), "{stderr}");
    assert!(stderr.contains("--offline"), "{stderr}");
    let (ok, _, stderr) = pull(&["not-an-id"]);
    assert!(!ok && stderr.contains("is not a hub id"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
