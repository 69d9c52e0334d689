//! Keeps the layering: reads every `use` and `crate::` path in the sources and fails when a module
//! imports one of a higher layer, or when files import each other (a cycle of any length). The
//! `caption-images` crate is held to the same rule about its own files.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
};

/// The crate's top modules, highest layer first; a module may import its own layer or a lower
/// one. `backend` implements the engine's traits, so it sits above `engine`.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["app"],
    &["config"],
    &["api"],
    &["upstream"],
    &["cascade"],
    &["backend"],
    &["engine"],
    &["validate"],
    &["models"],
    &["images", "hub", "telemetry"],
    &["lru", "pb", "watched"],
];

type ModPath = Vec<String>;

struct Source {
    module: ModPath,
    text: String,
}

/// Every file under `root` by its module path (`lib.rs` is the root module).
fn sources(root: &Path) -> Vec<Source> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("main.rs") {
                let rel: PathBuf = path.strip_prefix(root).unwrap().with_extension("");
                let mut module: ModPath = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
                if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                    module.pop();
                }
                out.push(Source { module, text: code_only(&std::fs::read_to_string(&path).unwrap()) });
            }
        }
    }
    out
}

/// The text without comments and string literals, which may spell paths that are not imports.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut kept = String::new();
        for (i, c) in line.char_indices() {
            if !in_str && c == '/' && line[i..].starts_with("//") {
                break;
            }
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                kept.push(c);
            }
            prev = c;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

/// The full paths a `use` tree names, e.g. `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<Vec<String>> {
    // `A as B` is kept as `A@B` through the whitespace removal.
    let tree = tree.split_whitespace().collect::<Vec<_>>().join(" ").replace(" as ", "@");
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    fn walk(prefix: &[String], tree: &str, out: &mut Vec<Vec<String>>) {
        // Split at top-level commas.
        let (mut depth, mut start, mut parts) = (0, 0, Vec::new());
        for (i, c) in tree.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&tree[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&tree[start..]);
        for part in parts.into_iter().filter(|p| !p.is_empty()) {
            match part.find('{') {
                Some(open) => {
                    let head = part[..open].trim_end_matches("::");
                    let mut path = prefix.to_vec();
                    path.extend(head.split("::").filter(|s| !s.is_empty()).map(String::from));
                    walk(&path, &part[open + 1..part.len() - 1], out);
                }
                None => {
                    let mut path = prefix.to_vec();
                    let body = part.split('@').next().unwrap_or(part);
                    path.extend(body.split("::").map(String::from));
                    out.push(path);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&[], &tree, &mut out);
    out
}

/// Every path a file names: its `use` items (not its `pub use` re-exports) and the `crate::…`
/// and `super::…` paths in its code.
fn named_paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if let Some(body) = line.trim_start().strip_prefix("use ") {
            let start = offset + (line.len() - body.len());
            if let Some(end) = text[start..].find(';') {
                out.extend(expand(&text[start..start + end]));
            }
        }
        offset += line.len();
    }
    for prefix in ["crate::", "super::"] {
        let mut rest = text;
        while let Some(at) = rest.find(prefix) {
            let tail = &rest[at..];
            let word_start =
                rest[..at].chars().next_back().is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':'));
            if word_start && !tail[prefix.len()..].starts_with('{') {
                let path: String = tail.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
                out.push(path.split("::").filter(|s| !s.is_empty()).map(String::from).collect());
            }
            rest = &rest[at + prefix.len()..];
        }
    }
    out
}

/// The module a path leads to (the longest prefix that is a module), followed through the
/// `pub use child::Item` re-exports of the module it ends in.
fn resolve(
    from: &ModPath,
    path: &[String],
    modules: &BTreeSet<ModPath>,
    reexports: &HashMap<(ModPath, String), ModPath>,
) -> Option<ModPath> {
    let mut abs: ModPath = match path.first()?.as_str() {
        "crate" => Vec::new(),
        "super" => from[..from.len().saturating_sub(1)].to_vec(),
        "self" => from.clone(),
        first => {
            let child: ModPath = from.iter().cloned().chain([first.to_string()]).collect();
            if !modules.contains(&child) {
                return None;
            }
            let mut abs = child;
            abs.extend(path[1..].iter().cloned());
            return longest(abs, modules, reexports);
        }
    };
    let mut rest = &path[1..];
    while rest.first().is_some_and(|s| s == "super") {
        abs.pop();
        rest = &rest[1..];
    }
    abs.extend(rest.iter().cloned());
    longest(abs, modules, reexports)
}

