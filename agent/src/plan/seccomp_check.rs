//! Checking the seccomp compiler: a classic-BPF interpreter that runs a
//! compiled program on one `struct seccomp_data`, and a reference model that
//! computes the action straight from the OCI profile. The fuzz target
//! `seccomp_compile` asserts they agree on arbitrary profiles and probes;
//! the tests below also load programs into the kernel, so the interpreter
//! is held to what the kernel does.
//!
//! The model states the profile's semantics as the agent implements them:
//! a call of another architecture is killed, an x32 call (or a number past
//! it) gets the default action, otherwise the first rule (in order) that
//! names the call (names this kernel does not know are skipped) and whose
//! conditions hold decides. Conditions compare the full 64-bit argument;
//! they are ANDed, except that the conditions on the first argument index
//! listed more than once are alternatives (each ANDed with the others).

use super::seccomp::{syscall_nr, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT};
use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompArg, LinuxSeccompOperator};

/// The kernel's `struct seccomp_data` as the filter sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeccompData {
    pub nr: i32,
    pub arch: u32,
    pub instruction_pointer: u64,
    pub args: [u64; 6],
}

impl SeccompData {
    /// The 32-bit word at byte `offset`, as BPF_LD|BPF_W|BPF_ABS loads it
    /// (native, little-endian order); None past the end or unaligned.
    fn word(&self, offset: u32) -> Option<u32> {
        if offset & 3 != 0 {
            return None;
        }
        let word = |v: u64, hi: bool| if hi { (v >> 32) as u32 } else { v as u32 };
        Some(match offset {
            0 => self.nr as u32,
            4 => self.arch,
            8 | 12 => word(self.instruction_pointer, offset == 12),
            16..=63 => {
                let i = (offset as usize - 16) / 8;
                word(self.args[i], offset % 8 == 4)
            }
            _ => return None,
        })
    }
}

/// Why the interpreter stopped without a verdict: the kernel would have
/// refused to load such a program.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BpfError {
    #[error("instruction {0}: opcode {1:#06x} is not one the compiler emits")]
    Opcode(usize, u16),
    #[error("instruction {0}: load of offset {1} outside seccomp_data")]
    Load(usize, u32),
    #[error("instruction {0}: jump past the end of the program")]
    Jump(usize),
    #[error("the program ends without a return")]
    NoReturn,
}

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// Runs `filter` on `data` as the kernel's classic-BPF seccomp interpreter
/// would, for the instructions the compiler emits (and JA, JSET); returns
/// the action.
pub fn run(filter: &[libc::sock_filter], data: &SeccompData) -> Result<u32, BpfError> {
    let mut acc: u32 = 0;
    let mut pc = 0usize;
    while let Some(insn) = filter.get(pc) {
        let next = pc + 1;
        let jump = |skip: u32| {
            let to = next + skip as usize;
            if to >= filter.len() {
                Err(BpfError::Jump(pc))
            } else {
                Ok(to)
            }
        };
        let cond = |holds: bool| jump(u32::from(if holds { insn.jt } else { insn.jf }));
        pc = match insn.code {
            LD_W_ABS => {
                acc = data.word(insn.k).ok_or(BpfError::Load(pc, insn.k))?;
                next
            }
            AND_K => {
                acc &= insn.k;
                next
            }
            JEQ_K => cond(acc == insn.k)?,
            JGT_K => cond(acc > insn.k)?,
            JGE_K => cond(acc >= insn.k)?,
            JSET_K => cond(acc & insn.k != 0)?,
            JA => jump(insn.k)?,
            RET_K => return Ok(insn.k),
            other => return Err(BpfError::Opcode(pc, other)),
        };
    }
    Err(BpfError::NoReturn)
}

/// Whether one condition holds for the 64-bit argument `arg`.
pub fn condition_holds(op: LinuxSeccompOperator, arg: u64, value: u64, value_two: u64) -> bool {
    match op {
        LinuxSeccompOperator::ScmpCmpNe => arg != value,
        LinuxSeccompOperator::ScmpCmpLt => arg < value,
        LinuxSeccompOperator::ScmpCmpLe => arg <= value,
        LinuxSeccompOperator::ScmpCmpEq => arg == value,
        LinuxSeccompOperator::ScmpCmpGe => arg >= value,
        LinuxSeccompOperator::ScmpCmpGt => arg > value,
        LinuxSeccompOperator::ScmpCmpMaskedEq => arg & value == value_two,
    }
}

