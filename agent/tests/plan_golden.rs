//! Golden tests of the planner: every `tests/fixtures/plan/<name>.json`
//! (a spec or exec'd process, the host's request and the guest file system
//! the planner sees) is planned and its plan, or its error, rendered and
//! compared with `<name>.golden`. A fixture without a golden file fails.
//!
//! After a deliberate change of the plan, regenerate the goldens with
//! `HUSK_UPDATE_GOLDEN=1 cargo test -p husk-agent --test plan_golden` and
//! review the diff.
//!
//! Fixture format:
//! ```json
//! { "fs": { "/path": "dir" | "file" | "exec" | "node" | {"link": "target"} | {"text": "..."} },
//!   "container": { "spec": {...}, "root": "/run/husk/shared/c/rootfs",
//!                  "cgroup_procs": "...", "device_stage": "...",
//!                  "shared_mounts": {...}, "no_pivot": false } }
//! ```
//! or, for an exec into a running container,
//! `"exec": { "process": {...}, "init_pid": 42, "root": "...", "cgroup_procs": "...", "seccomp": {...} }`.

use husk_agent::plan::fs::{Entry, MapFs};
use husk_agent::plan::{self, ContainerRequest};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SHARED_DIR: &str = "/run/husk/shared";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plan")
}

fn str_field<'a>(v: &'a Value, key: &str, name: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{name}: \"{key}\" must be a string"))
}

fn guest_fs(v: &Value, name: &str) -> MapFs {
    let mut fs = MapFs::new();
    let Some(entries) = v.as_object() else {
        return fs;
    };
    for (path, what) in entries {
        match what {
            Value::String(kind) => fs.insert(
                path.as_str(),
                match kind.as_str() {
                    "dir" => Entry::Dir,
                    "file" => Entry::File { executable: false },
                    "exec" => Entry::File { executable: true },
                    "node" => Entry::Other,
                    other => panic!("{name}: fs entry {path}: unknown kind {other:?}"),
                },
            ),
            Value::Object(o) if o.contains_key("link") => fs.insert(
                path.as_str(),
                Entry::Symlink(str_field(what, "link", name).into()),
            ),
            Value::Object(o) if o.contains_key("text") => {
                fs.insert_text(path.as_str(), str_field(what, "text", name))
            }
            other => panic!("{name}: fs entry {path}: cannot read {other}"),
        }
    }
    fs
}

/// The plan of one fixture as the golden text: the plan's Debug rendering,
/// or `error: <message>`.
fn render(fixture: &Value, name: &str) -> String {
    let fs = guest_fs(&fixture["fs"], name);
    let result = if let Some(c) = fixture.get("container") {
        let spec = match serde_json::from_value(c["spec"].clone()) {
            Ok(spec) => spec,
            Err(e) => return format!("error: config.json does not parse: {e}\n"),
        };
        let shared_mounts: HashMap<String, String> =
            serde_json::from_value(c.get("shared_mounts").cloned().unwrap_or(Value::Null))
                .unwrap_or_default();
        let root = PathBuf::from(str_field(c, "root", name));
        let cgroup_procs = PathBuf::from(str_field(c, "cgroup_procs", name));
        let device_stage = PathBuf::from(str_field(c, "device_stage", name));
        let request = ContainerRequest {
            root: &root,
            shared_dir: Path::new(SHARED_DIR),
            shared_mounts: &shared_mounts,
            cgroup_procs: &cgroup_procs,
            no_pivot: c["no_pivot"].as_bool().unwrap_or(false),
            device_stage: &device_stage,
            guest_network_namespace: c["guest_network_namespace"].as_bool().unwrap_or(false),
        };
        plan::plan_container(&spec, &request, &fs)
    } else if let Some(e) = fixture.get("exec") {
        let process = match serde_json::from_value(e["process"].clone()) {
            Ok(p) => p,
            Err(err) => return format!("error: process does not parse: {err}\n"),
        };
        let seccomp = match e.get("seccomp") {
            Some(s) => {
                let s = serde_json::from_value(s.clone())
                    .unwrap_or_else(|err| panic!("{name}: exec.seccomp: {err}"));
                match plan::seccomp::compile(&s) {
                    Ok(p) => Some(Arc::new(p)),
                    Err(err) => return format!("error: {err}\n"),
                }
            }
            None => None,
        };
        let init_pid = e["init_pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .unwrap_or_else(|| panic!("{name}: exec.init_pid must be a pid"));
        plan::plan_exec(
            &process,
            init_pid,
            Path::new(str_field(e, "root", name)),
            Path::new(str_field(e, "cgroup_procs", name)),
            seccomp,
            &fs,
        )
    } else {
        panic!("{name}: a fixture has \"container\" or \"exec\"");
    };
    match result {
        Ok(plan) => format!("{plan:#?}\n"),
        Err(e) => format!("error: {e}\n"),
    }
}

#[test]
fn plans_match_their_goldens() {
    let update = std::env::var_os("HUSK_UPDATE_GOLDEN").is_some();
    let mut names: Vec<String> = std::fs::read_dir(fixture_dir())
        .expect("tests/fixtures/plan must exist")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".json").map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(
        names.len() >= 10,
        "only {} fixtures found in {}",
        names.len(),
        fixture_dir().display()
    );
    let mut failures = Vec::new();
    for name in &names {
        let text = std::fs::read_to_string(fixture_dir().join(format!("{name}.json"))).unwrap();
        let fixture: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}.json: {e}"));
        let got = render(&fixture, name);
        let golden = fixture_dir().join(format!("{name}.golden"));
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        match std::fs::read_to_string(&golden) {
            Ok(want) if want == got => {}
            Ok(want) => {
                let line = want
                    .lines()
                    .zip(got.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or(want.lines().count().min(got.lines().count()));
                failures.push(format!(
                    "{name}: differs from {name}.golden at line {}:\n  want: {}\n  got:  {}",
                    line + 1,
                    want.lines().nth(line).unwrap_or("<end>"),
                    got.lines().nth(line).unwrap_or("<end>")
                ));
            }
            Err(e) => failures.push(format!(
                "{name}: no golden ({e}); run with HUSK_UPDATE_GOLDEN=1 and review it"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every error fixture fails naming the spec field it is about (the
/// fixture's `"field"`), not just any error.
#[test]
fn errors_name_their_field() {
    let mut checked = 0;
    for entry in std::fs::read_dir(fixture_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let fixture: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{name}.json: {e}"));
        let Some(field) = fixture.get("field").and_then(Value::as_str) else {
            continue;
        };
        let got = render(&fixture, &name);
        assert!(
            got.starts_with("error: ") && got.contains(field),
            "{name}: expected an error naming {field:?}, got:\n{got}"
        );
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} error fixtures");
}
