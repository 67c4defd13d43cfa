//! Host-side OCI hooks: createRuntime and prestart (during create, in the
//! monitor, once the container exists in the guest), poststart (after
//! start), poststop (after delete). Each gets the state JSON on stdin and is
//! killed at its timeout. createContainer and startContainer belong to the
//! container's namespaces, which are in the guest: the agent runs those.

use super::bundle::Bundle;
use super::state::ContainerState;
use anyhow::{bail, Context};
use oci_spec::runtime::{Hook, Spec};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn hooks_of<'a>(spec: &'a Spec, kind: &str) -> &'a [Hook] {
    let Some(hooks) = spec.hooks() else {
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
    // Woken by the hook's exit (its pidfd), or its deadline.
    let waited = husk_runtime::event::PidFd::open(child.id())
        .and_then(|pidfd| husk_runtime::event::wait_any(&[pidfd.as_fd()], deadline));
    let exited = match waited {
        Ok(woken) => woken.is_some(),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what}: {e}");
        }
    };
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{what} timed out after {}s", hook.timeout().unwrap_or(0));
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{what} failed: {}", husk_runtime::child::describe(status));
    }
    Ok(())
}

/// Runs every hook of `kind`; the first failure stops the rest.
pub fn run_spec_hooks(spec: &Spec, state: &serde_json::Value, kind: &str) -> anyhow::Result<()> {
    for (i, hook) in hooks_of(spec, kind).iter().enumerate() {
        run_hook(hook, state, kind, i)?;
    }
    Ok(())
}

/// poststart from the CLI: failures are warnings, as the spec says.
pub fn run_host_hooks(root: &Path, id: &str, kind: &str) -> anyhow::Result<()> {
    let st = ContainerState::load(root, id)?;
    run_saved_hooks(&st, kind);
    Ok(())
}

/// Runs hooks of a container whose bundle is on disk; failures only warn.
pub fn run_saved_hooks(st: &ContainerState, kind: &str) {
    let Ok(bundle) = Bundle::load(&st.bundle) else {
        return;
    };
    let mut state = st.oci();
    if kind == "poststop" {
        state["status"] = serde_json::json!("stopped");
    }
    for (i, hook) in hooks_of(&bundle.spec, kind).iter().enumerate() {
        if let Err(e) = run_hook(hook, &state, kind, i) {
            eprintln!("husk: warning: {e}");
        }
    }
}
