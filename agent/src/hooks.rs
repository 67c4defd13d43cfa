//! The OCI hooks that run inside the guest: `createContainer` and
//! `startContainer`, in the container's namespaces (the host runtime runs
//! `createRuntime`, `prestart`, `poststart` and `poststop` on the host).
//!
//! The agent builds a container's namespaces and rootfs when the container
//! is started (a `created` husk container is a booted VM with a checked,
//! precomputed launch plan, not yet a guest process). So both hook lists
//! run in the forked child at `start`, once its namespaces, rootfs, hostname
//! and cgroup are in place and before capabilities, the user and seccomp
//! are applied: first `createContainer`, then `startContainer`, then the
//! process is exec'd. Paths resolve in the container's rootfs. A hook that
//! fails (non-zero exit, a signal, its timeout, or a path that cannot be
//! exec'd) fails `start` with a message naming it, and the container does
//! not run.
//!
//! Each hook gets the container's state JSON on stdin, with `pid` the
//! container process as seen in its own pid namespace. The child may not
//! allocate, so everything but the pid is prepared before the fork.

use oci_spec::runtime::{Hook, Spec};
use std::ffi::CString;
use std::os::raw::c_char;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("config.json: hooks.{list}[{index}]: {reason}")]
    Invalid {
        list: &'static str,
        index: usize,
        reason: String,
    },
}

/// A NULL-terminated array of pointers into CStrings owned next to it.
struct CStringArray {
    _strings: Vec<CString>,
    pointers: Vec<*const c_char>,
}

// SAFETY: the pointers point into `_strings`, which the array owns and never
// changes after construction (moving a CString does not move its heap
// buffer); the array is read-only once built.
unsafe impl Send for CStringArray {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for CStringArray {}

impl CStringArray {
    fn new(strings: Vec<CString>) -> Self {
        let mut pointers: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        pointers.push(std::ptr::null());
        CStringArray {
            _strings: strings,
            pointers,
        }
    }

    fn as_ptr(&self) -> *const *const c_char {
        self.pointers.as_ptr()
    }
}

/// One hook, ready for execve.
pub struct GuestHook {
    path: CString,
    argv: CStringArray,
    envp: CStringArray,
    /// Seconds, 0 for none.
    timeout_secs: u32,
    /// `hooks.startContainer[0] (/bin/check)`, for the failure message.
    label: CString,
}

/// The in-guest hooks of a container and the state JSON they read.
pub struct GuestHooks {
    create_container: Vec<GuestHook>,
    start_container: Vec<GuestHook>,
    /// State JSON up to the pid value, for `createContainer` (status
    /// `creating`) and `startContainer` (status `created`).
    state_creating: Vec<u8>,
    state_created: Vec<u8>,
}

fn hook_list(list: &'static str, hooks: Option<&Vec<Hook>>) -> Result<Vec<GuestHook>, HookError> {
    let invalid = |index, reason: &str| HookError::Invalid {
        list,
        index,
        reason: reason.to_string(),
    };
    let mut out = Vec::new();
    for (index, hook) in hooks.map(Vec::as_slice).unwrap_or(&[]).iter().enumerate() {
        let path = hook.path();
        if !path.is_absolute() {
            return Err(invalid(
                index,
                &format!("path {} is not absolute", path.display()),
            ));
        }
        let cstring = |s: &str| CString::new(s).map_err(|_| invalid(index, "contains a NUL byte"));
        let path_c = cstring(&path.display().to_string())?;
        let argv = match hook.args() {
            Some(args) if !args.is_empty() => {
                args.iter().map(|a| cstring(a)).collect::<Result<_, _>>()?
            }
            _ => vec![path_c.clone()],
        };
        let envp = hook
            .env()
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .map(|e| cstring(e))
            .collect::<Result<_, _>>()?;
        let timeout_secs = match hook.timeout() {
            None => 0,
            Some(t) if t > 0 => t as u32,
            Some(t) => return Err(invalid(index, &format!("timeout {t} is not positive"))),
        };
        out.push(GuestHook {
            label: cstring(&format!("hooks.{list}[{index}] ({})", path.display()))?,
            path: path_c,
            argv: CStringArray::new(argv),
            envp: CStringArray::new(envp),
            timeout_secs,
        });
    }
    Ok(out)
}

/// The state JSON of the container, without its closing `pid` value and
/// brace: `{..., "pid": ` — the child appends its pid and `}`.
fn state_head(spec: &Spec, id: &str, status: &str, bundle: &str) -> Vec<u8> {
    let mut state = serde_json::json!({
        "ociVersion": spec.version(),
        "id": id,
        "status": status,
        "bundle": bundle,
    });
    if let Some(a) = spec.annotations() {
        state["annotations"] = serde_json::json!(a);
    }
    let mut text = state.to_string();
    // Drop the closing brace; the object has at least one member.
    text.pop();
    text.push_str(",\"pid\":");
    text.into_bytes()
}

/// The in-guest hooks of `spec`, or None when it has none.
pub fn plan(spec: &Spec, id: &str, bundle: &str) -> Result<Option<GuestHooks>, HookError> {
    let hooks = match spec.hooks() {
        Some(h) => h,
        None => return Ok(None),
    };
    let create_container = hook_list("createContainer", hooks.create_container().as_ref())?;
    let start_container = hook_list("startContainer", hooks.start_container().as_ref())?;
    if create_container.is_empty() && start_container.is_empty() {
        return Ok(None);
    }
    Ok(Some(GuestHooks {
        create_container,
        start_container,
        state_creating: state_head(spec, id, "creating", bundle),
        state_created: state_head(spec, id, "created", bundle),
    }))
}

/// Writes `n` in decimal into `buf`, returning the digits.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

/// write(2) of all of `bytes`, for the child (no allocation).
///
/// # Safety
/// `fd` must be an open fd.
unsafe fn write_all(fd: libc::c_int, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        // SAFETY: a valid buffer; the caller guarantees the fd.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return false;
        }
        bytes = &bytes[n as usize..];
    }
    true
}

