//! seccomp-bpf allow-lists, one per husk-vmm thread kind.
//!
//! Every thread of husk-vmm runs under a filter of its own once everything
//! the process needs is open (guest memory, KVM VM and vCPUs, vhost-user
//! connections, console, API socket), and before the guest's first
//! instruction:
//!
//! * the API thread installs its filter before its first `accept`;
//! * each vCPU thread installs its filter, then waits at the start gate
//!   ([`crate::vcpu::StartGate`]);
//! * the main thread installs its filter last, because a thread inherits the
//!   filters of the thread that creates it (the vCPU and API threads must not
//!   carry the main thread's list on top of their own), and only then opens
//!   the gate.
//!
//! Filters are per thread (no TSYNC), so each thread kind gets only what it
//! does. Arguments are checked where the check is cheap and exact:
//!
//! * `sendmsg` / `recvmsg`: vCPU threads only, on the vhost-user backend
//!   sockets only.
//! * `ioctl`: vCPU threads only, only on their own vCPU fd and only with the
//!   two requests the run loop issues (`KVM_RUN`, `KVM_GET_REGS`). The request
//!   is compared on its low 32 bits: the kernel's ioctl takes an
//!   `unsigned int cmd`, so the upper half of the register is never looked at.
//!   The main and API threads issue no ioctl at all.
//! * `mmap` / `mprotect`: never with `PROT_EXEC` (nothing maps code after
//!   start-up).
//! * `tgkill`: only to threads of this process, only with the vCPU kick
//!   signal, `SIGABRT` (abort on panic) and `SIGSYS` (a trapped thread
//!   handing the exit to the main thread).
//! * API thread: `accept4` only on the API listener, `fcntl` only
//!   `F_DUPFD_CLOEXEC` (cloning the connection for the reply writer).
//!
//! No filtered thread may open, create, connect or execute anything. The main
//! thread may `unlink` (removing the API socket when the VM ends); seccomp
//! cannot see a path, and under the runtime's jail only the sandbox's own
//! directory is visible to the process.
//!
//! A blocked call raises SIGSYS. [`install_sigsys_handler`] turns it into one
//! `husk-vmm: seccomp blocked system call <nr> in the <kind> thread` line and
//! exit status 1; the main thread removes the API socket first (a trapped
//! vCPU or API thread hands the exit to it, since only the main thread's
//! filter allows `unlink`).

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::convert::TryInto;
use std::ffi::CString;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

/// The kinds of husk-vmm thread, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: waits for the vCPUs, stops them, cleans up.
    Main,
    /// A vCPU thread: KVM_RUN and the device emulation behind its exits.
    Vcpu,
    /// The API server thread.
    Api,
    /// The data path thread of a virtio-net device.
    Net,
}

impl ThreadKind {
    /// Name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Vcpu => "vCPU",
            Self::Api => "API",
            Self::Net => "virtio-net",
        }
    }
}

/// Errors building or installing filters.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// seccompiler rejected the rules.
    #[error("cannot build the {thread} thread's seccomp filter: {reason}")]
    Build {
        /// Thread kind.
        thread: &'static str,
        /// Why.
        reason: String,
    },
    /// The kernel refused the filter.
    #[error("cannot install the {thread} thread's seccomp filter: {reason}")]
    Apply {
        /// Thread kind.
        thread: &'static str,
        /// Why.
        reason: String,
    },
}

/// The KVM request numbers the vCPU run loop issues, built like kvm-ioctls
/// builds them (it keeps its own private): `KVMIO` and the argument size come
/// from kvm-bindings, the direction from vmm-sys-util's `_IOC` encoding.
mod kvm_requests {
    use kvm_bindings::{kvm_regs, KVMIO};
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr};

    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
}

/// What every thread of ours does: read/write its fds, allocate, lock, sleep,
/// take and return from signals, exit. mmap, mprotect and tgkill are added
/// with argument checks by [`AllowList::new`].
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
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
];

/// Rules of one thread kind: syscalls allowed outright and syscalls allowed
/// when one of their rules (a conjunction of argument checks) holds.
struct AllowList {
    thread: ThreadKind,
    unconditional: BTreeSet<i64>,
    conditional: BTreeMap<i64, Vec<SeccompRule>>,
}