fn holds(a: &LinuxSeccompArg, data: &SeccompData) -> bool {
    let arg = data.args.get(a.index()).copied().unwrap_or(0);
    condition_holds(a.op(), arg, a.value(), a.value_two().unwrap_or(0))
}

fn conditions_hold(args: &[LinuxSeccompArg], data: &SeccompData) -> bool {
    let count = |i: usize| args.iter().filter(|a| a.index() == i).count();
    match (0..6).find(|i| count(*i) > 1) {
        None => args.iter().all(|a| holds(a, data)),
        Some(r) => {
            let others = args
                .iter()
                .filter(|a| a.index() != r)
                .all(|a| holds(a, data));
            others && args.iter().any(|a| a.index() == r && holds(a, data))
        }
    }
}

/// The model of one profile, its syscall names resolved once.
pub struct Model<'a> {
    profile: &'a LinuxSeccomp,
    default: u32,
    /// Per rule: the numbers it names (known names only).
    numbers: Vec<Vec<u32>>,
}

impl<'a> Model<'a> {
    pub fn new(profile: &'a LinuxSeccomp) -> Self {
        let numbers = profile
            .syscalls()
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .map(|r| r.names().iter().filter_map(|n| syscall_nr(n)).collect())
            .collect();
        Model {
            profile,
            default: profile.default_action().as_u32(profile.default_errno_ret()),
            numbers,
        }
    }

    /// The action the profile gives `data`. Only for profiles
    /// [`super::seccomp::compile`] accepts.
    pub fn action(&self, data: &SeccompData) -> u32 {
        if data.arch != AUDIT_ARCH_X86_64 {
            return libc::SECCOMP_RET_KILL_PROCESS;
        }
        let nr = data.nr as u32;
        if nr >= X32_SYSCALL_BIT {
            return self.default;
        }
        let rules = self.profile.syscalls().as_deref().unwrap_or(&[]);
        for (rule, numbers) in rules.iter().zip(&self.numbers) {
            if numbers.contains(&nr) && conditions_hold(rule.args().as_deref().unwrap_or(&[]), data)
            {
                return rule.action().as_u32(rule.errno_ret());
            }
        }
        self.default
    }
}

