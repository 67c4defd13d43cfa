//! Pid namespaces: entered by the spawning thread around the fork (a pid
//! namespace applies to the caller's children only), and the holder that is
//! PID 1 of a new one.

use husk_agent::plan::PidNs;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Points this thread's pid namespace for children at the container's, so
/// the next fork lands there (and is its PID 1 when the namespace is new);
/// returns this thread's own namespace to return to after the fork. Only
/// the calling thread is affected, and it creates no threads in between.
///
/// `made` is a new pid namespace the user namespace helper made (owned by
/// the container's user namespace), entered instead of unsharing one.
pub fn enter(ns: &PidNs, made: Option<&std::ffi::CStr>) -> std::io::Result<Option<OwnedFd>> {
    use std::os::fd::AsFd;
    if matches!(ns, PidNs::Inherit) {
        return Ok(None);
    }
    let own = OwnedFd::from(File::open("/proc/thread-self/ns/pid")?);
    let join = match ns {
        PidNs::New => made,
        PidNs::Join(path) => Some(path.as_c_str()),
        PidNs::Inherit => None,
    };
    match join {
        None => {
            // SAFETY: unshare of the pid namespace for children only.
            if unsafe { libc::unshare(libc::CLONE_NEWPID) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Some(path) => {
            // SAFETY: open of a prepared CString path.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: fd was just opened and is owned here.
            let target = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: setns on an fd we own.
            if unsafe { libc::setns(target.as_fd().as_raw_fd(), libc::CLONE_NEWPID) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(Some(own))
}

/// Forks the init of a new pid namespace (the calling thread's namespace
/// for children must already be the new one): a process that only reaps
/// orphans of the namespace, as the `pause` process of a pod does. The
/// container's process is forked next, as PID 2: a direct child of the
/// agent that reaps it and reports its status, and an ordinary process for
/// signals (a namespace's PID 1 ignores every signal it has no handler for,
/// which would make `kill TERM` of a plain `sleep` a no-op). Killing the
/// holder ends everything left in the namespace.
pub fn fork_holder() -> std::io::Result<i32> {
    // SAFETY: fork; the child makes only raw syscalls and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the forked child.
        unsafe { holder_main() }
    }
    Ok(pid)
}

/// The body of a pid namespace holder (see `fork_holder`; the user
/// namespace helper forks one too).
///
/// # Safety
/// Only in a freshly forked child.
pub unsafe fn holder_main() -> ! {
    // SAFETY: raw syscalls only. No fds of the agent stay open in it
    // (streams must see EOF when their processes end).
    unsafe {
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        libc::prctl(libc::PR_SET_NAME, c"husk-pidns-init".as_ptr());
        // Woken by SIGCHLD, kept blocked so that it stays pending (a
        // namespace's init would otherwise discard it) and is taken with
        // rt_sigtimedwait; a SIGCHLD that comes while reaping is still
        // pending at the next wait.
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &chld, std::ptr::null_mut());
        loop {
            let mut status = 0;
            while libc::waitpid(-1, &mut status, libc::WNOHANG) > 0 {}
            // The kernel's sigset is 8 bytes (64 signals).
            libc::syscall(
                libc::SYS_rt_sigtimedwait,
                &chld as *const libc::sigset_t,
                std::ptr::null_mut::<libc::siginfo_t>(),
                std::ptr::null::<libc::timespec>(),
                8usize,
            );
        }
    }
}

/// Kills a pid namespace holder. A holder only dies of SIGKILL from the
/// agent, so its pid is still its own.
pub fn kill_holder(holder: i32) {
    // SAFETY: kill(2) of a holder that only dies of this.
    unsafe { libc::kill(holder, libc::SIGKILL) };
}
