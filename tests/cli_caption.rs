//! The `caption` command on the sample scenes, as the demo runs it: the origin job's text format,
//! and `--json` with the right captions.

mod common;

use std::{collections::HashMap, process::Command};

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_caption-cascade"))
        .arg("caption")
        .args(["--device", "cpu"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn expected() -> HashMap<String, String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/images/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn prints_the_origin_format_with_the_right_first_caption() {
    let expected = expected();
    let mut names: Vec<&String> = expected.keys().collect();
    names.sort();
    let paths: Vec<String> = names.iter().map(|n| format!("examples/images/{n}")).collect();
    let args: Vec<&str> = paths.iter().map(String::as_str).collect();
    let (ok, stdout, stderr) = run(&args);
    assert!(ok, "{stderr}");
    let mut lines = stdout.lines();
    for name in &names {
        // The origin's name rule: the basename up to its first dot.
        let stem = name.split('.').next().unwrap();
        assert_eq!(lines.next(), Some(format!("Image: {stem}").as_str()), "{stdout}");
        assert_eq!(lines.next(), Some("\tTop 3 captions ranked by CLIP:"), "{stdout}");
        // One line per candidate, duplicates included, as the origin lists them.
        let mut ranked = Vec::new();
        for rank in 1..=3 {
            let line = lines.next().unwrap_or_else(|| panic!("{name}: only {} lines", rank - 1));
            let rest = line.strip_prefix(&format!("\t\t{rank}: ")).unwrap_or_else(|| panic!("{line:?}"));
            let (caption, prob) = rest.split_once(". (Caption probability: ").expect("probability");
            let prob: f64 = prob.strip_suffix(')').expect("closing parenthesis").parse().unwrap();
            ranked.push((caption.to_string(), prob));
        }
        // print('\n') after each block: two empty lines.
        assert_eq!((lines.next(), lines.next()), (Some(""), Some("")), "{name}: the block's end");
        assert!(ranked.windows(2).all(|w| w[0].1 >= w[1].1), "{name}: sorted {ranked:?}");
        assert!(ranked.iter().all(|(_, p)| (0.0..=1.0).contains(p)), "{name}: {ranked:?}");
        // The shipped captioner gets every sample scene right (tools/README.md).
        assert_eq!(ranked[0].0, expected[*name], "{name}");
    }
    assert_eq!(lines.next(), None);
}

/// The origin's printout, written the way the origin job writes it (Python f-strings over each
/// image's ranked candidates), from the results this run recorded: the text mode must equal it.
const ORIGIN_PRINT: &str = r#"
import json, os, sys
order, k = sys.argv[2].split("\n"), int(sys.argv[3])
records = {r["image"]: r for r in map(json.loads, open(sys.argv[1]))}
for image in order:
    print(f"Image: {os.path.basename(image).rsplit('.')[0]}")
    print(f"\tTop {k} captions ranked by CLIP:")
    for i, c in enumerate(records[image]["captions"][:k]):
        print(f"\t\t{i + 1}: {c['text']}. (Caption probability: {c['probability']:.2f})")
    print("\n")
"#;

#[test]
fn the_text_output_is_what_the_origins_print_statements_make_of_the_same_results() {
    let mut names: Vec<String> = expected().into_keys().collect();
    names.sort();
    let paths: Vec<String> = names.iter().map(|n| format!("examples/images/{n}")).collect();
    let results = std::env::temp_dir().join(format!("cc-origin-print-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&results);
    let mut args: Vec<&str> = vec!["--seed", "5", "-k", "4", "--output", results.to_str().unwrap()];
    args.extend(paths.iter().map(String::as_str));
    let (ok, ours, stderr) = run(&args);
    assert!(ok, "{stderr}");
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    let origin = Command::new(python)
        .args(["-c", ORIGIN_PRINT, results.to_str().unwrap(), &paths.join("\n"), "4"])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&results);
    assert!(origin.status.success(), "{}", String::from_utf8_lossy(&origin.stderr));
    let origin = String::from_utf8(origin.stdout).unwrap();
    assert_eq!(ours.lines().count(), names.len() * 8, "{ours}");
    for (i, (a, b)) in ours.lines().zip(origin.lines()).enumerate() {
        assert_eq!(a, b, "line {}", i + 1);
    }
    assert_eq!(ours, origin);
}

#[test]
fn json_output_has_one_object_per_image_and_bad_files_fail_clearly() {
    let (ok, stdout, _) = run(&["--json", "-k", "2", "examples/images/scene_1.png"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["image"], "examples/images/scene_1.png");
    assert_eq!(v["captions"].as_array().unwrap().len().min(2), v["captions"].as_array().unwrap().len());
    assert_eq!(v["candidates"].as_array().unwrap().len(), 10);
    let ranked: Vec<&str> = v["captions"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    let candidates: Vec<&str> = v["candidates"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert!(ranked.iter().all(|r| candidates.contains(r)), "ranked captions come from the candidates");

    let (ok, _, stderr) = run(&["Cargo.toml", "examples/images/missing.png"]);
    assert!(!ok);
    assert!(stderr.contains("Cargo.toml: error: image data cannot be decoded"), "{stderr}");
    assert!(stderr.contains("missing.png: error: cannot read"), "{stderr}");
}

#[test]
fn cuda_graphs_refuse_batches_their_buckets_cannot_cover() {
    let (ok, stdout, stderr) =
        run(&["--cuda-graphs", "--generate-max-batch", "64", "--max-candidates", "10", "examples/images/scene_1.png"]);
    assert!(!ok && stdout.is_empty());
    assert!(stderr.contains("--generate-max-batch 64 x --max-candidates 10 allows 640"), "{stderr}");
}

#[test]
fn options_the_device_cannot_honour_stop_the_run_with_the_reason() {
    let (ok, stdout, stderr) = run(&["--cuda-graphs", "examples/images/scene_1.png"]);
    assert!(!ok && stdout.is_empty());
    assert!(stderr.contains("--cuda-graphs needs a CUDA device"), "{stderr}");
    let (ok, _, stderr) = run(&["--quantize", "int8", "--dtype", "bf16", "examples/images/scene_1.png"]);
    assert!(!ok);
    assert!(stderr.contains("--dtype fp32"), "{stderr}");
}

#[test]
fn cuda_graphs_name_what_they_capture_and_keep_the_old_spellings() {
    for graphs in ["--cuda-graphs=whole", "--cuda-graphs=pieces"] {
        let (ok, _, stderr) = run(&[graphs, "examples/images/scene_1.png"]);
        assert!(!ok);
        assert!(stderr.contains("--cuda-graphs needs a CUDA device"), "{graphs}: {stderr}");
    }
    let (ok, _, stderr) = run(&["--cuda-graphs=sideways", "examples/images/scene_1.png"]);
    assert!(!ok);
    assert!(stderr.contains("invalid value 'sideways'") && stderr.contains("pieces, whole"), "{stderr}");
    // CAPTION_CUDA_GRAPHS was a boolean: true and false still mean what they meant.
    for (value, refused) in [("true", true), ("false", false)] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_caption-cascade"))
            .args(["caption", "--device", "cpu", "examples/images/scene_1.png"])
            .env("CAPTION_CUDA_GRAPHS", value)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), !refused, "{value}: {stderr}");
        assert_eq!(stderr.contains("--cuda-graphs needs a CUDA device"), refused, "{value}: {stderr}");
    }
}

/// Serves `body` to every connection on a loopback port, from a thread, for the test's lifetime.
fn serve_once_per_connection(body: Vec<u8>) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut sock in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf);
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = sock.write_all(head.as_bytes());
            let _ = sock.write_all(&body);
        }
    });
    addr
}

