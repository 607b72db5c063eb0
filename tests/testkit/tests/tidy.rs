//! Tidy checks over the workspace's sources, read as text (no heavy tool):
//! - no import cycle between the top-level modules of any crate (from `crate::`
//!   paths in each module's non-test code);
//! - modules whose doc says `Pure:` use no runtime, no object store, no file or
//!   network I/O and read no clock;
//! - every metric the docs name exists in the code, and every metric the code
//!   exports is documented;
//!   (the READMEs' configuration blocks are held to the defaults by the
//!   gateway's and the cloud's own `config` tests, which can parse them);
//! - the cloud's layers (ARCHITECTURE.md): each top-level module of
//!   `cloud-cluster` imports only the modules below it, nothing imports the
//!   composition root `node`, and outside `shard/` a shard is reached through its
//!   handle, never its state or task.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests: a panic is the failure report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// `src/` of every crate of the workspace (and the no_std proof).
fn crates() -> Vec<PathBuf> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let members = manifest.split("members = [").nth(1).unwrap().split(']').next().unwrap();
    let mut out: Vec<PathBuf> = members
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
        .map(|m| root().join(m).join("src"))
        .collect();
    out.push(root().join("device-sdk/no-std-check/src"));
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A file's code without its test module (by convention the last item, after
/// `#[cfg(test)]`); `tests.rs` files are test code altogether.
fn non_test_code(path: &Path) -> String {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    let text = std::fs::read_to_string(path).unwrap();
    let code = text.split("\n#[cfg(test)]").next().unwrap_or_default();
    // Comments say things like `crate::x` in prose; only code counts.
    code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// The top-level module a file belongs to (`None`: the crate root, `lib.rs`/`main.rs`,
/// and binaries under `bin/`).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_string_lossy().into_owned();
    match first.as_str() {
        "lib.rs" | "main.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// Top-level modules a piece of code names through `crate::` (also inside
/// `use crate::{a, b::c}` groups).
fn crate_refs(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        // Not part of a longer path such as `fleetline_crate::`.
        if code[..i].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let body = &group[..group.find('}').unwrap_or(group.len())];
            for part in body.split(',') {
                let name: String = part.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if modules.contains(&name) {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if modules.contains(&name) {
                out.insert(name);
            }
        }
    }
    out
}

/// Module → modules it imports, per crate.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(src, f)).collect();
    let mut g: BTreeMap<String, BTreeSet<String>> = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for f in &files {
        let Some(from) = top_module(src, f) else { continue };
        for to in crate_refs(&non_test_code(f), &modules) {
            if to != from {
                g.get_mut(&from).unwrap().insert(to);
            }
        }
    }
    g
}

/// Strongly connected components with more than one module: the cycles.
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    let reach = |start: &String| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start.clone()];
        while let Some(m) = stack.pop() {
            for n in &g[&m] {
                if seen.insert(n.clone()) {
                    stack.push(n.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> = g.keys().map(|m| (m, reach(m))).collect();
    let mut out: Vec<BTreeSet<String>> = Vec::new();
    for m in g.keys() {
        let scc: BTreeSet<String> =
            g.keys().filter(|n| reach[m].contains(*n) && reach[*n].contains(m)).cloned().collect();
        if scc.len() > 1 && !out.contains(&scc) {
            out.push(scc);
        }
    }
    out
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    let mut found = Vec::new();
    for src in crates() {
        let name = src.parent().unwrap().strip_prefix(root()).unwrap().display().to_string();
        for c in cycles(&graph(&src)) {
            found.push((name.clone(), c.into_iter().collect::<Vec<_>>().join(" ")));
        }
    }
    assert!(found.is_empty(), "import cycles (crate, modules in the cycle): {found:?}");
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let m = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    let code_a = "use crate::b::Thing;\nfn f() { crate::c::g() }";
    let code_b = "use crate::{a::X, c};";
    let modules = m(&["a", "b", "c"]);
    assert_eq!(crate_refs(code_a, &modules), m(&["b", "c"]));
    assert_eq!(crate_refs(code_b, &modules), m(&["a", "c"]));
    assert_eq!(crate_refs("use fleetline_crate::a;", &modules), m(&[]));
    let g: BTreeMap<String, BTreeSet<String>> =
        [("a".to_string(), m(&["b"])), ("b".to_string(), m(&["a", "c"])), ("c".to_string(), m(&[]))].into();
    assert_eq!(cycles(&g), vec![m(&["a", "b"])]);
}

/// What a module marked `Pure:` in its doc must not name.
const IMPURE: &[&str] = &[
    "tokio",
    "object_store",
    "std::fs",
    "std::net",
    "SystemTime::now",
    "Instant::now",
    "std::thread",
    "rumqttc",
    "rumqttd",
];

#[test]
fn pure_modules_use_no_runtime_no_store_no_io_and_no_clock() {
    let mut marked = 0;
    let mut bad = Vec::new();
    for src in crates() {
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let doc: String = text.lines().take_while(|l| l.starts_with("//!")).collect::<Vec<_>>().join("\n");
            if !doc.contains("Pure:") {
                continue;
            }
            marked += 1;
            let code = non_test_code(&f);
            for word in IMPURE {
                if code.contains(word) {
                    bad.push(format!("{} names {word}", f.strip_prefix(root()).unwrap().display()));
                }
            }
        }
    }
    assert!(marked >= 13, "modules marked pure: {marked}");
    assert!(bad.is_empty(), "{bad:#?}");
}

/// The cloud's dependency rule, as in ARCHITECTURE.md: module → what it may import.
const CLOUD_LAYERS: &[(&str, &[&str])] = &[
    ("analytics", &[]),
    ("cluster", &[]),
    ("keys", &[]),
    ("telemetry", &[]),
    ("lake", &["analytics"]),
    ("registry", &["lake"]),
    ("inference", &["lake", "telemetry"]),
    ("shard", &["analytics", "inference", "keys", "lake", "registry", "telemetry"]),
    ("ingest", &["analytics", "keys", "lake", "shard", "telemetry"]),
    ("jobs", &["analytics", "inference", "lake", "registry", "shard", "telemetry"]),
    ("http", &["cluster", "inference", "jobs", "lake", "registry", "shard", "telemetry"]),
    ("config", &["analytics", "cluster", "ingest", "jobs", "lake", "shard"]),
    (
        "node",
        &["cluster", "config", "http", "inference", "ingest", "jobs", "keys", "lake", "registry", "shard", "telemetry"],
    ),
    ("cli", &["cluster", "config", "jobs", "keys", "lake", "node"]),
];

#[test]
fn the_cloud_keeps_its_layers() {
    let src = root().join("cloud-cluster/src");
    let g = graph(&src);
    let mut bad = Vec::new();
    for (module, imports) in &g {
        let Some((_, allowed)) = CLOUD_LAYERS.iter().find(|(m, _)| m == module) else {
            bad.push(format!("{module} is not in the layer table"));
            continue;
        };
        for i in imports {
            if !allowed.contains(&i.as_str()) {
                bad.push(format!("{module} imports {i}"));
            }
        }
    }
    // Outside `shard/` (and the node that starts the tasks) a shard is its handle.
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for f in files {
        let top = top_module(&src, &f);
        if matches!(top.as_deref(), Some("shard" | "node")) {
            continue;
        }
        let code = non_test_code(&f);
        for inner in ["shard::state", "shard::task", "ShardState"] {
            if code.contains(inner) {
                bad.push(format!("{} names {inner}", f.strip_prefix(&src).unwrap().display()));
            }
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

/// `fleetline_*` names in a text: metric names (a trailing `{label}` is not part).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("fleetline_") {
        if i > 0 && text.as_bytes()[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let name: String =
            text[i..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        let kinds = ["fleetline_cloud_", "fleetline_gateway_", "fleetline_broker_"];
        if kinds.iter().any(|k| name.starts_with(k) && name.len() > k.len()) {
            out.insert(name);
        }
    }
    out
}

fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            if !name.starts_with('.') && name != "target" && name != "node_modules" {
                markdown_files(&p, out);
            }
        } else if name.ends_with(".md") {
            out.push(p);
        }
    }
}

#[test]
fn every_metric_in_the_docs_exists_and_every_exported_metric_is_documented() {
    let mut docs = BTreeSet::new();
    let mut files = Vec::new();
    markdown_files(&root(), &mut files);
    for f in &files {
        docs.extend(metric_names(&std::fs::read_to_string(f).unwrap()));
    }
    let mut code = BTreeSet::new();
    for src in crates() {
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for f in files {
            // Names in string literals of non-test code.
            let text = non_test_code(&f);
            for part in text.split('"').skip(1).step_by(2) {
                code.extend(metric_names(part).into_iter().filter(|n| n == part));
            }
        }
    }
    assert!(code.len() >= 40, "metrics found in the code: {code:?}");
    let undocumented: Vec<_> = code.difference(&docs).collect();
    let missing: Vec<_> = docs.difference(&code).collect();
    assert!(undocumented.is_empty(), "exported but not documented: {undocumented:#?}");
    assert!(missing.is_empty(), "documented but not exported: {missing:#?}");
}
