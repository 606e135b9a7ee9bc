//! The signposts match the tree: every path `docs/architecture.md` names exists, every module
//! folder has a front-door doc, and every crate's `lib.rs` Layout comment names each of its
//! modules. A move that forgets the map fails here, not in a newcomer's first hour.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Backticked words that look like repository paths: they hold a `/` and name a Rust file, a
/// folder (trailing `/`) or a Markdown page.
fn named_paths(markdown: &str) -> Vec<String> {
    markdown
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.contains(' ') && !w.contains('<') && !w.contains('*'))
        .filter(|w| {
            w.contains('/') && (w.ends_with(".rs") || w.ends_with('/') || w.ends_with(".md"))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn every_path_the_architecture_page_names_exists() {
    let root = root();
    let text = std::fs::read_to_string(root.join("docs/architecture.md")).expect("read page");
    let paths = named_paths(&text);
    assert!(
        paths.len() > 20,
        "the code map names too few paths: {paths:?}"
    );
    // Short paths on the page are below `node/src/` (the page says so).
    let missing: Vec<&String> = paths
        .iter()
        .filter(|p| !root.join(p).exists() && !root.join("node/src").join(p).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "docs/architecture.md names paths that do not exist: {missing:?}"
    );
}

/// Every `pub mod x;` / `mod x;` of a crate root must appear as `x` in its `//!` Layout comment.
#[test]
fn every_crate_layout_comment_names_all_its_modules() {
    let root = root();
    let mut gaps = Vec::new();
    for krate in ["node", "raft", "geo", "wg", "proto", "cluster-tests"] {
        let lib = root.join(krate).join("src/lib.rs");
        let text = std::fs::read_to_string(&lib).expect("read lib.rs");
        let doc: String = text
            .lines()
            .filter(|l| l.starts_with("//!"))
            .collect::<Vec<_>>()
            .join("\n");
        for line in text.lines() {
            let line = line.trim();
            let Some(rest) = line
                .strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("mod "))
            else {
                continue;
            };
            let Some(name) = rest.strip_suffix(';') else {
                continue;
            };
            if !doc.contains(&format!("`{name}`")) && !doc.contains(&format!("`{name}::")) {
                gaps.push(format!("{krate}/src/lib.rs: module {name}"));
            }
        }
    }
    assert!(
        gaps.is_empty(),
        "modules missing from their crate's Layout comment: {gaps:?}"
    );
}

/// Every module folder (a `mod.rs`) opens with a front-door doc comment.
#[test]
fn every_module_folder_has_a_front_door_doc() {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
            let p = entry.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.file_name().is_some_and(|n| n == "mod.rs") {
                out.push(p);
            }
        }
    }
    let root = root();
    let mut folders = Vec::new();
    for krate in ["node", "raft", "geo", "wg", "cluster-tests"] {
        walk(&root.join(krate).join("src"), &mut folders);
    }
    assert!(!folders.is_empty());
    let bare: Vec<&PathBuf> = folders
        .iter()
        .filter(|p| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let doc_lines = text.lines().take_while(|l| l.starts_with("//!")).count();
            doc_lines < 2
        })
        .collect();
    assert!(
        bare.is_empty(),
        "module folders without a front-door doc: {bare:?}"
    );
}

/// One source file as a module: its path segments below the crate root.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("below src");
    let mut segs: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        segs.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        segs.pop();
    }
    segs
}

/// The file that defines module `segs`, if any.
fn file_of(src: &Path, segs: &[String]) -> Option<PathBuf> {
    if segs.is_empty() {
        return None;
    }
    let base = segs.iter().fold(src.to_path_buf(), |p, s| p.join(s));
    let flat = base.with_extension("rs");
    let folder = base.join("mod.rs");
    [flat, folder].into_iter().find(|p| p.is_file())
}

