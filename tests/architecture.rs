//! The layering the code promises, checked on its source: which modules may
//! name which. Data flows one way (edge → task → backend), configuration is
//! read in one place (`app`), and no two modules reach into each other.
//!
//! The check reads every `crate::…`, `super::…` and `self::…` path of every
//! file under `src/` (inside `use` trees too) and resolves it to the module
//! it names. It needs no tool beyond the test itself: `cargo test --test
//! architecture`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// A module path such as `server::health`, as its segments.
type Module = Vec<String>;

/// Every `.rs` file under `dir` with the module it defines.
fn modules(dir: &Path, prefix: &Module, found: &mut Vec<(Module, PathBuf)>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        let stem = path
            .file_stem()
            .and_then(|stem| stem.to_str())
            .expect("file name")
            .to_owned();
        if path.is_dir() {
            let mut inner = prefix.clone();
            inner.push(stem);
            modules(&path, &inner, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            let mut module = prefix.clone();
            if !matches!(stem.as_str(), "mod" | "lib" | "main") {
                module.push(stem);
            }
            found.push((module, path));
        }
    }
}

/// The source without comments, so a doc comment naming a module is not a
/// dependency.
fn code_of(source: &str) -> String {
    source
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Paths a `use` tree names, flattened: `a::{b, c::{d}}` gives `a::b`,
/// `a::c::d`.
fn flatten(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap_or(tree).trim();
        return vec![path.trim_end_matches("::self").to_owned()];
    };
    let prefix = tree[..open].trim_end_matches("::").trim();
    let inner = &tree[open + 1..tree.rfind('}').expect("balanced use tree")];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (at, character) in inner.char_indices() {
        match character {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|part| !part.trim().is_empty())
        .flat_map(flatten)
        .map(|path| match path.as_str() {
            "self" => prefix.to_owned(),
            _ if prefix.is_empty() => path,
            _ => format!("{prefix}::{path}"),
        })
        .collect()
}

/// Every path of `code` that starts at `crate`, `super` or `self`.
fn paths(code: &str) -> Vec<String> {
    let is_path_char = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let statement = &rest[at + 4..];
        let end = statement.find(';').unwrap_or(statement.len());
        if !rest[..at].chars().next_back().is_some_and(is_path_char) {
            found.extend(flatten(&statement[..end]));
        }
        rest = &statement[end..];
    }
    for root in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(at) = rest.find(root) {
            let preceded = rest[..at].chars().next_back();
            let tail = &rest[at..];
            let end = tail.find(|c| !is_path_char(c)).unwrap_or(tail.len());
            if !preceded.is_some_and(is_path_char) {
                found.push(tail[..end].trim_end_matches(':').to_owned());
            }
            rest = &tail[end..];
        }
    }
    found
}

/// The module a path names, resolved from the module it appears in,
/// cut to the known modules (an item's name is not a module).
fn resolve(path: &str, within: &Module, known: &BTreeSet<Module>) -> Option<Module> {
    let mut segments = path.split("::").map(str::trim);
    let mut module = match segments.next()? {
        "crate" => Vec::new(),
        "super" => within[..within.len().checked_sub(1)?].to_vec(),
        "self" => within.clone(),
        _ => return None,
    };
    for segment in segments {
        match segment {
            "super" => {
                module.pop();
            }
            _ => {
                let mut deeper = module.clone();
                deeper.push(segment.to_owned());
                if !known.contains(&deeper) {
                    break;
                }
                module = deeper;
            }
        }
    }
    Some(module)
}

/// Which module names which, at the depth of `level` segments. A module
/// naming its own submodules (declaring or re-exporting them) is how Rust
/// nests modules, not a dependency, and is left out.
fn dependencies(level: usize) -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    modules(&root, &Vec::new(), &mut files);
    files.retain(|(_, path)| !path.starts_with(root.join("bin")));
    let known: BTreeSet<Module> = files.iter().map(|(module, _)| module.clone()).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, path) in &files {
        let code = code_of(&std::fs::read_to_string(path).expect("read source"));
        let from = module[..module.len().min(level)].join("::");
        for path in paths(&code) {
            let Some(target) = resolve(&path, module, &known) else {
                continue;
            };
            if target.starts_with(module) {
                continue;
            }
            let to = target[..target.len().min(level)].join("::");
            if to != from && !to.is_empty() {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    edges
}

/// A cycle among `edges`, if there is one.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|seen| seen == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

#[test]
fn top_level_modules_form_no_cycle() {
    let edges = dependencies(1);
    assert!(
        edges.contains_key("server") && edges["server"].contains("backend"),
        "the check must see server → backend: {edges:?}"
    );
    assert_eq!(cycle(&edges), None, "{edges:#?}");
}

#[test]
fn modules_within_each_layer_form_no_cycle() {
    let edges = dependencies(2);
    assert!(
        edges.contains_key("server::service"),
        "the check must see the server's modules: {edges:?}"
    );
    assert_eq!(cycle(&edges), None, "{edges:#?}");
}

#[test]
fn configuration_is_read_only_where_the_service_is_built() {
    let edges = dependencies(1);
    let of_config = edges.get("config").cloned().unwrap_or_default();
    assert!(
        of_config.is_disjoint(&BTreeSet::from(["backend".to_owned(), "server".to_owned()])),
        "config must not depend on backend or server: {of_config:?}"
    );
    // The server takes plain settings from `app`, some of them value types
    // declared with their flags (log format, OTEL settings); the layers
    // below it know nothing of configuration.
    for layer in ["backend", "task"] {
        assert!(
            !edges.get(layer).is_some_and(|to| to.contains("config")),
            "{layer} reads configuration; only `app` (and the server's settings) may: {:?}",
            edges.get(layer)
        );
    }
}

#[test]
fn the_flattener_and_resolver_see_through_use_trees() {
    assert_eq!(
        flatten("crate::{backend::{Backend, registry}, server::self}"),
        [
            "crate::backend::Backend",
            "crate::backend::registry",
            "crate::server"
        ]
    );
    let known = BTreeSet::from([
        vec![],
        vec!["server".to_owned()],
        vec!["server".to_owned(), "health".to_owned()],
    ]);
    let within = vec!["server".to_owned(), "service".to_owned()];
    assert_eq!(
        resolve("super::health::backend_service", &within, &known),
        Some(vec!["server".to_owned(), "health".to_owned()])
    );
}