/// Reports why a hook failed on the diagnostics pipe: the label and what
/// happened (`exited with status 3`).
///
/// # Safety
/// Only between fork and exec; `diag` is the child's diagnostics fd.
unsafe fn report(
    diag: libc::c_int,
    hook: &GuestHook,
    what: &[u8],
    number: Option<u64>,
    suffix: &[u8],
) {
    let mut digits = [0u8; 20];
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        write_all(diag, hook.label.as_bytes());
        write_all(diag, b": ");
        write_all(diag, what);
        if let Some(n) = number {
            write_all(diag, decimal(n, &mut digits));
        }
        write_all(diag, suffix);
    }
}

/// Runs one hook with the state on its stdin and waits for it, up to its
/// timeout. Returns false (after reporting on `diag`) when it failed.
///
/// # Safety
/// Only between fork and exec (raw syscalls, no allocation).
unsafe fn run_one(hook: &GuestHook, state_head: &[u8], diag: libc::c_int) -> bool {
    let mut pipe = [0; 2];
    // SAFETY: pipe2 into a two-int array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        // SAFETY: forwarded.
        unsafe { report(diag, hook, b"cannot create its stdin pipe", None, b"") };
        return false;
    }
    let [read_end, write_end] = pipe;
    // SAFETY: fork in the (single-threaded) forked child.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: in the hook's process: stdin from the pipe, then exec;
        // _exit(127) when exec fails, as a shell reports "not found".
        unsafe {
            libc::dup2(read_end, 0);
            libc::execve(hook.path.as_ptr(), hook.argv.as_ptr(), hook.envp.as_ptr());
            libc::_exit(127);
        }
    }
    // SAFETY: closing our copy of the read end.
    unsafe { libc::close(read_end) };
    if pid < 0 {
        // SAFETY: forwarded; closing the write end we own.
        unsafe {
            libc::close(write_end);
            report(diag, hook, b"cannot fork", None, b"");
        }
        return false;
    }
    let mut digits = [0u8; 20];
    // SAFETY: getpid cannot fail; writes to the pipe we own. SIGPIPE is
    // ignored around the write: a hook that does not read its stdin makes it
    // fail with EPIPE, which must not kill this child.
    unsafe {
        let own = libc::getpid() as u64;
        let old = libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        write_all(write_end, state_head);
        write_all(write_end, decimal(own, &mut digits));
        write_all(write_end, b"}");
        libc::close(write_end);
        libc::signal(libc::SIGPIPE, old);
    }
    // Wait for the exit on the hook's pidfd, up to its timeout: poll(2),
    // the one wait with a timeout this child (no threads, no timers, raw
    // syscalls only) has.
    let mut status = 0;
    let waited = wait_exit_or_timeout(pid, hook.timeout_secs);
    if waited != Waited::Exited {
        // SAFETY: kill and reap our own child, then report.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            while libc::waitpid(pid, &mut status, 0) < 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
            {}
            if waited == Waited::TimedOut {
                report(
                    diag,
                    hook,
                    b"killed after its timeout of ",
                    Some(u64::from(hook.timeout_secs)),
                    b"s",
                );
            } else {
                report(diag, hook, b"cannot wait for it", None, b"");
            }
        }
        return false;
    }
    loop {
        // SAFETY: waitpid of our own child, which has exited.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: forwarded.
            unsafe { report(diag, hook, b"cannot wait for it", None, b"") };
            return false;
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        return true;
    }
    // SAFETY: forwarded.
    unsafe {
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 127 {
            report(diag, hook, b"could not be run (exit status 127)", None, b"");
        } else if libc::WIFEXITED(status) {
            report(
                diag,
                hook,
                b"exited with status ",
                Some(libc::WEXITSTATUS(status) as u64),
                b"",
            );
        } else {
            report(
                diag,
                hook,
                b"killed by signal ",
                Some(libc::WTERMSIG(status) as u64),
                b"",
            );
        }
    }
    false
}