/// The action `profile` gives `data` (see [`Model`]).
pub fn expected_action(profile: &LinuxSeccomp, data: &SeccompData) -> u32 {
    Model::new(profile).action(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::seccomp::compile;

    const PROBE_ERRNO: u32 = 77;

    /// Values around the interesting edges of a 64-bit compare of `v`:
    /// equal, one off either way, the other word changed, and the extremes.
    fn probes(v: u64) -> Vec<u64> {
        let mut p = vec![
            v,
            v.wrapping_add(1),
            v.wrapping_sub(1),
            v ^ (1 << 32),
            v ^ 1,
            v.wrapping_add(1 << 32),
            v.wrapping_sub(1 << 32),
            0,
            u64::MAX,
            0xffff_ffff,
            1 << 32,
        ];
        p.sort_unstable();
        p.dedup();
        p
    }

    fn profile(op: &str, value: u64, two: u64) -> LinuxSeccomp {
        serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{
                "names": ["getppid"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": PROBE_ERRNO,
                "args": [{"index": 1, "value": value, "valueTwo": two, "op": op}]
            }]
        }))
        .unwrap()
    }

    /// Loads `filter` in a forked child and calls getppid (which ignores
    /// its arguments; the filter sees them) with each value as argument 1;
    /// returns, per value, whether the filter answered PROBE_ERRNO.
    fn kernel_verdicts(p: &super::super::SeccompProgram, values: &[u64]) -> Vec<bool> {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) into a two-int array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let prog = libc::sock_fprog {
            len: p.filter.len() as libc::c_ushort,
            filter: p.filter.as_ptr() as *mut libc::sock_filter,
        };
        let mut out = vec![0u8; values.len()];
        // SAFETY: fork; the child makes raw syscalls on data prepared
        // before the fork and ends with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: in the child: prctl, seccomp, getppid, write, _exit.
            unsafe {
                libc::close(fds[0]);
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::syscall(libc::SYS_seccomp, 1, 0, &prog) != 0
                {
                    libc::_exit(2);
                }
                for (v, o) in values.iter().zip(out.iter_mut()) {
                    let rc = libc::syscall(libc::SYS_getppid, 0, *v);
                    *o = u8::from(rc == -1 && *libc::__errno_location() == PROBE_ERRNO as i32);
                }
                libc::write(fds[1], out.as_ptr().cast(), out.len());
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copy of the write end.
        unsafe { libc::close(fds[1]) };
        let mut status = 0;
        // SAFETY: waitpid of the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the probe child could not load the filter (status {status:#x})"
        );
        use std::io::Read;
        // SAFETY: the read end is ours alone.
        let mut reader = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
        reader.read_exact(&mut out).unwrap();
        out.into_iter().map(|b| b == 1).collect()
    }

    /// Every operator, on values whose two 32-bit words matter: the
    /// compiled program in the kernel, the interpreter and the model agree.
    #[test]
    fn kernel_interpreter_and_model_agree_on_every_operator() {
        let ops = [
            "SCMP_CMP_NE",
            "SCMP_CMP_LT",
            "SCMP_CMP_LE",
            "SCMP_CMP_EQ",
            "SCMP_CMP_GE",
            "SCMP_CMP_GT",
            "SCMP_CMP_MASKED_EQ",
        ];
        let values = [0u64, 7, 0xffff_ffff, 1 << 32, 0x1_0000_0005, u64::MAX - 1];
        let nr = libc::SYS_getppid as i32;
        for op in ops {
            for &value in &values {
                let two = value & 0xf0f0_f0f0_f0f0_f0f0;
                let spec = profile(op, value, two);
                let program = compile(&spec).unwrap();
                let args = probes(value);
                let kernel = kernel_verdicts(&program, &args);
                for (arg, in_kernel) in args.iter().zip(kernel) {
                    let data = SeccompData {
                        nr,
                        arch: AUDIT_ARCH_X86_64,
                        args: [0, *arg, 0, 0, 0, 0],
                        ..Default::default()
                    };
                    let errno = libc::SECCOMP_RET_ERRNO | PROBE_ERRNO;
                    let interpreted = run(&program.filter, &data).unwrap() == errno;
                    let modelled = expected_action(&spec, &data) == errno;
                    assert_eq!(
                        (interpreted, modelled),
                        (in_kernel, in_kernel),
                        "{op} value {value:#x} arg {arg:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_interpreter_refuses_what_the_kernel_would() {
        let ret = |k| libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k,
        };
        let data = SeccompData::default();
        assert_eq!(run(&[ret(5)], &data), Ok(5));
        assert_eq!(run(&[], &data), Err(BpfError::NoReturn));
        let load = libc::sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 64,
        };
        assert_eq!(run(&[load, ret(0)], &data), Err(BpfError::Load(0, 64)));
        let jump = libc::sock_filter {
            code: JEQ_K,
            jt: 1,
            jf: 0,
            k: 0,
        };
        assert_eq!(run(&[jump, ret(0)], &data), Err(BpfError::Jump(0)));
    }

    #[test]
    fn alternatives_on_a_repeated_index() {
        let spec: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{
                "names": ["personality"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
                         {"index": 0, "value": 0xffffffffu64, "op": "SCMP_CMP_EQ"},
                         {"index": 1, "value": 3, "op": "SCMP_CMP_LT"}]
            }]
        }))
        .unwrap();
        let program = compile(&spec).unwrap();
        for (a0, a1, blocked) in [
            (8, 0, true),
            (0xffff_ffff, 2, true),
            (8, 3, false),
            (9, 0, false),
        ] {
            let data = SeccompData {
                nr: 135,
                arch: AUDIT_ARCH_X86_64,
                args: [a0, a1, 0, 0, 0, 0],
                ..Default::default()
            };
            let want = if blocked {
                libc::SECCOMP_RET_ERRNO | 1
            } else {
                libc::SECCOMP_RET_ALLOW
            };
            assert_eq!(expected_action(&spec, &data), want, "{a0} {a1}");
            assert_eq!(run(&program.filter, &data), Ok(want), "{a0} {a1}");
        }
    }
}
