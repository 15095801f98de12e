//! The modules of `src/` import in one direction: each names (through `crate::`) only
//! modules of a lower layer, so the graph has no cycle and a reader can go bottom to top.
//! Adding a module means placing it in a layer here.

use std::collections::BTreeMap;
use std::path::Path;

/// Lowest first. A module may use the modules of the layers before its own.
const LAYERS: &[&[&str]] = &[
    &["error", "openai", "logprobs", "backend"],
    &["models"],
    &["state", "tools", "anthropic", "responses"],
    &["output", "validate"],
    &["admission", "ollama"],
    &["generation"],
    &["whole", "stream", "embeddings"],
    &[
        "handlers",
        "messages",
        "responding",
        "ollama_api",
        "tokenize",
        "metrics",
        "batches",
    ],
    &["middleware"],
];

/// The modules a source file names as `crate::module`.
fn imports(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a, b::c}`.
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name = item.trim().split("::").next().unwrap_or_default();
                out.push(name.to_owned());
            }
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.push(name);
    }
    out.retain(|n| !n.is_empty());
    out
}

#[test]
fn modules_import_downwards_only() {
    let layer_of: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, mods)| mods.iter().map(move |m| (*m, i)))
        .collect();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = 0;
    let mut wrong = Vec::new();
    for entry in std::fs::read_dir(&src).expect("src") {
        let path = entry.expect("entry").path();
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if name == "lib" || path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        files += 1;
        let Some(&layer) = layer_of.get(name) else {
            wrong.push(format!("{name}: in no layer"));
            continue;
        };
        let source = std::fs::read_to_string(&path).expect("read");
        for import in imports(&source) {
            match layer_of.get(import.as_str()) {
                Some(&l) if l < layer => {}
                Some(&l) if import == name && l == layer => {}
                Some(_) => wrong.push(format!("{name} (layer {layer}) uses {import}")),
                None => wrong.push(format!(
                    "{name} uses crate::{import}, not a module (import it from its module)"
                )),
            }
        }
    }
    assert!(files >= 16, "only {files} modules read");
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn the_import_reader_sees_groups_and_paths() {
    let found = imports("use crate::{a, b::c};\nlet x = crate::d::e();\nuse crate::f;");
    assert_eq!(found, ["a", "b", "d", "f"]);
}
