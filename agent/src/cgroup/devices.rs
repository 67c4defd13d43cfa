//! Device cgroup rules (`linux.resources.devices`) as an eBPF program.
//!
//! cgroup v2 has no `devices.allow`/`devices.deny` files: access to device
//! nodes (open for read/write, mknod) is decided by a
//! `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the cgroup. This module
//! turns the rule list into such a program with its own small instruction
//! generator (no libbpf: the agent is static), loads it with
//! `bpf(BPF_PROG_LOAD)` and attaches it with `bpf(BPF_PROG_ATTACH)`.
//!
//! Hand-written on purpose: no maintained crate generates device-cgroup
//! programs (aya and libbpf-rs load programs compiled elsewhere; they do
//! not build one from a rule list at run time), and runc and crun likewise
//! emit theirs with their own generators. The program is a few
//! instructions per rule, all of them checked by the kernel's verifier.
//!
//! Semantics: rules are evaluated in order and the last rule that matches
//! wins, separately for each access bit a request asks for (`m`, `r`, `w`);
//! a request is allowed when each of its bits is, and a bit no rule matches
//! is denied. So `deny c 1:5 w` after `allow c 1:5 rw` leaves reads of
//! /dev/zero allowed and makes writes fail, and `allow c 1:5 r` plus
//! `allow c 1:5 w` allow `rw`, which a "the whole request must be a subset
//! of one rule" check (runc's and crun's generated programs) would deny.
//!
//! Like runc, every container gets runc's default allow-list
//! ([`RUNC_DEFAULTS`]: mknod of any node, /dev/null, zero, full, random,
//! urandom, tty, ptmx, the pty slaves, /dev/net/tun), so a bare
//! `[{"allow": false, "access": "rwm"}]` (what `runc spec` and `husk spec`
//! write) still leaves those usable, and a spec without
//! `linux.resources.devices` gets exactly that list. Where: right after the
//! spec's last deny-all rule (type `a`, any major and minor, `rwm`), or
//! first when it has none. runc appends the list after all of the spec's
//! rules instead, so there a spec cannot deny one of those devices (its
//! own comment calls this questionable); here the rules after a deny-all
//! are taken as written: `deny c 1:5 rwm` makes /dev/zero unusable. For
//! the usual spec (deny-all, then allows, as docker, containerd and podman
//! write it) the two agree.

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum DeviceFilterError {
    /// A rule that does not make sense.
    #[error("config.json: linux.resources.devices[{index}]: {reason}")]
    Invalid { index: usize, reason: String },
    /// Too many rules for one program.
    #[error("config.json: linux.resources.devices: {0} rules, at most {MAX_RULES} are supported")]
    TooMany(usize),
    /// The kernel refused the program (the verifier's log follows).
    #[error("linux.resources.devices: loading the eBPF device filter: {source}{log}")]
    Load { source: std::io::Error, log: String },
    /// The program could not be attached to the container's cgroup.
    #[error("linux.resources.devices: attaching the eBPF device filter to {cgroup}: {source}")]
    Attach {
        cgroup: String,
        source: std::io::Error,
    },
}

/// Access bits of `struct bpf_cgroup_dev_ctx` (BPF_DEVCG_ACC_*).
pub const ACC_MKNOD: u32 = 1;
pub const ACC_READ: u32 = 2;
pub const ACC_WRITE: u32 = 4;
const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;
/// Device types of `struct bpf_cgroup_dev_ctx` (BPF_DEVCG_DEV_*).
pub const DEV_BLOCK: u32 = 1;
pub const DEV_CHAR: u32 = 2;

/// Keeps every generated jump inside an i16 offset with room to spare.
pub const MAX_RULES: usize = 1024;

/// Which device types a rule covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    All,
    Char,
    Block,
}

/// One rule, validated: `None` for major/minor is "any".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    pub kind: Kind,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// ACC_* bits.
    pub access: u32,
}

impl Rule {
    const fn allow(kind: Kind, major: Option<u32>, minor: Option<u32>, access: u32) -> Self {
        Rule {
            allow: true,
            kind,
            major,
            minor,
            access,
        }
    }
}

