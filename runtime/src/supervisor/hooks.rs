//! Host-side OCI hooks, for the CLI's monitor and the shim alike:
//! createRuntime and prestart once the container exists in the guest (its
//! process not started), poststart after start, poststop after delete.
//! Each gets the container's state JSON on stdin and is killed at its
//! timeout. createContainer and startContainer belong to the container's
//! namespaces, which are in the guest: the agent runs those.

use oci_spec::runtime::{Hook, Hooks};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    CreateRuntime,
    Prestart,
    Poststart,
    Poststop,
}

impl HookKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::CreateRuntime => "createRuntime",
            HookKind::Prestart => "prestart",
            HookKind::Poststart => "poststart",
            HookKind::Poststop => "poststop",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{kind} hook {index} ({}): {source}", .path.display())]
    Spawn {
        kind: &'static str,
        index: usize,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{kind} hook {index} ({}) failed: {how}", .path.display())]
    Failed {
        kind: &'static str,
        index: usize,
        path: PathBuf,
        how: String,
    },
    #[error("{kind} hook {index} ({}) timed out after {seconds}s", .path.display())]
    TimedOut {
        kind: &'static str,
        index: usize,
        path: PathBuf,
        seconds: i64,
    },
}

/// The state a hook reads on stdin (the runtime spec's state).
pub fn oci_state(
    id: &str,
    status: super::Status,
    pid: i32,
    bundle: &Path,
    annotations: &HashMap<String, String>,
) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "id": id,
        "status": status.as_str(),
        "pid": pid,
        "bundle": bundle,
        "annotations": annotations,
    })
}

fn hooks_of(hooks: Option<&Hooks>, kind: HookKind) -> &[Hook] {
    let Some(hooks) = hooks else {
        return &[];
    };
    #[allow(deprecated)]
    let list = match kind {
        HookKind::CreateRuntime => hooks.create_runtime(),
        HookKind::Prestart => hooks.prestart(),
        HookKind::Poststart => hooks.poststart(),
        HookKind::Poststop => hooks.poststop(),
    };
    list.as_deref().unwrap_or(&[])
}

fn run_hook(
    hook: &Hook,
    state: &serde_json::Value,
    kind: HookKind,
    index: usize,
) -> Result<(), HookError> {
    let path = hook.path().clone();
    let kind = kind.as_str();
    let mut cmd = Command::new(&path);
    if let Some((arg0, rest)) = hook.args().as_deref().and_then(<[String]>::split_first) {
        std::os::unix::process::CommandExt::arg0(&mut cmd, arg0);
        cmd.args(rest);
    }
    cmd.env_clear();
    for kv in hook.env().as_deref().unwrap_or(&[]) {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    let mut child = match cmd.stdin(Stdio::piped()).stdout(Stdio::null()).spawn() {
        Ok(c) => c,
        Err(source) => {
            return Err(HookError::Spawn {
                kind,
                index,
                path,
                source,
            })
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is not an error.
        let _ = stdin.write_all(state.to_string().as_bytes());
    }
    let seconds = hook.timeout().filter(|t| *t > 0);
    let deadline = seconds.map(|t| Instant::now() + Duration::from_secs(t.unsigned_abs()));
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(HookError::Failed {
                    kind,
                    index,
                    path,
                    how: crate::child::describe(status),
                })
            }
            Ok(None) => {}
            Err(e) => {
                return Err(HookError::Failed {
                    kind,
                    index,
                    path,
                    how: e.to_string(),
                })
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HookError::TimedOut {
                kind,
                index,
                path,
                seconds: seconds.unwrap_or(0),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs the hooks of `kind` in order; the first failure stops the rest and
/// is returned (createRuntime, prestart: the failure fails `create`).
pub fn run(
    hooks: Option<&Hooks>,
    state: &serde_json::Value,
    kind: HookKind,
) -> Result<(), HookError> {
    for (i, hook) in hooks_of(hooks, kind).iter().enumerate() {
        run_hook(hook, state, kind, i)?;
    }
    Ok(())
}

/// Runs every hook of `kind`, each whatever the others did, and returns
/// the failures, for the caller to warn of (poststart, poststop).
pub fn run_all(hooks: Option<&Hooks>, state: &serde_json::Value, kind: HookKind) -> Vec<HookError> {
    hooks_of(hooks, kind)
        .iter()
        .enumerate()
        .filter_map(|(i, hook)| run_hook(hook, state, kind, i).err())
        .collect()
}
