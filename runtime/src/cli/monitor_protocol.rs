//! The one wire format between husk's host processes: the CLI and its
//! per-container monitor (`monitor.sock`), the ready pipe `husk create`
//! reads the monitor's setup result from (and a detached exec's), and the
//! link between the monitor and the shadow process.
//!
//! Every message is a frame: a 4-byte big-endian length, then that many
//! bytes of JSON of one of the typed enums below. A frame longer than
//! [`MAX_FRAME`] is refused before anything is allocated for it, and JSON
//! that is not exactly one of the messages (an unknown request, a missing
//! or extra field) is an error that names what is wrong. The file
//! descriptors an exec hands over travel as SCM_RIGHTS on its request's
//! frame ([`send_with_fds`], [`recv_with_fds`]).
//!
//! Everything on these links is between husk processes of one host user;
//! what came from the guest (a process list, stats, an agent's error
//! message) is already bounded and made printable by the agent client
//! before it is put into a reply.

use husk_runtime::phases::Phases;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The largest frame either way: a process list of thousands of guest
/// processes, or an exec's process JSON with a large environment, fits.
pub const MAX_FRAME: usize = 1 << 20;

/// The most file descriptors one request carries (an exec's stdio).
pub const MAX_FDS: usize = 3;

/// How long the CLI waits for the reply to a request that asks the monitor
/// for something quick; a monitor that does not answer by then is named.
/// Twice the agent's own timeout: longer than any one request's agent calls
/// (an exec's stream handshakes and its RPC), so an agent that does not
/// answer is reported as such, by the monitor, before this runs out.
pub const QUICK_REPLY: Duration =
    Duration::from_secs(2 * husk_runtime::agent::RPC_TIMEOUT.as_secs());

/// How long the monitor waits for a connected client to send its request.
pub const REQUEST_READ: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection before a whole message")]
    Closed,
    #[error("a message of {len} bytes is over the limit of {MAX_FRAME}")]
    TooLarge { len: usize },
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the file descriptors were cut short (more than {MAX_FDS} sent)")]
    FdsTruncated,
}

/// A request from the CLI to a container's monitor: every command that
/// reaches into the guest goes through one of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum MonitorRequest {
    /// Start the container's process; poststart hooks follow.
    Start,
    /// Signal the container's process (all of its processes with `all`).
    Kill {
        signal: i32,
        all: bool,
    },
    /// End the VM, remove the container, run poststop; the monitor exits.
    Delete {
        force: bool,
    },
    /// Run a process in the container (OCI process JSON); the stdio named
    /// by `stdio` comes with the request as file descriptors.
    Exec {
        process: serde_json::Value,
        stdio: ExecStdio,
    },
    /// Wait for an exec to end; the reply comes once its output is all
    /// delivered.
    Wait {
        exec_id: String,
    },
    /// The container's processes.
    Ps,
    Pause,
    Resume,
    /// The container's resource usage.
    Stats,
    /// New resources (OCI linux.resources) for the container.
    Update {
        resources: Box<oci_spec::runtime::LinuxResources>,
    },
}

impl MonitorRequest {
    /// How long the CLI waits for the reply: None for requests that last
    /// as long as something else does (a process, hooks with their own
    /// timeouts, a VM's teardown).
    pub fn reply_timeout(&self) -> Option<Duration> {
        match self {
            MonitorRequest::Start | MonitorRequest::Delete { .. } | MonitorRequest::Wait { .. } => {
                None
            }
            MonitorRequest::Kill { .. }
            | MonitorRequest::Exec { .. }
            | MonitorRequest::Ps
            | MonitorRequest::Pause
            | MonitorRequest::Resume
            | MonitorRequest::Stats
            | MonitorRequest::Update { .. } => Some(QUICK_REPLY),
        }
    }

    /// How many file descriptors come with the request.
    pub fn fd_count(&self) -> usize {
        match self {
            MonitorRequest::Exec { stdio, .. } => stdio.fd_count(),
            _ => 0,
        }
    }
}

