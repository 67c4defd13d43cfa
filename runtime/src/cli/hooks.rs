//! The CLI's side of the host hooks (the runner is the supervisor's,
//! `husk_runtime::supervisor::hooks`): createRuntime and prestart run in the
//! monitor during create, once the container exists in the guest;
//! poststart in the monitor after start; poststop in the monitor after
//! delete (by `husk delete` itself only when the monitor is gone).
//! poststart and poststop run from the hooks saved in the state at create,
//! not from the bundle, which may be gone by then.

use super::state::ContainerState;
use husk_runtime::supervisor::{hooks, HookKind};

/// Runs the hooks of `kind` saved in the container's state at create, so
/// they run even when the bundle no longer loads. Failures only warn, as
/// the spec says: they are logged and returned for the caller to show.
pub fn run_saved_hooks(st: &ContainerState, kind: HookKind) -> Vec<String> {
    let mut state = st.oci();
    if kind == HookKind::Poststop {
        state["status"] = serde_json::json!("stopped");
    }
    hooks::run_all(st.hooks.as_ref(), &state, kind)
        .into_iter()
        .map(|e| {
            log::warn!("{}: {e}", st.id);
            e.to_string()
        })
        .collect()
}
