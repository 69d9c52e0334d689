//! No test hands a port on. Binding port 0, closing the socket and giving the number to a server
//! started later races every other test doing the same at that moment: two servers can be given
//! one port, and a test then reads another server's counters or finds nothing listening. Servers
//! bind port 0 themselves and name the ports they got (`serve --ready-file`); listeners a test runs
//! itself keep their socket for as long as the port is used.
//!
//! This scans the test sources (tests/**/*.rs, *.py, *.js, *.sh; the benchmark's scripts; the fetch
//! tests in src/) and names file:line for each way
//! a port has been handed on. It is a lexical scan, not a parser, and it recognises:
//! * a helper named like free_port or free_addr, in any of these languages;
//! * in Rust, a listener asked its address in the statement that binds it (dropped at once), one
//!   dropped after only being asked its address, or one only asked its address in a block that
//!   then yields a value (the listener closes as the block ends, the value outlives it);
//! * in Python, a `with socket…` block, or a function that closes its socket, that binds and reads
//!   `getsockname()`;
//! * in JavaScript and shell, a port-0 listen or bind whose port is read and that is closed within
//!   a few lines.
//!
//! This file alone may name the patterns: its own check runs them against the harness as it was.

use std::path::{Path, PathBuf};

/// Helper names that hand a port on, compared without case or underscores.
const HANDOFF_NAMES: &[&str] = &["freeport", "freeaddr", "unusedport", "spareport", "availableport", "portpicker"];
/// Lines a JavaScript or shell port-0 listener is looked at after it is opened.
const WINDOW: usize = 15;

