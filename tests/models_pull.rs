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

/// `caption` with `args`, the hub's environment cleared but for `env`.
fn caption_with(args: &[&str], env: &[(&str, &Path)]) -> (bool, String, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_caption-cascade"));
    cmd.args(["caption", "--device", "cpu", "--greedy", "-n", "1"]).args(args);
    cmd.arg(root.join("examples/images/scene_1.png"));
    for var in ["HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HOME", "CAPTION_BLIP_MODEL", "CAPTION_CLIP_MODEL"]
    {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.current_dir(root).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn the_model_flags_take_hub_ids_served_from_the_hub_cache() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = scratch("model-flags");
    let cache = dir.join("cache");
    fake_cache(&cache, "acme/shapes-blip", &root.join("models/shapes-blip"));
    fake_cache(&cache, "acme/shapes-clip", &root.join("models/shapes-clip"));
    let offline = Path::new("1");
    let ids = ["--blip-model", "acme/shapes-blip", "--clip-model", "acme/shapes-clip@main"];
    let (ok, from_hub, stderr) = caption_with(&ids, &[("HF_HUB_CACHE", &cache), ("HF_HUB_OFFLINE", offline)]);
    assert!(ok, "{stderr}");
    // The same captions as the folders the cache was filled from.
    let (ok, from_folders, stderr) = caption_with(&[], &[]);
    assert!(ok, "{stderr}");
    assert_eq!(from_hub, from_folders);
    assert!(!from_hub.trim().is_empty());
    // HF_HOME/hub is the cache when HF_HUB_CACHE is not set.
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::rename(&cache, home.join("hub")).unwrap();
    let (ok, _, stderr) = caption_with(&ids, &[("HF_HOME", &home), ("HF_HUB_OFFLINE", offline)]);
    assert!(ok, "{stderr}");

    // A revision the cache lacks, offline, names the flag, the id and what is missing.
    let ids = ["--blip-model", "acme/shapes-blip@v2"];
    let (ok, _, stderr) = caption_with(&ids, &[("HF_HOME", &home), ("HF_HUB_OFFLINE", offline)]);
    assert!(!ok);
    assert!(stderr.contains("--blip-model acme/shapes-blip: offline: config.json"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_hub_id_the_hub_cannot_serve_names_the_flag() {
    let dir = scratch("model-flags-unreachable");
    let (ok, _, stderr) = caption_with(
        &["--clip-model", "acme/absent"],
        &[("HF_ENDPOINT", Path::new("http://127.0.0.1:9")), ("HF_HUB_CACHE", &dir)],
    );
    assert!(!ok);
    assert!(stderr.contains("--clip-model acme/absent: cannot reach the model hub at http://127.0.0.1:9"), "{stderr}");
    assert!(stderr.contains("checkpoint folder on this machine"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
