//! The host's client of the in-guest agent: ttrpc over the hybrid vsock
//! socket, plus raw stream connections for process stdio.

use crate::phases::Phases;
use crate::rpc::{RpcClient, RpcError};
use husk_protocol::agent::*;
pub use husk_protocol::ErrorKind as GuestErrorKind;
use husk_protocol::{StreamHeader, StreamKind, AGENT_PORT, STREAM_PORT};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Timeout of ordinary RPCs (not WaitProcess, which blocks until exit).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of Shutdown: the VM is stopped anyway when it passes, so a
/// guest that never answers delays a delete by this much, not by
/// [`RPC_TIMEOUT`].
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the `OK <port>` answer to a CONNECT may take once the guest runs.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("vsock {uds}: {source}")]
    Connect {
        uds: PathBuf,
        source: std::io::Error,
    },
    #[error("vsock port {port}: the guest refused the connection (nothing listening yet)")]
    Refused { port: u32 },
    #[error("vsock port {port}: no answer to CONNECT within {timeout:?}")]
    Unanswered { port: u32, timeout: Duration },
    #[error("vsock port {port}: unexpected handshake answer {answer:?}")]
    Handshake { port: u32, answer: String },
    #[error("the agent did not answer within {0:?} (last attempt: {1})")]
    NotReady(Duration, String),
    /// The agent answered with an error (or a frame ttrpc could not read).
    #[error("agent: {message}")]
    Rpc {
        /// The kind the guest named, as far as the host accepts it.
        kind: GuestErrorKind,
        /// The guest's message, bounded and printable.
        message: String,
    },
    /// The ttrpc connection broke (closed, reset, end of stream).
    #[error("agent: {0}")]
    Disconnected(String),
    #[error("agent: no answer within {RPC_TIMEOUT:?}")]
    Timeout,
    #[error("{0}")]
    Aborted(String),
}

/// The most of an agent's error message the host keeps, in characters. A
/// reply may be 4 MiB of whatever the guest chose; the message travels on
/// one line (the monitor's socket, capped at 64 KiB; stderr; a log).
pub const MAX_AGENT_MESSAGE: usize = 1024;

impl From<ttrpc::Error> for AgentError {
    fn from(e: ttrpc::Error) -> Self {
        // Both kinds may carry guest bytes: a status message, or ttrpc's
        // dump of a malformed frame. The status's code and kind are data
        // too: they only classify (see `GuestErrorKind::of_status`).
        match e {
            ttrpc::Error::RpcStatus(s) => AgentError::Rpc {
                kind: GuestErrorKind::of_status(&s),
                message: printable(s.message(), MAX_AGENT_MESSAGE),
            },
            e @ (ttrpc::Error::Socket(_)
            | ttrpc::Error::Nix(_)
            | ttrpc::Error::LocalClosed
            | ttrpc::Error::RemoteClosed
            | ttrpc::Error::Eof) => {
                AgentError::Disconnected(printable(&e.to_string(), MAX_AGENT_MESSAGE))
            }
            other => AgentError::Rpc {
                kind: GuestErrorKind::Unknown,
                message: printable(&other.to_string(), MAX_AGENT_MESSAGE),
            },
        }
    }
}

impl From<RpcError> for AgentError {
    fn from(e: RpcError) -> Self {
        match e {
            RpcError::Status(s) => ttrpc::Error::RpcStatus(s).into(),
            RpcError::Timeout(_) => AgentError::Timeout,
            RpcError::Disconnected(why) => {
                AgentError::Disconnected(printable(&why, MAX_AGENT_MESSAGE))
            }
            RpcError::Malformed(what) => AgentError::Rpc {
                kind: GuestErrorKind::Unknown,
                message: printable(&what, MAX_AGENT_MESSAGE),
            },
        }
    }
}

/// The agent's ttrpc service.
const SERVICE: &str = "husk.agent.v1.Agent";

/// What kind of failure an [`AgentError`] is, for callers that act on it
/// (the shim's status codes, a boot's retry) without reading its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The agent reported a failure of this kind.
    Guest(GuestErrorKind),
    /// The guest could not be reached (connection refused, unanswered or
    /// broken, a VM component gone).
    Unavailable,
    /// The agent did not come up while the VM booted.
    NotReady,
    /// The agent did not answer a request in time.
    Timeout,
}