/// Runs the `createContainer` hooks (at `create`); the first failure ends
/// the child's set-up with an error (reported on `diag`).
///
/// # Safety
/// Only between fork and exec, once the container's namespaces and rootfs
/// are in place.
pub unsafe fn run_create(hooks: &GuestHooks, diag: libc::c_int) -> std::io::Result<()> {
    // SAFETY: forwarded from the caller's contract.
    unsafe { run_list(&hooks.create_container, &hooks.state_creating, diag) }
}

/// Runs the `startContainer` hooks (at `start`, before exec).
///
/// # Safety
/// As [`run_create`].
pub unsafe fn run_start(hooks: &GuestHooks, diag: libc::c_int) -> std::io::Result<()> {
    // SAFETY: forwarded from the caller's contract.
    unsafe { run_list(&hooks.start_container, &hooks.state_created, diag) }
}

/// # Safety
/// As [`run_create`].
unsafe fn run_list(list: &[GuestHook], head: &[u8], diag: libc::c_int) -> std::io::Result<()> {
    for hook in list {
        // SAFETY: forwarded from the caller's contract.
        if !unsafe { run_one(hook, head, diag) } {
            return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waited {
    /// Exited, not yet reaped.
    Exited,
    TimedOut,
    /// No pidfd, or poll failed.
    Failed,
}

/// Waits for child `pid` to exit, up to `timeout_secs` (0: no timeout).
/// Async-signal-safe: pidfd_open, poll, clock_gettime and close, no
/// allocation.
fn wait_exit_or_timeout(pid: libc::pid_t, timeout_secs: u32) -> Waited {
    // SAFETY: pidfd_open of our own child, not yet reaped.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if pidfd < 0 {
        return Waited::Failed;
    }
    let pidfd = pidfd as i32;
    let now_ms = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime into a valid timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
    };
    let deadline = now_ms() + i64::from(timeout_secs) * 1000;
    let exited = loop {
        let wait_ms = if timeout_secs == 0 {
            -1
        } else {
            (deadline - now_ms()).clamp(0, i64::from(i32::MAX)) as i32
        };
        let mut pfd = libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll of one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
        if r > 0 {
            break Waited::Exited;
        }
        if r == 0 {
            break Waited::TimedOut;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break Waited::Failed;
        }
    };
    // SAFETY: closing the pidfd opened above.
    unsafe { libc::close(pidfd) };
    exited
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with_hooks(hooks: serde_json::Value) -> Spec {
        let mut v = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "annotations": {"a": "b"},
        });
        v["hooks"] = hooks;
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_hook_wait_ends_at_the_exit_or_the_timeout() {
        let reap = |c: &mut std::process::Child| c.wait().unwrap();
        let mut quick = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        assert_eq!(wait_exit_or_timeout(quick.id() as i32, 30), Waited::Exited);
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
        assert_eq!(reap(&mut quick).code(), Some(3));
        let mut slow = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30"])
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        assert_eq!(wait_exit_or_timeout(slow.id() as i32, 1), Waited::TimedOut);
        assert!(t.elapsed() >= std::time::Duration::from_secs(1));
        slow.kill().unwrap();
        reap(&mut slow);
        // No such child: no pidfd.
        assert_eq!(wait_exit_or_timeout(i32::MAX, 1), Waited::Failed);
    }

    #[test]
    fn state_head_completes_to_valid_state() {
        let spec = spec_with_hooks(serde_json::json!({
            "startContainer": [{"path": "/bin/true"}]
        }));
        let hooks = plan(&spec, "c1", "/b").unwrap().unwrap();
        let mut digits = [0u8; 20];
        let mut text = hooks.state_created.clone();
        text.extend_from_slice(decimal(42, &mut digits));
        text.push(b'}');
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(v["pid"], 42);
        assert_eq!(v["status"], "created");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["bundle"], "/b");
        assert_eq!(v["annotations"]["a"], "b");
        assert_eq!(hooks.start_container.len(), 1);
        assert!(hooks.create_container.is_empty());
    }

    #[test]
    fn decimal_digits() {
        let mut d = [0u8; 20];
        assert_eq!(decimal(0, &mut d), b"0");
        assert_eq!(decimal(1234567, &mut d), b"1234567");
        assert_eq!(decimal(u64::MAX, &mut d), b"18446744073709551615");
    }

    #[test]
    fn bad_hooks_are_named() {
        for (hooks, expect) in [
            (
                serde_json::json!({"createContainer": [{"path": "bin/x"}]}),
                "hooks.createContainer[0]: path bin/x is not absolute",
            ),
            (
                serde_json::json!({"startContainer": [{"path": "/x"}, {"path": "/y", "timeout": 0}]}),
                "hooks.startContainer[1]: timeout 0 is not positive",
            ),
        ] {
            let err = plan(&spec_with_hooks(hooks), "c", "/b").err().unwrap();
            assert_eq!(err.to_string(), format!("config.json: {expect}"));
        }
        // Host-side hooks only: nothing to run in the guest.
        let spec = spec_with_hooks(serde_json::json!({"poststop": [{"path": "/x"}]}));
        assert!(plan(&spec, "c", "/b").unwrap().is_none());
    }
}
