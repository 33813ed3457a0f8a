//! What the README and docs/*.md point at exists: every repository path in
//! backquotes (`src/...`, `tests/...`, ...), every relative link with its
//! `#anchor`, and every Rust path `pktdist::module::item`.

use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The top-level folders whose paths the docs name.
const FOLDERS: [&str; 8] = [
    "src/",
    "tests/",
    "docs/",
    "config/",
    "perf/",
    "scripts/",
    "examples/",
    "fuzz/",
];

/// README.md and docs/*.md: (name, text).
fn documents() -> Vec<(String, String)> {
    let mut files = vec![PathBuf::from(ROOT).join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read");
            let name = p.strip_prefix(ROOT).unwrap_or(&p).display().to_string();
            (name, text)
        })
        .collect()
}

/// The spans between backquotes.
fn quoted(text: &str) -> impl Iterator<Item = &str> {
    text.split('`').skip(1).step_by(2)
}

/// Whether `pattern` (a path, possibly with one `*` in its file name) names
/// something under the repository.
fn exists(pattern: &str) -> bool {
    let path = pattern.trim_start_matches("./");
    let Some((prefix, suffix)) = path.split_once('*') else {
        return Path::new(ROOT).join(path).exists();
    };
    let (dir, start) = prefix.rsplit_once('/').unwrap_or(("", prefix));
    std::fs::read_dir(Path::new(ROOT).join(dir)).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(start) && name.ends_with(suffix)
        })
    })
}

/// GitHub's anchor of a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(markdown: &str) -> Vec<String> {
    markdown
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

#[test]
fn quoted_repository_paths_exist() {
    let mut missing = Vec::new();
    for (doc, text) in documents() {
        for q in quoted(&text) {
            let path = q.trim_start_matches("./");
            if FOLDERS.iter().any(|f| path.starts_with(f))
                && !path.contains([' ', '<', '{'])
                && !exists(path)
            {
                missing.push(format!("{doc}: `{q}`"));
            }
        }
    }
    assert!(missing.is_empty(), "named but absent: {missing:#?}");
}

#[test]
fn relative_links_and_their_anchors_exist() {
    let mut broken = Vec::new();
    for (doc, text) in documents() {
        let base = Path::new(ROOT).join(&doc);
        let dir = base.parent().expect("parent");
        for (at, _) in text.match_indices("](") {
            let rest = &text[at + 2..];
            let target = &rest[..rest.find(')').expect("link end")];
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
            let path = if file.is_empty() {
                base.clone()
            } else {
                dir.join(file)
            };
            if !path.exists() {
                broken.push(format!("{doc}: ({target}): no file"));
            } else if !anchor.is_empty() {
                let md = std::fs::read_to_string(&path).unwrap_or_default();
                if !anchors(&md).iter().any(|a| a == anchor) {
                    broken.push(format!("{doc}: ({target}): no such heading"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:#?}");
}

/// `pktdist::a::b::item`: the module file `src/a/b.rs` (or `src/a/b/mod.rs`,
/// or `src/lib.rs` for `pktdist::item`) exists and declares a public `item`.
#[test]
fn rust_paths_name_public_items() {
    let mut wrong = Vec::new();
    for (doc, text) in documents() {
        for (at, _) in text.match_indices("pktdist::") {
            let rest = &text[at + "pktdist::".len()..];
            let len = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let segs: Vec<&str> = rest[..len].trim_end_matches(':').split("::").collect();
            let (item, modules) = segs.split_last().expect("a path");
            let module = modules.join("/");
            // A top-level item (`pktdist::control`) is declared in lib.rs.
            let candidates = if modules.is_empty() {
                vec!["src/lib.rs".to_string()]
            } else {
                vec![format!("src/{module}.rs"), format!("src/{module}/mod.rs")]
            };
            let file = candidates
                .into_iter()
                .map(|f| Path::new(ROOT).join(f))
                .find(|f| f.exists());
            let declared = file.as_ref().is_some_and(|f| {
                let src = std::fs::read_to_string(f).unwrap_or_default();
                ["fn", "struct", "enum", "trait", "const", "type", "mod"]
                    .iter()
                    .any(|kind| {
                        src.contains(&format!("pub {kind} {item}("))
                            || src.contains(&format!("pub {kind} {item} "))
                            || src.contains(&format!("pub {kind} {item}<"))
                            || src.contains(&format!("pub {kind} {item};"))
                            || src.contains(&format!("pub {kind} {item}:"))
                    })
            });
            if !declared {
                wrong.push(format!("{doc}: pktdist::{}", &rest[..len]));
            }
        }
    }
    assert!(wrong.is_empty(), "no such public item: {wrong:#?}");
}