#[test]
fn no_test_hands_a_closed_port_on() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    let mut scanned = 0;
    // The benchmark's scripts and the unit tests in src/ start servers and listeners too.
    let tested = [root.join("tests"), root.join("bench"), root.join("src/images/fetch")];
    for path in tested.iter().flat_map(|dir| sources(dir)) {
        if path.file_name() == Some(std::ffi::OsStr::new("no_port_handoff.rs")) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let shown = path.strip_prefix(root).unwrap().display().to_string();
        found.extend(findings(&path, &text).into_iter().map(|(line, what)| format!("{shown}:{line}: {what}")));
        scanned += 1;
    }
    assert!(scanned >= 20, "only {scanned} test sources found under tests/");
    assert!(
        found.is_empty(),
        "test code hands ports on (bind port 0 in the server, report it with --ready-file, or keep the \
         listener):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_scan_finds_every_way_a_port_was_handed_on() {
    let handed_on: &[(&str, &str)] = &[
        // The shared harness as it was.
        (
            "mod.rs",
            "/// A port that was free a moment ago, for listeners that cannot bind port 0 themselves.\n\
             pub fn free_port() -> u16 {\n    std::net::TcpListener::bind(\"127.0.0.1:0\").unwrap().local_addr().unwrap().port()\n}\n",
        ),
        ("mod.rs", "pub fn free_addr() -> SocketAddr {\n    format!(\"127.0.0.1:{}\", free_port()).parse().unwrap()\n}\n"),
        (
            "cli.rs",
            "fn t() {\n    let addr =\n        format!(\"127.0.0.1:{}\", std::net::TcpListener::bind(\"127.0.0.1:0\").unwrap().local_addr().unwrap().port());\n    run(&addr);\n}\n",
        ),
        (
            "a.rs",
            "async fn t() {\n    let addr = tokio::net::TcpListener::bind(\"127.0.0.1:0\").await?.local_addr()?;\n    start(addr);\n}\n",
        ),
        (
            "b.rs",
            "fn t() {\n    let l = TcpListener::bind(\"127.0.0.1:0\").unwrap(); // a port\n    let port = l.local_addr().unwrap().port();\n    drop(l);\n    start(port);\n}\n",
        ),
        (
            "c.rs",
            "fn port_for_later() -> u16 {\n    let listener = TcpListener::bind(\"127.0.0.1:0\").expect(\"bind\");\n    listener.local_addr().unwrap().port()\n}\n",
        ),
        (
            "test_image.py",
            "def free_port():\n    with socket.socket() as s:\n        s.bind((\"127.0.0.1\", 0))\n        return s.getsockname()[1]\n",
        ),
        (
            "d.py",
            "def pick():\n    s = socket.socket()\n    s.bind(('', 0))\n    port = s.getsockname()[1]\n    s.close()\n    return port\n",
        ),
        ("e.py", "with socket.socket() as s:\n    s.bind((\"127.0.0.1\", 0))\n    PORT = s.getsockname()[1]\nstart(PORT)\n"),
        (
            "f.js",
            "const srv = net.createServer();\nsrv.listen(0, () => {\n  const port = srv.address().port;\n  srv.close(() => start(port));\n});\n",
        ),
        ("g.sh", "PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind((\"\", 0)); print(s.getsockname()[1]); s.close()')\n"),
        ("h.js", "function freePort() { return 0; }\n"),
    ];
    for (name, text) in handed_on {
        let found = findings(Path::new(name), text);
        assert!(!found.is_empty(), "{name} hands a port on, unnoticed:\n{text}");
    }

    let kept: &[(&str, &str)] = &[
        // A listener the test serves from, found by its address.
        (
            "a.rs",
            "async fn origin() -> SocketAddr {\n    let listener = TcpListener::bind(\"127.0.0.1:0\").await.unwrap();\n    let addr = listener.local_addr().unwrap();\n    tokio::spawn(async move {\n        while let Ok((sock, _)) = listener.accept().await {\n            drop(sock);\n        }\n    });\n    addr\n}\n",
        ),
        (
            "b.rs",
            "async fn bind(ip: &str) -> Option<Self> {\n    let listener = TcpListener::bind((ip, 0)).await.ok()?;\n    let addr = listener.local_addr().unwrap();\n    Some(Self { addr, listener })\n}\n",
        ),
        // Held open for the whole test, so the address stays in use.
        (
            "c.rs",
            "fn t() {\n    let held = std::net::TcpListener::bind(\"127.0.0.1:0\").unwrap();\n    let busy = held.local_addr().unwrap().to_string();\n    expect_refused(&busy);\n}\n",
        ),
        ("d.rs", "fn t() {\n    let p = server(&[]).spawn(); // binds 127.0.0.1:0 itself\n    let r = p.ready();\n}\n"),
        ("e.py", "server = http.server.ThreadingHTTPServer((\"127.0.0.1\", 0), Handler)\nurl = f\"http://127.0.0.1:{server.server_address[1]}\"\n"),
        ("f.py", "port = server.add_insecure_port(\"127.0.0.1:0\")\nserver.start()\n"),
        ("g.js", "const client = new pb.Cascade(args.addr, creds);\nclient.close();\n"),
    ];
    for (name, text) in kept {
        let found = findings(Path::new(name), text);
        assert!(found.is_empty(), "{name} keeps its listener, yet: {found:?}\n{text}");
    }
}

/// Every test source under `dir`, without installed packages, caches or data.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if !(name.starts_with('.') || name == "node_modules" || name == "__pycache__") {
                    stack.push(path);
                }
            } else if matches!(path.extension().and_then(|e| e.to_str()), Some("rs" | "py" | "js" | "sh")) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// (line, what) for each hand-over found in `text`, a source of `path`'s language.
fn findings(path: &Path, text: &str) -> Vec<(usize, String)> {
    let mut found = handoff_names(text);
    match path.extension().and_then(|e| e.to_str()) {
        Some("rs") => found.extend(rust_listeners(&without_rust_comments(text))),
        Some("py") => found.extend(python_sockets(text)),
        _ => found.extend(port_zero_windows(text)),
    }
    found.sort();
    found.dedup();
    found
}