impl ErrorKind {
    /// The ttrpc status code that goes with the kind (what the shim tells
    /// containerd).
    pub fn code(self) -> ttrpc::Code {
        match self {
            ErrorKind::Guest(kind) => kind.code(),
            ErrorKind::Unavailable | ErrorKind::NotReady => ttrpc::Code::UNAVAILABLE,
            ErrorKind::Timeout => ttrpc::Code::DEADLINE_EXCEEDED,
        }
    }
}

impl AgentError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AgentError::Rpc { kind, .. } => ErrorKind::Guest(*kind),
            AgentError::Connect { .. }
            | AgentError::Refused { .. }
            | AgentError::Unanswered { .. }
            | AgentError::Handshake { .. }
            | AgentError::Disconnected(_)
            | AgentError::Aborted(_) => ErrorKind::Unavailable,
            AgentError::NotReady(..) => ErrorKind::NotReady,
            AgentError::Timeout => ErrorKind::Timeout,
        }
    }

    /// The ttrpc status code of [`Self::kind`].
    pub fn code(&self) -> ttrpc::Code {
        self.kind().code()
    }
}

/// Unanswered CONNECTs kept open at once, at most (per process).
const MAX_PARKED: usize = 32;
static PARKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Keeps an unanswered CONNECT open until its answer (or the backend's
/// end) comes, instead of closing it at the timeout. vhost-device-vsock
/// (0.3) unwraps its write of `OK <port>` and loses its worker thread when
/// the guest's late answer finds the host's side closed: every connection
/// of the sandbox, the agent's included, then hangs. A guest that stalls
/// (or a loaded host) would so wedge its own sandbox for good. The parked
/// stream's thread reads nothing but that answer (at most one line; no
/// guest bytes are used) and closes the stream. Beyond [`MAX_PARKED`] a
/// stream is closed at once, as before.
fn park_unanswered(stream: UnixStream) {
    use std::sync::atomic::Ordering;
    if PARKED.fetch_add(1, Ordering::SeqCst) >= MAX_PARKED {
        PARKED.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let parked = std::thread::Builder::new()
        .name("vsock-parked".into())
        .spawn(move || {
            let mut stream = stream;
            let _ = stream.set_read_timeout(None);
            let mut byte = [0u8; 1];
            for _ in 0..64 {
                match stream.read(&mut byte) {
                    Ok(1) if byte[0] != b'\n' => continue,
                    _ => break,
                }
            }
            drop(stream);
            PARKED.fetch_sub(1, Ordering::SeqCst);
        });
    if parked.is_err() {
        PARKED.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Connects to guest vsock `port` through the hybrid Unix socket.
pub fn connect_port(uds: &Path, port: u32) -> Result<UnixStream, AgentError> {
    let timeout = HANDSHAKE_TIMEOUT;
    let mut stream = UnixStream::connect(uds).map_err(|source| AgentError::Connect {
        uds: uds.to_path_buf(),
        source,
    })?;
    let io = |source| AgentError::Connect {
        uds: uds.to_path_buf(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io)?;
    // Read byte by byte: anything after the newline belongs to the peer.
    let mut answer = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(AgentError::Refused { port }),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if answer.len() < 64 => answer.push(byte[0]),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(AgentError::Refused { port })
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                park_unanswered(stream);
                return Err(AgentError::Unanswered { port, timeout });
            }
            Err(e) => return Err(io(e)),
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    if !answer.starts_with("OK ") {
        return Err(AgentError::Handshake { port, answer });
    }
    stream.set_read_timeout(None).map_err(io)?;
    Ok(stream)
}

/// A connected agent.
#[derive(Clone)]
pub struct AgentClient {
    rpc: RpcClient,
    uds: PathBuf,
}

/// A fresh random stream token (never 0).
pub fn new_token() -> u64 {
    let mut buf = [0u8; 8];
    // getrandom(2) cannot fail for 8 bytes once the pool is ready; fall back
    // to time and pid rather than to a fixed value.
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    let token = if n == 8 {
        u64::from_le_bytes(buf)
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        t ^ ((std::process::id() as u64) << 32)
    };
    token.max(1)
}

impl AgentClient {
    /// The hybrid vsock socket this client reaches the agent through.
    pub fn uds(&self) -> &std::path::Path {
        &self.uds
    }

    /// Connects, retrying while the guest boots (connections are refused
    /// until the agent listens) and `alive` says the VM is still there.
    pub fn connect(
        uds: &Path,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<(), String>,
    ) -> Result<Self, AgentError> {
        let deadline = Instant::now() + timeout;
        loop {
            alive().map_err(AgentError::Aborted)?;
            // The sandbox connects only after the agent announced itself, so an
            // attempt is given the full handshake time: abandoning slow
            // CONNECTs (a loaded host) leaves the vsock backend wedged.
            match connect_port(uds, AGENT_PORT) {
                Ok(stream) => {
                    let rpc =
                        RpcClient::new(stream, SERVICE).map_err(|source| AgentError::Connect {
                            uds: uds.to_path_buf(),
                            source,
                        })?;
                    return Ok(AgentClient {
                        rpc,
                        uds: uds.to_path_buf(),
                    });
                }
                Err(
                    e @ (AgentError::Refused { .. }
                    | AgentError::Unanswered { .. }
                    | AgentError::Connect { .. }),
                ) => {
                    if Instant::now() >= deadline {
                        return Err(AgentError::NotReady(timeout, e.to_string()));
                    }
                    // A retry backoff, not a poll: the agent has announced
                    // itself, and a refused CONNECT gives no event to wait
                    // for (the VM's death is checked by `alive` each round).
                    std::thread::sleep(Duration::from_millis(3));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A client over a stream already connected to the agent's port (a
    /// pooled sandbox's, made while it idled; or, in tests, the agent API
    /// served in process).
    pub fn over(stream: UnixStream, uds: &Path) -> Result<Self, AgentError> {
        let rpc = RpcClient::new(stream, SERVICE).map_err(|source| AgentError::Connect {
            uds: uds.to_path_buf(),
            source,
        })?;
        Ok(AgentClient {
            rpc,
            uds: uds.to_path_buf(),
        })
    }

    /// Opens a stream connection of `kind` carrying `token`.
    pub fn open_stream(&self, kind: StreamKind, token: u64) -> Result<UnixStream, AgentError> {
        let mut stream = connect_port(&self.uds, STREAM_PORT)?;
        StreamHeader { kind, token }
            .write_to(&mut stream)
            .map_err(|source| AgentError::Connect {
                uds: self.uds.clone(),
                source,
            })?;
        Ok(stream)
    }

    /// One call of the agent's `method`.
    fn call<Req: protobuf::Message, Res: protobuf::Message>(
        &self,
        method: &str,
        timeout: Option<Duration>,
        request: &Req,
    ) -> Result<Res, AgentError> {
        Ok(self.rpc.call(method, request, timeout)?)
    }

    pub fn health(&self) -> Result<HealthResponse, AgentError> {
        self.call("Health", Some(RPC_TIMEOUT), &HealthRequest::default())
    }

    pub fn guest_info(&self) -> Result<GuestInfoResponse, AgentError> {
        self.call("GuestInfo", Some(RPC_TIMEOUT), &GuestInfoRequest::default())
    }

    /// Creates a container; the guest's steps of it, for display.
    pub fn create_container(&self, req: &CreateContainerRequest) -> Result<Phases, AgentError> {
        let reply: CreateResponse = self.call("CreateContainer", Some(RPC_TIMEOUT), req)?;
        Ok(guest_phases("guest: ", &reply.phases))
    }

    /// Has the guest run one throwaway container of its own, so a sandbox
    /// booted ahead of its tenant (the pool) meets its container warm.
    /// Only for a sandbox with no tenant yet. The guest's steps, for display.
    pub fn warm_up(&self) -> Result<Phases, AgentError> {
        let reply: CreateResponse =
            self.call("WarmUp", Some(RPC_TIMEOUT), &WarmUpRequest::default())?;
        Ok(guest_phases("guest warm-up: ", &reply.phases))
    }

    pub fn start_container(&self, id: &str) -> Result<u32, AgentError> {
        Ok(self.start_container_timed(id)?.0)
    }

    /// Starts a created container: its guest pid and the guest's steps.
    pub fn start_container_timed(&self, id: &str) -> Result<(u32, Phases), AgentError> {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        let reply: StartResponse = self.call("StartContainer", Some(RPC_TIMEOUT), &req)?;
        Ok((reply.pid, guest_phases("guest: ", &reply.phases)))
    }

    pub fn remove_container(&self, id: &str, force: bool) -> Result<(), AgentError> {
        let req = RemoveContainerRequest {
            container_id: id.into(),
            force,
            ..Default::default()
        };
        self.call::<_, Empty>("RemoveContainer", Some(RPC_TIMEOUT), &req)?;
        Ok(())
    }

    pub fn exec_process(&self, req: &ExecProcessRequest) -> Result<u32, AgentError> {
        Ok(self.exec_process_timed(req)?.0)
    }

    /// Starts an exec: its guest pid and the guest's steps.
    pub fn exec_process_timed(
        &self,
        req: &ExecProcessRequest,
    ) -> Result<(u32, Phases), AgentError> {
        let reply: StartResponse = self.call("ExecProcess", Some(RPC_TIMEOUT), req)?;
        Ok((reply.pid, guest_phases("guest: ", &reply.phases)))
    }

    /// Blocks until the process exits (no timeout: processes live long).
    pub fn wait_process(&self, id: &str, exec_id: &str) -> Result<WaitProcessResponse, AgentError> {
        let req = ProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.call("WaitProcess", None, &req)
    }

    pub fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let req = SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.call::<_, Empty>("SignalProcess", Some(RPC_TIMEOUT), &req)?;
        Ok(())
    }

    pub fn resize_tty(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        let req = ResizeTtyRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            rows,
            cols,
            ..Default::default()
        };
        self.call::<_, Empty>("ResizeTty", Some(RPC_TIMEOUT), &req)?;
        Ok(())
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = ProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.call::<_, Empty>("CloseStdin", Some(RPC_TIMEOUT), &req)?;
        Ok(())
    }

    pub fn pause(&self, id: &str) -> Result<(), AgentError> {
        self.call::<_, Empty>(
            "PauseContainer",
            Some(RPC_TIMEOUT),
            &ContainerRequest {
                container_id: id.into(),
                ..Default::default()
            },
        )?;
        Ok(())
    }

    pub fn resume(&self, id: &str) -> Result<(), AgentError> {
        self.call::<_, Empty>(
            "ResumeContainer",
            Some(RPC_TIMEOUT),
            &ContainerRequest {
                container_id: id.into(),
                ..Default::default()
            },
        )?;
        Ok(())
    }

    pub fn stats(&self, id: &str) -> Result<StatsResponse, AgentError> {
        self.call(
            "Stats",
            Some(RPC_TIMEOUT),
            &ContainerRequest {
                container_id: id.into(),
                ..Default::default()
            },
        )
    }

    pub fn list_processes(&self, id: &str) -> Result<Vec<ProcessInfo>, AgentError> {
        Ok(self
            .call::<_, ListProcessesResponse>(
                "ListProcesses",
                Some(RPC_TIMEOUT),
                &ContainerRequest {
                    container_id: id.into(),
                    ..Default::default()
                },
            )?
            .processes)
    }

    pub fn update_resources(&self, id: &str, resources_json: Vec<u8>) -> Result<(), AgentError> {
        let req = UpdateResourcesRequest {
            container_id: id.into(),
            resources_json,
            ..Default::default()
        };
        self.call::<_, Empty>("UpdateResources", Some(RPC_TIMEOUT), &req)?;
        Ok(())
    }

    /// Gives the container's network namespace in the guest the
    /// interfaces, addresses, routes and neighbours of `req`.
    pub fn update_network(
        &self,
        req: &husk_protocol::agent::UpdateNetworkRequest,
    ) -> Result<(), AgentError> {
        self.call::<_, Empty>("UpdateNetwork", Some(RPC_TIMEOUT), req)?;
        Ok(())
    }

    pub fn shutdown(&self) -> Result<(), AgentError> {
        self.call::<_, Empty>(
            "Shutdown",
            Some(SHUTDOWN_TIMEOUT),
            &ShutdownRequest::default(),
        )?;
        Ok(())
    }
}

/// How a process ended, as the host may act on it. Built only by
/// [`ProcessExit::from_guest`]: the guest's numbers are data, never a
/// signal the host raises as they come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// The exit status a shell would show: 0-255.
    pub code: i32,
    /// A signal that ends a process by default (so one the host may raise
    /// on a stand-in process, as runc's pid does), or 0.
    pub signal: i32,
}

impl ProcessExit {
    /// Decodes a guest's WaitProcess reply. A signal is kept only when it
    /// is in 1-64 and its default action ends a process: a stop signal
    /// (which would freeze the host process raising it), an ignored one
    /// (which would leave it running) or a number out of range becomes an
    /// exit code (128+n, capped at 255) instead. The code is capped to 0-255.
    pub fn from_guest(exit_code: i32, signal: u32) -> ProcessExit {
        if signal == 0 {
            return ProcessExit {
                code: exit_code.clamp(0, 255),
                signal: 0,
            };
        }
        let code = signal.saturating_add(128).min(255) as i32;
        match i32::try_from(signal) {
            Ok(n) if is_fatal_signal(n) => ProcessExit { code, signal: n },
            _ => ProcessExit { code, signal: 0 },
        }
    }
}

/// A string from the guest made fit for a terminal or a log line: control
/// characters (C0, DEL, C1 — escape sequences, bells, carriage returns)
/// become `?`, and at most `max_chars` characters are kept.
pub fn printable(guest: &str, max_chars: usize) -> String {
    let mut out: String = guest
        .chars()
        .take(max_chars)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if guest.chars().nth(max_chars).is_some() {
        out.push('…');
    }
    out
}

/// Signals 1-64 whose default action terminates the process.
pub fn is_fatal_signal(n: i32) -> bool {
    use libc::*;
    match n {
        SIGCHLD | SIGCONT | SIGSTOP | SIGTSTP | SIGTTIN | SIGTTOU | SIGURG | SIGWINCH => false,
        // 32 and 33 are glibc's own (NPTL) and never a process's exit.
        32 | 33 => false,
        1..=64 => true,
        _ => false,
    }
}

#[cfg(test)]
mod exit_tests {
    use super::ProcessExit as E;

    #[test]
    fn guest_strings_lose_their_control_characters() {
        assert_eq!(
            super::printable("sh -c \u{1b}]0;x\u{7}\u{1b}[2J\r\n\u{9b}1m", 100),
            "sh -c ?]0;x??[2J???1m"
        );
        assert_eq!(super::printable("abcdef", 3), "abc…");
        assert_eq!(super::printable("ünï", 3), "ünï");
    }

    #[test]
    fn agent_errors_are_bounded_and_printable() {
        use super::{AgentError, MAX_AGENT_MESSAGE};
        let huge = "\u{1b}]0;x\u{7}".repeat(1 << 20);
        let status = ttrpc::get_status(ttrpc::Code::INTERNAL, huge);
        let AgentError::Rpc {
            message: text,
            kind,
        } = AgentError::from(ttrpc::Error::RpcStatus(status))
        else {
            panic!("a status is an Rpc error");
        };
        assert_eq!(kind, super::GuestErrorKind::Internal);
        assert_eq!(text.chars().count(), MAX_AGENT_MESSAGE + 1);
        assert!(text.starts_with("?]0;x??]0;x?") && text.ends_with('…'));
        assert!(!text.chars().any(char::is_control));
        let dump = ttrpc::Error::Others(format!(
            "malformed packet \r\u{9b}{}",
            "9, ".repeat(1 << 20)
        ));
        match AgentError::from(dump) {
            AgentError::Rpc { message: t, kind } => assert!(
                kind == super::GuestErrorKind::Unknown
                    && t.starts_with("ttrpc err: malformed packet ??9, ")
                    && t.chars().count() == MAX_AGENT_MESSAGE + 1
            ),
            other => panic!("{other:?}"),
        }
        let timeout = crate::rpc::RpcError::Timeout(super::RPC_TIMEOUT);
        assert!(matches!(AgentError::from(timeout), AgentError::Timeout));
        // What the client finds wrong in a guest's frame is bounded too.
        let cut = crate::rpc::RpcError::Disconnected(format!("\u{1b}[2J{}", "x".repeat(1 << 20)));
        match AgentError::from(cut) {
            AgentError::Disconnected(t) => assert!(
                t.starts_with("?[2Jx") && t.chars().count() == MAX_AGENT_MESSAGE + 1,
                "{t}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            AgentError::Timeout.to_string(),
            "agent: no answer within 30s"
        );
    }

    #[test]
    fn guest_exit_signals_are_data() {
        assert_eq!(E::from_guest(3, 0), E { code: 3, signal: 0 });
        assert_eq!(E::from_guest(-7, 0), E { code: 0, signal: 0 });
        assert_eq!(
            E::from_guest(9999, 0),
            E {
                code: 255,
                signal: 0
            }
        );
        assert_eq!(
            E::from_guest(0, 9),
            E {
                code: 137,
                signal: 9
            }
        );
        assert_eq!(
            E::from_guest(0, 64),
            E {
                code: 192,
                signal: 64
            }
        );
        // A stop signal would stop the host process raising it.
        for stop in [libc::SIGSTOP, libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU] {
            assert_eq!(E::from_guest(0, stop as u32).signal, 0);
            assert_eq!(E::from_guest(0, stop as u32).code, 128 + stop);
        }
        for ignored in [
            libc::SIGCHLD,
            libc::SIGCONT,
            libc::SIGURG,
            libc::SIGWINCH,
            0,
        ] {
            assert!(!super::is_fatal_signal(ignored));
        }
        assert_eq!(
            E::from_guest(0, 999),
            E {
                code: 255,
                signal: 0
            }
        );
        assert_eq!(
            E::from_guest(0, u32::MAX),
            E {
                code: 255,
                signal: 0
            }
        );
        assert_eq!(
            E::from_guest(0, 65),
            E {
                code: 193,
                signal: 0
            }
        );
    }
}

#[cfg(test)]
mod connect_tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A CONNECT the guest answers only after the host gave up stays open
    /// until the answer: the backend's late `OK` is written, not refused
    /// (vhost-device-vsock unwraps that write), and the host closes the
    /// stream right after it.
    #[test]
    fn an_unanswered_connect_stays_open_for_the_late_answer() {
        let dir = std::env::temp_dir().join(format!("husk-park-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let backend = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut line = [0u8; 13];
            conn.read_exact(&mut line).unwrap();
            assert_eq!(&line, b"CONNECT 1025\n");
            std::thread::sleep(HANDSHAKE_TIMEOUT + Duration::from_millis(500));
            let late = conn.write_all(b"OK 7\n");
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut rest = Vec::new();
            let closed = conn.read_to_end(&mut rest);
            (late.map_err(|e| e.kind()), closed.map_err(|e| e.kind()))
        });
        let e = connect_port(&uds, 1025).unwrap_err();
        assert!(
            matches!(e, AgentError::Unanswered { port: 1025, .. }),
            "{e}"
        );
        let (late, closed) = backend.join().unwrap();
        assert_eq!(late, Ok(()), "the late answer found the host's side closed");
        assert_eq!(closed, Ok(0), "the parked stream was not closed after it");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod kind_tests {
    use super::*;
    use husk_protocol::agent_ttrpc::{create_agent, Agent};
    use std::sync::Arc;
    use ttrpc::proto::Any;
    use ttrpc::{Code, TtrpcContext};

    /// An agent whose RemoveContainer fails as its container id says: a
    /// kind's name sends that kind; the others send what a hostile guest
    /// could.
    struct FailingAgent;

    impl Agent for FailingAgent {
        fn remove_container(
            &self,
            _: &TtrpcContext,
            req: RemoveContainerRequest,
        ) -> ttrpc::Result<Empty> {
            let id = req.container_id.as_str();
            if let Some(kind) = GuestErrorKind::SENT.into_iter().find(|k| k.name() == id) {
                return Err(kind.rpc_error(format!("container {id}: refused")));
            }
            let mut status = ttrpc::get_status(Code::NOT_FOUND, "\u{1b}[2Jhostile");
            match id {
                "kind-garbage" | "kind-disagrees" | "kind-huge" => {
                    let mut any = Any::new();
                    any.type_url = husk_protocol::error::KIND_TYPE_URL.into();
                    any.value = match id {
                        "kind-garbage" => b"\xff\xfeadmin".to_vec(),
                        "kind-disagrees" => b"already-exists".to_vec(),
                        _ => vec![b'n'; 1 << 20],
                    };
                    status.details.push(any);
                }
                _ => unreachable!("unknown test case {id}"),
            }
            Err(ttrpc::Error::RpcStatus(status))
        }
    }

    /// Serves [`FailingAgent`] on a Unix socket and connects a client.
    fn serve() -> (ttrpc::Server, AgentClient, PathBuf) {
        let dir = std::env::temp_dir().join(format!("husk-kinds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let service = Arc::new(FailingAgent) as Arc<dyn Agent + Send + Sync>;
        let mut server = ttrpc::Server::new()
            .bind(&format!("unix://{}", sock.display()))
            .unwrap()
            .register_service(create_agent(service));
        server.start().unwrap();
        let stream = UnixStream::connect(&sock).unwrap();
        let client = AgentClient::over(stream, &sock).unwrap();
        (server, client, dir)
    }

    #[test]
    fn agent_error_kinds_cross_ttrpc_with_their_codes() {
        let (server, client, dir) = serve();
        for sent in GuestErrorKind::SENT {
            let e = client.remove_container(sent.name(), false).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Guest(sent), "{e}");
            assert_eq!(e.code(), sent.code(), "{e}");
            assert_eq!(e.to_string(), format!("agent: container {sent}: refused"));
        }
        for hostile in ["kind-garbage", "kind-disagrees", "kind-huge"] {
            let e = client.remove_container(hostile, false).unwrap_err();
            assert_eq!(
                e.kind(),
                ErrorKind::Guest(GuestErrorKind::Unknown),
                "{hostile}: {e}"
            );
            assert_eq!(e.code(), Code::UNKNOWN, "{hostile}");
            assert_eq!(e.to_string(), "agent: ?[2Jhostile", "{hostile}");
        }
        // A method the agent does not serve is no kind of its own.
        let e = client.health().unwrap_err();
        assert!(matches!(e, AgentError::Rpc { .. }), "{e}");
        drop(client);
        server.shutdown();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn host_side_failures_have_kinds_too() {
        let refused = AgentError::Refused { port: 1024 };
        assert_eq!(refused.kind(), ErrorKind::Unavailable);
        assert_eq!(refused.code(), Code::UNAVAILABLE);
        let not_ready = AgentError::NotReady(Duration::from_secs(1), "x".into());
        assert_eq!(not_ready.kind(), ErrorKind::NotReady);
        assert_eq!(AgentError::Timeout.code(), Code::DEADLINE_EXCEEDED);
        assert_eq!(
            AgentError::Aborted("gone".into()).kind(),
            ErrorKind::Unavailable
        );
        for broken in [
            ttrpc::Error::Eof,
            ttrpc::Error::RemoteClosed,
            ttrpc::Error::Socket("\u{1b}[2Jreset".into()),
        ] {
            let e = AgentError::from(broken);
            assert!(matches!(e, AgentError::Disconnected(_)), "{e}");
            assert_eq!(e.code(), Code::UNAVAILABLE);
            assert!(!e.to_string().chars().any(char::is_control), "{e}");
        }
    }
}

/// The steps a guest reported, bounded and cleaned (see `phases`).
fn guest_phases(prefix: &str, steps: &[husk_protocol::agent::Phase]) -> Phases {
    let mut p = Phases::default();
    p.push_guest(prefix, steps.iter().map(|s| (s.name.as_str(), s.ns)));
    p
}
