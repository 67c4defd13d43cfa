//! The shim's errors and the ttrpc status code containerd gets for each,
//! chosen by the error's type and kind, never by its message.

use husk_runtime::agent::{AgentError, ErrorKind, GuestErrorKind};
use husk_runtime::config::ConfigError;
use husk_runtime::sandbox::{BootPhase, SandboxError};
use husk_runtime::supervisor::{BundleError, HookError, SupervisorError};
use ttrpc::Code;

/// A task request the shim refused or failed, as the shim itself saw it.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("invalid container id {0:?}")]
    InvalidId(String),
    #[error("{0} already exists in this shim (its create is in progress)")]
    CreateInProgress(String),
    #[error("container {0} already exists in this shim")]
    ContainerExists(String),
    #[error("a VM named {0} already exists in this shim")]
    VmExists(String),
    #[error("husk does not support restoring from a checkpoint")]
    Checkpoint,
    #[error("the pod sandbox {pod} of container {id} is not served by this shim")]
    PodNotServed { pod: String, id: String },
    #[error("the sandbox container of pod {0} has not started yet")]
    PodNotStarted(String),
    #[error("runtime options: {0}")]
    RuntimeOptions(String),
    /// A VM that did not boot: the phase that failed, and how many boots
    /// were tried (a retry is never silent).
    #[error("starting the VM ({phase}{}): {source}", retried(*.attempts))]
    Boot {
        phase: BootPhase,
        attempts: u32,
        source: SandboxError,
    },
    /// A request on a pod's VM, with the code its cause was classified by.
    #[error("{message}")]
    Pod { code: Code, message: String },
}

fn retried(attempts: u32) -> String {
    if attempts > 1 {
        format!(", after {attempts} attempts")
    } else {
        String::new()
    }
}

impl TaskError {
    /// The code containerd gets for this error.
    pub fn code(&self) -> Code {
        match self {
            TaskError::InvalidId(_) | TaskError::RuntimeOptions(_) => Code::INVALID_ARGUMENT,
            TaskError::CreateInProgress(_)
            | TaskError::ContainerExists(_)
            | TaskError::VmExists(_) => Code::ALREADY_EXISTS,
            TaskError::Checkpoint => Code::UNIMPLEMENTED,
            TaskError::PodNotServed { .. } => Code::NOT_FOUND,
            TaskError::PodNotStarted(_) => Code::FAILED_PRECONDITION,
            TaskError::Boot { source, .. } => source.code(),
            TaskError::Pod { code, .. } => *code,
        }
    }
}

/// The containerd code of an agent error's kind.
pub fn code_of_kind(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::Guest(GuestErrorKind::NotFound) => Code::NOT_FOUND,
        ErrorKind::Guest(GuestErrorKind::AlreadyExists) => Code::ALREADY_EXISTS,
        ErrorKind::Guest(GuestErrorKind::InvalidArgument) => Code::INVALID_ARGUMENT,
        ErrorKind::Guest(GuestErrorKind::FailedPrecondition) => Code::FAILED_PRECONDITION,
        ErrorKind::Guest(GuestErrorKind::DeadlineExceeded) | ErrorKind::Timeout => {
            Code::DEADLINE_EXCEEDED
        }
        ErrorKind::Guest(GuestErrorKind::Internal) => Code::INTERNAL,
        ErrorKind::Guest(GuestErrorKind::Unknown) => Code::UNKNOWN,
        ErrorKind::Unavailable | ErrorKind::NotReady => Code::UNAVAILABLE,
    }
}

/// The code of a sandbox error: an agent's error by its kind.
pub fn code_of_sandbox(e: &SandboxError) -> Code {
    match e {
        SandboxError::Agent(agent) => code_of_kind(agent.kind()),
        other => other.code(),
    }
}

/// The code of a bundle that cannot be used: missing parts are NOT_FOUND,
/// the rest is the client's bad input.
fn code_of_bundle(e: &BundleError) -> Code {
    match e {
        BundleError::Missing(_)
        | BundleError::MissingRootfs { .. }
        | BundleError::BindSource { .. }
        | BundleError::Read { .. } => Code::NOT_FOUND,
        _ => Code::INVALID_ARGUMENT,
    }
}

