//! The layering of `src/`, checked: every module imports only modules below
//! it in [`LAYERS`], the order in which data flows (a request enters at the
//! top, the row format and the byte budget are at the bottom). An import
//! that points back up, or a module missing from the list, fails this test
//! with the file and the edge named, so the drawing in
//! `docs/ARCHITECTURE.md` cannot drift from the code.
//!
//! What counts as an import: every `crate::a::b` and `super::x` path in the
//! code (a `use` or an inline path), with comments, doc links and
//! `#[cfg(test)]` modules left out. The units are the entries of
//! [`LAYERS`]; a path belongs to the longest entry it starts with. Two kinds
//! of edge are not ordered: a directory module's root (`mod.rs`) and its
//! own children (the root declares them and re-exports their faces; the
//! children share the root's vocabulary, e.g. `shard::ShardCtx`,
//! `spool::Seq`), and the log macros (`crate::warn!` …), which every layer
//! may call. Siblings inside a directory are ordered like everything else.
//! Left out entirely: the binaries (`main.rs`, `bin/`), which sit above
//! everything, and the test-only `fuzzing.rs` and `spool/tests.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top to bottom. A unit may import units listed after it, never before.
const LAYERS: &[&str] = &[
    "app",
    "resources",
    "deadletter",
    "shard",
    "shard::conn",
    "shard::routes",
    "shard::ws",
    "shard::devices",
    "shard::snapshot",
    "shard::rooms",
    "shard::accept",
    "shard::http",
    "shard::transport",
    "shard::io",
    "report",
    "auth",
    "limits",
    "ingest",
    "ingest::parse",
    "ingest::event",
    "drain",
    "read",
    "writer",
    "writer::probe",
    "writer::db",
    "writer::state",
    "writer::connect",
    "writer::recent",
    "pipeline",
    "cluster",
    "cluster::bus",
    "cluster::wire",
    "cluster::peers",
    "broadcast",
    "health",
    "breaker",
    "spool",
    "spool::appender",
    "spool::reader",
    "spool::checkpoint",
    "spool::segment",
    "spool::record",
    "metrics",
    "shutdown",
    "config",
    "config::pgurl",
    "config::sections",
    "log",
    "labels",
    "row",
    "budget",
];

/// Exported macros, callable from every layer.
const LOG_MACROS: &[&str] = &["error", "warn", "info", "debug", "log_at"];

/// Files outside the layering (see the module doc).
const EXEMPT: &[&str] = &["lib.rs", "main.rs", "fuzzing.rs", "spool/tests.rs"];

fn rank(unit: &str) -> usize {
    LAYERS.iter().position(|l| *l == unit).expect("a unit from LAYERS")
}

/// The module path of a source file: `shard/conn.rs` → `shard::conn`,
/// `spool/mod.rs` → `spool`.
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let file = parts.pop().expect("a file name");
    let stem = file.trim_end_matches(".rs");
    if stem != "mod" {
        parts.push(stem.to_string());
    }
    parts.join("::")
}

/// The longest entry of LAYERS that `path` starts with.
fn unit_of(path: &str) -> Option<&'static str> {
    LAYERS.iter().filter(|l| path == **l || path.starts_with(&format!("{l}::"))).max_by_key(|l| l.len()).copied()
}

/// The code of a file without comments and without `#[cfg(test)]` modules.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    let mut in_block = false;
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if trimmed == "#[cfg(test)]" {
            let next = lines.peek().map(|l| l.trim()).unwrap_or("");
            if next.starts_with("mod ") && next.ends_with('{') {
                // A test module runs to the end of the file by convention;
                // check that, so that code after one is never skipped.
                let rest: Vec<&str> = lines.collect();
                let closes = rest.iter().rposition(|l| l.starts_with('}'));
                assert!(
                    closes.is_some_and(|i| rest[i + 1..].iter().all(|l| l.trim().is_empty())),
                    "a #[cfg(test)] module that is not last in its file"
                );
                break;
            }
        }
        let mut code = String::new();
        let mut rest = line;
        loop {
            if in_block {
                match rest.find("*/") {
                    Some(i) => {
                        in_block = false;
                        rest = &rest[i + 2..];
                    }
                    None => break,
                }
            } else {
                let line_comment = rest.find("//");
                let block = rest.find("/*");
                match (line_comment, block) {
                    (Some(l), Some(b)) if b < l => {
                        code.push_str(&rest[..b]);
                        in_block = true;
                        rest = &rest[b + 2..];
                    }
                    (None, Some(b)) => {
                        code.push_str(&rest[..b]);
                        in_block = true;
                        rest = &rest[b + 2..];
                    }
                    (Some(l), _) => {
                        code.push_str(&rest[..l]);
                        break;
                    }
                    (None, None) => {
                        code.push_str(rest);
                        break;
                    }
                }
            }
        }
        out.push_str(&code);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path that starts at `crate::` or `super::` in `code`, resolved to