fn line_of(text: &str, at: usize) -> usize {
    text[..at].matches('\n').count() + 1
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Identifiers such as free_port, freePort or get_free_addr.
fn handoff_names(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices().chain([(text.len(), ' ')]) {
        match (is_ident(c), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                let word = &text[s..i];
                let folded = word.to_lowercase().replace('_', "");
                if HANDOFF_NAMES.iter().any(|n| folded.contains(n)) {
                    found.push((line_of(text, s), format!("`{word}` names a port picked and let go of")));
                }
                start = None;
            }
            _ => {}
        }
    }
    found
}

/// `text` with its comments blanked (newlines kept, so offsets and lines stay), strings kept.
fn without_rust_comments(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"'
            || (b[i] == b'r' && matches!(b.get(i + 1), Some(b'"' | b'#')) && (i == 0 || !is_ident(b[i - 1] as char)))
        {
            i = string_end(b, i);
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            i += 3; // a char literal such as '"'
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                out[i] = b' ';
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            while i < b.len() && !b[i..].starts_with(b"*/") {
                out[i] = if b[i] == b'\n' { b'\n' } else { b' ' };
                i += 1;
            }
            for _ in 0..2.min(b.len() - i) {
                out[i] = b' ';
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the string literal starting at `i` (`"…"`, `r"…"` or `r#"…"#`) ends.
fn string_end(b: &[u8], mut i: usize) -> usize {
    if b[i] == b'r' {
        i += 1;
        let hashes = b[i..].iter().take_while(|&&c| c == b'#').count();
        i += hashes + 1;
        let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
        while i < b.len() && !b[i..].starts_with(&close) {
            i += 1;
        }
        return (i + close.len()).min(b.len());
    }
    i += 1;
    while i < b.len() && b[i] != b'"' {
        i += if b[i] == b'\\' { 2 } else { 1 };
    }
    (i + 1).min(b.len())
}

/// The index just past the bracket matching the one at `open`.
fn matching(b: &[u8], open: usize) -> usize {
    let (o, c) = (b[open], if b[open] == b'(' { b')' } else { b'}' });
    let mut depth = 0;
    let mut i = open;
    while i < b.len() {
        if b[i] == b'"' {
            i = string_end(b, i);
            continue;
        }
        if b[i] == o {
            depth += 1;
        } else if b[i] == c {
            depth -= 1;
            if depth == 0 {
                return i + 1;
            }
        }
        i += 1;
    }
    b.len()
}

/// Past `.await`, `?`, `.unwrap()`, `.expect(…)` and `.ok()` from `i`: where the value they
/// unwrap is used.
fn past_unwrapping(b: &[u8], mut i: usize) -> usize {
    loop {
        while i < b.len() && (b[i] as char).is_whitespace() {
            i += 1;
        }
        let rest = &b[i..];
        if rest.starts_with(b".await") {
            i += 6;
        } else if rest.starts_with(b"?") {
            i += 1;
        } else if rest.starts_with(b".unwrap()") || rest.starts_with(b".ok()") {
            i += if rest.starts_with(b".ok()") { 5 } else { 9 };
        } else if rest.starts_with(b".expect(") {
            i = matching(b, i + 7);
        } else {
            return i;
        }
    }
}

/// Rust listeners that give their address away and close.
fn rust_listeners(text: &str) -> Vec<(usize, String)> {
    let b = text.as_bytes();
    let mut found = Vec::new();
    for (at, _) in text.match_indices("bind(") {
        if at > 0 && is_ident(b[at - 1] as char) {
            continue; // rebind(, unbind(
        }
        let after = past_unwrapping(b, matching(b, at + 4));
        if b[after..].starts_with(b".local_addr()") {
            found.push((
                line_of(text, at),
                "a listener asked its address where it is bound, and dropped at once".into(),
            ));
            continue;
        }
        if b.get(after) != Some(&b';') {
            continue;
        }
        // `let NAME = …bind(…)…;`: the listener is NAME.
        let statement = text[..at].rfind([';', '{', '}']).map_or(0, |s| s + 1);
        let head = text[statement..at].trim_start();
        let Some(name) = head.strip_prefix("let ").map(|h| h.trim_start_matches("mut ")) else { continue };
        let name: String = name.chars().take_while(|&c| is_ident(c)).collect();
        if name.is_empty() || name == "_" {
            continue;
        }
        let scope = &text[after + 1..block_end(b, after + 1)];
        let uses: Vec<usize> = word_indices(scope, &name).collect();
        let asks_address = |u: &usize| scope[u + name.len()..].starts_with(".local_addr()");
        let dropped = |u: &usize| scope[..*u].ends_with("drop(");
        if uses.is_empty() || !uses.iter().any(asks_address) {
            continue;
        }
        if uses.iter().all(|u| asks_address(u) || dropped(u)) {
            if uses.iter().any(dropped) {
                found.push((line_of(text, at), format!("`{name}` is dropped once asked its address")));
            } else if !tail_expression(scope).is_empty() {
                found.push((
                    line_of(text, at),
                    format!("`{name}` is only asked its address, then closes as its block yields"),
                ));
            }
        }
    }
    found
}

/// The end of the block that `from` is in: its closing brace (or the end of the text).
fn block_end(b: &[u8], from: usize) -> usize {
    let mut depth = 0i32;
    let mut i = from;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = string_end(b, i);
                continue;
            }
            b'{' => depth += 1,
            b'}' if depth == 0 => return i,
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    b.len()
}

/// The block's final expression: what follows its last statement at its own depth.
fn tail_expression(block: &str) -> &str {
    let b = block.as_bytes();
    let (mut depth, mut last) = (0i32, 0);
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = string_end(b, i);
                continue;
            }
            b'{' | b'(' | b'[' => depth += 1,
            b'}' | b')' | b']' => {
                depth -= 1;
                // A block statement (`for … { }`, `if … { }`) ends where its brace closes.
                if depth == 0 && b[i] == b'}' {
                    last = i + 1;
                }
            }
            b';' if depth == 0 => last = i + 1,
            _ => {}
        }
        i += 1;
    }
    block[last..].trim()
}

