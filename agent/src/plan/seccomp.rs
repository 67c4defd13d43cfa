//! OCI `linux.seccomp` compiled to a classic BPF program, once, by the
//! planner.
//!
//! The program is built here (allocation is fine) and loaded in the child
//! with one seccomp(2) call. Layout: check the architecture, load the
//! syscall number, then one block per (syscall, rule) pair: compare the
//! number, compare the arguments (64-bit, as two 32-bit words), return the
//! rule's action; after the last block return the default action.

use super::SpecError;
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};

pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// BPF opcodes.
const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

// Offsets in struct seccomp_data.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const fn off_arg_lo(i: usize) -> u32 {
    16 + 8 * i as u32
}
const fn off_arg_hi(i: usize) -> u32 {
    16 + 8 * i as u32 + 4
}

/// A compiled filter and the flags to load it with.
pub struct SeccompProgram {
    pub filter: Vec<libc::sock_filter>,
    pub flags: libc::c_ulong,
}

impl std::fmt::Debug for SeccompProgram {
    /// One instruction a line, as (code, jt, jf, k): the golden plans show
    /// the program the kernel gets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let insns: Vec<String> = self
            .filter
            .iter()
            .map(|i| format!("{:#06x} {} {} {:#x}", i.code, i.jt, i.jf, i.k))
            .collect();
        f.debug_struct("SeccompProgram")
            .field("flags", &self.flags)
            .field("filter", &insns)
            .finish()
    }
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Number of an x86_64 syscall by name (the `syscalls` crate's table,
/// generated from the kernel's syscall_64.tbl). The guest is x86_64
/// whatever the build host is, so the x86_64 table is named explicitly.
/// `None` for a name the table lacks (a newer kernel's syscall, another
/// architecture's): the caller skips it, as runc and crun do.
pub fn syscall_nr(name: &str) -> Option<u32> {
    name.parse::<syscalls::x86_64::Sysno>()
        .ok()
        .and_then(|s| u32::try_from(s.id()).ok())
}

fn action(a: LinuxSeccompAction, errno: Option<u32>, field: &str) -> Result<u32, SpecError> {
    if a == LinuxSeccompAction::ScmpActNotify {
        return Err(SpecError::Invalid(format!(
            "{field}: SCMP_ACT_NOTIFY is not supported (no seccomp agent inside the microVM)"
        )));
    }
    if let Some(e) = errno {
        if e > 0xffff {
            return Err(SpecError::Invalid(format!(
                "{field}: errnoRet {e} out of range"
            )));
        }
    }
    Ok(a.as_u32(errno))
}

/// One argument condition as BPF: falls through when it holds, jumps to
/// the "no match" label (the end of the block) otherwise. Returned with
/// placeholder jump targets: `fail` marks the instructions whose jt/jf must
/// reach the block end.
struct Block {
    insns: Vec<libc::sock_filter>,
    /// (instruction index, true if the jt field, else jf) to patch to "no match".
    fail_jumps: Vec<(usize, bool)>,
}

impl Block {
    fn push(&mut self, f: libc::sock_filter) -> usize {
        self.insns.push(f);
        self.insns.len() - 1
    }
    fn fail_on_true(&mut self, f: libc::sock_filter) {
        let i = self.push(f);
        self.fail_jumps.push((i, true));
    }
    fn fail_on_false(&mut self, f: libc::sock_filter) {
        let i = self.push(f);
        self.fail_jumps.push((i, false));
    }
}

/// Emits "arg op value" for a 64-bit argument.
fn emit_arg(b: &mut Block, index: usize, op: LinuxSeccompOperator, value: u64, two: u64) {
    let (vhi, vlo) = ((value >> 32) as u32, value as u32);
    let lo = off_arg_lo(index);
    let hi = off_arg_hi(index);
    match op {
        LinuxSeccompOperator::ScmpCmpEq => {
            b.push(stmt(LD_W_ABS, hi));
            b.fail_on_false(jump(JEQ_K, vhi, 0, 0));
            b.push(stmt(LD_W_ABS, lo));
            b.fail_on_false(jump(JEQ_K, vlo, 0, 0));
        }
        LinuxSeccompOperator::ScmpCmpNe => {
            // Holds unless both words are equal.
            b.push(stmt(LD_W_ABS, hi));
            b.push(jump(JEQ_K, vhi, 0, 2)); // hi differs: holds (skip 2)
            b.push(stmt(LD_W_ABS, lo));
            b.fail_on_true(jump(JEQ_K, vlo, 0, 0));
        }
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            // value is the mask, valueTwo the expected value.
            let (mhi, mlo) = ((value >> 32) as u32, value as u32);
            let (thi, tlo) = ((two >> 32) as u32, two as u32);
            b.push(stmt(LD_W_ABS, hi));
            b.push(stmt(AND_K, mhi));
            b.fail_on_false(jump(JEQ_K, thi, 0, 0));
            b.push(stmt(LD_W_ABS, lo));
            b.push(stmt(AND_K, mlo));
            b.fail_on_false(jump(JEQ_K, tlo, 0, 0));
        }
        LinuxSeccompOperator::ScmpCmpGt | LinuxSeccompOperator::ScmpCmpGe => {
            let lo_op = if op == LinuxSeccompOperator::ScmpCmpGt {
                JGT_K
            } else {
                JGE_K
            };
            // hi > vhi: holds; hi < vhi: fails; equal: compare lo.
            b.push(stmt(LD_W_ABS, hi));
            b.push(jump(JGT_K, vhi, 3, 0)); // holds: skip to after the lo check
            b.fail_on_false(jump(JEQ_K, vhi, 0, 0));
            b.push(stmt(LD_W_ABS, lo));
            b.fail_on_false(jump(lo_op, vlo, 0, 0));
        }
        LinuxSeccompOperator::ScmpCmpLt | LinuxSeccompOperator::ScmpCmpLe => {
            // a < v  <=>  !(a >= v); a <= v <=> !(a > v).
            let lo_op = if op == LinuxSeccompOperator::ScmpCmpLt {
                JGE_K
            } else {
                JGT_K
            };
            b.push(stmt(LD_W_ABS, hi));
            b.fail_on_true(jump(JGT_K, vhi, 0, 0)); // hi > vhi: fails
            b.push(jump(JEQ_K, vhi, 0, 2)); // hi < vhi: holds
            b.push(stmt(LD_W_ABS, lo));
            b.fail_on_true(jump(lo_op, vlo, 0, 0));
        }
    }
}