/// Which file descriptors an exec request carries, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum ExecStdio {
    /// The CLI's own stdin, stdout and stderr (those it has open).
    Pipes {
        stdin: bool,
        stdout: bool,
        stderr: bool,
    },
    /// A terminal: the raw host pty's slave (the process's bytes), then its
    /// master (whose window size is followed; the console socket got a copy).
    Terminal,
}

impl ExecStdio {
    pub fn fd_count(&self) -> usize {
        match *self {
            ExecStdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => usize::from(stdin) + usize::from(stdout) + usize::from(stderr),
            ExecStdio::Terminal => 2,
        }
    }
}

/// A process in the container, as the guest listed it (printable, bounded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestProcess {
    pub pid: u32,
    pub command: String,
}

/// A container's resource usage, as the guest reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerStats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub cpu_nr_periods: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_usec: u64,
    pub memory_current_bytes: u64,
    pub memory_limit_bytes: u64,
    pub memory_oom_kill_events: u64,
    pub memory_stat: BTreeMap<String, u64>,
    pub pids_current: u64,
    pub pids_limit: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
}

/// A successful answer; which one follows from the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum MonitorReply {
    /// Done, nothing to report.
    Done,
    /// Done; host hooks that failed (they only warn, as the spec says).
    DoneWithWarnings {
        warnings: Vec<String>,
        /// Where a delete's time went (`husk --debug`).
        #[serde(default)]
        phases: Phases,
    },
    /// The container's process started (guest pid).
    Started {
        pid: u32,
        warnings: Vec<String>,
        #[serde(default)]
        phases: Phases,
    },
    /// An exec started: its id for `Wait`, its guest pid.
    ExecStarted {
        exec_id: String,
        pid: u32,
        #[serde(default)]
        phases: Phases,
    },
    /// The process ended: its exit code, or the signal that killed it.
    Exited {
        code: i32,
        signal: i32,
    },
    Processes {
        processes: Vec<GuestProcess>,
    },
    Stats {
        stats: ContainerStats,
    },
}

/// What kind of failure a [`MonitorError`] is, so that a caller acts on
/// the kind, never on the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MonitorErrorKind {
    /// The request was malformed, or asked for something the monitor does
    /// not have (an unknown exec).
    BadRequest,
    /// The container is not in a state that allows the request.
    FailedPrecondition,
    /// The agent failed the request; its kind as the runtime classified it.
    Agent(AgentErrorKind),
    /// The host side failed (a VM component, a cgroup, a file).
    Internal,
}

/// [`husk_runtime::agent::ErrorKind`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    DeadlineExceeded,
    Internal,
    Unknown,
    Unavailable,
    NotReady,
    Timeout,
}

impl From<husk_runtime::agent::ErrorKind> for AgentErrorKind {
    fn from(kind: husk_runtime::agent::ErrorKind) -> Self {
        use husk_protocol::error::ErrorKind as Guest;
        use husk_runtime::agent::ErrorKind as Kind;
        match kind {
            Kind::Guest(Guest::NotFound) => AgentErrorKind::NotFound,
            Kind::Guest(Guest::AlreadyExists) => AgentErrorKind::AlreadyExists,
            Kind::Guest(Guest::InvalidArgument) => AgentErrorKind::InvalidArgument,
            Kind::Guest(Guest::FailedPrecondition) => AgentErrorKind::FailedPrecondition,
            Kind::Guest(Guest::DeadlineExceeded) => AgentErrorKind::DeadlineExceeded,
            Kind::Guest(Guest::Internal) => AgentErrorKind::Internal,
            Kind::Guest(Guest::Unknown) => AgentErrorKind::Unknown,
            Kind::Unavailable => AgentErrorKind::Unavailable,
            Kind::NotReady => AgentErrorKind::NotReady,
            Kind::Timeout => AgentErrorKind::Timeout,
        }
    }
}