/// Where `word` occurs in `text` as a whole identifier.
fn word_indices<'a>(text: &'a str, word: &'a str) -> impl Iterator<Item = usize> + 'a {
    text.match_indices(word).map(|(i, _)| i).filter(move |&i| {
        let before = text[..i].chars().next_back().is_none_or(|c| !is_ident(c));
        let after = text[i + word.len()..].chars().next().is_none_or(|c| !is_ident(c));
        before && after
    })
}

/// Python: a `with socket…` block or a function closing its socket, that binds and reads the port.
fn python_sockets(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let opens_socket = trimmed.starts_with("with ") && trimmed.contains("socket");
        if !(opens_socket || trimmed.starts_with("def ")) {
            continue;
        }
        let body: Vec<&str> =
            lines[i + 1..].iter().take_while(|l| l.trim().is_empty() || indent(l) > indent(line)).copied().collect();
        let body = body.join("\n");
        if !(body.contains(".bind(") && body.contains("getsockname()")) {
            continue;
        }
        if opens_socket {
            found.push((i + 1, "a socket bound, asked its port and closed as the `with` block ends".into()));
        } else if body.contains(".close()") {
            found.push((i + 1, "a function binds a socket, reads its port and closes it".into()));
        }
    }
    found
}

/// JavaScript and shell: a port-0 listen or bind whose port is read and that is closed soon after.
fn port_zero_windows(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let squeezed = |l: &str| l.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let line = squeezed(line);
        if !(line.contains(".listen(0") || line.contains("port:0") || line.contains(",0))")) {
            continue;
        }
        let window = lines[i..(i + WINDOW).min(lines.len())].iter().map(|l| squeezed(l)).collect::<Vec<_>>().join("\n");
        let reads_port = window.contains(".address()") || window.contains("getsockname()");
        if reads_port && window.contains(".close(") {
            found.push((i + 1, "a port-0 socket whose port is read and that is closed".into()));
        }
    }
    found
}
