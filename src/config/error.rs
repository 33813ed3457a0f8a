//! Configuration errors that name the file, line, column and key.
//!
//! Both kinds of error meet here: serde/TOML errors come with a byte span
//! and we find the key path at that span; validation errors come with a key
//! path and we find its span. Both directions use toml's spanned document
//! tree ([`toml::de::DeTable`]).

use std::fmt;
use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// One step of a key path: a table key or an array index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A key path such as `services[1].backends[0].address`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    pub fn root() -> KeyPath {
        KeyPath(Vec::new())
    }
    /// This path extended by a key.
    pub fn key(&self, k: &str) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_string()));
        p
    }
    /// This path extended by an array index.
    pub fn index(&self, i: usize) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A configuration error. `line` and `column` are 1-based; 0 when unknown
/// (e.g. the file could not be read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// The key path, empty when the error is not about one key.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        write!(f, ": ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

fn contains(r: &Range<usize>, at: usize) -> bool {
    r.start <= at && at < r.end.max(r.start + 1)
}

/// The key path of the innermost key or value whose span holds `at`.
pub fn path_at(text: &str, at: usize) -> KeyPath {
    let Ok(doc) = DeTable::parse(text) else {
        return KeyPath::root();
    };
    let mut path = KeyPath::root();
    walk_table(doc.get_ref(), at, &mut path);
    path
}

fn walk_table(t: &DeTable<'_>, at: usize, path: &mut KeyPath) {
    for (k, v) in t.iter() {
        if contains(&k.span(), at) {
            path.0.push(Seg::Key(k.get_ref().to_string()));
            return;
        }
        if contains(&v.span(), at) || holds(v, at) {
            path.0.push(Seg::Key(k.get_ref().to_string()));
            walk_value(v, at, path);
            return;
        }
    }
}

/// True when a nested key or value of `v` holds `at`: tables defined by
/// `[header]` sections have spans that need not cover their contents.
fn holds(v: &Spanned<DeValue<'_>>, at: usize) -> bool {
    match v.get_ref() {
        DeValue::Table(t) => t
            .iter()
            .any(|(k, v)| contains(&k.span(), at) || contains(&v.span(), at) || holds(v, at)),
        DeValue::Array(a) => a.iter().any(|v| contains(&v.span(), at) || holds(v, at)),
        _ => false,
    }
}

fn walk_value(v: &Spanned<DeValue<'_>>, at: usize, path: &mut KeyPath) {
    match v.get_ref() {
        DeValue::Table(t) => walk_table(t, at, path),
        DeValue::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                if contains(&item.span(), at) || holds(item, at) {
                    path.0.push(Seg::Index(i));
                    walk_value(item, at, path);
                    return;
                }
            }
        }
        _ => {}
    }
}

/// The span of the deepest part of `path` present in the document: the
/// value of the full path, or the table/array of the longest prefix found
/// (a missing key is reported where its table is; a missing top-level key
/// at the start of the document, where the root table begins).
pub fn span_of(text: &str, path: &KeyPath) -> Option<Range<usize>> {
    let doc = DeTable::parse(text).ok()?;
    let mut best: Option<Range<usize>> = Some(0..0);
    let mut cur: Option<&Spanned<DeValue<'_>>> = None;
    for seg in &path.0 {
        let next = match (seg, cur.map(|v| v.get_ref())) {
            (Seg::Key(k), None) => doc.get_ref().get(k.as_str()),
            (Seg::Key(k), Some(DeValue::Table(t))) => t.get(k.as_str()),
            (Seg::Index(i), Some(DeValue::Array(a))) => a.get(*i),
            _ => None,
        };
        let Some(next) = next else { break };
        best = Some(next.span());
        // Tables from `[[header]]` sections: prefer the first key's line
        // when the table's own span is empty.
        if best.as_ref().is_some_and(|r| r.is_empty()) {
            if let DeValue::Table(t) = next.get_ref() {
                if let Some(first) = t.keys().map(|k| k.span()).min_by_key(|r| r.start) {
                    best = Some(first);
                }
            }
        }
        cur = Some(next);
    }
    best
}

/// Builds an error for `path`, locating it in `text`.
pub fn at_path(file: &str, text: &str, path: &KeyPath, message: String) -> ConfigError {
    let (line, column) = span_of(text, path)
        .map(|r| line_col(text, r.start))
        .unwrap_or((0, 0));
    ConfigError {
        file: file.to_string(),
        line,
        column,
        key: path.to_string(),
        message,
    }
}

/// Converts a TOML/serde error, naming the key at its span.
pub fn from_toml(file: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column, key) = match e.span() {
        // An empty span at the start: the root table (a missing top-level
        // key), not the first key that happens to begin there.
        Some(std::ops::Range { start: 0, end: 0 }) => (1, 1, String::new()),
        Some(r) => {
            let (l, c) = line_col(text, r.start);
            (l, c, path_at(text, r.start).to_string())
        }
        None => (0, 0, String::new()),
    };
    ConfigError {
        file: file.to_string(),
        line,
        column,
        key,
        message: e.message().trim().to_string(),
    }
}
