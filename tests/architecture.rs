//! The layers of docs/ARCHITECTURE.md, checked: every `crate::…` path in `src/` points to a module
//! of a lower layer (or into its own module), so there is no import cycle between the top-level
//! modules and no lower layer reaches up. Within a module's folder, the files form no cycle either,
//! apart from the folder's `mod.rs`, which declares the others.
//!
//! Reads the source text (no tool to install); `use` lines, paths in code and `use` inside functions
//! all count, comments do not.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may use only modules of lower layers.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["format", "immich", "policy", "redact", "host", "progress"],
    &["crypto"],
    &["config"],
    &["store", "db", "notify", "hooks"],
    &["repo"],
    &["backup", "restore", "maintenance"],
    &["verify", "browse"],
    &["agent", "demo"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/backup/walk.rs` → ["backup", "walk"]; `src/backup/mod.rs` → ["backup"].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The code of a file without comments (line comments, doc comments, block comments) and without
/// string literals' contents, so that text in them is not taken for a path.
fn code_of(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Every `crate::a::b…` path in `code`, as its first two segments.
fn crate_paths(code: &str) -> BTreeSet<(String, Option<String>)> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':' || c == '$') {
            continue; // `$crate::`, `a::crate::`, `my_crate::`: not this crate's path
        }
        let ident = |s: &str| -> String {
            s.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        };
        let first = ident(rest);
        let after = &rest[first.len()..];
        let second = after
            .strip_prefix("::")
            .map(ident)
            .filter(|s| !s.is_empty());
        if !first.is_empty() {
            found.insert((first, second));
        }
        if let Some(group) = rest.strip_prefix("{") {
            // `use crate::{a, b::c}`: each item.
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let item = item.trim();
                let first = ident(item);
                if !first.is_empty() {
                    found.insert((first, None));
                }
            }
        }
    }
    found
}

struct Source {
    /// Module path → the `crate::` paths its file uses.
    uses: BTreeMap<Vec<String>, BTreeSet<(String, Option<String>)>>,
}

fn read_sources() -> Source {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut uses = BTreeMap::new();
    for file in files {
        let module = module_path(&src, &file);
        if module
            .first()
            .is_some_and(|m| m == "main" || m == "cli" || m == "lib")
        {
            continue; // the binary and the crate root sit above every layer
        }
        let text = std::fs::read_to_string(&file).unwrap();
        uses.insert(module, crate_paths(&code_of(&text)));
    }
    Source { uses }
}

#[test]
fn every_module_has_a_layer() {
    let src = read_sources();
    let unknown: BTreeSet<&String> = src
        .uses
        .keys()
        .map(|m| &m[0])
        .filter(|m| layer_of(m).is_none())
        .collect();
    assert!(
        unknown.is_empty(),
        "modules without a layer in tests/architecture.rs and docs/ARCHITECTURE.md: {unknown:?}"
    );
}

#[test]
fn imports_point_down_the_layers() {
    let src = read_sources();
    let mut wrong = Vec::new();
    for (module, paths) in &src.uses {
        let Some(own) = layer_of(&module[0]) else {
            continue;
        };
        for (first, _) in paths {
            if *first == module[0] {
                continue;
            }
            match layer_of(first) {
                Some(l) if l < own => {}
                Some(l) => wrong.push(format!(
                    "{} (layer {own}) uses crate::{first} (layer {l})",
                    module.join("::")
                )),
                None => wrong.push(format!(
                    "{} uses crate::{first}, which has no layer",
                    module.join("::")
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that do not point down:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn files_of_one_folder_form_no_cycle() {
    let src = read_sources();
    // Edges between sibling files (a folder's mod.rs is left out: it declares its files and may
    // use them, and they may use the types it defines).
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, paths) in &src.uses {
        if module.len() != 2 {
            continue;
        }
        let from = module.join("::");
        for (first, second) in paths {
            if *first != module[0] {
                continue;
            }
            if let Some(second) = second {
                let to = format!("{first}::{second}");
                if to != from && src.uses.contains_key(&vec![first.clone(), second.clone()]) {
                    edges.entry(from.clone()).or_default().insert(to);
                }
            }
        }
    }
    // Depth-first search for a cycle.
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(cycle) = visit(node, &edges, &mut Vec::new(), &mut done) {
            panic!("files that use each other: {}", cycle.join(" → "));
        }
    }
}

#[test]
fn the_checker_sees_paths_and_skips_comments() {
    let code = code_of(
        "use crate::store::Store; // crate::agent\n/* crate::demo */ let s = \"crate::cli\";\nuse crate::{repo, format::Entry};\nx::crate::no;",
    );
    let found = crate_paths(&code);
    let firsts: BTreeSet<&str> = found.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        firsts,
        BTreeSet::from(["store", "repo", "format"]),
        "{found:?}"
    );
}