impl From<AgentErrorKind> for husk_runtime::agent::ErrorKind {
    fn from(kind: AgentErrorKind) -> Self {
        use husk_protocol::error::ErrorKind as Guest;
        use husk_runtime::agent::ErrorKind as Kind;
        match kind {
            AgentErrorKind::NotFound => Kind::Guest(Guest::NotFound),
            AgentErrorKind::AlreadyExists => Kind::Guest(Guest::AlreadyExists),
            AgentErrorKind::InvalidArgument => Kind::Guest(Guest::InvalidArgument),
            AgentErrorKind::FailedPrecondition => Kind::Guest(Guest::FailedPrecondition),
            AgentErrorKind::DeadlineExceeded => Kind::Guest(Guest::DeadlineExceeded),
            AgentErrorKind::Internal => Kind::Guest(Guest::Internal),
            AgentErrorKind::Unknown => Kind::Guest(Guest::Unknown),
            AgentErrorKind::Unavailable => Kind::Unavailable,
            AgentErrorKind::NotReady => Kind::NotReady,
            AgentErrorKind::Timeout => Kind::Timeout,
        }
    }
}

/// A failed request: its kind, and the message the user reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{message}")]
pub struct MonitorError {
    pub kind: MonitorErrorKind,
    pub message: String,
}

impl MonitorError {
    pub fn new(kind: MonitorErrorKind, message: impl Into<String>) -> Self {
        MonitorError {
            kind,
            message: message.into(),
        }
    }

    /// The error of a failed request: the kind of the agent error in its
    /// causes, if one is there, and the whole chain as the message.
    pub fn of(e: &anyhow::Error) -> Self {
        if let Some(own) = e.downcast_ref::<MonitorError>() {
            return own.clone();
        }
        let kind = e
            .chain()
            .find_map(|c| c.downcast_ref::<husk_runtime::agent::AgentError>())
            .map(|a| MonitorErrorKind::Agent(a.kind().into()))
            .unwrap_or(MonitorErrorKind::Internal);
        MonitorError::new(kind, super::one_line(e))
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum MonitorResponse {
    Ok(MonitorReply),
    Err(MonitorError),
}

/// What the monitor (or a detached exec's background copy) says on its
/// ready pipe once its setup is over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum ReadyMessage {
    /// Set up; where the set-up's time went (`husk --debug`).
    Ready {
        #[serde(default)]
        phases: Phases,
    },
    Failed {
        message: String,
    },
}

/// From the monitor to the shadow: how the container's process ended,
/// which is how the shadow ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum ToShadow {
    Exit { code: i32, signal: i32 },
}

/// From the shadow to the monitor: a signal the shadow caught, for the
/// container's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum ToMonitor {
    Signal { signal: i32 },
}

/// Writes one frame.
pub fn write_message<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ProtocolError> {
    let frame = encode(msg)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::TooLarge { len: body.len() });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Reads one frame. A timeout set on the stream shows as
/// [`ProtocolError::Timeout`] when `timeout` names it.
pub fn read_message<T: DeserializeOwned>(
    r: &mut impl Read,
    timeout: Option<Duration>,
) -> Result<T, ProtocolError> {
    let mut header = [0u8; 4];
    read_exact(r, &mut header, timeout)?;
    read_body(r, header, timeout)
}

fn read_body<T: DeserializeOwned>(
    r: &mut impl Read,
    header: [u8; 4],
    timeout: Option<Duration>,
) -> Result<T, ProtocolError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLarge { len });
    }
    let mut body = vec![0u8; len];
    read_exact(r, &mut body, timeout)?;
    Ok(serde_json::from_slice(&body)?)
}

fn read_exact(
    r: &mut impl Read,
    buf: &mut [u8],
    timeout: Option<Duration>,
) -> Result<(), ProtocolError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => match timeout {
            Some(t) => ProtocolError::Timeout(t),
            None => ProtocolError::Io(e),
        },
        _ => ProtocolError::Io(e),
    })
}

/// Sends one frame with `fds` attached (SCM_RIGHTS on its first bytes).
pub fn send_with_fds<T: Serialize>(
    sock: &UnixStream,
    msg: &T,
    fds: &[RawFd],
) -> Result<(), ProtocolError> {
    let frame = encode(msg)?;
    let mut sent = if fds.is_empty() {
        0
    } else {
        sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&frame)],
            &[ControlMessage::ScmRights(fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(std::io::Error::from)?
    };
    while sent < frame.len() {
        let n = sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&frame[sent..])],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(std::io::Error::from)?;
        sent += n;
    }
    Ok(())
}