/// runc's default allow-list (libcontainer/specconv AllowedDevices), which
/// runc appends to every container's rules: mknod of any char and block
/// device, /dev/null, random, full, tty, zero, urandom, the pty slaves
/// (136:*), /dev/ptmx and /dev/net/tun.
pub const RUNC_DEFAULTS: [Rule; 11] = [
    Rule::allow(Kind::Char, None, None, ACC_MKNOD),
    Rule::allow(Kind::Block, None, None, ACC_MKNOD),
    Rule::allow(Kind::Char, Some(1), Some(3), ACC_ALL),
    Rule::allow(Kind::Char, Some(1), Some(8), ACC_ALL),
    Rule::allow(Kind::Char, Some(1), Some(7), ACC_ALL),
    Rule::allow(Kind::Char, Some(5), Some(0), ACC_ALL),
    Rule::allow(Kind::Char, Some(1), Some(5), ACC_ALL),
    Rule::allow(Kind::Char, Some(1), Some(9), ACC_ALL),
    Rule::allow(Kind::Char, Some(136), None, ACC_ALL),
    Rule::allow(Kind::Char, Some(5), Some(2), ACC_ALL),
    Rule::allow(Kind::Char, Some(10), Some(200), ACC_ALL),
];

fn device_number(
    index: usize,
    what: &str,
    v: Option<i64>,
) -> Result<Option<u32>, DeviceFilterError> {
    match v {
        None | Some(-1) => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| DeviceFilterError::Invalid {
                index,
                reason: format!("{what} {n} is neither -1 (any) nor a device number"),
            }),
    }
}

/// Validates the spec's rules and appends the defaults (see the module
/// documentation): the list [`compile`] turns into a program.
pub fn rules_from_spec(
    devices: Option<&[LinuxDeviceCgroup]>,
) -> Result<Vec<Rule>, DeviceFilterError> {
    let devices = devices.unwrap_or(&[]);
    if devices.len() + RUNC_DEFAULTS.len() > MAX_RULES {
        return Err(DeviceFilterError::TooMany(devices.len()));
    }
    let mut rules = Vec::with_capacity(devices.len() + RUNC_DEFAULTS.len());
    for (index, d) in devices.iter().enumerate() {
        let kind = match d.typ() {
            None | Some(LinuxDeviceType::A) => Kind::All,
            Some(LinuxDeviceType::C) => Kind::Char,
            Some(LinuxDeviceType::B) => Kind::Block,
            Some(other) => {
                return Err(DeviceFilterError::Invalid {
                    index,
                    reason: format!(
                        "type {:?} is not a device cgroup type (a, c or b)",
                        other.as_str()
                    ),
                })
            }
        };
        // runc refuses a rule without access as well: "" would match nothing.
        let text = d.access().as_deref().unwrap_or("");
        if text.is_empty() {
            return Err(DeviceFilterError::Invalid {
                index,
                reason: "access is empty (a combination of r, w and m)".into(),
            });
        }
        let mut access = 0;
        for c in text.chars() {
            access |= match c {
                'r' => ACC_READ,
                'w' => ACC_WRITE,
                'm' => ACC_MKNOD,
                other => {
                    return Err(DeviceFilterError::Invalid {
                        index,
                        reason: format!("access {text:?} has {other:?}, not one of r, w, m"),
                    })
                }
            };
        }
        rules.push(Rule {
            allow: d.allow(),
            kind,
            major: device_number(index, "major", d.major())?,
            minor: device_number(index, "minor", d.minor())?,
            access,
        });
    }
    let after_deny_all = rules
        .iter()
        .rposition(|r| {
            !r.allow
                && r.kind == Kind::All
                && r.major.is_none()
                && r.minor.is_none()
                && r.access == ACC_ALL
        })
        .map_or(0, |i| i + 1);
    rules.splice(after_deny_all..after_deny_all, RUNC_DEFAULTS);
    Ok(rules)
}

/// One eBPF instruction (`struct bpf_insn`): opcode, dst and src register
/// nibbles, offset, immediate.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

