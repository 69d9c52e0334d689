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
    let mut lines = stdout.lines().peekable();
    for name in &names {
        assert_eq!(lines.next(), Some(format!("Image: examples/images/{name}").as_str()), "{stdout}");
        assert_eq!(lines.next(), Some("\tTop 3 captions ranked by CLIP:"), "{stdout}");
        // Up to 3 lines: the distinct candidates, best first.
        let mut ranked = Vec::new();
        while let Some(line) = lines.next_if(|l| l.starts_with("\t\t")) {
            let rank = ranked.len() + 1;
            let rest = line.strip_prefix(&format!("\t\t{rank}: ")).unwrap_or_else(|| panic!("{line:?}"));
            let (caption, prob) = rest.split_once(". (Caption probability: ").expect("probability");
            let prob: f64 = prob.strip_suffix(')').expect("closing parenthesis").parse().unwrap();
            ranked.push((caption.to_string(), prob));
        }
        assert!((1..=3).contains(&ranked.len()), "{name}: {ranked:?}");
        assert!(ranked.windows(2).all(|w| w[0].1 >= w[1].1), "{name}: sorted {ranked:?}");
        assert!(ranked.iter().all(|(_, p)| (0.0..=1.0).contains(p)), "{name}: {ranked:?}");
        // The shipped captioner gets every sample scene right (tools/README.md).
        assert_eq!(ranked[0].0, expected[*name], "{name}");
    }
    assert_eq!(lines.next(), None);
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
