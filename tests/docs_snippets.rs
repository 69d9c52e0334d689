//! The documentation's snippets are run: every shell, Python and JavaScript block of README.md,
//! docs/, the Helm chart's README and the Python client's README runs against the binary under test
//! (servers started as the blocks start them, in a private network namespace), or carries a marker
//! saying what it needs that these machines lack, which the block must show. Every relative link
//! resolves. tests/docs/snippets.py does the work; docs/development.md ("The docs test") says what it
//! promises. `make test` sets up what it uses: .venv, .venv-beam and the Node.js client's packages.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn harness(extra: &[&str]) -> Output {
    let python = root().join(".venv/bin/python");
    Command::new(&python)
        .arg(root().join("tests/docs/snippets.py"))
        .args(["--binary", env!("CARGO_BIN_EXE_caption-cascade")])
        .args(extra)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (make test creates .venv)", python.display()))
}

#[test]
fn every_documented_snippet_runs_or_is_marked() {
    let out = harness(&[]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    assert!(out.status.success(), "the docs test failed ({}):\n{stderr}", out.status);
    let summary = stdout.lines().find(|l| l.starts_with("docs: ")).expect("the summary line");
    let ran: usize = summary["docs: ".len()..].split(' ').next().unwrap().parse().unwrap();
    // The guide's quick start alone runs more than this: a count that collapses means blocks went unseen.
    assert!(ran >= 15, "only {ran} blocks ran: {summary}");
}

/// A scratch document with one of each thing the docs test must refuse.
fn drifting_document(dir: &Path) -> PathBuf {
    let doc = dir.join("drift.md");
    let text = "\
# Drift

A flag the binary does not have:

```sh
caption-cascade caption --num-candidatez 3 examples/images/scene_1.png
```

Output that is not what the block prints:

```sh
echo 'Image: scene_1'
```

```text
Image: scene_2
```

A marker the block does not need:

<!-- docs-test: needs gpu -->
```sh
caption-cascade --help
```

A reason that is not on the list:

<!-- docs-test: too slow -->
```sh
true
```

A fence without a language:

```
caption-cascade --version
```

A link to [nowhere](no-such-file.md) and to [a missing heading](#no-such-heading).

```sh
echo this one passes
```
";
    std::fs::write(&doc, text).unwrap();
    doc
}

#[test]
fn a_snippet_that_drifts_from_the_code_fails_the_docs_test() {
    let dir = std::env::temp_dir().join(format!("docs-drift-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let doc = drifting_document(&dir);
    let out = harness(&["--docs", doc.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the docs test passed a drifting document:\n{stdout}");
    let line_of = |needle: &str| {
        let at = stdout.lines().position(|l| l.starts_with("FAIL ") && l.contains(needle));
        at.unwrap_or_else(|| panic!("no failure for {needle:?}:\n{stdout}"))
    };
    line_of("drift.md:5: exit status 2");
    line_of("drift.md:11: output differs");
    line_of("drift.md:22: marked 'needs gpu'");
    line_of("drift.md:29: marker 'too slow'");
    line_of("drift.md:35: a fence without a language");
    line_of("link 'no-such-file.md': no such file");
    line_of("link '#no-such-heading'");
    assert!(stdout.contains("docs: 1 blocks ran"), "the passing block ran:\n{stdout}");
}