/// Every `a::b::c` path in `code`, with `use` groups (`a::{b, c::d}`) expanded.
fn paths_in(code: &str) -> Vec<Vec<String>> {
    fn ident(b: &[u8], i: &mut usize) -> Option<String> {
        let start = *i;
        while *i < b.len() && (b[*i].is_ascii_alphanumeric() || b[*i] == b'_') {
            *i += 1;
        }
        (*i > start).then(|| String::from_utf8_lossy(&b[start..*i]).into_owned())
    }
    fn skip_ws(b: &[u8], i: &mut usize) {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    }
    /// Reads the rest of a path after `prefix`, expanding groups.
    fn tail(b: &[u8], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
        let mut path = prefix;
        loop {
            skip_ws(b, i);
            if !b[*i..].starts_with(b"::") {
                out.push(path);
                return;
            }
            *i += 2;
            skip_ws(b, i);
            if *i < b.len() && b[*i] == b'{' {
                *i += 1;
                loop {
                    skip_ws(b, i);
                    if *i >= b.len() || b[*i] == b'}' {
                        *i += 1;
                        return;
                    }
                    if b[*i] == b',' {
                        *i += 1;
                        continue;
                    }
                    match ident(b, i) {
                        Some(first) if first == "self" => out.push(path.clone()),
                        Some(first) => {
                            let mut p = path.clone();
                            p.push(first);
                            tail(b, i, p, out);
                        }
                        None => *i += 1,
                    }
                }
            }
            match ident(b, i) {
                Some(seg) => path.push(seg),
                None => {
                    out.push(path);
                    return;
                }
            }
        }
    }
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let boundary =
            i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b':');
        if boundary && (b[i].is_ascii_alphabetic() || b[i] == b'_') {
            let Some(first) = ident(b, &mut i) else {
                continue;
            };
            let mut j = i;
            skip_ws(b, &mut j);
            if b[j..].starts_with(b"::") {
                tail(b, &mut i, vec![first], &mut out);
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Code without comments (line comments and doc comments; good enough for paths).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(at) if !l[..at].contains('"') => &l[..at],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The files each file of a crate imports (crate-internal only).
fn import_graph(src: &Path) -> Vec<(PathBuf, Vec<PathBuf>)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
            let p = entry.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    // Test files are not rooms: they may reach anywhere they test from.
    files.retain(|f| {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name != "tests.rs" && !name.ends_with("_tests.rs") && !f.starts_with(src.join("bin"))
    });
    files.sort();
    let mut graph = Vec::new();
    for f in &files {
        let me = module_of(src, f);
        let is_folder_root = f
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        // `super` of `a/b.rs` is `a`; of `a/b/mod.rs` it is `a` too.
        let parent: Vec<String> = me[..me.len().saturating_sub(1)].to_vec();
        let text = std::fs::read_to_string(f).expect("read");
        // Unit tests are not rooms either (and their `super` is the file itself).
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code = strip_comments(text);
        let mut deps = Vec::new();
        for path in paths_in(&code) {
            let abs: Vec<String> = match path[0].as_str() {
                "crate" => path[1..].to_vec(),
                "super" => {
                    let mut base = parent.clone();
                    let mut rest = &path[1..];
                    while rest.first().is_some_and(|s| s == "super") {
                        base.pop();
                        rest = &rest[1..];
                    }
                    base.into_iter().chain(rest.iter().cloned()).collect()
                }
                "self" => me.iter().chain(path[1..].iter()).cloned().collect(),
                // A child module named bare (2018 paths): `use body::Body` in `demo/mod.rs`.
                child if is_folder_root => {
                    let mut p = me.clone();
                    p.push(child.to_string());
                    if file_of(src, &p).is_none() {
                        continue;
                    }
                    me.iter().chain(path.iter()).cloned().collect()
                }
                _ => continue,
            };
            // The deepest prefix that is a module file.
            if let Some(target) = (1..=abs.len()).rev().find_map(|n| file_of(src, &abs[..n])) {
                // A folder's front door naming the rooms behind it is not an import that can
                // close a circle (as farm-studio reads it): a room using its front door's
                // shared types is an arrow running back up, not a loop.
                let own_room = is_folder_root && f.parent().is_some_and(|d| target.starts_with(d));
                if &target != f && !own_room && !deps.contains(&target) {
                    deps.push(target);
                }
            }
        }
        if std::env::var_os("CODE_MAP_DEBUG").is_some() {
            eprintln!("{} -> {:?}", f.display(), deps);
        }
        graph.push((f.clone(), deps));
    }
    graph
}

/// Files that import each other in a loop (strongly connected components of two or more).
fn circles(graph: &[(PathBuf, Vec<PathBuf>)]) -> Vec<Vec<PathBuf>> {
    let index = |p: &PathBuf| graph.iter().position(|(f, _)| f == p);
    let n = graph.len();
    let reach = |from: usize| {
        let mut seen = vec![false; n];
        let mut stack = vec![from];
        while let Some(v) = stack.pop() {
            for d in &graph[v].1 {
                if let Some(w) = index(d) {
                    if !seen[w] {
                        seen[w] = true;
                        stack.push(w);
                    }
                }
            }
        }
        seen
    };
    let reaches: Vec<Vec<bool>> = (0..n).map(reach).collect();
    let mut done = vec![false; n];
    let mut out = Vec::new();
    for v in 0..n {
        if done[v] || !reaches[v][v] {
            continue;
        }
        let members: Vec<usize> = (0..n).filter(|&w| reaches[v][w] && reaches[w][v]).collect();
        for &w in &members {
            done[w] = true;
        }
        out.push(members.into_iter().map(|w| graph[w].0.clone()).collect());
    }
    out
}

#[test]
fn the_import_graph_finds_a_planted_circle() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path();
    std::fs::create_dir_all(src.join("wing")).expect("mkdir");
    std::fs::write(src.join("lib.rs"), "pub mod wing;\npub mod leaf;\n").expect("write");
    std::fs::write(src.join("leaf.rs"), "pub fn f() {}\n").expect("write");
    std::fs::write(
        src.join("wing/mod.rs"),
        "//! a\n//! b\nmod a;\nmod b;\nuse a::A;\n",
    )
    .expect("write");
    std::fs::write(
        src.join("wing/a.rs"),
        "use super::b::{B, self};\npub struct A;\n",
    )
    .expect("write");
    std::fs::write(
        src.join("wing/b.rs"),
        "use crate::leaf;\npub struct B(crate::wing::a::A);\n",
    )
    .expect("write");
    let graph = import_graph(src);
    let found = circles(&graph);
    assert_eq!(found.len(), 1, "{graph:?}");
    let names: Vec<String> = found[0]
        .iter()
        .map(|p| p.strip_prefix(src).expect("below").display().to_string())
        .collect();
    assert_eq!(names, ["wing/a.rs", "wing/b.rs"]);
}

#[test]
fn no_crate_has_an_import_circle() {
    let root = root();
    let mut all = Vec::new();
    for krate in ["node", "raft", "geo", "wg", "cluster-tests"] {
        let src = root.join(krate).join("src");
        for circle in circles(&import_graph(&src)) {
            let names: Vec<String> = circle
                .iter()
                .map(|p| {
                    p.strip_prefix(&root)
                        .expect("below root")
                        .display()
                        .to_string()
                })
                .collect();
            all.push(names);
        }
    }
    assert!(
        all.is_empty(),
        "files that import each other in a loop: {all:?}"
    );
}