/// The kernel's limit on a classic BPF program (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;
/// See the check in `compile`.
const MAX_ARGS_PER_RULE: usize = 1024;

fn too_long(len: usize) -> SpecError {
    SpecError::Invalid(format!(
        "linux.seccomp: the profile compiles to {len} or more BPF instructions, over the \
         kernel's {MAX_INSNS}"
    ))
}

/// Compiles an OCI seccomp profile for x86_64.
pub fn compile(s: &LinuxSeccomp) -> Result<SeccompProgram, SpecError> {
    let default = action(
        s.default_action(),
        s.default_errno_ret(),
        "linux.seccomp.defaultAction",
    )?;
    let mut flags: libc::c_ulong = 0;
    for f in s.flags().as_deref().unwrap_or(&[]) {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => 2,
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 1,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => 4,
            other => {
                return Err(SpecError::Invalid(format!(
                    "linux.seccomp.flags: {other} is not supported"
                )))
            }
        };
    }
    // Architectures: only x86_64 code runs in the guest. A listed x86 or
    // x32 is accepted (their syscalls then get the default action, as the
    // profile has no x86 numbers here); anything else is refused.
    for a in s.architectures().as_deref().unwrap_or(&[]) {
        match a {
            Arch::ScmpArchNative | Arch::ScmpArchX86_64 | Arch::ScmpArchX86 | Arch::ScmpArchX32 => {
            }
            other => {
                return Err(SpecError::Invalid(format!(
                    "linux.seccomp.architectures: {other:?} cannot run in an x86_64 guest"
                )))
            }
        }
    }
    let mut prog = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(LD_W_ABS, OFF_NR),
        // x32 syscalls: not part of any rule, default action.
        jump(JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(RET_K, default),
    ];
    for (i, rule) in s.syscalls().as_deref().unwrap_or(&[]).iter().enumerate() {
        let field = format!("linux.seccomp.syscalls[{i}]");
        let act = action(rule.action(), rule.errno_ret(), &field)?;
        let args = rule.args().clone().unwrap_or_default();
        for a in &args {
            if a.index() > 5 {
                return Err(SpecError::Invalid(format!(
                    "{field}.args: index {} out of range (0-5)",
                    a.index()
                )));
            }
        }
        let known: Vec<u32> = rule.names().iter().filter_map(|n| syscall_nr(n)).collect();
        if known.is_empty() {
            // Unknown names are skipped, as runc and crun do: profiles list
            // syscalls of newer kernels and other architectures.
            continue;
        }
        // More conditions than this never fit: a block's jumps reach at most
        // 255 instructions (about 42 conditions) and every alternative costs
        // at least 5 of the 4096. Refused before the alternatives below are
        // built (their size grows with the square of the count).
        if args.len() > MAX_ARGS_PER_RULE {
            return Err(SpecError::Invalid(format!(
                "{field}: too many argument conditions ({}, at most {MAX_ARGS_PER_RULE})",
                args.len()
            )));
        }
        // Conditions on the same argument are alternatives (as in runc):
        // one block per combination is overkill; split per distinct
        // repeated index into separate blocks, others ANDed.
        let mut groups: Vec<Vec<&oci_spec::runtime::LinuxSeccompArg>> = vec![Vec::new()];
        let mut seen = [0usize; 6];
        for a in &args {
            seen[a.index()] += 1;
        }
        let repeated = (0..6).find(|i| seen[*i] > 1);
        if let Some(r) = repeated {
            let common: Vec<_> = args.iter().filter(|a| a.index() != r).collect();
            groups = args
                .iter()
                .filter(|a| a.index() == r)
                .map(|a| {
                    let mut g = common.clone();
                    g.push(a);
                    g
                })
                .collect();
        } else {
            groups[0] = args.iter().collect();
        }
        for &nr in &known {
            for g in &groups {
                let mut b = Block {
                    insns: Vec::new(),
                    fail_jumps: Vec::new(),
                };
                b.push(stmt(LD_W_ABS, OFF_NR));
                b.fail_on_false(jump(JEQ_K, nr, 0, 0));
                for a in g {
                    emit_arg(
                        &mut b,
                        a.index(),
                        a.op(),
                        a.value(),
                        a.value_two().unwrap_or(0),
                    );
                }
                b.push(stmt(RET_K, act));
                let end = b.insns.len();
                for (idx, on_true) in &b.fail_jumps {
                    let dist = end - idx - 1;
                    let dist = u8::try_from(dist).map_err(|_| {
                        SpecError::Invalid(format!("{field}: too many argument conditions"))
                    })?;
                    if *on_true {
                        b.insns[*idx].jt = dist;
                    } else {
                        b.insns[*idx].jf = dist;
                    }
                }
                prog.extend(b.insns);
                // Checked as it grows: the blocks of a large profile are
                // never all built.
                if prog.len() > MAX_INSNS {
                    return Err(too_long(prog.len()));
                }
            }
        }
    }
    prog.push(stmt(RET_K, default));
    if prog.len() > MAX_INSNS {
        return Err(too_long(prog.len()));
    }
    Ok(SeccompProgram {
        filter: prog,
        flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names resolve to x86_64 numbers (syscall_64.tbl), exactly as
    /// spelled; anything else is unknown, to be skipped by the caller.
    #[test]
    fn syscall_names_resolve_to_x86_64_numbers() {
        for (name, nr) in [
            ("read", 0),
            ("getcwd", 79),
            ("personality", 135),
            ("clone3", 435),
            ("fchmodat2", 452),
        ] {
            assert_eq!(syscall_nr(name), Some(nr), "{name}");
        }
        // Unknown, wrong case, another architecture's only, empty, with a
        // NUL.
        for name in ["nosuchcall", "READ", "arm_fadvise64_64", "", "read\0"] {
            assert_eq!(syscall_nr(name), None, "{name:?}");
        }
    }

    #[test]
    fn compiles_a_profile_with_args() {
        let s: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
                "syscalls":[{"names":["getcwd","nosuchcall"],"action":"SCMP_ACT_ERRNO","errnoRet":42},
                            {"names":["personality"],"action":"SCMP_ACT_ERRNO",
                             "args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"},
                                     {"index":0,"value":4294967295,"op":"SCMP_CMP_EQ"}]}]}"#,
        )
        .unwrap();
        let p = compile(&s).unwrap();
        assert_eq!(p.filter.last().unwrap().k, libc::SECCOMP_RET_ALLOW);
        assert!(p
            .filter
            .iter()
            .any(|f| f.k == (libc::SECCOMP_RET_ERRNO | 42)));
    }

    /// Profiles whose program cannot fit are refused as soon as that is
    /// certain, before their blocks (quadratic in the conditions) are built.
    #[test]
    fn oversized_profiles_are_refused_early() {
        let many = |n: usize| -> Vec<serde_json::Value> {
            (0..n)
                .map(|v| serde_json::json!({"index": 0, "value": v, "op": "SCMP_CMP_EQ"}))
                .collect()
        };
        let rule = |names: Vec<&str>, args| {
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": names, "action": "SCMP_ACT_ERRNO", "args": args}]})
        };
        let compile_json =
            |v: serde_json::Value| compile(&serde_json::from_value(v).unwrap()).map(|_| ());
        let err = compile_json(rule(vec!["read"], many(5000))).unwrap_err();
        assert!(
            err.to_string()
                .contains("linux.seccomp.syscalls[0]: too many argument conditions (5000"),
            "{err}"
        );
        // Unknown names only: skipped as before, whatever the conditions.
        assert!(compile_json(rule(vec!["nosuchcall"], many(5000))).is_ok());
        // 300 alternatives on each of 300 names: refused once past 4096.
        let names: Vec<&str> = syscalls::x86_64::Sysno::iter()
            .take(300)
            .map(|s| s.name())
            .collect();
        let err = compile_json(rule(names, many(300))).unwrap_err();
        assert!(err.to_string().contains("over the kernel's 4096"), "{err}");
    }

    #[test]
    fn notify_is_refused() {
        let s: LinuxSeccomp =
            serde_json::from_str(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#).unwrap();
        assert!(compile(&s).is_err());
    }
}
