//! The command line as an operator meets it: each subcommand's help lists only the flags it
//! honours, grouped under headings; sizes and durations take units while bare numbers and the old
//! flag and environment names keep working.

mod common;

use std::process::Command;

fn help(subcommand: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_caption-cascade")).args([subcommand, "--help"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn each_subcommand_lists_the_flags_it_honours_under_headings() {
    let (serve, caption) = (help("serve"), help("caption"));
    for serve_only in ["--max-inflight", "--allow-file-dir", "--fetch-allow", "--fetch-deny", "--fetch-allow-private"] {
        assert!(serve.contains(serve_only), "serve --help lacks {serve_only}");
        assert!(!caption.contains(serve_only), "caption --help lists {serve_only}, which only serve honours");
    }
    for heading in
        ["Listeners:", "Connections:", "Streams:", "TLS and authentication:", "Models and device:", "Batching:"]
    {
        assert!(serve.lines().any(|l| l == heading), "serve --help has no {heading} heading:\n{serve}");
    }
    assert!(caption.lines().any(|l| l == "Models and device:"), "{caption}");
    assert!(serve.contains("[alias: --fetch-timeout-s]"), "the old name is shown as an alias");
}

#[test]
fn caption_refuses_a_flag_only_serve_honours() {
    let out = Command::new(env!("CARGO_BIN_EXE_caption-cascade"))
        .args(["caption", "--fetch-allow", "127.0.0.1", "x.png"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fetch-allow"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn sizes_and_durations_take_units_and_old_spellings_still_work() {
    // New names with units, old names with units, and old environment variables with bare numbers.
    let with_units = [
        "--max-message-bytes",
        "32MiB",
        "--fetch-timeout-s",
        "10s",
        "--drain-timeout",
        "1500ms",
        "--image-cache-bytes",
        "64 MiB",
        "--max-queue-delay",
        "2ms",
    ];
    let server = common::server(&with_units)
        .env("CAPTION_KEEPALIVE_INTERVAL_S", "30")
        .env("CAPTION_RESULT_CACHE_TTL_S", "60")
        .start()
        .await;
    drop(server);
    let out = Command::new(env!("CARGO_BIN_EXE_caption-cascade"))
        .args(["serve", "--max-message-bytes", "lots"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--max-message-bytes") && err.contains("32MiB"), "the error shows how to write it:\n{err}");
}

/// `make install`'s layout, PREFIX/bin/caption-cascade and PREFIX/share/caption-cascade/models:
/// the binary runs from any directory with the embedded models; without them, the error names the
/// flag to set.
#[test]
fn an_installed_binary_finds_its_models_from_any_directory() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let prefix = std::env::temp_dir().join(format!("cc-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&prefix);
    let (bin, models) = (prefix.join("bin"), prefix.join("share/caption-cascade/models"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_caption-cascade"), bin.join("caption-cascade")).unwrap();
    let elsewhere = prefix.join("work");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let scene = root.join("examples/images/scene_1.png");
    let caption = || {
        Command::new(bin.join("caption-cascade"))
            .args(["caption", "--device", "cpu", "--greedy", "-n", "2", "-k", "1"])
            .arg(&scene)
            .current_dir(&elsewhere)
            .env_remove("CAPTION_BLIP_MODEL")
            .env_remove("CAPTION_CLIP_MODEL")
            // libtorch is found through the binary's rpath, as an installed one finds it.
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .unwrap()
    };

    let out = caption();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--blip-model") && stderr.contains("CAPTION_BLIP_MODEL"), "{stderr}");

    for model in ["shapes-blip", "shapes-clip"] {
        let (from, to) = (root.join("models").join(model), models.join(model));
        std::fs::create_dir_all(&to).unwrap();
        for file in std::fs::read_dir(&from).unwrap() {
            let file = file.unwrap().path();
            std::fs::copy(&file, to.join(file.file_name().unwrap())).unwrap();
        }
    }
    let out = caption();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("Image: scene_1"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::remove_dir_all(&prefix).unwrap();
}