impl AllowList {
    /// The common part: [`COMMON`], mmap/mprotect without `PROT_EXEC`, and
    /// tgkill within this process with our three signals.
    fn new(thread: ThreadKind) -> Result<Self, SeccompError> {
        let mut list = Self {
            thread,
            unconditional: BTreeSet::new(),
            conditional: BTreeMap::new(),
        };
        for nr in COMMON {
            list.allow(*nr);
        }
        let no_exec = SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64);
        list.allow_if(libc::SYS_mmap, &[(2, no_exec.clone(), 0)])?;
        list.allow_if(libc::SYS_mprotect, &[(2, no_exec, 0)])?;
        // SAFETY: getpid has no preconditions and cannot fail.
        let pid = unsafe { libc::getpid() };
        for signal in [crate::vcpu::kick_signal(), libc::SIGABRT, libc::SIGSYS] {
            list.allow_if(
                libc::SYS_tgkill,
                &[
                    (0, SeccompCmpOp::Eq, u64::from(pid.unsigned_abs())),
                    (2, SeccompCmpOp::Eq, u64::from(signal.unsigned_abs())),
                ],
            )?;
        }
        Ok(list)
    }

    fn error(&self, reason: impl ToString) -> SeccompError {
        SeccompError::Build {
            thread: self.thread.name(),
            reason: reason.to_string(),
        }
    }

    /// Allow `nr` whatever its arguments.
    fn allow(&mut self, nr: i64) {
        self.unconditional.insert(nr);
    }

    /// Allow `nr` when every `(argument index, operator, value)` holds (one
    /// rule; several calls for the same `nr` are alternatives). Arguments are
    /// compared on their low 32 bits: every argument checked here is an
    /// `int` or `unsigned int` for the kernel.
    fn allow_if(
        &mut self,
        nr: i64,
        checks: &[(u8, SeccompCmpOp, u64)],
    ) -> Result<(), SeccompError> {
        let conditions = checks
            .iter()
            .map(|(arg, op, value)| {
                SeccompCondition::new(*arg, SeccompCmpArgLen::Dword, op.clone(), *value)
                    .map_err(|e| self.error(e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let rule = SeccompRule::new(conditions).map_err(|e| self.error(e))?;
        self.conditional.entry(nr).or_default().push(rule);
        Ok(())
    }

    /// Compile to BPF; anything not listed raises SIGSYS.
    fn build(self) -> Result<BpfProgram, SeccompError> {
        // An unconditional entry would silently void the argument checks.
        if let Some(nr) = self
            .conditional
            .keys()
            .find(|nr| self.unconditional.contains(nr))
        {
            return Err(self.error(format!(
                "system call {nr} is allowed both outright and with argument checks"
            )));
        }
        let arch: TargetArch = std::env::consts::ARCH
            .try_into()
            .map_err(|e| self.error(format!("{e:?}")))?;
        let thread = self.thread;
        let error = |reason: String| SeccompError::Build {
            thread: thread.name(),
            reason,
        };
        let mut rules = self.conditional;
        for nr in self.unconditional {
            rules.insert(nr, Vec::new());
        }
        let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch)
            .map_err(|e| error(e.to_string()))?;
        filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| error(e.to_string()))
    }
}

/// A file descriptor as the filter compares it.
fn fd_arg(thread: ThreadKind, fd: RawFd) -> Result<u64, SeccompError> {
    u32::try_from(fd)
        .map(u64::from)
        .map_err(|_| SeccompError::Build {
            thread: thread.name(),
            reason: format!("invalid file descriptor {fd}"),
        })
}

/// Filter of the main thread once the vCPUs run: wait for them, kick and
/// join them, remove the API socket, print the outcome, exit.
pub fn main_filter() -> Result<BpfProgram, SeccompError> {
    let mut list = AllowList::new(ThreadKind::Main)?;
    list.allow(libc::SYS_unlink);
    list.build()
}

/// Filter of the vCPU thread owning `vcpu_fd`: KVM_RUN and KVM_GET_REGS on
/// that fd, and the vhost-user messages (with fds) a guest's device
/// activation or reset sends from the MMIO exit, on the `backend_fds`
/// (the vhost-user sockets) only.
pub fn vcpu_filter(vcpu_fd: RawFd, backend_fds: &[RawFd]) -> Result<BpfProgram, SeccompError> {
    let thread = ThreadKind::Vcpu;
    let mut list = AllowList::new(thread)?;
    for backend in backend_fds {
        let backend = fd_arg(thread, *backend)?;
        for nr in [libc::SYS_sendmsg, libc::SYS_recvmsg] {
            list.allow_if(nr, &[(0, SeccompCmpOp::Eq, backend)])?;
        }
    }
    let fd = fd_arg(thread, vcpu_fd)?;
    for request in [kvm_requests::KVM_RUN(), kvm_requests::KVM_GET_REGS()] {
        list.allow_if(
            libc::SYS_ioctl,
            &[(0, SeccompCmpOp::Eq, fd), (1, SeccompCmpOp::Eq, request)],
        )?;
    }
    list.build()
}

/// Filter of a virtio-net data path thread waiting on `epoll_fd`: wait
/// for its tap and eventfds, read and write them (in [`COMMON`]), nothing
/// else. Guest memory is already mapped; the tap was set up before.
pub fn net_filter(epoll_fd: RawFd) -> Result<BpfProgram, SeccompError> {
    let thread = ThreadKind::Net;
    let mut list = AllowList::new(thread)?;
    let fd = fd_arg(thread, epoll_fd)?;
    #[cfg(target_arch = "x86_64")]
    list.allow_if(libc::SYS_epoll_wait, &[(0, SeccompCmpOp::Eq, fd)])?;
    list.allow_if(libc::SYS_epoll_pwait, &[(0, SeccompCmpOp::Eq, fd)])?;
    list.build()
}

/// Filter of the API thread serving `listener_fd`: accept, read and write
/// JSON lines, clone the connection for the writer.
pub fn api_filter(listener_fd: RawFd) -> Result<BpfProgram, SeccompError> {
    let thread = ThreadKind::Api;
    let mut list = AllowList::new(thread)?;
    let fd = fd_arg(thread, listener_fd)?;
    list.allow_if(libc::SYS_accept4, &[(0, SeccompCmpOp::Eq, fd)])?;
    list.allow(libc::SYS_recvfrom);
    list.allow(libc::SYS_sendto);
    list.allow_if(
        libc::SYS_fcntl,
        &[(1, SeccompCmpOp::Eq, libc::F_DUPFD_CLOEXEC as u64)],
    )?;
    list.build()
}

thread_local! {
    /// Kind of the filter this thread runs under, for the SIGSYS line.
    static FILTERED_AS: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Install `filter` on the calling thread (and set no_new_privs, which
/// seccomp requires of an unprivileged process).
///
/// Before that, heap trimming is turned off for the whole process: the first
/// time glibc shrinks a thread's heap it opens
/// /proc/sys/vm/overcommit_memory, which no filter allows, so a thread that
/// freed a few hundred KiB would die of SIGSYS. husk-vmm's own heap is small
/// (guest RAM is a separate mapping); freed memory stays in the allocator.
pub fn apply(kind: ThreadKind, filter: &BpfProgram) -> Result<(), SeccompError> {
    // SAFETY: mallopt only changes an allocator tunable; c_int::MAX is above
    // any heap a thread arena can have (64 MiB), so no trim ever happens.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) };
    FILTERED_AS.with(|k| k.set(Some(kind)));
    seccompiler::apply_filter(filter).map_err(|e| {
        FILTERED_AS.with(|k| k.set(None));
        SeccompError::Apply {
            thread: kind.name(),
            reason: e.to_string(),
        }
    })
}

/// `si_code` of a SIGSYS raised by a seccomp `SECCOMP_RET_TRAP`.
const SYS_SECCOMP: libc::c_int = 1;

/// The head of a siginfo for SIGSYS as the kernel lays it out on 64-bit
/// Linux (`struct { si_signo, si_errno, si_code; union { _sigsys { void
/// *_call_addr; int _syscall; unsigned _arch; } } }`); libc does not expose
/// `si_syscall`.
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// A line assembled without allocating (signal handler context).
struct LineBuf {
    bytes: [u8; 160],
    len: usize,
}

impl LineBuf {
    fn new() -> Self {
        Self {
            bytes: [0; 160],
            len: 0,
        }
    }

    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// `husk-vmm: seccomp blocked system call <nr> in the <kind> thread ...`.
fn blocked_line(nr: i64, kind: Option<ThreadKind>) -> LineBuf {
    let mut line = LineBuf::new();
    line.push(b"husk-vmm: seccomp blocked system call ");
    line.push_number(nr);
    line.push(b" in the ");
    line.push(kind.map_or("unfiltered", ThreadKind::name).as_bytes());
    line.push(b" thread (run with --no-seccomp to debug)\n");
    line
}

static SIGSYS_UNLINK: OnceLock<Option<CString>> = OnceLock::new();
/// Thread id of the main thread (0 until [`install_sigsys_handler`]).
static MAIN_TID: AtomicI32 = AtomicI32::new(0);

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe calls here, and only system calls every filter
    // allows (gettid, getpid, write, tgkill with SIGSYS, exit, exit_group),
    // plus unlink on the main thread, whose filter allows it.
    // SAFETY: gettid and getpid have no preconditions.
    let (me, pid) = unsafe { (libc::syscall(libc::SYS_gettid) as i32, libc::getpid()) };
    let main = MAIN_TID.load(Ordering::SeqCst);
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo; for
    // si_code SYS_SECCOMP its _sigsys member is the one filled in, and the
    // layout of SigsysInfo is the kernel's.
    let (trapped, nr, sender) = unsafe {
        let sigsys = &*info.cast::<SigsysInfo>();
        (sigsys.code == SYS_SECCOMP, sigsys.syscall, (*info).si_pid())
    };
    if trapped {
        let kind = FILTERED_AS.try_with(Cell::get).ok().flatten();
        let line = blocked_line(i64::from(nr), kind);
        // SAFETY: writing a stack buffer to fd 2 is async-signal-safe.
        unsafe { libc::write(2, line.as_bytes().as_ptr().cast(), line.len) };
    } else if sender != pid {
        let line = b"husk-vmm: terminated by SIGSYS from another process\n";
        // SAFETY: writing a static buffer to fd 2 is async-signal-safe.
        unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    }
    if main != 0 && me != main {
        // Only the main thread's filter allows unlink: hand the cleanup and
        // the exit to it, and end this thread (the process ends right away).
        // SAFETY: tgkill and exit are plain system calls; exit ends only the
        // calling thread, which touches nothing of the process's state.
        unsafe {
            libc::syscall(libc::SYS_tgkill, pid, main, libc::SIGSYS);
            libc::syscall(libc::SYS_exit, 1);
        }
    }
    if let Some(Some(path)) = SIGSYS_UNLINK.get() {
        // SAFETY: `path` is a valid NUL-terminated string that lives for the
        // whole program (static OnceLock).
        unsafe { libc::unlink(path.as_ptr()) };
    }
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(1) };
}

/// Make SIGSYS print the one-line failure, remove `cleanup` and exit 1.
/// Call it on the main thread: the one that removes `cleanup`.
pub fn install_sigsys_handler(cleanup: Option<&std::path::Path>) -> Result<(), std::io::Error> {
    use std::os::unix::ffi::OsStrExt;
    let _ = SIGSYS_UNLINK.set(cleanup.and_then(|p| CString::new(p.as_os_str().as_bytes()).ok()));
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
    MAIN_TID.store(me, Ordering::SeqCst);
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// How a forked child ended.
    #[derive(Debug, PartialEq, Eq)]
    enum ChildEnd {
        Exited(i32),
        Signalled(i32),
    }

    const KILLED_BY_SIGSYS: ChildEnd = ChildEnd::Signalled(libc::SIGSYS);

    /// Run `body` in a forked child (so that a trap kills only the child);
    /// the child exits with what `body` returns, 101 if it panics.
    fn in_child(body: impl FnOnce() -> i32) -> ChildEnd {
        // SAFETY: the child only runs `body` and leaves with _exit; it never
        // returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(101);
            // SAFETY: _exit is always safe to call.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid, "waitpid");
        if libc::WIFSIGNALED(status) {
            ChildEnd::Signalled(libc::WTERMSIG(status))
        } else {
            ChildEnd::Exited(libc::WEXITSTATUS(status))
        }
    }

    /// Apply `filter` as `kind` in the child, then run `act`.
    fn filtered(kind: ThreadKind, filter: &BpfProgram, act: impl FnOnce() -> i32) -> i32 {
        if apply(kind, filter).is_err() {
            return 2;
        }
        act()
    }

    #[test]
    fn kvm_requests_are_the_kernels() {
        // include/uapi/linux/kvm.h: _IO(KVMIO, 0x80), _IOR(KVMIO, 0x81, struct kvm_regs).
        assert_eq!(kvm_requests::KVM_RUN(), 0xae80);
        assert_eq!(kvm_requests::KVM_GET_REGS(), 0x8090_ae81);
    }

    #[test]
    fn filters_build() {
        assert!(!main_filter().unwrap().is_empty());
        assert!(!vcpu_filter(7, &[]).unwrap().is_empty());
        assert!(!vcpu_filter(7, &[8, 9]).unwrap().is_empty());
        assert!(!api_filter(3).unwrap().is_empty());
        assert!(!net_filter(5).unwrap().is_empty());
        let e = net_filter(-1).unwrap_err().to_string();
        assert!(e.contains("virtio-net") && e.contains("-1"), "{e}");
        let e = vcpu_filter(-1, &[]).unwrap_err().to_string();
        assert!(e.contains("vCPU") && e.contains("-1"), "{e}");
        let e = vcpu_filter(7, &[-1]).unwrap_err().to_string();
        assert!(e.contains("vCPU") && e.contains("-1"), "{e}");
    }

    #[test]
    fn allow_list_refuses_a_call_both_outright_and_checked() {
        let mut list = AllowList::new(ThreadKind::Main).unwrap();
        list.allow(libc::SYS_mmap);
        let e = list.build().unwrap_err().to_string();
        assert!(e.contains("main") && e.contains("both outright"), "{e}");
    }

    #[test]
    fn blocked_line_names_call_and_thread() {
        let l = blocked_line(41, Some(ThreadKind::Vcpu));
        assert_eq!(
            std::str::from_utf8(l.as_bytes()).unwrap(),
            "husk-vmm: seccomp blocked system call 41 in the vCPU thread (run with --no-seccomp to debug)\n"
        );
        let l = blocked_line(-7, None);
        assert!(std::str::from_utf8(l.as_bytes())
            .unwrap()
            .contains("call -7 in the unfiltered thread"));
    }

    /// A KVM VM with one vCPU, made before the filter goes on (a KVM VM is
    /// bound to the process that made it, so each child makes its own).
    fn vm_and_vcpu() -> (kvm_ioctls::Kvm, kvm_ioctls::VmFd, crate::vcpu::Vcpu) {
        let (kvm, vm) = crate::vm::create_kvm_vm().expect("KVM must be usable for this test");
        let vcpu = crate::vcpu::Vcpu::new(&vm, 0).expect("KVM_CREATE_VCPU");
        (kvm, vm, vcpu)
    }

    #[test]
    fn vcpu_filter_allows_its_requests_on_its_fd_only() {
        // Allowed: KVM_GET_REGS on the thread's own vCPU fd.
        let end = in_child(|| {
            let (_kvm, _vm, vcpu) = vm_and_vcpu();
            let Ok(f) = vcpu_filter(vcpu.fd().as_raw_fd(), &[]) else {
                return 3;
            };
            filtered(ThreadKind::Vcpu, &f, || match vcpu.fd().get_regs() {
                Ok(_) => 0,
                Err(_) => 4,
            })
        });
        assert_eq!(end, ChildEnd::Exited(0));
        // KVM_CREATE_VM on the /dev/kvm fd.
        let end = in_child(|| {
            let (kvm, _vm, vcpu) = vm_and_vcpu();
            let Ok(f) = vcpu_filter(vcpu.fd().as_raw_fd(), &[]) else {
                return 3;
            };
            filtered(ThreadKind::Vcpu, &f, || {
                let _ = kvm.create_vm();
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "KVM_CREATE_VM");
        // A KVM request the run loop never issues, on the right fd.
        let end = in_child(|| {
            let (_kvm, _vm, vcpu) = vm_and_vcpu();
            let Ok(f) = vcpu_filter(vcpu.fd().as_raw_fd(), &[]) else {
                return 3;
            };
            filtered(ThreadKind::Vcpu, &f, || {
                let _ = vcpu.fd().set_regs(&kvm_bindings::kvm_regs::default());
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "KVM_SET_REGS");
        // An allowed request on another vCPU's fd.
        let end = in_child(|| {
            let (_kvm, vm, vcpu) = vm_and_vcpu();
            let Ok(other) = crate::vcpu::Vcpu::new(&vm, 1) else {
                return 5;
            };
            let Ok(f) = vcpu_filter(vcpu.fd().as_raw_fd(), &[]) else {
                return 3;
            };
            filtered(ThreadKind::Vcpu, &f, || {
                let _ = other.fd().get_regs();
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "KVM_GET_REGS on another vCPU");
        // An arbitrary request on the vCPU fd.
        let end = in_child(|| {
            let (_kvm, _vm, vcpu) = vm_and_vcpu();
            let fd = vcpu.fd().as_raw_fd();
            let Ok(f) = vcpu_filter(fd, &[]) else {
                return 3;
            };
            filtered(ThreadKind::Vcpu, &f, || {
                let mut on: libc::c_int = 1;
                // SAFETY: FIONBIO with a valid int pointer.
                unsafe { libc::ioctl(fd, libc::FIONBIO, &mut on) };
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "FIONBIO");
        // Opening anything.
        let end = in_child(|| {
            let Ok(f) = vcpu_filter(0, &[]) else { return 3 };
            filtered(ThreadKind::Vcpu, &f, || {
                let _ = std::fs::File::open("/dev/null");
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "open");
    }

    #[test]
    fn vcpu_filter_messages_only_its_backends() {
        let send = |fd: RawFd| {
            let byte = [0u8; 1];
            let iov = libc::iovec {
                iov_base: byte.as_ptr() as *mut libc::c_void,
                iov_len: 1,
            };
            // SAFETY: a zeroed msghdr is valid; it points at one live iovec.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &iov as *const libc::iovec as *mut libc::iovec;
            msg.msg_iovlen = 1;
            // SAFETY: sendmsg with a valid msghdr on an open socket.
            unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) }
        };
        let (backend, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let (other, _other_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let f = vcpu_filter(0, &[backend.as_raw_fd()]).unwrap();
        let end = in_child(|| {
            filtered(ThreadKind::Vcpu, &f, || {
                i32::from(send(backend.as_raw_fd()) != 1)
            })
        });
        assert_eq!(end, ChildEnd::Exited(0), "sendmsg to the backend");
        let end = in_child(|| {
            filtered(ThreadKind::Vcpu, &f, || {
                send(other.as_raw_fd());
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "sendmsg to another socket");
        let none = vcpu_filter(0, &[]).unwrap();
        let end = in_child(|| {
            filtered(ThreadKind::Vcpu, &none, || {
                send(backend.as_raw_fd());
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "sendmsg without backends");
    }

    /// mmap / mprotect with PROT_EXEC, tgkill outside the process or with
    /// another signal: refused on every thread kind (tried on the main one).
    #[test]
    fn common_argument_checks() {
        let main = main_filter().unwrap();
        let len = 4096;
        let map = |prot| {
            // SAFETY: an anonymous private mapping at an address of the
            // kernel's choosing; the result is only compared.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            }
        };
        let end = in_child(|| {
            filtered(ThreadKind::Main, &main, || {
                let p = map(libc::PROT_READ | libc::PROT_WRITE);
                if p == libc::MAP_FAILED {
                    return 4;
                }
                // SAFETY: `p` is our own mapping of `len` bytes.
                let r = unsafe { libc::mprotect(p, len, libc::PROT_READ) };
                i32::from(r != 0)
            })
        });
        assert_eq!(end, ChildEnd::Exited(0), "read/write mappings stay allowed");
        let end = in_child(|| {
            filtered(ThreadKind::Main, &main, || {
                map(libc::PROT_READ | libc::PROT_EXEC);
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "mmap PROT_EXEC");
        let end = in_child(|| {
            let p = map(libc::PROT_READ);
            filtered(ThreadKind::Main, &main, || {
                // SAFETY: `p` is our own mapping of `len` bytes.
                unsafe { libc::mprotect(p, len, libc::PROT_READ | libc::PROT_EXEC) };
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "mprotect PROT_EXEC");
        let end = in_child(|| {
            // The filter is built in the child: it names the child's pid.
            let Ok(f) = main_filter() else { return 3 };
            filtered(ThreadKind::Main, &f, || {
                // SAFETY: getppid has no preconditions.
                let parent = unsafe { libc::getppid() };
                // SAFETY: plain system call; the kick signal to another process.
                unsafe {
                    libc::syscall(libc::SYS_tgkill, parent, parent, crate::vcpu::kick_signal())
                };
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "tgkill to another process");
        let end = in_child(|| {
            let Ok(f) = main_filter() else { return 3 };
            filtered(ThreadKind::Main, &f, || {
                // SAFETY: plain system call on ourselves; SIGKILL is not one
                // of ours, the filter must trap it before it is sent.
                unsafe {
                    libc::syscall(
                        libc::SYS_tgkill,
                        libc::getpid(),
                        libc::syscall(libc::SYS_gettid),
                        libc::SIGKILL,
                    )
                };
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "tgkill with a foreign signal");
        let end = in_child(|| {
            if crate::vcpu::install_kick_handler().is_err() {
                return 3;
            }
            let Ok(f) = main_filter() else { return 3 };
            filtered(ThreadKind::Main, &f, || {
                // SAFETY: plain system call; the kick signal has a handler.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_tgkill,
                        libc::getpid(),
                        libc::syscall(libc::SYS_gettid),
                        crate::vcpu::kick_signal(),
                    )
                };
                i32::from(r != 0)
            })
        });
        assert_eq!(end, ChildEnd::Exited(0), "kicking our own thread");
    }

    #[test]
    fn main_filter_allows_unlink_and_no_ioctl_open_or_socket() {
        let main = main_filter().unwrap();
        let end = in_child(|| {
            filtered(ThreadKind::Main, &main, || {
                let r = std::fs::remove_file("/nonexistent/husk-vmm-api.sock");
                match r {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                    _ => 4,
                }
            })
        });
        assert_eq!(end, ChildEnd::Exited(0), "unlink");
        for (what, call) in [("ioctl", 0), ("open", 1), ("socket", 2), ("clone", 3)] {
            let end = in_child(|| {
                filtered(ThreadKind::Main, &main, || {
                    match call {
                        0 => {
                            let mut on: libc::c_int = 1;
                            // SAFETY: FIONBIO with a valid int pointer.
                            unsafe { libc::ioctl(2, libc::FIONBIO, &mut on) };
                        }
                        1 => {
                            let _ = std::fs::File::open("/dev/null");
                        }
                        2 => {
                            // SAFETY: plain system call.
                            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                        }
                        _ => {
                            let _ = std::thread::Builder::new().spawn(|| ());
                        }
                    }
                    0
                })
            });
            assert_eq!(end, KILLED_BY_SIGSYS, "{what}");
        }
    }

    #[test]
    fn api_filter_accepts_only_on_its_listener() {
        let dir = std::env::temp_dir().join(format!("husk-seccomp-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(dir.join("api.sock")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let other = std::os::unix::net::UnixListener::bind(dir.join("other.sock")).unwrap();
        other.set_nonblocking(true).unwrap();
        let filter = api_filter(listener.as_raw_fd()).unwrap();
        let end = in_child(|| {
            filtered(ThreadKind::Api, &filter, || match listener.accept() {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                _ => 4,
            })
        });
        assert_eq!(end, ChildEnd::Exited(0), "accept on the API listener");
        let end = in_child(|| {
            filtered(ThreadKind::Api, &filter, || {
                let _ = other.accept();
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "accept on another socket");
        let end = in_child(|| {
            filtered(ThreadKind::Api, &filter, || {
                // SAFETY: plain fcntl on an open fd.
                unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_SETFL, 0) };
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "fcntl F_SETFL");
        let end = in_child(|| {
            filtered(ThreadKind::Api, &filter, || {
                let mut on: libc::c_int = 1;
                // SAFETY: FIONBIO with a valid int pointer.
                unsafe { libc::ioctl(listener.as_raw_fd(), libc::FIONBIO, &mut on) };
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "ioctl");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn net_filter_waits_only_on_its_epoll_and_opens_nothing() {
        use vmm_sys_util::epoll::Epoll;
        let epoll = Epoll::new().unwrap();
        let other = Epoll::new().unwrap();
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let filter = net_filter(epoll.as_raw_fd()).unwrap();
        let end = in_child(|| {
            filtered(ThreadKind::Net, &filter, || {
                let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 2];
                // Reads and writes of its descriptors are what the data path does.
                let ok = epoll.wait(0, &mut events).is_ok()
                    && evt.write(1).is_ok()
                    && evt.read().is_ok();
                if ok {
                    0
                } else {
                    4
                }
            })
        });
        assert_eq!(end, ChildEnd::Exited(0), "epoll_wait on its own epoll");
        let end = in_child(|| {
            filtered(ThreadKind::Net, &filter, || {
                let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 2];
                let _ = other.wait(0, &mut events);
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "epoll_wait on another epoll");
        let end = in_child(|| {
            filtered(ThreadKind::Net, &filter, || {
                let _ = std::fs::File::open("/dev/null");
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "open");
        let end = in_child(|| {
            filtered(ThreadKind::Net, &filter, || {
                let _ = epoll.ctl(
                    vmm_sys_util::epoll::ControlOperation::Add,
                    evt.as_raw_fd(),
                    vmm_sys_util::epoll::EpollEvent::default(),
                );
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "epoll_ctl");
        let end = in_child(|| {
            filtered(ThreadKind::Net, &filter, || {
                let mut on: libc::c_int = 1;
                // SAFETY: FIONBIO with a valid int pointer.
                unsafe { libc::ioctl(evt.as_raw_fd(), libc::FIONBIO, &mut on) };
                0
            })
        });
        assert_eq!(end, KILLED_BY_SIGSYS, "ioctl");
    }

    /// The SIGSYS contract in a process shaped like husk-vmm: a trapped call
    /// on a filtered vCPU thread or on the filtered main thread gives exactly
    /// one line naming the call and the thread, exit status 1, and the API
    /// socket removed (by the main thread).
    #[test]
    fn trapped_call_is_one_line_exit_1_and_no_socket() {
        for trapped_on in [ThreadKind::Vcpu, ThreadKind::Main] {
            let dir = std::env::temp_dir().join(format!(
                "husk-seccomp-sigsys-{}-{}",
                trapped_on.name(),
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let sock = dir.join("api.sock");
            let err = dir.join("stderr");
            let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
            let err_file = std::fs::File::create(&err).unwrap();
            let end = in_child(|| {
                // SAFETY: dup2 onto fd 2 of the child only.
                if unsafe { libc::dup2(err_file.as_raw_fd(), 2) } < 0 {
                    return 3;
                }
                if install_sigsys_handler(Some(&sock)).is_err() {
                    return 3;
                }
                let (Ok(main), Ok(vcpu)) = (main_filter(), vcpu_filter(listener.as_raw_fd(), &[]))
                else {
                    return 3;
                };
                let vcpu_thread = std::thread::spawn(move || {
                    if apply(ThreadKind::Vcpu, &vcpu).is_err() {
                        return;
                    }
                    if trapped_on == ThreadKind::Vcpu {
                        // SAFETY: plain system call, not on the vCPU list.
                        unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                    }
                });
                if apply(ThreadKind::Main, &main).is_err() {
                    return 3;
                }
                if trapped_on == ThreadKind::Main {
                    // SAFETY: plain system call, not on the main list.
                    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                }
                let _ = vcpu_thread.join();
                0
            });
            let stderr = std::fs::read_to_string(&err).unwrap();
            assert_eq!(end, ChildEnd::Exited(1), "{trapped_on:?}: {stderr}");
            assert_eq!(
                stderr,
                format!(
                    "husk-vmm: seccomp blocked system call {} in the {} thread (run with --no-seccomp to debug)\n",
                    libc::SYS_socket,
                    trapped_on.name()
                )
            );
            assert!(!sock.exists(), "{trapped_on:?}: API socket left behind");
            drop(listener);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
