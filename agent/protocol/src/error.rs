//! What kind of failure an agent RPC reports, carried next to the ttrpc
//! status code so that the host classifies an error without reading its
//! message.
//!
//! The agent puts the kind's name into the status's `details` as one
//! [`ttrpc::proto::Any`] of type [`KIND_TYPE_URL`]. The host reads it back
//! with [`ErrorKind::of_status`]: the guest is hostile, so a kind is
//! accepted only when it is one of the names below and agrees with the
//! status code; anything else is [`ErrorKind::Unknown`].

use protobuf::Enum;
use ttrpc::proto::Any;
use ttrpc::{Code, Status};

/// The type URL of the `details` entry that names an [`ErrorKind`].
pub const KIND_TYPE_URL: &str = "husk.dev/agent.ErrorKind";

/// The longest kind name; a longer `details` value is not a kind.
const MAX_KIND_LEN: usize = 32;

/// The kind of an agent error, stable across versions (its name travels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No container or process of that id.
    NotFound,
    /// A container of that id exists already.
    AlreadyExists,
    /// The request (an OCI spec, a process, resources) was refused as given.
    InvalidArgument,
    /// The container is not in a state that allows the request.
    FailedPrecondition,
    /// Something the request waited for (a stream connection) did not come.
    DeadlineExceeded,
    /// The guest failed to do what was asked (a mount, a spawn, a cgroup).
    Internal,
    /// Not one of the above: no kind, an unknown name, or a kind that
    /// disagrees with its status code.
    Unknown,
}

impl ErrorKind {
    /// Every kind the agent sends (all but [`ErrorKind::Unknown`]).
    pub const SENT: [ErrorKind; 6] = [
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::InvalidArgument,
        ErrorKind::FailedPrecondition,
        ErrorKind::DeadlineExceeded,
        ErrorKind::Internal,
    ];

    /// The kind's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::AlreadyExists => "already-exists",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::FailedPrecondition => "failed-precondition",
            ErrorKind::DeadlineExceeded => "deadline-exceeded",
            ErrorKind::Internal => "internal",
            ErrorKind::Unknown => "unknown",
        }
    }

    /// The ttrpc status code that goes with the kind.
    pub fn code(self) -> Code {
        match self {
            ErrorKind::NotFound => Code::NOT_FOUND,
            ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
            ErrorKind::InvalidArgument => Code::INVALID_ARGUMENT,
            ErrorKind::FailedPrecondition => Code::FAILED_PRECONDITION,
            ErrorKind::DeadlineExceeded => Code::DEADLINE_EXCEEDED,
            ErrorKind::Internal => Code::INTERNAL,
            ErrorKind::Unknown => Code::UNKNOWN,
        }
    }

    /// The sent kind named by `bytes`, if any.
    fn from_name(bytes: &[u8]) -> Option<ErrorKind> {
        if bytes.len() > MAX_KIND_LEN {
            return None;
        }
        ErrorKind::SENT
            .into_iter()
            .find(|k| k.name().as_bytes() == bytes)
    }

    /// The status an agent answers a failed request with: the kind's code,
    /// `message`, and the kind in `details`.
    pub fn status(self, message: impl ToString) -> Status {
        let mut status = ttrpc::get_status(self.code(), message);
        let mut kind = Any::new();
        kind.type_url = KIND_TYPE_URL.to_string();
        kind.value = self.name().as_bytes().to_vec();
        status.details.push(kind);
        status
    }

    /// [`Self::status`] as a ttrpc error.
    pub fn rpc_error(self, message: impl ToString) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(self.status(message))
    }

    /// The kind of a status the guest sent. Data only: the kind in the
    /// first `details` entry of [`KIND_TYPE_URL`] counts when it is a known
    /// name and matches the status code; without such an entry the code
    /// alone decides. Anything else is [`ErrorKind::Unknown`].
    pub fn of_status(status: &Status) -> ErrorKind {
        let by_code = ErrorKind::of_code(status.code.value());
        let named = status.details.iter().find(|d| d.type_url == KIND_TYPE_URL);
        match named {
            None => by_code,
            Some(d) => match ErrorKind::from_name(&d.value) {
                Some(kind) if kind == by_code => kind,
                _ => ErrorKind::Unknown,
            },
        }
    }

    /// The kind of a raw status code (an unknown number is `Unknown`).
    fn of_code(code: i32) -> ErrorKind {
        let Some(code) = Code::from_i32(code) else {
            return ErrorKind::Unknown;
        };
        ErrorKind::SENT
            .into_iter()
            .find(|k| k.code() == code)
            .unwrap_or(ErrorKind::Unknown)
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sent_kind_reads_back_as_itself() {
        for kind in ErrorKind::SENT {
            let status = kind.status("m");
            assert_eq!(status.code(), kind.code());
            assert_eq!(ErrorKind::of_status(&status), kind, "{kind}");
        }
    }

    fn with_detail(code: i32, type_url: &str, value: &[u8]) -> Status {
        let mut status = ttrpc::get_status(Code::INTERNAL, "m");
        status.code = protobuf::EnumOrUnknown::from_i32(code);
        let mut any = Any::new();
        any.type_url = type_url.to_string();
        any.value = value.to_vec();
        status.details.push(any);
        status
    }

    #[test]
    fn a_hostile_kind_or_code_is_unknown() {
        let not_found = Code::NOT_FOUND as i32;
        for status in [
            // A name that is not a kind, garbage, a huge value.
            with_detail(not_found, KIND_TYPE_URL, b"root"),
            with_detail(not_found, KIND_TYPE_URL, b"\xff\x00not-found"),
            with_detail(not_found, KIND_TYPE_URL, &[b'x'; 1 << 20]),
            // "unknown" is not sent: it is the host's own.
            with_detail(Code::UNKNOWN as i32, KIND_TYPE_URL, b"unknown"),
            // A kind that disagrees with the code.
            with_detail(Code::INTERNAL as i32, KIND_TYPE_URL, b"not-found"),
            // Codes out of range, or OK for an error.
            with_detail(999, "other", b""),
            with_detail(-1, "other", b""),
            with_detail(0, "other", b""),
            with_detail(999, KIND_TYPE_URL, b"not-found"),
        ] {
            assert_eq!(
                ErrorKind::of_status(&status),
                ErrorKind::Unknown,
                "{status:?}"
            );
        }
        // Without a kind, a known code still classifies.
        assert_eq!(
            ErrorKind::of_status(&ttrpc::get_status(Code::NOT_FOUND, "m")),
            ErrorKind::NotFound
        );
        assert_eq!(
            ErrorKind::of_status(&ttrpc::get_status(Code::UNAVAILABLE, "m")),
            ErrorKind::Unknown
        );
    }
}
