//! How the log is written, as an operator sets it: plain text with no escape sequence when stderr
//! is a file or a pipe, coloured on a terminal unless `NO_COLOR` is set; `--log-format json` (or
//! `CAPTION_LOG_FORMAT`) one object per line, a command's failure included; `--log-level` (or
//! `CAPTION_LOG_LEVEL`), which `RUST_LOG` overrides when set; and every subcommand taking them.

use std::{
    io::Read,
    os::fd::{FromRawFd, OwnedFd},
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Variables that would change what a run logs, so that the caller's environment does not.
const LOG_ENV: [&str; 5] = ["RUST_LOG", "NO_COLOR", "CAPTION_LOG_FORMAT", "CAPTION_LOG_LEVEL", "CAPTION_OTLP_ENDPOINT"];

fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_caption-cascade"));
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR")).stdin(Stdio::null());
    for name in LOG_ENV {
        cmd.env_remove(name);
    }
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd
}

/// `caption-cascade ARGS…` with stderr on a pipe.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(args, env).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Captions one sample scene on this machine: it logs `loading models` at INFO, then exits.
const CAPTION: [&str; 4] = ["caption", "--device", "cpu", "examples/images/scene_1.png"];

#[test]
fn text_on_a_pipe_has_no_escape_sequence() {
    let out = run(&CAPTION, &[]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    let line = log.lines().find(|l| l.contains("loading models")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(" INFO caption_cascade::app: loading models device=Cpu"), "{line:?}");
    assert!(!log.contains('\x1b'), "an escape sequence on a pipe:\n{log:?}");
}

/// What `serve` writes to a terminal until it says it is serving.
fn served_on_a_terminal(env: &[(&str, &str)]) -> String {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes the two descriptors it opens; no name, settings or size are passed.
    let opened =
        unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned here only.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = command(&["serve", "--device", "cpu", "--listen", "127.0.0.1:0"], env)
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let (seen, mut master) = (seen.clone(), std::fs::File::from(master));
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once the server, the terminal's only writer, has exited.
            while let Ok(n @ 1..) = master.read(&mut buf) {
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let start = Instant::now();
    let text = loop {
        let text = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        if text.contains("serving caption.v1") || start.elapsed() > Duration::from_secs(120) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    assert!(text.contains("serving caption.v1"), "the server did not start:\n{text}");
    text
}

#[test]
fn text_on_a_terminal_is_coloured_unless_no_color_is_set() {
    let coloured = served_on_a_terminal(&[]);
    let line = coloured.lines().find(|l| l.contains("loading models")).unwrap();
    assert!(line.contains("\x1b["), "no colour on a terminal: {line:?}");
    let plain = served_on_a_terminal(&[("NO_COLOR", "1")]);
    assert!(plain.contains("loading models") && !plain.contains('\x1b'), "{plain:?}");
}

/// The JSON object on `line`, and its keys in the order written (a name written twice shows).
fn json_line(line: &str) -> (serde_json::Value, Vec<String>) {
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl<'de> serde::de::Visitor<'de> for Visitor {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                    let mut keys = Vec::new();
                    while let Some(key) = map.next_key::<String>()? {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        keys.push(key);
                    }
                    Ok(Keys(keys))
                }
            }
            d.deserialize_map(Visitor)
        }
    }
    let value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
    let Keys(keys) = serde_json::from_str(line).unwrap();
    (value, keys)
}

#[test]
fn json_by_flag_or_environment_one_object_per_line() {
    for (args, env) in [
        (["--log-format", "json"].iter().chain(&CAPTION).copied().collect::<Vec<_>>(), vec![]),
        (CAPTION.iter().copied().chain(["--log-format", "json"]).collect(), vec![]),
        (CAPTION.to_vec(), vec![("CAPTION_LOG_FORMAT", "json")]),
    ] {
        let out = run(&args, &env);
        let log = stderr(&out);
        assert!(out.status.success(), "{args:?}: {log}");
        let logged: Vec<_> = log.lines().filter(|l| !l.starts_with("caption: ")).collect();
        assert!(!logged.is_empty(), "{log}");
        for line in logged {
            let (value, keys) = json_line(line);
            assert_eq!(&keys[..3], ["time", "level", "message"], "{line}");
            assert_eq!(keys.last().map(String::as_str), Some("target"), "{line}");
            let mut unique = keys.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), keys.len(), "a name written twice: {line}");
            assert!(humantime::parse_rfc3339(value["time"].as_str().unwrap()).is_ok(), "{line}");
        }
        let loading = log.lines().find(|l| l.contains("loading models")).unwrap_or_else(|| panic!("{log}"));
        let (value, _) = json_line(loading);
        assert_eq!(
            (&value["level"], &value["message"], &value["device"], &value["target"]),
            (&"INFO".into(), &"loading models".into(), &"Cpu".into(), &"caption_cascade::app".into()),
            "{loading}"
        );
    }
}

#[test]
fn a_failed_command_says_why_in_the_log_format() {
    let args = ["caption", "--device", "cpu", "--output", "/nonexistent/out.jsonl", "examples/images/scene_1.png"];
    let out = run(&args, &[("CAPTION_LOG_FORMAT", "json")]);
    assert!(!out.status.success());
    let log = stderr(&out);
    let (value, _) = json_line(log.lines().last().unwrap());
    assert_eq!(value["level"], "ERROR", "{log}");
    assert!(value["message"].as_str().unwrap().contains("/nonexistent/out.jsonl"), "{log}");
    let out = run(&args, &[]);
    let log = stderr(&out);
    assert!(log.lines().last().unwrap().starts_with("error: --output /nonexistent/out.jsonl"), "{log}");
}

#[test]
fn log_level_by_flag_or_environment_and_rust_log_wins() {
    let logs_info = |args: &[&str], env: &[(&str, &str)]| {
        let all: Vec<&str> = CAPTION.iter().copied().chain(args.iter().copied()).collect();
        let out = run(&all, env);
        assert!(out.status.success(), "{}", stderr(&out));
        stderr(&out).contains("loading models")
    };
    assert!(logs_info(&[], &[]), "INFO by default");
    assert!(!logs_info(&["--log-level", "warn"], &[]));
    assert!(!logs_info(&[], &[("CAPTION_LOG_LEVEL", "error")]));
    assert!(logs_info(&["--log-level", "warn"], &[("RUST_LOG", "info")]), "RUST_LOG wins");
    assert!(!logs_info(&["--log-level", "warn"], &[("RUST_LOG", "")]), "an empty RUST_LOG is unset");
    assert!(!logs_info(&[], &[("RUST_LOG", "caption_cascade::app=warn")]), "RUST_LOG names modules");
    let out = run(&["--log-level", "loud", "serve"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("invalid value 'loud' for '--log-level"), "{}", stderr(&out));
}

#[test]
fn every_subcommand_takes_the_log_and_trace_flags() {
    for sub in [&["serve"][..], &["caption"], &["models", "pull"]] {
        let args: Vec<&str> = sub.iter().copied().chain(["--help"]).collect();
        let help = String::from_utf8(run(&args, &[]).stdout).unwrap();
        for flag in ["--log-format", "--log-level", "--otlp-endpoint"] {
            assert!(help.contains(flag), "{sub:?} --help lacks {flag}:\n{help}");
        }
    }
}
