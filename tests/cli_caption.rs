//! The `caption` command on the sample scenes, as the demo runs it: the origin job's text format,
//! and `--json` with the right captions.

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
    let lines: Vec<&str> = stdout.lines().collect();
    let mut right = 0;
    for (i, name) in names.iter().enumerate() {
        let block = &lines[i * 5..i * 5 + 5];
        assert_eq!(block[0], format!("Image: examples/images/{name}"));
        assert_eq!(block[1], "\tTop 3 captions ranked by CLIP:");
        let first = block[2].strip_prefix("\t\t1: ").expect("rank line");
        let (caption, prob) = first.split_once(". (Caption probability: ").expect("probability");
        let prob: f64 = prob.trim_end_matches(')').parse().unwrap();
        assert!((0.0..=1.0).contains(&prob));
        right += usize::from(caption == expected[*name]);
    }
    assert!(right + 1 >= names.len(), "{right}/{} sample scenes right:\n{stdout}", names.len());
}

#[test]
fn json_output_has_one_object_per_image_and_bad_files_fail_clearly() {
    let (ok, stdout, _) = run(&["--json", "-k", "2", "examples/images/scene_1.png"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["image"], "examples/images/scene_1.png");
    assert_eq!(v["captions"].as_array().unwrap().len().min(2), v["captions"].as_array().unwrap().len());
    assert_eq!(v["candidates"].as_array().unwrap().len(), 10);
    assert_eq!(v["captions"][0]["text"], expected()["scene_1.png"].as_str());

    let (ok, _, stderr) = run(&["Cargo.toml", "examples/images/missing.png"]);
    assert!(!ok);
    assert!(stderr.contains("Cargo.toml: error: image data cannot be decoded"), "{stderr}");
    assert!(stderr.contains("missing.png: error: cannot read"), "{stderr}");
}