/// an absolute module path (`super` against `module`). Brace groups are
/// expanded one level: `super::{http, io}` gives `…::http` and `…::io`.
fn imported_paths(code: &str, module: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (line_no, line) in code.lines().enumerate() {
        for anchor in ["crate::", "super::"] {
            let mut from = 0;
            while let Some(i) = line[from..].find(anchor) {
                let start = from + i;
                from = start + anchor.len();
                if line[..start].chars().next_back().is_some_and(is_ident) {
                    continue; // e.g. `my_crate::`
                }
                let base: Vec<&str> = if anchor == "crate::" {
                    Vec::new()
                } else {
                    // `super` of `a::b` (file a/b.rs) is `a`; of a mod.rs
                    // root `a` it is the crate: one step up either way.
                    let mut m: Vec<&str> = module.split("::").collect();
                    m.pop();
                    m
                };
                let tail = &line[from..];
                let mut segs: Vec<String> = base.iter().map(|s| s.to_string()).collect();
                let mut j = 0;
                let bytes: Vec<char> = tail.chars().collect();
                loop {
                    if bytes.get(j) == Some(&'{') {
                        let group: String = bytes[j + 1..].iter().take_while(|c| **c != '}').collect();
                        for item in group.split(',') {
                            let name: String = item.trim().chars().take_while(|c| is_ident(*c)).collect();
                            if !name.is_empty() && name != "self" {
                                found.push((format!("{}::{name}", segs.join("::")), line_no + 1));
                            }
                        }
                        break;
                    }
                    let seg: String = bytes[j..].iter().take_while(|c| is_ident(**c)).collect();
                    if seg.is_empty() {
                        break;
                    }
                    j += seg.len();
                    let is_macro = bytes.get(j) == Some(&'!');
                    if is_macro && segs.is_empty() && LOG_MACROS.contains(&seg.as_str()) {
                        found.push(("log".into(), line_no + 1));
                        break;
                    }
                    segs.push(seg);
                    if bytes[j..].starts_with(&[':', ':']) {
                        j += 2;
                        continue;
                    }
                    found.push((segs.join("::"), line_no + 1));
                    break;
                }
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "bin") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// True when `a` and `b` are a directory module's root and one of its
/// own children (see the module doc).
fn parent_and_child(a: &str, b: &str) -> bool {
    b.strip_prefix(a).is_some_and(|r| r.starts_with("::") && !r[2..].contains("::"))
        || a.strip_prefix(b).is_some_and(|r| r.starts_with("::") && !r[2..].contains("::"))
}

#[test]
fn every_module_imports_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut seen_units = BTreeSet::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let rel_text = rel.to_string_lossy().replace('\\', "/");
        if EXEMPT.contains(&rel_text.as_str()) {
            continue;
        }
        let module = module_of(rel);
        let Some(unit) = LAYERS.iter().find(|l| **l == module).copied() else {
            violations.push(format!("src/{rel_text}: module `{module}` is not placed in LAYERS (tests/layers.rs)"));
            continue;
        };
        seen_units.insert(unit);
        let text = std::fs::read_to_string(file).expect("read source");
        for (path, line) in imported_paths(&code_of(&text), &module) {
            let Some(target) = unit_of(&path) else {
                // `crate::` paths to items at the crate root are the log
                // macros only; anything else is a module we do not know.
                violations.push(format!("src/{rel_text}:{line}: `{path}` is in no layer"));
                continue;
            };
            if target == unit || parent_and_child(unit, target) {
                continue;
            }
            if rank(target) < rank(unit) {
                violations.push(format!(
                    "src/{rel_text}:{line}: `{unit}` imports `{path}` from `{target}`, a layer above it"
                ));
            }
        }
    }
    for unit in LAYERS {
        if !seen_units.contains(unit) {
            violations.push(format!("LAYERS names `{unit}` but there is no such file in src/"));
        }
    }
    assert!(violations.is_empty(), "layering violations:\n  {}", violations.join("\n  "));
}

/// The checker finds what it is meant to find (so that a pass above means
/// something): an upward `use`, a `super::` sibling going up, brace
/// groups, inline paths; and it ignores comments and test modules.
#[test]
fn the_checker_sees_upward_edges_and_ignores_comments() {
    let code = code_of(
        "use crate::row::RowBuf; // crate::app::run\n\
         /* crate::shard::ShardCtx */ use super::{http, io};\n\
         fn f() { crate::writer::db::connect(); crate::warn!(\"x\"); }\n\
         /// see [`crate::report::Report`]\n\
         #[cfg(test)]\n\
         mod tests {\n\
             use crate::app::run;\n\
         }\n",
    );
    let paths: Vec<String> = imported_paths(&code, "shard::conn").into_iter().map(|(p, _)| p).collect();
    assert_eq!(paths, ["row::RowBuf", "shard::http", "shard::io", "writer::db::connect", "log"]);
    assert_eq!(unit_of("writer::db::connect"), Some("writer::db"));
    assert_eq!(unit_of("writer::Writer"), Some("writer"));
    assert!(rank("writer::db") < rank("row"), "row is below the writer");
    assert!(rank("shard::conn") < rank("shard::http"));
    let root: Vec<String> = imported_paths("use super::Seq;", "spool").into_iter().map(|(p, _)| p).collect();
    assert_eq!(root, ["Seq"], "super of a mod.rs root is the crate");
    assert!(parent_and_child("spool", "spool::record") && !parent_and_child("spool", "spool2::x"));
    assert_eq!(module_of(Path::new("spool/mod.rs")), "spool");
    assert_eq!(module_of(Path::new("shard/conn.rs")), "shard::conn");
}