#[test]
fn in_process_urls_are_fetched_with_the_users_own_rights() {
    // The server's egress policy denies loopback by default; the CLI acts for its user, who can
    // reach loopback anyway, so it fetches without any --fetch-allow.
    let png = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/images/scene_1.png")).unwrap();
    let addr = serve_once_per_connection(png);
    let url = format!("http://{addr}/scene_1.png");
    let mut command = Command::new(env!("CARGO_BIN_EXE_caption-cascade"));
    command.args(["caption", "--device", "cpu", "--json", "-k", "1", &url]).current_dir(env!("CARGO_MANIFEST_DIR"));
    // A proxy from the test's environment would stand between the CLI and the loopback server.
    for var in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
        command.env_remove(var);
    }
    let out = command.output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["key"], url.as_str());
    assert_eq!(v["captions"][0]["text"], expected()["scene_1.png"].as_str(), "{stdout}");
}

/// The output file's records, one JSON object per line.
fn records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_bulk_run_from_a_list_records_every_image_and_resumes_where_it_stopped() {
    let dir = std::env::temp_dir().join(format!("cc-bulk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let expected = expected();
    let mut names: Vec<&String> = expected.keys().collect();
    names.sort();
    let mut list: Vec<String> = names.iter().map(|n| format!("examples/images/{n}")).collect();
    list.insert(3, "examples/images/missing.png".into());
    let list_file = dir.join("images.txt");
    std::fs::write(&list_file, format!("# the sample scenes\n\n{}\n", list.join("\n"))).unwrap();
    let output = dir.join("results.jsonl");
    let (list_arg, out_arg) = (list_file.to_str().unwrap(), output.to_str().unwrap());
    let bulk = ["--greedy", "-n", "3", "--concurrency", "4", "--input", list_arg, "--output", out_arg];

    let (ok, stdout, stderr) = run(&bulk);
    assert!(!ok, "a failed image makes the exit status non-zero");
    assert!(stderr.contains("examples/images/missing.png: error: cannot read"), "{stderr}");
    assert!(stderr.contains("caption: 9 captioned, 1 failed"), "{stderr}");
    // Printed in list order, whatever order they finished in.
    let shown: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("Image: ")).collect();
    let stems: Vec<&str> = names.iter().map(|n| n.split('.').next().unwrap()).collect();
    assert_eq!(shown, stems);
    let first = records(&output);
    assert_eq!(first.len(), 10, "one record per image, the failed one included");
    for r in &first {
        let image = r["image"].as_str().unwrap();
        match image.strip_prefix("examples/images/").and_then(|n| expected.get(n)) {
            Some(want) => {
                assert_eq!(r["captions"][0]["text"], want.as_str(), "{r}");
                assert!(r["key"].as_str().unwrap().starts_with("sha256:"));
            }
            None => assert_eq!(r["error"]["code"], "NOT_FOUND", "{r}"),
        }
    }

    // A rerun skips what has a result and retries the failure; nothing is captioned twice.
    let (ok, stdout, stderr) = run(&bulk);
    assert!(!ok);
    assert!(stderr.contains("9 of 10 images already have a result"), "{stderr}");
    assert!(stderr.contains("caption: 0 captioned, 1 failed, 9 skipped"), "{stderr}");
    assert_eq!(stdout, "");
    let second = records(&output);
    assert_eq!(second.len(), 11);
    assert_eq!(second[10]["image"], "examples/images/missing.png");

    // A run cut mid-line leaves a fragment: it is not a result, and the next record starts afresh.
    std::fs::write(&output, "{\"image\": \"examples/images/scene_1.png\", \"capt").unwrap();
    let (ok, _, stderr) = run(&["--greedy", "-n", "3", "--output", out_arg, "examples/images/scene_1.png"]);
    assert!(ok, "{stderr}");
    let third = std::fs::read_to_string(&output).unwrap();
    let last: serde_json::Value = serde_json::from_str(third.lines().last().unwrap()).unwrap();
    assert_eq!(last["captions"][0]["text"], expected["scene_1.png"].as_str());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_server_captions_a_list_from_stdin_over_one_stream() {
    let server = tokio::runtime::Runtime::new().unwrap().block_on(common::server(&[]).start());
    let expected = expected();
    let mut names: Vec<&String> = expected.keys().collect();
    names.sort();
    // The same image twice, and one that is not an image.
    let mut list: Vec<String> = names.iter().map(|n| format!("examples/images/{n}")).collect();
    list.push(list[0].clone());
    list.push("Cargo.toml".into());
    // Ready: its listener is bound, so the first connection is accepted. HOST:PORT, as gRPC tools
    // write an endpoint.
    let endpoint = server.addr().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_caption-cascade"))
        .args(["caption", "--endpoint", &endpoint, "--merge", "--greedy", "-n", "4", "-k", "2", "--input", "-"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(list.join("\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    drop(server);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stderr.contains("caption: 10 captioned, 1 failed"), "{stderr}");
    assert!(stderr.contains("Cargo.toml: error: image data cannot be decoded"), "{stderr}");
    let blocks: Vec<&str> = stdout.split("\n\n\n").filter(|b| !b.is_empty()).collect();
    assert_eq!(blocks.len(), 10, "{stdout}");
    for (block, name) in blocks.iter().zip(names.iter().chain([&names[0]])) {
        let mut lines = block.lines();
        assert_eq!(lines.next().unwrap(), format!("Image: {}", name.split('.').next().unwrap()));
        assert_eq!(lines.next().unwrap(), "\tTop 2 captions ranked by CLIP:");
        // Greedy: four identical candidates, merged into one line that says so.
        let line = lines.next().unwrap();
        assert_eq!(line, format!("\t\t1: {}. (Caption probability: 1.00, 4 of 4 candidates)", expected[*name]));
        assert_eq!(lines.next(), None);
    }
}

#[test]
fn the_cli_reaches_a_server_over_tls_with_a_token() {
    let tls = common::TlsFiles::new("cli-tls");
    let token = tls.dir.join("token");
    std::fs::write(&token, "cli-secret\n").unwrap();
    let server = tokio::runtime::Runtime::new().unwrap().block_on(common::spawn_server(
        &["--tls-cert", &tls.cert, "--tls-key", &tls.key],
        &[("CAPTION_AUTH_TOKEN", "cli-secret")],
    ));
    let endpoint = format!("https://127.0.0.1:{}", server.addr().port());
    let scene = "examples/images/scene_1.png";
    let with_token = run(&[
        "--endpoint",
        &endpoint,
        "--endpoint-ca",
        &tls.ca,
        "--endpoint-token-file",
        token.to_str().unwrap(),
        "--greedy",
        "--json",
        scene,
    ]);
    assert!(with_token.0, "{}", with_token.2);
    let v: serde_json::Value = serde_json::from_str(with_token.1.trim()).unwrap();
    assert_eq!(v["captions"][0]["text"], expected()["scene_1.png"].as_str());
    let without = run(&["--endpoint", &endpoint, "--endpoint-ca", &tls.ca, "--json", scene]);
    assert!(!without.0);
    assert!(without.2.contains("bearer token"), "{}", without.2);
}

#[test]
fn a_rerun_resumes_only_with_the_parameters_its_results_were_made_with() {
    let results = std::env::temp_dir().join(format!("cc-resume-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&results);
    let out = results.to_str().unwrap();
    let scene = "examples/images/scene_1.png";
    let (ok, stdout, stderr) = run(&["--quiet", "--seed", "5", "-n", "4", "--output", out, scene]);
    assert!(ok, "{stderr}");
    assert!(stdout.is_empty(), "--quiet prints nothing per image: {stdout}");
    assert!(stderr.contains("1 captioned"), "{stderr}");
    let record: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&results).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(record["params"]["num_candidates"], 4, "{record}");
    assert_eq!(record["params"]["seed"], 5, "{record}");

    let (ok, _, stderr) = run(&["--seed", "5", "-n", "4", "--output", out, scene]);
    assert!(ok && stderr.contains("1 of 1 images already have a result"), "{stderr}");
    let (ok, stdout, stderr) = run(&["--seed", "5", "-n", "3", "--output", out, scene]);
    assert!(!ok && stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("made with other parameters"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&results).unwrap().lines().count(), 1, "nothing was appended");
    let _ = std::fs::remove_file(&results);
}

#[test]
fn json_lists_every_candidate_unless_merged() {
    let scene = "examples/images/scene_1.png";
    let (ok, each, _) = run(&["--json", "--greedy", "-n", "4", "-k", "10", scene]);
    assert!(ok);
    let each: serde_json::Value = serde_json::from_str(each.trim()).unwrap();
    assert_eq!(each["captions"].as_array().unwrap().len(), 4, "greedy: four identical candidates, each listed");
    let (ok, merged, _) = run(&["--json", "--merge", "--greedy", "-n", "4", "-k", "10", scene]);
    assert!(ok);
    let merged: serde_json::Value = serde_json::from_str(merged.trim()).unwrap();
    assert_eq!(merged["captions"].as_array().unwrap().len(), 1, "{merged}");
    assert_eq!(merged["captions"][0]["count"], 4);
}