/// Receives one frame and the file descriptors that came with it.
pub fn recv_with_fds<T: DeserializeOwned>(
    sock: &UnixStream,
    timeout: Option<Duration>,
) -> Result<(T, Vec<OwnedFd>), ProtocolError> {
    let mut header = [0u8; 4];
    let mut fds = Vec::new();
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut got = 0;
    let mut truncated = false;
    while got < header.len() {
        let mut iov = [IoSliceMut::new(&mut header[got..])];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => {
                return Err(match timeout {
                    Some(t) => ProtocolError::Timeout(t),
                    None => ProtocolError::Io(std::io::ErrorKind::WouldBlock.into()),
                })
            }
            Err(e) => return Err(std::io::Error::from(e).into()),
        };
        truncated |= msg.flags.contains(MsgFlags::MSG_CTRUNC);
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(received) = c {
                    // SAFETY: the kernel just installed these fds in this
                    // process for us; nothing else owns them.
                    fds.extend(
                        received
                            .into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
        }
        if msg.bytes == 0 {
            return Err(ProtocolError::Closed);
        }
        got += msg.bytes;
    }
    if truncated {
        return Err(ProtocolError::FdsTruncated);
    }
    let mut reader = sock;
    let msg = read_body(&mut reader, header, timeout)?;
    Ok((msg, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: T) {
        let mut buf = Vec::new();
        write_message(&mut buf, &msg).expect("write");
        let back: T = read_message(&mut buf.as_slice(), None).expect("read");
        assert_eq!(back, msg);
    }

    #[test]
    fn every_message_survives_a_round_trip() {
        round_trip(MonitorRequest::Start);
        round_trip(MonitorRequest::Kill {
            signal: 15,
            all: true,
        });
        round_trip(MonitorRequest::Delete { force: true });
        round_trip(MonitorRequest::Exec {
            process: serde_json::json!({"args": ["sh"], "env": ["A=b"]}),
            stdio: ExecStdio::Pipes {
                stdin: true,
                stdout: true,
                stderr: false,
            },
        });
        round_trip(MonitorRequest::Wait {
            exec_id: "exec-1".into(),
        });
        round_trip(MonitorRequest::Ps);
        round_trip(MonitorRequest::Stats);
        let resources: oci_spec::runtime::LinuxResources =
            serde_json::from_value(serde_json::json!({"memory": {"limit": 50000000}}))
                .expect("resources");
        round_trip(MonitorRequest::Update {
            resources: Box::new(resources),
        });
        round_trip(MonitorResponse::Ok(MonitorReply::Started {
            pid: 1,
            warnings: vec!["poststart hook 0 failed".into()],
            phases: Phases::default(),
        }));
        round_trip(MonitorResponse::Ok(MonitorReply::Exited {
            code: 137,
            signal: 9,
        }));
        round_trip(MonitorResponse::Ok(MonitorReply::Processes {
            processes: vec![GuestProcess {
                pid: 7,
                command: "sleep 600".into(),
            }],
        }));
        round_trip(MonitorResponse::Ok(MonitorReply::Stats {
            stats: ContainerStats {
                memory_stat: [("anon".to_string(), 4096)].into(),
                ..Default::default()
            },
        }));
        round_trip(MonitorResponse::Err(MonitorError::new(
            MonitorErrorKind::Agent(AgentErrorKind::NotFound),
            "agent: no such process",
        )));
        round_trip(ReadyMessage::Failed {
            message: "createRuntime hook 0 (/bin/false) failed".into(),
        });
        round_trip(ToShadow::Exit {
            code: 130,
            signal: 2,
        });
        round_trip(ToMonitor::Signal { signal: 15 });
    }

    #[test]
    fn an_agent_error_kind_survives_the_trip() {
        use husk_runtime::agent::ErrorKind;
        for kind in husk_protocol::error::ErrorKind::SENT
            .into_iter()
            .map(ErrorKind::Guest)
            .chain([
                ErrorKind::Guest(husk_protocol::error::ErrorKind::Unknown),
                ErrorKind::Unavailable,
                ErrorKind::NotReady,
                ErrorKind::Timeout,
            ])
        {
            let wire = AgentErrorKind::from(kind);
            assert_eq!(ErrorKind::from(wire), kind);
        }
        let e = anyhow::Error::from(husk_runtime::agent::AgentError::Timeout).context("exec in c1");
        let me = MonitorError::of(&e);
        assert_eq!(
            me.kind,
            MonitorErrorKind::Agent(AgentErrorKind::Timeout),
            "{me:?}"
        );
        assert!(
            me.message.starts_with("exec in c1: agent"),
            "{}",
            me.message
        );
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    fn read_request(bytes: &[u8]) -> Result<MonitorRequest, ProtocolError> {
        read_message(&mut &bytes[..], None)
    }

    #[test]
    fn unknown_and_malformed_requests_are_named() {
        let e = read_request(&frame(br#""reboot""#)).expect_err("unknown request");
        assert!(e.to_string().contains("unknown variant `reboot`"), "{e}");
        let e = read_request(&frame(br#"{"kill":{"signal":9}}"#)).expect_err("missing field");
        assert!(e.to_string().contains("missing field `all`"), "{e}");
        let e =
            read_request(&frame(br#"{"delete":{"force":true,"now":1}}"#)).expect_err("extra field");
        assert!(e.to_string().contains("unknown field `now`"), "{e}");
        let e = read_request(&frame(b"{\"kill\":")).expect_err("cut JSON");
        assert!(matches!(e, ProtocolError::Malformed(_)), "{e}");
        // The old line format is not a frame of a sane size.
        let e = read_request(b"{\"op\":\"start\"}\n").expect_err("old format");
        assert!(matches!(e, ProtocolError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn oversized_and_cut_frames_are_refused_without_reading_them() {
        let mut huge = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        let e = read_request(&huge).expect_err("over the limit");
        assert!(
            e.to_string()
                .contains(&format!("over the limit of {MAX_FRAME}")),
            "{e}"
        );
        let e = read_request(&frame(b"\"start\"")[..5]).expect_err("cut body");
        assert!(matches!(e, ProtocolError::Closed), "{e}");
        let e = read_request(&[0, 0]).expect_err("cut header");
        assert!(matches!(e, ProtocolError::Closed), "{e}");
        let big = MonitorRequest::Exec {
            process: serde_json::json!({"env": ["x".repeat(MAX_FRAME)]}),
            stdio: ExecStdio::Terminal,
        };
        let e = write_message(&mut Vec::new(), &big).expect_err("too large to send");
        assert!(matches!(e, ProtocolError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn file_descriptors_travel_with_their_request() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let req = MonitorRequest::Exec {
            process: serde_json::json!({"args": ["true"]}),
            stdio: ExecStdio::Pipes {
                stdin: false,
                stdout: true,
                stderr: false,
            },
        };
        send_with_fds(&a, &req, &[w.as_raw_fd()]).expect("send");
        drop(w);
        let (got, fds): (MonitorRequest, _) = recv_with_fds(&b, None).expect("recv");
        assert_eq!(got, req);
        assert_eq!(fds.len(), req.fd_count());
        // The received fd is the pipe's write end: what goes in comes out.
        let mut out = std::fs::File::from(fds.into_iter().next().expect("fd"));
        out.write_all(b"through").expect("write");
        drop(out);
        let mut text = String::new();
        std::fs::File::from(r)
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, "through");
    }

    #[test]
    fn a_silent_peer_times_out_naming_the_wait() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let t = Duration::from_millis(50);
        a.set_read_timeout(Some(t)).expect("timeout");
        let e = read_message::<MonitorResponse>(&mut &a, Some(t)).expect_err("silence");
        assert!(matches!(e, ProtocolError::Timeout(_)), "{e}");
        let e = recv_with_fds::<MonitorRequest>(&a, Some(t)).expect_err("silence");
        assert!(matches!(e, ProtocolError::Timeout(_)), "{e}");
    }
}