// Opcodes (linux/bpf.h, linux/bpf_common.h).
pub const LDX_MEM_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
pub const ALU32_AND_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
pub const ALU32_RSH_K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
pub const ALU64_MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
pub const JMP32_JNE_K: u8 = 0x56; // BPF_JMP32 | BPF_JNE | BPF_K
pub const JMP32_JSET_K: u8 = 0x46; // BPF_JMP32 | BPF_JSET | BPF_K
pub const JMP_JA: u8 = 0x05; // BPF_JMP | BPF_JA
pub const JMP_EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

// Registers: R1 holds the context on entry, R0 the verdict on exit.
const R0: u8 = 0;
const R1: u8 = 1;
/// Device type (low 16 bits of access_type).
const R_TYPE: u8 = 2;
/// Requested access (high 16 bits of access_type).
const R_ACCESS: u8 = 3;
const R_MAJOR: u8 = 4;
const R_MINOR: u8 = 5;

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// A program under construction: jumps are emitted with offset 0 and
/// patched once their target is known.
struct Emitter {
    insns: Vec<Insn>,
}

impl Emitter {
    fn push(&mut self, i: Insn) -> usize {
        self.insns.push(i);
        self.insns.len() - 1
    }

    /// Points the jumps at `from` to the next instruction to be emitted.
    fn land(&mut self, from: &[usize]) {
        let target = self.insns.len();
        for &at in from {
            // Offsets count from the instruction after the jump; MAX_RULES
            // keeps them far below i16::MAX.
            self.insns[at].off = (target - at - 1) as i16;
        }
    }

    fn verdict(&mut self, allow: bool) {
        self.push(insn(ALU64_MOV_K, R0, 0, 0, i32::from(allow)));
        self.push(insn(JMP_EXIT, 0, 0, 0, 0));
    }
}

/// Compiles rules to a device program: for each access bit the request
/// has, the rules that grant or refuse that bit are tried from the last to
/// the first; the first that covers the device decides (deny: return 0;
/// allow: go on with the next bit); none: deny. All bits allowed: return 1.
/// Only forward jumps, and no unreachable instruction (the verifier
/// rejects both).
pub fn compile(rules: &[Rule]) -> Vec<Insn> {
    let mut e = Emitter { insns: Vec::new() };
    e.push(insn(LDX_MEM_W, R_TYPE, R1, 0, 0));
    e.push(insn(ALU32_AND_K, R_TYPE, 0, 0, 0xffff));
    e.push(insn(LDX_MEM_W, R_ACCESS, R1, 0, 0));
    e.push(insn(ALU32_RSH_K, R_ACCESS, 0, 0, 16));
    e.push(insn(LDX_MEM_W, R_MAJOR, R1, 4, 0));
    e.push(insn(LDX_MEM_W, R_MINOR, R1, 8, 0));
    for bit in [ACC_MKNOD, ACC_READ, ACC_WRITE] {
        // Not asked for: skip the section.
        e.push(insn(JMP32_JSET_K, R_ACCESS, 0, 1, bit as i32));
        let mut to_next_bit = vec![e.push(insn(JMP_JA, 0, 0, 0, 0))];
        // The rules that can decide this bit, last first. A rule covering
        // every device ends the list and gives the verdict for what no rule
        // before it covers (none: deny); rules right before that verdict
        // with the same verdict change nothing and are left out.
        let mut scan: Vec<&Rule> = rules.iter().rev().filter(|r| r.access & bit != 0).collect();
        let mut fallthrough = false;
        if let Some(pos) = scan
            .iter()
            .position(|r| r.kind == Kind::All && r.major.is_none() && r.minor.is_none())
        {
            fallthrough = scan[pos].allow;
            scan.truncate(pos);
        }
        while scan.last().is_some_and(|r| r.allow == fallthrough) {
            scan.pop();
        }
        for rule in scan {
            let mut to_next_rule = Vec::new();
            let dev_type = match rule.kind {
                Kind::All => None,
                Kind::Char => Some(DEV_CHAR),
                Kind::Block => Some(DEV_BLOCK),
            };
            for (reg, value) in [
                (R_TYPE, dev_type),
                (R_MAJOR, rule.major),
                (R_MINOR, rule.minor),
            ] {
                if let Some(v) = value {
                    // 32-bit compare: no sign extension of the immediate.
                    to_next_rule.push(e.push(insn(JMP32_JNE_K, reg, 0, 0, v as i32)));
                }
            }
            if rule.allow {
                to_next_bit.push(e.push(insn(JMP_JA, 0, 0, 0, 0)));
            } else {
                e.verdict(false);
            }
            e.land(&to_next_rule);
        }
        // Allowed: fall through into the next bit's section.
        if !fallthrough {
            e.verdict(false);
        }
        e.land(&to_next_bit);
    }
    e.verdict(true);
    e.insns
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// Lets a nested runtime attach its own (further restricting) filter to a
/// child cgroup; all programs on the path must allow.
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;
const BPF_F_REPLACE: u32 = 1 << 2;

/// The BPF_PROG_LOAD part of `union bpf_attr` up to expected_attach_type;
/// the kernel treats the fields it has and we leave out as zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The BPF_PROG_ATTACH part of `union bpf_attr`.
#[repr(C)]
pub struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn prog_load(insns: &[Insn], log: Option<&mut [u8]>) -> std::io::Result<OwnedFd> {
    let license = c"Apache-2.0";
    let mut name = [0u8; 16];
    for (d, s) in name.iter_mut().zip(b"husk_devices") {
        *d = *s;
    }
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    if let Some(buf) = log {
        attr.log_level = 1;
        attr.log_size = buf.len() as u32;
        attr.log_buf = buf.as_mut_ptr() as u64;
    }
    // SAFETY: bpf(2) reads `attr` and the instruction and license buffers
    // it points to, and writes at most log_size bytes to log_buf; all live
    // across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads a compiled program. A refused program is loaded again with the
/// verifier's log, which then goes into the error.
pub fn load(insns: &[Insn]) -> Result<OwnedFd, DeviceFilterError> {
    match prog_load(insns, None) {
        Ok(fd) => Ok(fd),
        Err(source) => {
            let mut log = vec![0u8; 64 * 1024];
            let _ = prog_load(insns, Some(&mut log));
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]).trim().to_string();
            Err(DeviceFilterError::Load {
                source,
                log: if text.is_empty() {
                    String::new()
                } else {
                    format!(" (verifier: {text})")
                },
            })
        }
    }
}

