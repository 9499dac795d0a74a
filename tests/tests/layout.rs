//! The layout the architecture promises (docs/architecture.md), checked on the sources: the
//! modules of each crate import each other without a circle and never from the crate root;
//! `tether-proto` depends on `bytes` and `thiserror` alone, and `fuzz/` on `tether-proto` alone;
//! no source file outside `tests/` is over 800 lines; and the walk of one connection names
//! functions that exist and call each other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
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

/// The top-level modules each top-level module of `src` names through `crate::`.
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap().to_string_lossy().into_owned();
        let top = rel
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" || top == "bin" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let mut named = BTreeSet::new();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                named.extend(
                    group
                        .split(',')
                        .map(|m| m.trim().split("::").next().unwrap_or("").to_string()),
                );
            } else {
                let m: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                named.insert(m);
            }
        }
        named.retain(|m| !m.is_empty() && *m != top && m != "self");
        graph.entry(top).or_default().extend(named);
    }
    graph
}

fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    fn walk(
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        found: &mut BTreeSet<String>,
    ) {
        let Some(last) = path.last().cloned() else {
            return;
        };
        for next in g.get(&last).into_iter().flatten() {
            if let Some(i) = path.iter().position(|p| p == next) {
                let mut c = path[i..].to_vec();
                c.push(next.clone());
                found.insert(c.join(" -> "));
            } else {
                path.push(next.clone());
                walk(g, path, found);
                path.pop();
            }
        }
    }
    let mut found = BTreeSet::new();
    for start in graph.keys() {
        walk(graph, &mut vec![start.clone()], &mut found);
    }
    found.into_iter().collect()
}

#[test]
fn modules_import_without_a_circle_and_never_from_the_root() {
    for krate in [
        "proto",
        "process",
        "endpoint",
        "transport",
        "link",
        "etcd",
        "standin",
        "server",
        "agent",
        "bench",
        "testkit",
    ] {
        let graph = imports(&workspace().join(krate).join("src"));
        let found = circles(&graph);
        assert!(found.is_empty(), "{krate}: import circles: {found:#?}");
        for (module, named) in &graph {
            // `crate::VERSION`-like items of the root, or the root's functions.
            let upward: Vec<_> = named
                .iter()
                .filter(|m| !graph.contains_key(*m) && !is_leaf_module(krate, m))
                .collect();
            assert!(
                upward.is_empty(),
                "{krate}::{module} names {upward:?} of the crate root"
            );
        }
    }
}

/// A module without `crate::` imports of its own has no entry in the graph but exists.
fn is_leaf_module(krate: &str, m: &str) -> bool {
    let src = workspace().join(krate).join("src");
    src.join(format!("{m}.rs")).exists() || src.join(m).join("mod.rs").exists()
}

/// The `[dependencies]` names of a manifest.
fn dependencies(manifest: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let doc: toml::Table = text.parse().unwrap();
    doc.get("dependencies")
        .and_then(|d| d.as_table())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn the_protocol_crate_and_its_fuzz_targets_stand_alone() {
    let proto = dependencies(&workspace().join("proto/Cargo.toml"));
    assert_eq!(proto, BTreeSet::from(["bytes".into(), "thiserror".into()]));
    let fuzz = dependencies(&workspace().join("fuzz/Cargo.toml"));
    assert_eq!(
        fuzz,
        BTreeSet::from(["libfuzzer-sys".into(), "tether-proto".into()])
    );
    let server = dependencies(&workspace().join("server/Cargo.toml"));
    assert!(
        !server.contains("tether-agent"),
        "the server does not depend on the agent"
    );
}

/// One step of a walk in docs/architecture.md: the file and the function a connection is in.
#[derive(Debug)]
struct Step {
    line: String,
    file: String,
    function: String,
}

/// The walks of "Following one connection": a list of steps under each "On ..." or "Through
/// ..." paragraph.
fn walks() -> Vec<Vec<Step>> {
    let doc = std::fs::read_to_string(workspace().join("docs/architecture.md")).unwrap();
    let section = doc
        .split("## Following one connection")
        .nth(1)
        .expect("docs/architecture.md has its walk")
        .split("\n## ")
        .next()
        .unwrap();
    let mut walks: Vec<Vec<Step>> = Vec::new();
    for line in section.lines() {
        if line.starts_with("On ") || line.starts_with("Through ") {
            walks.push(Vec::new());
            continue;
        }
        // "N. `path` `function`: ..."
        let Some((number, rest)) = line.split_once(". `") else {
            continue;
        };
        if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let mut ticks = rest.split('`');
        let file = ticks.next().unwrap_or("").to_string();
        let _between = ticks.next();
        let function = ticks.next().unwrap_or("").to_string();
        walks
            .last_mut()
            .expect("a step under an \"On ...\" paragraph")
            .push(Step {
                line: line.trim().to_string(),
                file,
                function,
            });
    }
    walks
}

/// Whether `text` calls `name` (as `name(`, `.name(` or `::name(`), not only defines it.
fn calls(text: &str, name: &str) -> bool {
    let needle = format!("{name}(");
    text.match_indices(&needle).any(|(i, _)| {
        let before = &text[..i];
        let prev = before.chars().next_back();
        let ident = prev.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        !ident && !before.ends_with("fn ")
    })
}

/// Whether `text` defines `name` as a function.
fn defines(text: &str, name: &str) -> bool {
    text.contains(&format!("fn {name}(")) || text.contains(&format!("fn {name}<"))
}

#[test]
fn the_architecture_walk_names_files_and_functions_on_the_path() {
    let walks = walks();
    assert!(
        walks.len() >= 5 && walks.iter().all(|w| w.len() >= 4),
        "the forward, peer and reverse walks: {walks:#?}"
    );
    for walk in &walks {
        for (i, step) in walk.iter().enumerate() {
            let path = workspace().join(&step.file);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (step \"{}\")", step.file, step.line));
            assert!(
                defines(&text, &step.function),
                "{} defines no function `{}` (step \"{}\")",
                step.file,
                step.function,
                step.line
            );
            if i == 0 {
                continue;
            }
            let called = walk[..i].iter().any(|earlier| {
                let text = std::fs::read_to_string(workspace().join(&earlier.file)).unwrap();
                calls(&text, &step.function)
            });
            assert!(
                called,
                "`{}` is not called from any earlier step's file: is step \"{}\" on the path?",
                step.function, step.line
            );
        }
    }
}

/// No source file outside `tests/` over 800 lines: a file that grows past it holds more than one
/// thing (bench/src/soak.rs held seven in 2,788 lines) and is split along its seams.
#[test]
fn no_source_file_outside_the_test_suites_is_over_800_lines() {
    let mut files = Vec::new();
    for dir in [
        "proto",
        "process",
        "endpoint",
        "transport",
        "link",
        "trust",
        "etcd",
        "standin",
        "server",
        "agent",
        "bench",
        "testkit",
        "fuzz",
    ] {
        let dir = workspace().join(dir);
        if dir.exists() {
            rust_files(&dir, &mut files);
        }
    }
    let long: Vec<String> = files
        .iter()
        .filter(|f| !f.components().any(|c| c.as_os_str() == "target"))
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > 800).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "files over 800 lines: {long:#?}");
    assert!(files.len() > 50, "the sources were found: {}", files.len());
}