/// The code of an error chain: the first cause of a known type decides;
/// a chain of none is `UNKNOWN`.
pub fn code_of(e: &anyhow::Error) -> Code {
    for cause in e.chain() {
        if let Some(t) = cause.downcast_ref::<TaskError>() {
            return t.code();
        }
        if let Some(s) = cause.downcast_ref::<SandboxError>() {
            return code_of_sandbox(s);
        }
        if let Some(a) = cause.downcast_ref::<AgentError>() {
            return code_of_kind(a.kind());
        }
        if cause.downcast_ref::<ConfigError>().is_some() {
            return Code::INVALID_ARGUMENT;
        }
        if let Some(b) = cause.downcast_ref::<BundleError>() {
            return code_of_bundle(b);
        }
        if cause.downcast_ref::<HookError>().is_some() {
            return Code::FAILED_PRECONDITION;
        }
        if let Some(s) = cause.downcast_ref::<SupervisorError>() {
            return match s {
                SupervisorError::Bundle(b) => code_of_bundle(b),
                SupervisorError::Hook(_) | SupervisorError::Transition(_) => {
                    Code::FAILED_PRECONDITION
                }
                SupervisorError::Cgroup(_) => Code::INTERNAL,
                SupervisorError::Mount { source, .. } | SupervisorError::Sandbox(source) => {
                    code_of_sandbox(source)
                }
            };
        }
    }
    Code::UNKNOWN
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn agent_error_kinds_map_to_containerd_codes() {
        let table = [
            (ErrorKind::Guest(GuestErrorKind::NotFound), Code::NOT_FOUND),
            (
                ErrorKind::Guest(GuestErrorKind::AlreadyExists),
                Code::ALREADY_EXISTS,
            ),
            (
                ErrorKind::Guest(GuestErrorKind::InvalidArgument),
                Code::INVALID_ARGUMENT,
            ),
            (
                ErrorKind::Guest(GuestErrorKind::FailedPrecondition),
                Code::FAILED_PRECONDITION,
            ),
            (
                ErrorKind::Guest(GuestErrorKind::DeadlineExceeded),
                Code::DEADLINE_EXCEEDED,
            ),
            (ErrorKind::Guest(GuestErrorKind::Internal), Code::INTERNAL),
            (ErrorKind::Guest(GuestErrorKind::Unknown), Code::UNKNOWN),
            (ErrorKind::Unavailable, Code::UNAVAILABLE),
            (ErrorKind::NotReady, Code::UNAVAILABLE),
            (ErrorKind::Timeout, Code::DEADLINE_EXCEEDED),
        ];
        for (kind, code) in table {
            assert_eq!(code_of_kind(kind), code, "{kind:?}");
            // The runtime's own mapping agrees with containerd's.
            assert_eq!(kind.code(), code, "{kind:?}");
        }
    }

    /// An error chain is classified by the type of its cause, whatever its
    /// text says.
    #[test]
    fn chains_are_classified_by_type_not_text() {
        let guest = |kind: GuestErrorKind| {
            AgentError::from(kind.rpc_error("container x does not exist already exists"))
        };
        let e = anyhow::Error::new(guest(GuestErrorKind::Internal)).context("creating");
        assert_eq!(code_of(&e), Code::INTERNAL);
        let e = anyhow::Error::new(SandboxError::Agent(guest(GuestErrorKind::NotFound)));
        assert_eq!(code_of(&e), Code::NOT_FOUND);
        let e = anyhow::anyhow!("container a already exists, not supported, not found");
        assert_eq!(code_of(&e), Code::UNKNOWN);
        let e = anyhow::Error::new(TaskError::ContainerExists("a".into()));
        assert_eq!(code_of(&e), Code::ALREADY_EXISTS);
        let boot = TaskError::Boot {
            phase: BootPhase::AgentNotReady,
            attempts: 2,
            source: SandboxError::AgentNotReady {
                timeout: Duration::from_secs(1),
                last: "refused".into(),
                console: "c".into(),
                vsock: "v".into(),
            },
        };
        assert_eq!(boot.code(), Code::UNAVAILABLE);
        assert!(
            boot.to_string()
                .starts_with("starting the VM (guest agent not ready, after 2 attempts): "),
            "{boot}"
        );
        let e = anyhow::Error::new(ConfigError::UnknownHypervisor("x".into()));
        assert_eq!(code_of(&e), Code::INVALID_ARGUMENT);
    }
}
