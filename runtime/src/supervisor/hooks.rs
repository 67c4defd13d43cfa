//! Host-side OCI hooks, for the CLI's monitor and the shim alike:
//! createRuntime and prestart once the container exists in the guest (its
//! process not started), poststart after start, poststop after delete.
//! Each gets the container's state JSON on stdin and is killed at its
//! timeout. createContainer and startContainer belong to the container's
//! namespaces, which are in the guest: the agent runs those.

use oci_spec::runtime::{Hook, Hooks};
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsFd;
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
    // Woken by the hook's exit (its pidfd) or its deadline.
    let waited = crate::event::PidFd::open(child.id())
        .and_then(|pidfd| crate::event::wait_any(&[pidfd.as_fd()], deadline));
    let exited = match waited {
        Ok(woken) => woken.is_some(),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HookError::Failed {
                kind,
                index,
                path,
                how: e.to_string(),
            });
        }
    };
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        return Err(HookError::TimedOut {
            kind,
            index,
            path,
            seconds: seconds.unwrap_or(0),
        });
    }
    match child.wait() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(HookError::Failed {
            kind,
            index,
            path,
            how: crate::child::describe(status),
        }),
        Err(e) => Err(HookError::Failed {
            kind,
            index,
            path,
            how: e.to_string(),
        }),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(json: serde_json::Value) -> Hooks {
        serde_json::from_value(json).expect("hooks")
    }

    #[test]
    fn hooks_get_the_state_run_in_order_and_stop_at_a_failure() {
        let dir = std::env::temp_dir().join(format!("husk-hooks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("log");
        let hook = |name: &str| serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("echo {name} $(cat) >> {}", log.display())]});
        let h = hooks(serde_json::json!({
            "prestart": [hook("one"), {"path": "/bin/false"}, hook("never")],
            "poststop": [{"path": "/bin/false"}, hook("after-a-failure")],
        }));
        let state = serde_json::json!({"id": "c1"});
        let e = run(Some(&h), &state, HookKind::Prestart).expect_err("/bin/false passed");
        assert!(
            e.to_string()
                .starts_with("prestart hook 1 (/bin/false) failed"),
            "{e}"
        );
        let failures = run_all(Some(&h), &state, HookKind::Poststop);
        assert_eq!(failures.len(), 1);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(
            text,
            "one {\"id\":\"c1\"}\nafter-a-failure {\"id\":\"c1\"}\n"
        );
        assert!(run(None, &state, HookKind::Poststart).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_hook_is_killed_at_its_timeout() {
        let h = hooks(serde_json::json!({
            "createRuntime": [{"path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1}]
        }));
        let t = Instant::now();
        let e = run(Some(&h), &serde_json::json!({}), HookKind::CreateRuntime)
            .expect_err("sleep 30 passed");
        assert!(matches!(e, HookError::TimedOut { seconds: 1, .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
