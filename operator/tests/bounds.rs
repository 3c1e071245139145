//! The input bounds let every real manifest in the repository through: the test data,
//! the chart, the SMI examples and the README's examples.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

use std::path::{Path, PathBuf};

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        {
            out.push(path);
        }
    }
}

/// The README's YAML examples, unindented.
fn readme_examples(readme: &str) -> Vec<String> {
    let mut examples = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(indent) = line.find("```yaml") else {
            continue;
        };
        let body: Vec<&str> = lines
            .by_ref()
            .take_while(|l| l.trim() != "```")
            .map(|l| l.get(indent..).unwrap_or(""))
            .collect();
        examples.push(body.join("\n"));
    }
    examples
}

#[test]
fn every_manifest_in_the_repository_is_within_bounds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["operator/tests/testdata", "helm", "crds/tests"] {
        yaml_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "{files:?}");
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        if let Err(e) = weft_crds::bounds::check_yaml(&text) {
            panic!("{}: {e}", file.display());
        }
    }
    let examples = readme_examples(&std::fs::read_to_string(root.join("README.md")).unwrap());
    assert!(!examples.is_empty());
    for example in &examples {
        weft_crds::bounds::check_yaml(example).unwrap();
        weft::sources::parse_manifests(example).unwrap();
    }
}
