//! The agent's seccomp compiler, differentially: an arbitrary
//! `linux.seccomp` (decoded from the input so the fuzzer explores
//! semantics, not JSON syntax) is compiled, and the program, run by the
//! classic-BPF interpreter of `husk_agent::plan::seccomp_check`, must give
//! every probe the action the reference model computes from the profile
//! itself. Probes sit on the edges of each condition (the value, one off
//! either way, the other 32-bit word changed), for every operator:
//! SCMP_CMP_NE, LT, LE, EQ, GE, GT and MASKED_EQ. The interpreter is held to
//! the kernel by the agent's unit test
//! `kernel_interpreter_and_model_agree_on_every_operator`, which loads
//! compiled programs in a forked child.
//!
//! A profile the compiler refuses must be refused naming linux.seccomp.
#![no_main]

use husk_agent::plan::seccomp::{compile, AUDIT_ARCH_X86_64};
use husk_agent::plan::seccomp_check::{run, Model, SeccompData};
use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::LinuxSeccomp;
use serde_json::{json, Value};

/// Syscalls the rules name: known ones (with their numbers) and one this
/// kernel does not know (skipped by the compiler).
const NAMES: [(&str, i32); 8] = [
    ("read", 0),
    ("write", 1),
    ("clone", 56),
    ("execve", 59),
    ("kill", 62),
    ("personality", 135),
    ("socket", 41),
    ("no_such_syscall", 100_000),
];

const ACTIONS: [&str; 8] = [
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_LOG",
    "SCMP_ACT_NOTIFY",
];

const OPS: [&str; 7] = [
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
];

/// Values where 64-bit compares done as two 32-bit words go wrong.
const EDGES: [u64; 8] = [
    0,
    1,
    0xffff_ffff,
    1 << 32,
    0x1_0000_0001,
    0x8000_0000_0000_0000,
    u64::MAX - 1,
    u64::MAX,
];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn value(&mut self) -> u64 {
        let tag = self.byte();
        if tag & 0x80 == 0 {
            return EDGES[usize::from(tag) % EDGES.len()];
        }
        let mut v = [0u8; 8];
        for b in &mut v {
            *b = self.byte();
        }
        u64::from_le_bytes(v)
    }
    fn action(&mut self) -> (&'static str, u8) {
        let a = self.byte();
        // NOTIFY (refused) rarely, so most profiles compile.
        let i = usize::from(a) % if a & 0x70 == 0x70 { 8 } else { 7 };
        (ACTIONS[i], self.byte())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let (default, default_errno) = input.action();
    let mut profile = json!({"defaultAction": default});
    if default_errno & 1 != 0 {
        profile["defaultErrnoRet"] = json!(u32::from(default_errno) * 300);
    }
    let mut rules = Vec::new();
    let mut values = Vec::new();
    for _ in 0..input.byte() % 6 {
        let names: Vec<&str> = (0..1 + input.byte() % 3)
            .map(|_| NAMES[usize::from(input.byte()) % NAMES.len()].0)
            .collect();
        let (action, errno) = input.action();
        let mut rule = json!({"names": names, "action": action});
        if errno & 1 != 0 {
            rule["errnoRet"] = json!(errno);
        }
        let args: Vec<Value> = (0..input.byte() % 5)
            .map(|_| {
                let index = input.byte() % 7; // 6: out of range, refused
                let op = OPS[usize::from(input.byte()) % OPS.len()];
                let (value, two) = (input.value(), input.value());
                values.push((index, value, two));
                json!({"index": index, "value": value, "valueTwo": two, "op": op})
            })
            .collect();
        if !args.is_empty() {
            rule["args"] = json!(args);
        }
        rules.push(rule);
    }
    profile["syscalls"] = json!(rules);
    let profile: LinuxSeccomp = match serde_json::from_value(profile) {
        Ok(p) => p,
        Err(e) => panic!("the decoder wrote a profile oci-spec refuses: {e}"),
    };
    let program = match compile(&profile) {
        Ok(p) => p,
        Err(e) => {
            let text = e.to_string();
            assert!(text.starts_with("config.json: linux.seccomp"), "{text}");
            return;
        }
    };
    assert!(program.filter.len() <= 4096);

    // Probes: each named call, with arguments on the edges of every
    // condition, on x86_64; plus another architecture and an x32 number.
    let mut probes = Vec::new();
    for (_, nr) in NAMES {
        let mut args = [0u64; 6];
        probes.push(SeccompData {
            nr,
            arch: AUDIT_ARCH_X86_64,
            args,
            ..Default::default()
        });
        for &(index, value, two) in &values {
            let i = usize::from(index).min(5);
            for v in [
                value,
                value.wrapping_add(1),
                value.wrapping_sub(1),
                value ^ (1 << 32),
                two,
                two | !value,
                value & two,
            ] {
                args[i] = v;
                probes.push(SeccompData {
                    nr,
                    arch: AUDIT_ARCH_X86_64,
                    args,
                    ..Default::default()
                });
            }
        }
    }
    probes.push(SeccompData {
        nr: 0,
        arch: 0x4000_0003,
        ..Default::default()
    });
    probes.push(SeccompData {
        nr: 0x4000_0000,
        arch: AUDIT_ARCH_X86_64,
        ..Default::default()
    });
    probes.push(SeccompData {
        nr: -1,
        arch: AUDIT_ARCH_X86_64,
        ..Default::default()
    });
    let model = Model::new(&profile);
    for p in &probes {
        let got = run(&program.filter, p).unwrap_or_else(|e| panic!("{e} on {p:?}"));
        let want = model.action(p);
        assert_eq!(
            got, want,
            "{p:?}: the program returns {got:#x}, the profile says {want:#x}"
        );
    }
});
