//! seccomp-bpf allow-lists for the VMM threads (vCPUs and the API server).
//!
//! Filters are per thread (no TSYNC): the main thread keeps its freedom to
//! clean up (unlink the API socket) after the guest stops. A blocked syscall
//! raises SIGSYS; `install_sigsys_handler` turns it into the one-line failure.

use std::collections::BTreeMap;
use std::convert::TryInto;
use std::ffi::CString;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};
use thiserror::Error;

/// Errors building filters.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// seccompiler rejected the rules.
    #[error("cannot build the {thread} seccomp filter: {reason}")]
    Build {
        /// Thread kind.
        thread: &'static str,
        /// Why.
        reason: String,
    },
}

/// Syscalls any Rust thread of ours needs (allocation, locks, logging, exit).
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_rseq,
];

/// vCPU threads additionally run KVM ioctls, send vhost-user messages
/// (with fds) on device activation, and read /proc for nothing at all.
const VCPU: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_fcntl,
    libc::SYS_lseek,
    libc::SYS_fsync,
];

/// The API thread accepts connections and reads/writes JSON lines.
const API: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
];

fn build(thread: &'static str, extra: &[i64]) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in COMMON.iter().chain(extra) {
        rules.insert(*nr, Vec::new());
    }
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| SeccompError::Build {
            thread,
            reason: format!("{e:?}"),
        })?;
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
        .map_err(|e| SeccompError::Build {
            thread,
            reason: e.to_string(),
        })?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build {
            thread,
            reason: e.to_string(),
        })
}

/// Filter for vCPU threads.
pub fn vcpu_filter() -> Result<BpfProgram, SeccompError> {
    build("vCPU", VCPU)
}

/// Filter for the API server thread.
pub fn api_filter() -> Result<BpfProgram, SeccompError> {
    build("API", API)
}

static SIGSYS_UNLINK: OnceLock<Option<CString>> = OnceLock::new();

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe calls here.
    let msg =
        b"husk-vmm: seccomp blocked a system call in a VMM thread (use --no-seccomp to debug)\n";
    if let Some(Some(path)) = SIGSYS_UNLINK.get() {
        // SAFETY: `path` is a valid NUL-terminated string that lives for the
        // whole program (static OnceLock).
        unsafe { libc::unlink(path.as_ptr()) };
    }
    let _ = info;
    // SAFETY: writing a static buffer to fd 2 and exiting are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(1);
    }
}

/// Make SIGSYS print the one-line failure, remove `cleanup` and exit 1.
pub fn install_sigsys_handler(cleanup: Option<&std::path::Path>) -> Result<(), std::io::Error> {
    use std::os::unix::ffi::OsStrExt;
    let _ = SIGSYS_UNLINK.set(cleanup.and_then(|p| CString::new(p.as_os_str().as_bytes()).ok()));
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_build() {
        assert!(!vcpu_filter().unwrap().is_empty());
        assert!(!api_filter().unwrap().is_empty());
    }

    #[test]
    fn filter_allows_listed_and_traps_others() {
        let f = vcpu_filter().unwrap();
        // SAFETY: the child only makes raw syscalls and exits with _exit; it
        // never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(&f).is_err() {
                // SAFETY: _exit is always safe to call.
                unsafe { libc::_exit(2) };
            }
            // SAFETY: plain syscalls with valid arguments.
            unsafe {
                libc::getpid();
                // socket(2) is not on the vCPU list: SIGSYS kills us here.
                libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFSIGNALED(status), "child status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
