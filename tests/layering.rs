//! The layering rule of ARCHITECTURE.md, kept true: each top-level module of src/ uses only
//! the modules listed before it in the document's layer order, and no two files import each
//! other. The order is read from ARCHITECTURE.md itself, so the document and this check cannot
//! drift apart.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The module order between the `layer-order` markers of ARCHITECTURE.md, bottom first.
fn documented_order() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let start = text
        .find("<!-- layer-order -->")
        .expect("ARCHITECTURE.md has a layer-order block");
    let end = text.find("<!-- /layer-order -->").expect("the layer-order block ends");
    text[start..end]
        .lines()
        .skip(1)
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|l| l.split_whitespace().next().unwrap().trim_matches('`').to_string())
        .collect()
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

/// `src/nn/conv2d.rs` -> "nn::conv2d", `src/nn/mod.rs` -> "nn".
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(root().join("src")).unwrap().with_extension("");
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().to_string()).collect();
    let parts = if parts.last().is_some_and(|p| p == "mod") {
        &parts[..parts.len() - 1]
    } else {
        &parts[..]
    };
    parts.join("::")
}

/// Every `crate::a::b::...` path named in a file, outside string literals' worth of care: the
/// source here names modules only in code and doc links.
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let path: Vec<String> = rest
            .split("::")
            .map(|seg| {
                seg.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|seg| !seg.is_empty() && seg.chars().next().unwrap().is_ascii_lowercase())
            .collect();
        if !path.is_empty() {
            out.push(path);
        }
    }
    out
}

#[test]
fn no_import_runs_back_up_the_documented_layers() {
    let order = documented_order();
    assert!(order.len() > 10, "the layer order lists too few modules: {order:?}");
    let rank: BTreeMap<&str, usize> = order.iter().enumerate().map(|(i, m)| (m.as_str(), i)).collect();
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut violations = Vec::new();
    for f in &files {
        let module = module_of(f);
        let top = module.split("::").next().unwrap().to_string();
        if ["main", "lib", "cli"].contains(&top.as_str()) {
            continue; // the binary and the crate root sit above every layer
        }
        let Some(&mine) = rank.get(top.as_str()) else {
            panic!("src/{top} is missing from ARCHITECTURE.md's layer order");
        };
        let text = std::fs::read_to_string(f).unwrap();
        for path in crate_paths(&text) {
            let used = path[0].as_str();
            if used == top {
                continue;
            }
            match rank.get(used) {
                Some(&r) if r < mine => {}
                Some(_) => violations.push(format!("{} uses crate::{}", f.display(), path.join("::"))),
                None => {} // a re-export at the crate root (crate::Error, crate::Result)
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports that run back up:\n{}",
        violations.join("\n")
    );
}

#[test]
fn no_two_files_import_each_other() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    // Files that are not a module's facade (mod.rs, which re-exports its children).
    let modules: BTreeMap<String, PathBuf> = files
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n != "mod.rs"))
        .map(|f| (module_of(f), f.clone()))
        .collect();
    let mut edges: BTreeSet<(String, String)> = BTreeSet::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).unwrap();
        for path in crate_paths(&text) {
            // The longest prefix of the path that is a file.
            let target = (1..=path.len())
                .rev()
                .map(|k| path[..k].join("::"))
                .find(|m| modules.contains_key(m));
            if let Some(t) = target.filter(|t| t != module) {
                edges.insert((module.clone(), t));
            }
        }
    }
    let mutual: Vec<String> = edges
        .iter()
        .filter(|(a, b)| a < b && edges.contains(&(b.clone(), a.clone())))
        .map(|(a, b)| format!("{a} <-> {b}"))
        .collect();
    assert!(
        mutual.is_empty(),
        "files that import each other:\n{}",
        mutual.join("\n")
    );
}
