//! Keeps docs/architecture.md's code map and invariants true: every module of `agent/src` has a
//! row, imports only what its row allows, the module graph has no cycle, only `proc/` reads
//! `/proc`, only the modules that load and drive kernel programs use aya, and the kernel
//! programs' shared `maps.rs` imports no program file.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).expect("read dir").flatten() {
            let p = entry.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A file that only tests (a `tests.rs`, a `tests/` folder, test fixtures).
fn is_test_file(rel: &Path) -> bool {
    rel.components().any(|c| c.as_os_str() == "tests")
        || rel
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n == "tests.rs" || n.ends_with("_tests.rs") || n == "test_server.rs")
}

/// The source without its `#[cfg(test)]` items (a `mod x;` line or a braced block).
fn without_tests(src: &str) -> String {
    let mut out = String::new();
    let mut rest = src;
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "#[cfg(test)]".len()..];
        let semi = after.find(';');
        let brace = after.find('{');
        let end = match (semi, brace) {
            (Some(s), Some(b)) if s < b => s + 1,
            (Some(s), None) => s + 1,
            (_, Some(b)) => {
                let mut depth = 0usize;
                let mut end = after.len();
                for (k, c) in after[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, None) => after.len(),
        };
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The first path segments after `crate::` in `src`, grouped imports included.
fn crate_imports(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = src;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c, d::{e, f}}`: the top-level names.
            let mut depth = 1usize;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => {
                        push_name(&mut out, &item);
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 1 {
                    item.push(c);
                }
            }
            push_name(&mut out, &item);
        } else {
            push_name(&mut out, rest);
        }
    }
    out
}

fn push_name(out: &mut BTreeSet<String>, text: &str) {
    let name: String = text
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    if !name.is_empty() {
        out.insert(name);
    }
}

/// The agent's top-level modules, by the name other modules import them with.
fn modules(src: &Path) -> BTreeSet<String> {
    fs::read_dir(src)
        .expect("agent/src")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            match name.strip_suffix(".rs") {
                Some(stem) => Some(stem.to_string()),
                None if e.path().is_dir() => Some(name),
                None => None,
            }
        })
        .collect()
}

/// Which agent modules each module imports (test code aside).
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = workspace().join("agent/src");
    let known = modules(&src);
    let mut graph: BTreeMap<String, BTreeSet<String>> =
        known.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for file in rust_files(&src) {
        let rel = file.strip_prefix(&src).expect("under src").to_path_buf();
        if is_test_file(&rel) {
            continue;
        }
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_string())
            .expect("a module");
        let code = without_tests(&fs::read_to_string(&file).expect("read"));
        for m in crate_imports(&code) {
            if m != top && known.contains(&m) {
                graph.entry(top.clone()).or_default().insert(m);
            }
        }
    }
    graph
}

/// The code map of docs/architecture.md: module → allowed imports (`None`: anything).
fn code_map() -> BTreeMap<String, Option<BTreeSet<String>>> {
    let doc = fs::read_to_string(workspace().join("docs/architecture.md")).expect("the doc");
    let table = doc
        .split("## Code map")
        .nth(1)
        .expect("docs/architecture.md has a `## Code map` section");
    let mut map = BTreeMap::new();
    for line in table
        .lines()
        .skip_while(|l| !l.starts_with("| module"))
        .skip(2)
    {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (names, allowed) = (cells[1], cells[3]);
        let allowed = match allowed {
            "anything" => None,
            "—" => Some(BTreeSet::new()),
            list => Some(list.split(", ").map(str::to_string).collect()),
        };
        for name in names.split(", ") {
            let name = name
                .trim_matches('`')
                .trim_end_matches('/')
                .trim_end_matches(".rs")
                .to_string();
            map.insert(name, allowed.clone());
        }
    }
    map
}

#[test]
fn the_code_map_lists_every_module_and_its_imports() {
    let graph = import_graph();
    let map = code_map();
    let mut problems = Vec::new();
    for (module, imports) in &graph {
        match map.get(module) {
            None => problems.push(format!(
                "module `{module}` has no row in docs/architecture.md's code map"
            )),
            Some(None) => {}
            Some(Some(allowed)) => {
                for m in imports.difference(allowed) {
                    problems.push(format!(
                        "`{module}` imports `{m}`, which its code-map row does not allow"
                    ));
                }
            }
        }
    }
    for module in map.keys() {
        if !graph.contains_key(module) {
            problems.push(format!(
                "the code map names `{module}`, which is not a module of agent/src"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = import_graph();
    // Depth-first search; a module met again on the current path closes a cycle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(cycle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

/// Non-test source files of agent/src outside `except` (a top-level module), with their text.
fn code_outside(except: &[&str]) -> Vec<(PathBuf, String)> {
    let src = workspace().join("agent/src");
    rust_files(&src)
        .into_iter()
        .filter_map(|file| {
            let rel = file.strip_prefix(&src).ok()?.to_path_buf();
            let top = rel.components().next()?.as_os_str().to_str()?.to_string();
            let top = top.trim_end_matches(".rs");
            if is_test_file(&rel) || except.contains(&top) {
                return None;
            }
            Some((rel, without_tests(&fs::read_to_string(&file).ok()?)))
        })
        .collect()
}

#[test]
fn only_proc_reads_proc() {
    let offenders: Vec<String> = code_outside(&["proc"])
        .into_iter()
        .filter(|(_, code)| code.contains("\"/proc"))
        .map(|(rel, _)| rel.display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "a string literal starting with /proc outside proc/ (ask proc/ instead): {offenders:?}"
    );
}

#[test]
fn only_the_kernel_drivers_use_aya() {
    let offenders: Vec<String> = code_outside(&["kernel", "selection", "event_loop"])
        .into_iter()
        .filter(|(_, code)| code.contains("aya::"))
        .map(|(rel, _)| rel.display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "aya used outside kernel/, selection.rs and event_loop.rs: {offenders:?}"
    );
}

#[test]
fn the_kernel_programs_shared_maps_import_no_program_file() {
    let maps = fs::read_to_string(workspace().join("agent-ebpf/src/maps.rs")).expect("maps.rs");
    let imports = crate_imports(&maps);
    assert!(
        imports.is_empty(),
        "agent-ebpf/src/maps.rs imports {imports:?}: a map only one program uses belongs in that program's file"
    );
}

#[test]
fn the_import_reader_reads_grouped_and_inline_paths() {
    let src = "use crate::{a::b, c, d::{e, f}};\nfn x() { crate::g::h(); }";
    let found: Vec<String> = crate_imports(src).into_iter().collect();
    assert_eq!(found, ["a", "c", "d", "g"]);
    let code =
        "use crate::x;\n#[cfg(test)]\nmod tests { use crate::y; }\n#[cfg(test)]\nmod more;\n";
    assert_eq!(
        crate_imports(&without_tests(code))
            .into_iter()
            .collect::<Vec<_>>(),
        ["x"]
    );
}