fn longest(
    abs: ModPath,
    modules: &BTreeSet<ModPath>,
    reexports: &HashMap<(ModPath, String), ModPath>,
) -> Option<ModPath> {
    let n = (0..=abs.len()).rev().find(|&n| modules.contains(&abs[..n].to_vec()))?;
    let mut module = abs[..n].to_vec();
    if let Some(item) = abs.get(n) {
        while let Some(child) = reexports.get(&(module.clone(), item.clone())) {
            module = child.clone();
        }
    }
    Some(module)
}

/// Edges between the files of one crate (tests modules left out: they import what they test).
fn file_edges(root: &Path) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let files = sources(root);
    let modules: BTreeSet<ModPath> = files.iter().map(|f| f.module.clone()).collect();
    let mut reexports = HashMap::new();
    for f in &files {
        for line in f.text.lines().map(str::trim).filter(|l| l.starts_with("pub use ")) {
            for path in expand(line.trim_start_matches("pub use ").trim_end_matches(';')) {
                let child: ModPath = f.module.iter().cloned().chain([path[0].clone()]).collect();
                if path.len() >= 2 && modules.contains(&child) {
                    reexports.insert((f.module.clone(), path.last().unwrap().clone()), child);
                }
            }
        }
    }
    let mut edges: BTreeMap<ModPath, BTreeSet<ModPath>> = BTreeMap::new();
    for f in files.iter().filter(|f| f.module.last().is_none_or(|m| m != "tests")) {
        let targets = edges.entry(f.module.clone()).or_default();
        for path in named_paths(&f.text) {
            if let Some(to) = resolve(&f.module, &path, &modules, &reexports) {
                let test_only = to.last().is_some_and(|m| m == "tests");
                // A module's own children and ancestors are its own business.
                if to != f.module && !to.starts_with(&f.module) && !f.module.starts_with(&to) && !test_only {
                    targets.insert(to);
                }
            }
        }
    }
    edges
}

/// Files on a cycle: every strongly connected group of more than one file.
fn cycles(edges: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<ModPath>> {
    let reach = |from: &ModPath| {
        let (mut seen, mut stack) = (BTreeSet::new(), vec![from.clone()]);
        while let Some(m) = stack.pop() {
            for next in edges.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&ModPath, BTreeSet<ModPath>> = edges.keys().map(|m| (m, reach(m))).collect();
    let mut groups: BTreeSet<Vec<ModPath>> = BTreeSet::new();
    for (m, r) in &reached {
        let group: Vec<ModPath> =
            r.iter().filter(|o| reached.get(o).is_some_and(|back| back.contains(*m))).cloned().collect();
        if group.len() > 1 {
            groups.insert(group);
        }
    }
    groups.into_iter().collect()
}

fn layer(module: &ModPath) -> Option<usize> {
    let top = module.first()?;
    LAYERS.iter().position(|l| l.contains(&top.as_str()))
}

fn show(m: &ModPath) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

#[test]
fn no_module_imports_a_higher_layer_and_no_files_import_each_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let edges = file_edges(&root.join("src"));
    let mut wrong = Vec::new();
    for (from, targets) in &edges {
        for to in targets {
            match (layer(from), layer(to)) {
                (Some(a), Some(b)) if b < a => {
                    wrong.push(format!("{} imports {} (a higher layer)", show(from), show(to)))
                }
                (None, _) | (_, None) if !from.is_empty() && !to.is_empty() => {
                    wrong.push(format!("{} or {} is in no layer of LAYERS", show(from), show(to)))
                }
                _ => {}
            }
        }
    }
    for root in [root.join("src"), root.join("crates/images/src")] {
        for group in cycles(&file_edges(&root)) {
            let names: Vec<String> = group.iter().map(show).collect();
            wrong.push(format!("{}: files import each other: {}", root.display(), names.join(", ")));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_check_sees_what_it_must() {
    assert_eq!(
        expand("crate::{api::pb, cascade::{A, b::C as D}}"),
        [vec!["crate", "api", "pb"], vec!["crate", "cascade", "A"], vec!["crate", "cascade", "b", "C"]]
    );
    let modules: BTreeSet<ModPath> =
        [vec![], vec!["api".to_string()], vec!["api".into(), "stream".into()], vec!["api".into(), "services".into()]]
            .into_iter()
            .collect();
    let from = vec!["api".to_string(), "stream".to_string()];
    let path = |p: &str| p.split("::").map(String::from).collect::<Vec<_>>();
    let reexports = HashMap::new();
    assert_eq!(
        resolve(&from, &path("super::services::Services"), &modules, &reexports),
        Some(modules.iter().nth(2).unwrap().clone())
    );
    let mut edges = BTreeMap::new();
    let (a, b) = (vec!["a".to_string()], vec!["b".to_string()]);
    edges.insert(a.clone(), BTreeSet::from([b.clone()]));
    edges.insert(b.clone(), BTreeSet::from([a.clone()]));
    assert_eq!(cycles(&edges), [vec![a, b]]);
}
