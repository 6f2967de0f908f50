//! The crate's floors, checked: every module imports only modules of its
//! own floor or below, and no set of modules imports itself in a loop.
//!
//! Floors, bottom up (`lib.rs` says what each holds): the core types, `db`,
//! `delivery`, `http`, `app`. An import is any `crate::…`, `super::…` or
//! `self::…` path in a file, in `use` lines or in code, resolved to the
//! deepest module file it names; a module's imports of its own ancestors
//! are not edges (a child may use what its parent declares). The check
//! reads the sources as text, so it runs in `cargo test` on any machine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path, `["http", "h1", "codec"]`; the crate root is `[]`.
type Module = Vec<String>;

/// The floor of a module, by its first segment.
fn floor(m: &Module) -> usize {
    match m.first().map(String::as_str) {
        None => 6, // lib.rs, main.rs
        Some("app") => 5,
        Some("http") => 4,
        Some("delivery") => 3,
        Some("db") => 2,
        Some(
            "auth" | "config" | "cursor" | "message" | "metrics" | "ratelimit" | "shutdown"
            | "stream_quota" | "trim" | "architecture",
        ) => 1,
        Some(other) => panic!("module {other} has no floor: add it to architecture.rs"),
    }
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file
        .strip_prefix(src)
        .expect("under src")
        .with_extension("");
    let mut m: Module = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if m.last().is_some_and(|l| l == "mod") || m == ["lib"] || m == ["main"] {
        m.pop();
    }
    m
}

/// The text without comments (doc comments name modules that are not
/// imports).
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('/') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("//") {
            rest = tail.find('\n').map_or("", |j| &tail[j..]);
        } else if tail.starts_with("/*") {
            rest = tail.find("*/").map_or("", |j| &tail[j + 2..]);
        } else {
            out.push('/');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path a file's code names from `crate`, `super` or `self`, made
/// absolute; `{a, b::c}` groups are expanded.
fn paths(code: &str, here: &Module) -> Vec<Module> {
    let mut found = Vec::new();
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts_word = i == 0 || !is_ident(chars[i - 1]) && chars[i - 1] != ':';
        let word: String = chars[i..].iter().take_while(|c| is_ident(**c)).collect();
        if !starts_word || !matches!(word.as_str(), "crate" | "super" | "self") {
            i += word.len().max(1);
            continue;
        }
        let base: Module = match word.as_str() {
            "crate" => Vec::new(),
            // In `a/mod.rs` as in `a.rs`, `self` is module `a` and `super`
            // its parent.
            "self" => here.clone(),
            _ => here[..here.len().saturating_sub(1)].to_vec(),
        };
        i += word.len();
        let mut segs = base;
        loop {
            if chars.get(i) != Some(&':') || chars.get(i + 1) != Some(&':') {
                found.push(segs);
                break;
            }
            i += 2;
            if chars.get(i) == Some(&'{') {
                let end = matching_brace(&chars, i);
                let inner: String = chars[i + 1..end].iter().collect();
                for item in split_top(&inner) {
                    let item = item.split(" as ").next().unwrap_or("").trim();
                    let mut m = segs.clone();
                    for s in item.split("::").map(str::trim) {
                        if s.is_empty() || s == "self" || s == "*" || s.starts_with('{') {
                            break;
                        }
                        m.push(s.to_string());
                    }
                    found.push(m);
                }
                i = end + 1;
                break;
            }
            let seg: String = chars[i..].iter().take_while(|c| is_ident(**c)).collect();
            if seg.is_empty() {
                found.push(segs);
                break;
            }
            i += seg.len();
            segs.push(seg);
        }
    }
    found
}

fn matching_brace(chars: &[char], open: usize) -> usize {
    let mut depth = 0;
    for (k, c) in chars.iter().enumerate().skip(open) {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return k;
                }
            }
            _ => {}
        }
    }
    chars.len()
}

/// `a, b::{c, d}, e` split at the top-level commas.
fn split_top(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0);
    for c in s.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out
}

/// The import graph of the crate: module → the modules it imports.
fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let modules: BTreeMap<Module, PathBuf> = all
        .iter()
        .map(|f| (module_of(&src, f), f.clone()))
        .collect();
    let mut edges = BTreeMap::new();
    for (m, file) in &modules {
        let text = std::fs::read_to_string(file).expect("read a source file");
        let mut to = BTreeSet::new();
        for p in paths(&code(&text), m) {
            // The deepest module file the path names.
            let Some(target) = (0..=p.len())
                .rev()
                .map(|k| p[..k].to_vec())
                .find(|t| modules.contains_key(t))
            else {
                continue;
            };
            let ancestor = target.len() <= m.len() && m[..target.len()] == target[..];
            if !ancestor {
                to.insert(target);
            }
        }
        edges.insert(m.clone(), to);
    }
    edges
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

#[test]
fn every_module_imports_only_its_own_floor_or_below() {
    let mut wrong = Vec::new();
    for (m, to) in graph() {
        for t in to {
            if floor(&t) > floor(&m) {
                wrong.push(format!("{} -> {}", name(&m), name(&t)));
            }
        }
    }
    assert!(wrong.is_empty(), "imports upward: {wrong:#?}");
}

#[test]
fn no_modules_import_each_other_in_a_loop() {
    let g = graph();
    // A module is in a loop when it can reach itself.
    let mut loops = Vec::new();
    for start in g.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&Module> = g[start].iter().collect();
        while let Some(m) = stack.pop() {
            if m == start {
                loops.push(name(start));
                break;
            }
            if seen.insert(m.clone()) {
                stack.extend(g.get(m).into_iter().flatten());
            }
        }
    }
    assert!(loops.is_empty(), "modules in an import loop: {loops:?}");
}

#[test]
fn the_check_sees_imports_and_loops() {
    let here: Module = vec!["http".into(), "poll".into()];
    let found = paths(
        &code("use crate::a::{b, c::d as e};\n// crate::x\nlet y = super::z::f(self::g);"),
        &here,
    );
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Module>();
    assert!(found.contains(&s(&["a", "b"])), "{found:?}");
    assert!(found.contains(&s(&["a", "c", "d"])), "{found:?}");
    assert!(found.contains(&s(&["http", "z", "f"])), "{found:?}");
    assert!(found.contains(&s(&["http", "poll", "g"])), "{found:?}");
    assert!(!found.contains(&s(&["x"])), "comments are not imports");
}
