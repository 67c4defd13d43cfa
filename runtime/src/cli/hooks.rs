//! The CLI's side of the host hooks: poststart and poststop of a container
//! whose bundle is on disk, with its saved state (the runner is the
//! supervisor's, `husk_runtime::supervisor::hooks`).

use super::state::ContainerState;
use husk_runtime::supervisor::{hooks, Bundle, HookKind};
use std::path::Path;

/// poststart from the CLI: failures are warnings, as the spec says.
pub fn run_host_hooks(root: &Path, id: &str, kind: HookKind) -> anyhow::Result<()> {
    let st = ContainerState::load(root, id)?;
    run_saved_hooks(&st, kind);
    Ok(())
}

/// Runs hooks of a container whose bundle is on disk; failures only warn.
pub fn run_saved_hooks(st: &ContainerState, kind: HookKind) {
    let Ok(bundle) = Bundle::load(&st.bundle) else {
        return;
    };
    let mut state = st.oci();
    if kind == HookKind::Poststop {
        state["status"] = serde_json::json!("stopped");
    }
    for e in hooks::run_all(bundle.spec.hooks().as_ref(), &state, kind) {
        eprintln!("husk: warning: {e}");
    }
}