/// A loaded filter and the directory of the cgroup it goes on, with the
/// attach request prepared before the fork so the child only makes the
/// syscall. Both fds are close-on-exec.
pub struct DeviceFilter {
    cgroup_dir: OwnedFd,
    prog: OwnedFd,
    attr: ProgAttachAttr,
}

impl DeviceFilter {
    pub fn new(cgroup_dir: OwnedFd, prog: OwnedFd) -> Self {
        let attr = attach_attr(&cgroup_dir, &prog);
        DeviceFilter {
            cgroup_dir,
            prog,
            attr,
        }
    }

    /// The request for [`attach_raw`]; valid while `self` lives.
    pub fn attach_attr(&self) -> &ProgAttachAttr {
        &self.attr
    }

    pub fn prog(&self) -> &OwnedFd {
        &self.prog
    }

    pub fn cgroup_dir(&self) -> &OwnedFd {
        &self.cgroup_dir
    }
}

fn attach_attr(cgroup_dir: &OwnedFd, prog: &OwnedFd) -> ProgAttachAttr {
    ProgAttachAttr {
        target_fd: cgroup_dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    }
}

/// bpf(BPF_PROG_ATTACH): a raw syscall, callable between fork and exec.
/// Returns the syscall's result (-1 with errno set on failure).
///
/// # Safety
/// The fds in `attr` must be open for the duration of the call.
pub unsafe fn attach_raw(attr: &ProgAttachAttr) -> libc::c_int {
    // SAFETY: bpf(2) only reads `attr`; the caller keeps its fds open.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            attr as *const ProgAttachAttr,
            std::mem::size_of::<ProgAttachAttr>(),
        ) as libc::c_int
    }
}

