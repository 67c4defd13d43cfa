//! Host-side OCI hooks: createRuntime and prestart (during create, in the
//! monitor, once the container exists in the guest), poststart (in the
//! monitor, after start), poststop (in the monitor, after delete; by
//! `husk delete` itself only when the monitor is gone). poststart and
//! poststop run from the hooks saved in the state at create, not from the
//! bundle, which may be gone by then. Each gets the state JSON on stdin and is
//! killed at its timeout. createContainer and startContainer belong to the
//! container's namespaces, which are in the guest: the agent runs those.

use super::state::ContainerState;
use anyhow::{bail, Context};
use oci_spec::runtime::{Hook, Hooks, Spec};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn hooks_of<'a>(hooks: Option<&'a Hooks>, kind: &str) -> &'a [Hook] {
    let Some(hooks) = hooks else {
        return &[];
    };
    #[allow(deprecated)]
    let list = match kind {
        "createRuntime" => hooks.create_runtime(),
        "prestart" => hooks.prestart(),
        "poststart" => hooks.poststart(),
        "poststop" => hooks.poststop(),
        _ => &None,
    };
    list.as_deref().unwrap_or(&[])
}

fn run_hook(
    hook: &Hook,
    state: &serde_json::Value,
    kind: &str,
    index: usize,
) -> anyhow::Result<()> {
    let path = hook.path();
    let what = format!("{kind} hook {index} ({})", path.display());
    let mut cmd = Command::new(path);
    if let Some(args) = hook.args() {
        if let Some((arg0, rest)) = args.split_first() {
            std::os::unix::process::CommandExt::arg0(&mut cmd, arg0);
            cmd.args(rest);
        }
    }
    cmd.env_clear();
    for kv in hook.env().as_deref().unwrap_or(&[]) {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| what.clone())?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is not an error.
        let _ = stdin.write_all(state.to_string().as_bytes());
    }
    let deadline = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Instant::now() + Duration::from_secs(t as u64));
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("{what} failed: {}", husk_runtime::child::describe(status));
            }
            return Ok(());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} timed out after {}s", hook.timeout().unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs every hook of `kind`; the first failure stops the rest.
pub fn run_spec_hooks(spec: &Spec, state: &serde_json::Value, kind: &str) -> anyhow::Result<()> {
    for (i, hook) in hooks_of(spec.hooks().as_ref(), kind).iter().enumerate() {
        run_hook(hook, state, kind, i)?;
    }
    Ok(())
}

/// Runs the hooks of `kind` saved in the container's state at create, so
/// they run even when the bundle no longer loads. Failures only warn, as
/// the spec says: they are logged and returned for the caller to show.
pub fn run_saved_hooks(st: &ContainerState, kind: &str) -> Vec<String> {
    let mut state = st.oci();
    if kind == "poststop" {
        state["status"] = serde_json::json!("stopped");
    }
    let mut warnings = Vec::new();
    for (i, hook) in hooks_of(st.hooks.as_ref(), kind).iter().enumerate() {
        if let Err(e) = run_hook(hook, &state, kind, i) {
            log::warn!("{}: {e}", st.id);
            warnings.push(super::one_line(&e));
        }
    }
    warnings
}
