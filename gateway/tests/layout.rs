//! The crate's shape: no two modules import each other, directly or through others. Each module
//! names what it uses from others as `crate::module::item` or `super::item`; this test reads those
//! paths from the sources (tests and comments included, except the `mod tests` at the end of a
//! file) and looks for a cycle among the modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`cluster::streams`) → source text.
fn modules(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            modules(&path, &format!("{prefix}{name}::"), out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let module = match name.as_str() {
            "lib" | "main" if prefix.is_empty() => continue,
            "mod" => prefix.trim_end_matches("::").to_owned(),
            _ => format!("{prefix}{name}"),
        };
        let text = std::fs::read_to_string(&path).unwrap();
        let text = match text.find("#[cfg(test)]\nmod tests {") {
            Some(i) => text[..i].to_owned(),
            None => text,
        };
        out.insert(module, text);
    }
}

/// The module a path like `cluster::streams::SEQ_TTL` names: its longest prefix that is one.
fn resolve(path: &str, modules: &BTreeMap<String, String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|m| modules.contains_key(m))
}

/// Paths after `marker` in `text`: identifiers joined by `::`.
fn paths_after<'a>(text: &'a str, marker: &'a str) -> impl Iterator<Item = String> + 'a {
    text.match_indices(marker).filter_map(move |(i, _)| {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            return None;
        }
        let rest = &text[i + marker.len()..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        Some(rest[..end].trim_end_matches(':').to_owned())
    })
}

fn edges(modules: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges = BTreeMap::new();
    for (module, text) in modules {
        let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
        let mut targets = BTreeSet::new();
        let crate_paths = paths_after(text, "crate::");
        let super_paths = paths_after(text, "super::").map(|p| {
            if parent.is_empty() {
                p
            } else {
                format!("{parent}::{p}")
            }
        });
        for path in crate_paths.chain(super_paths) {
            if let Some(target) = resolve(&path, modules) {
                // A module may use its own submodules and itself.
                if target != *module && !target.starts_with(&format!("{module}::")) {
                    targets.insert(target);
                }
            }
        }
        edges.insert(module.clone(), targets);
    }
    edges
}

/// A cycle through `edges`, if any, as the list of its modules.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_owned(), 1);
        stack.push(m.to_owned());
        for next in &edges[m] {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                0 => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
                1 => {
                    let from = stack.iter().position(|s| s == next).unwrap();
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in edges.keys() {
        if state.get(m).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(m, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it() {
    let mut found = BTreeMap::new();
    modules(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        "",
        &mut found,
    );
    assert!(found.contains_key("cluster::streams"), "{:?}", found.keys());
    let edges = edges(&found);
    assert!(edges["router"].contains("store"), "the reader sees imports");
    if let Some(cycle) = find_cycle(&edges) {
        panic!("modules import each other: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut edges = BTreeMap::new();
    for (m, targets) in [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ] {
        edges.insert(
            m.to_owned(),
            targets
                .into_iter()
                .map(str::to_owned)
                .collect::<BTreeSet<_>>(),
        );
    }
    assert_eq!(find_cycle(&edges).unwrap().len(), 4, "a -> b -> c -> a");
    edges.get_mut("c").unwrap().clear();
    assert!(find_cycle(&edges).is_none());
}