/// Swaps the program attached to a cgroup for a new one in one step
/// (`linux.resources` update of a running container).
pub fn replace(
    cgroup_dir: &OwnedFd,
    old: &OwnedFd,
    new: &OwnedFd,
    cgroup: &str,
) -> Result<(), DeviceFilterError> {
    let mut attr = attach_attr(cgroup_dir, new);
    attr.attach_flags |= BPF_F_REPLACE;
    attr.replace_bpf_fd = old.as_raw_fd() as u32;
    // SAFETY: all three fds are borrowed for the call.
    if unsafe { attach_raw(&attr) } < 0 {
        return Err(DeviceFilterError::Attach {
            cgroup: cgroup.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a device program the way the kernel would for one request,
    /// after checking what the verifier checks of its shape: every jump
    /// goes forward and lands inside, and every instruction is reachable.
    /// Only the instructions `compile` emits are understood.
    fn run(prog: &[Insn], dev_type: u32, access: u32, major: u32, minor: u32) -> bool {
        let ctx = [(access << 16) | dev_type, major, minor];
        let mut regs = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, 1, "loads only from the context");
                    regs[dst] = u64::from(ctx[i.off as usize / 4]);
                }
                ALU32_AND_K => regs[dst] = u64::from(regs[dst] as u32 & i.imm as u32),
                ALU32_RSH_K => regs[dst] = u64::from((regs[dst] as u32) >> i.imm),
                ALU64_MOV_K => regs[dst] = i.imm as i64 as u64,
                JMP32_JNE_K => {
                    if regs[dst] as u32 != i.imm as u32 {
                        pc += i.off as usize;
                    }
                }
                JMP32_JSET_K => {
                    if regs[dst] as u32 & i.imm as u32 != 0 {
                        pc += i.off as usize;
                    }
                }
                JMP_JA => pc += i.off as usize,
                JMP_EXIT => {
                    assert!(regs[0] <= 1, "verdict {}", regs[0]);
                    return regs[0] == 1;
                }
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn check_shape(prog: &[Insn]) {
        let mut reached = vec![false; prog.len()];
        reached[0] = true;
        for (pc, i) in prog.iter().enumerate() {
            if !reached[pc] {
                panic!("unreachable instruction {pc}: {prog:?}");
            }
            assert!(i.off >= 0, "backward jump at {pc}");
            let target = pc + 1 + i.off as usize;
            match i.code {
                JMP32_JNE_K | JMP32_JSET_K => {
                    assert!(target < prog.len(), "jump out of the program at {pc}");
                    reached[target] = true;
                    reached[pc + 1] = true;
                }
                JMP_JA => {
                    assert!(target < prog.len(), "jump out of the program at {pc}");
                    reached[target] = true;
                }
                JMP_EXIT => {}
                _ => reached[pc + 1] = true,
            }
        }
        assert_eq!(prog.last().map(|i| i.code), Some(JMP_EXIT));
    }

    /// Whether a rule covers a device (not looking at access).
    fn covers(r: &Rule, dev_type: u32, major: u32, minor: u32) -> bool {
        let kind_ok = match r.kind {
            Kind::All => true,
            Kind::Char => dev_type == DEV_CHAR,
            Kind::Block => dev_type == DEV_BLOCK,
        };
        kind_ok
            && !matches!(r.major, Some(m) if m != major)
            && !matches!(r.minor, Some(m) if m != minor)
    }

    /// The reference: per access bit, the last rule covering the device
    /// and granting or refusing that bit decides; none: denied.
    fn reference(rules: &[Rule], dev_type: u32, access: u32, major: u32, minor: u32) -> bool {
        [ACC_MKNOD, ACC_READ, ACC_WRITE]
            .into_iter()
            .filter(|bit| access & bit != 0)
            .all(|bit| {
                rules
                    .iter()
                    .rev()
                    .find(|r| r.access & bit != 0 && covers(r, dev_type, major, minor))
                    .is_some_and(|r| r.allow)
            })
    }

    fn spec_rules(json: serde_json::Value) -> Result<Vec<Rule>, DeviceFilterError> {
        let devices: Vec<LinuxDeviceCgroup> = serde_json::from_value(json).unwrap();
        rules_from_spec(Some(&devices))
    }

    fn decide(rules: &[Rule], t: char, major: u32, minor: u32, access: &str) -> bool {
        let prog = compile(rules);
        check_shape(&prog);
        let dev_type = if t == 'b' { DEV_BLOCK } else { DEV_CHAR };
        let acc = access.chars().fold(0, |a, c| {
            a | match c {
                'r' => ACC_READ,
                'w' => ACC_WRITE,
                _ => ACC_MKNOD,
            }
        });
        let got = run(&prog, dev_type, acc, major, minor);
        assert_eq!(got, reference(rules, dev_type, acc, major, minor));
        got
    }

    #[test]
    fn absent_rules_are_runcs_default_list() {
        let rules = rules_from_spec(None).unwrap();
        assert_eq!(rules, RUNC_DEFAULTS.to_vec());
        assert!(decide(&rules, 'c', 1, 3, "rw"));
        assert!(decide(&rules, 'c', 136, 7, "rw"));
        assert!(decide(&rules, 'c', 10, 200, "rw"));
        // mknod of anything, but no access to what is not listed.
        assert!(decide(&rules, 'c', 4, 1, "m"));
        assert!(decide(&rules, 'b', 8, 0, "m"));
        assert!(!decide(&rules, 'c', 4, 1, "r"));
        assert!(!decide(&rules, 'b', 8, 0, "rw"));
        assert!(!decide(&rules, 'c', 1, 4, "w"));
    }

    #[test]
    fn deny_all_alone_keeps_the_defaults_as_runc_does() {
        let rules = spec_rules(serde_json::json!([{"allow": false, "access": "rwm"}])).unwrap();
        assert!(decide(&rules, 'c', 1, 3, "rw"));
        assert!(!decide(&rules, 'c', 10, 229, "rw"));
    }

    #[test]
    fn rules_after_the_deny_all_refine_the_defaults() {
        let rules = spec_rules(serde_json::json!([
            {"allow": true, "type": "c", "major": 1, "minor": 11, "access": "rwm"},
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
            {"allow": false, "type": "c", "major": 1, "minor": 5, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 4, "access": "r"},
            {"allow": false, "type": "c", "major": 1, "minor": 7, "access": "w"}
        ]))
        .unwrap();
        // The defaults sit right after the deny-all.
        assert_eq!(rules[2..2 + RUNC_DEFAULTS.len()], RUNC_DEFAULTS);
        assert!(!decide(&rules, 'c', 1, 11, "r"));
        assert!(decide(&rules, 'c', 1, 3, "rw"));
        assert!(!decide(&rules, 'c', 1, 5, "r"));
        assert!(!decide(&rules, 'c', 1, 5, "m"));
        assert!(decide(&rules, 'c', 1, 4, "r"));
        assert!(!decide(&rules, 'c', 1, 4, "w"));
        assert!(!decide(&rules, 'c', 1, 4, "rw"));
        assert!(decide(&rules, 'c', 1, 7, "r"));
        assert!(!decide(&rules, 'c', 1, 7, "w"));
        // The other defaults are untouched.
        assert!(decide(&rules, 'c', 1, 9, "rw"));
        assert!(decide(&rules, 'c', 136, 0, "rw"));
    }

    #[test]
    fn without_a_deny_all_the_rules_refine_the_defaults_too() {
        // What an update with one rule sends.
        let rules = spec_rules(serde_json::json!([
            {"allow": false, "type": "c", "major": 1, "minor": 3, "access": "w"}
        ]))
        .unwrap();
        assert_eq!(rules[..RUNC_DEFAULTS.len()], RUNC_DEFAULTS);
        assert!(decide(&rules, 'c', 1, 3, "r"));
        assert!(!decide(&rules, 'c', 1, 3, "w"));
        assert!(!decide(&rules, 'c', 10, 229, "r"));
    }

    #[test]
    fn last_match_wins_per_access_bit() {
        let rules = spec_rules(serde_json::json!([
            {"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rw"},
            {"allow": false, "type": "c", "major": 10, "minor": 229, "access": "w"},
            {"allow": true, "type": "b", "major": 8, "access": "r"},
            {"allow": true, "type": "b", "major": 8, "access": "w"}
        ]))
        .unwrap();
        assert!(decide(&rules, 'c', 10, 229, "r"));
        assert!(!decide(&rules, 'c', 10, 229, "w"));
        assert!(!decide(&rules, 'c', 10, 229, "rw"));
        // Bits granted by two rules together.
        assert!(decide(&rules, 'b', 8, 16, "rw"));
        assert!(!decide(&rules, 'c', 8, 16, "r"));
    }

    #[test]
    fn allow_all_at_the_end_allows_everything_and_cuts_the_program() {
        let rules = spec_rules(serde_json::json!([
            {"allow": false, "type": "c", "major": 1, "minor": 5, "access": "rwm"},
            {"allow": true, "access": "rwm"}
        ]))
        .unwrap();
        assert!(decide(&rules, 'c', 1, 5, "rwm"));
        assert!(decide(&rules, 'b', 259, 0, "rw"));
        let prog = compile(&rules);
        // The prologue, per bit the skip test and jump, the final verdict:
        // the defaults and the deny before the allow-all are gone.
        assert_eq!(prog.len(), 6 + 3 * 2 + 2, "{prog:?}");
    }

    #[test]
    fn a_wildcard_deny_after_allows_denies() {
        let rules = spec_rules(serde_json::json!([
            {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
            {"allow": false, "type": "c", "access": "rwm"}
        ]))
        .unwrap();
        // Not a deny-all (char devices only): the defaults come first and
        // the wildcard deny after them wins.
        assert!(!decide(&rules, 'c', 1, 3, "r"));
        assert!(!decide(&rules, 'c', 1, 5, "r"));
        assert!(!decide(&rules, 'c', 1, 5, "m"));
        assert!(!decide(&rules, 'b', 1, 3, "r"));
        assert!(decide(&rules, 'b', 8, 0, "m"));
    }

    /// Many random rule lists against the reference, on a small space of
    /// devices so that rules and requests collide often.
    #[test]
    fn generated_programs_agree_with_the_reference() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..300 {
            let count = next(8) as usize;
            let mut rules = Vec::new();
            for _ in 0..count {
                let pick = |v: u64| if v == 0 { None } else { Some(v as u32 - 1) };
                rules.push(Rule {
                    allow: next(2) == 0,
                    kind: [Kind::All, Kind::Char, Kind::Block][next(3) as usize],
                    major: pick(next(4)),
                    minor: pick(next(4)),
                    access: 1 + next(7) as u32,
                });
            }
            let prog = compile(&rules);
            check_shape(&prog);
            for dev_type in [DEV_CHAR, DEV_BLOCK] {
                for access in 1..=7 {
                    for major in 0..4 {
                        for minor in 0..4 {
                            assert_eq!(
                                run(&prog, dev_type, access, major, minor),
                                reference(&rules, dev_type, access, major, minor),
                                "rules {rules:?} type {dev_type} access {access} {major}:{minor}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn large_numbers_compare_as_unsigned_32_bit() {
        let rules = vec![Rule {
            allow: true,
            kind: Kind::Char,
            major: Some(0xffff_fff0),
            minor: None,
            access: ACC_ALL,
        }];
        assert!(decide(&rules, 'c', 0xffff_fff0, 1, "r"));
        assert!(!decide(&rules, 'c', 0x7fff_fff0, 1, "r"));
    }

    #[test]
    fn bad_rules_name_the_index() {
        for (json, want) in [
            (
                serde_json::json!([{"allow": true, "type": "u", "access": "r"}]),
                "[0]",
            ),
            (
                serde_json::json!([{"allow": true}, {"allow": true, "access": ""}]),
                "[0]",
            ),
            (
                serde_json::json!([{"allow": true, "access": "r"}, {"allow": true, "access": "rx"}]),
                "[1]",
            ),
            (
                serde_json::json!([{"allow": true, "access": "r", "major": -2}]),
                "[0]",
            ),
            (
                serde_json::json!([{"allow": true, "access": "r", "minor": 1_i64 << 33}]),
                "[0]",
            ),
        ] {
            let err = spec_rules(json.clone()).unwrap_err().to_string();
            assert!(
                err.contains(&format!("linux.resources.devices{want}")),
                "{json}: {err}"
            );
        }
    }
}
