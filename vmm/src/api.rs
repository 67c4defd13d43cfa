//! Control socket: a Unix stream socket speaking newline-delimited JSON.
//!
//! Requests: `{"action":"status"|"pause"|"resume"|"shutdown"}`.
//! Replies (one line each): `{"ok":true,"state":"running"}` or
//! `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use thiserror::Error;

use crate::seccomp::ThreadKind;
use crate::vcpu::{RunState, VmControl};
use crate::vm::VmEvent;

/// Longest request line we accept.
const MAX_REQUEST: usize = 4096;

/// Errors of the API server.
#[derive(Debug, Error)]
pub enum ApiError {
    /// bind() failed.
    #[error("cannot create API socket {path}: {source}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Path exists and is not a socket.
    #[error("cannot create API socket {path}: a non-socket file is in the way")]
    NotASocket {
        /// Socket path.
        path: PathBuf,
    },
    /// Thread spawn failed.
    #[error("cannot start the API thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The API thread's seccomp filter cannot be built.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// What the API acts upon.
pub struct ApiContext {
    /// vCPU run state.
    pub control: Arc<VmControl>,
    /// Number of vCPUs (to wait for a complete pause).
    pub nr_vcpus: usize,
    /// Channel to the VMM main loop.
    pub events: Sender<VmEvent>,
}

/// `{"ok":false,"error":"<msg>"}` (keys in this order).
pub fn error_reply(msg: &str) -> String {
    format!("{{\"ok\":false,\"error\":{}}}", Value::from(msg))
}

/// Handle one request line; returns the reply (without newline).
pub fn handle_request(line: &str, ctx: &ApiContext) -> String {
    let reply = |state: RunState| json!({"ok": true, "state": state.as_str()}).to_string();
    let error = |msg: String| error_reply(&msg);
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return error(format!("invalid request: {e}")),
    };
    let Some(action) = req.get("action").and_then(Value::as_str) else {
        return error("request has no string \"action\"".into());
    };
    match action {
        "status" => reply(ctx.control.state()),
        "pause" => match ctx.control.state() {
            RunState::Stopping => error("the VM is stopping".into()),
            _ => {
                if ctx.control.pause(ctx.nr_vcpus, Duration::from_secs(5)) {
                    reply(RunState::Paused)
                } else {
                    error("vCPUs did not pause in time".into())
                }
            }
        },
        "resume" => match ctx.control.state() {
            RunState::Stopping => error("the VM is stopping".into()),
            _ => {
                ctx.control.set_state(RunState::Running);
                reply(RunState::Running)
            }
        },
        "shutdown" => {
            let _ = ctx.events.send(VmEvent::ApiShutdown);
            reply(RunState::Stopping)
        }
        other => error(format!("unknown action {other:?}")),
    }
}

fn serve_connection(stream: UnixStream, ctx: &ApiContext) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_line(&mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_REQUEST => {
                let _ = writeln!(writer, "{}", error_reply("request too long"));
                return;
            }
            Ok(_) => {}
        }
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let reply = handle_request(trimmed, ctx);
        if writeln!(writer, "{reply}").is_err() {
            return;
        }
    }
}

/// A bound API socket; the file is removed on drop (and by [`ApiServer::cleanup`]).
pub struct ApiServer {
    path: PathBuf,
    listener: Option<UnixListener>,
    removed: bool,
}

impl ApiServer {
    /// Bind the socket at `path` (a stale socket file there is replaced).
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ApiError::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            listener: Some(listener),
            removed: false,
        })
    }

    /// Socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serve requests on a background thread (one connection at a time),
    /// under the API seccomp filter when `seccomp` is set.
    pub fn start(&mut self, ctx: ApiContext, seccomp: bool) -> Result<(), ApiError> {
        let Some(listener) = self.listener.take() else {
            return Ok(());
        };
        let filter = if seccomp {
            Some(crate::seccomp::api_filter(listener.as_raw_fd()).map_err(ApiError::Seccomp)?)
        } else {
            None
        };
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Some(f) = filter {
                    if let Err(e) = crate::seccomp::apply(ThreadKind::Api, &f) {
                        log::error!("{e}; API disabled");
                        return;
                    }
                }
                for stream in listener.incoming() {
                    match stream {
                        Ok(s) => serve_connection(s, &ctx),
                        Err(e) => log::warn!("API accept failed: {e}"),
                    }
                }
            })
            .map_err(ApiError::Thread)?;
        Ok(())
    }

    /// Remove the socket file (once; later calls do nothing).
    pub fn cleanup(&mut self) {
        if !self.removed {
            self.removed = true;
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.cleanup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    fn ctx() -> (ApiContext, std::sync::mpsc::Receiver<VmEvent>) {
        let (tx, rx) = channel();
        (
            ApiContext {
                control: Arc::new(VmControl::new()),
                nr_vcpus: 0,
                events: tx,
            },
            rx,
        )
    }

    #[test]
    fn requests() {
        let (c, rx) = ctx();
        assert_eq!(
            handle_request(r#"{"action":"status"}"#, &c),
            r#"{"ok":true,"state":"running"}"#
        );
        assert_eq!(
            handle_request(r#"{"action":"pause"}"#, &c),
            r#"{"ok":true,"state":"paused"}"#
        );
        assert_eq!(
            handle_request(r#"{"action":"status"}"#, &c),
            r#"{"ok":true,"state":"paused"}"#
        );
        assert_eq!(
            handle_request(r#"{"action":"resume"}"#, &c),
            r#"{"ok":true,"state":"running"}"#
        );
        assert_eq!(
            handle_request(r#"{"action":"fly"}"#, &c),
            r#"{"ok":false,"error":"unknown action \"fly\""}"#
        );
        assert!(handle_request("not json", &c).contains(r#""ok":false"#));
        assert!(handle_request(r#"{"action":5}"#, &c).contains(r#""ok":false"#));
        assert!(handle_request(r#"[]"#, &c).contains(r#""ok":false"#));
        assert_eq!(
            handle_request(r#"{"action":"shutdown"}"#, &c),
            r#"{"ok":true,"state":"stopping"}"#
        );
        assert!(matches!(rx.try_recv(), Ok(VmEvent::ApiShutdown)));
    }

    #[test]
    fn socket_roundtrip_and_cleanup() {
        let dir = std::env::temp_dir().join(format!("husk-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        // A stale socket is replaced; a regular file is not.
        drop(UnixListener::bind(&path).unwrap());
        let (c, _rx) = ctx();
        let mut server = ApiServer::bind(&path).unwrap();
        // The API thread serves under its seccomp filter, as in husk-vmm.
        server.start(c, true).unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"action\":\"status\"}\n\n{\"action\":\"nope\"}\n")
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert_eq!(l, "{\"ok\":true,\"state\":\"running\"}\n");
        l.clear();
        r.read_line(&mut l).unwrap();
        assert!(l.contains("\"ok\":false"), "{l}");
        // Oversized request is refused, connection closed.
        s.write_all(&vec![b'x'; MAX_REQUEST + 10]).unwrap();
        l.clear();
        r.read_line(&mut l).unwrap();
        assert!(l.contains("too long"), "{l}");
        drop(server);
        assert!(!path.exists());
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            ApiServer::bind(&path),
            Err(ApiError::NotASocket { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
