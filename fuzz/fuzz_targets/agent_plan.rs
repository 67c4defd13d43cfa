//! The agent's planner on arbitrary specs: the host's user writes
//! config.json, and the agent (PID 1 of the guest) plans it before anything
//! exists. The first byte picks a container or an exec and the request's
//! flags; the rest is the JSON. Whatever parses, planning never panics, and
//! a plan it returns keeps the invariants the child relies on: every path
//! it creates or mounts on lies below the rootfs, namespaces are consistent
//! with what the plan sets in them, limits are in range, a seccomp program
//! fits the kernel and never leaves its bounds.
#![no_main]

use husk_agent::plan::fs::{Entry, MapFs};
use husk_agent::plan::seccomp_check::{run, SeccompData};
use husk_agent::plan::userns::UserNs;
use husk_agent::plan::{self, ContainerRequest, LaunchPlan, PidNs};
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::ffi::CString;
use std::path::Path;
use std::sync::{Arc, OnceLock};

const SHARED: &str = "/run/husk/shared";
const ROOT: &str = "/run/husk/shared/c1/rootfs";
const CGROUP_PROCS: &str = "/sys/fs/cgroup/husk/c1/cgroup.procs";

/// The guest the fixtures of agent/tests/fixtures/plan see: a rootfs with
/// a shell, shared mount sources, some sysctls, namespaces of pid 77 and
/// of a running container (pid 42) to join.
fn guest() -> &'static MapFs {
    static FS: OnceLock<MapFs> = OnceLock::new();
    FS.get_or_init(|| {
        let mut fs = MapFs::new();
        fs.insert(
            format!("{ROOT}/bin/busybox"),
            Entry::File { executable: true },
        );
        fs.insert(
            format!("{ROOT}/bin/sh"),
            Entry::Symlink("/bin/busybox".into()),
        );
        fs.insert(format!("{ROOT}/usr/bin"), Entry::Symlink("../bin".into()));
        fs.insert(format!("{ROOT}/loop"), Entry::Symlink("/loop".into()));
        fs.insert(
            format!("{ROOT}/etc/hosts"),
            Entry::File { executable: false },
        );
        fs.insert(format!("{SHARED}/c1/mounts/data"), Entry::Dir);
        fs.insert(
            format!("{SHARED}/c1/mounts/resolv.conf"),
            Entry::File { executable: false },
        );
        for k in [
            "net/ipv4/ip_forward",
            "kernel/shm_rmid_forced",
            "kernel/domainname",
        ] {
            fs.insert(format!("/proc/sys/{k}"), Entry::File { executable: false });
        }
        for ns in ["user", "ipc", "uts", "net", "cgroup", "time", "mnt", "pid"] {
            fs.insert(
                format!("/proc/self/ns/{ns}"),
                Entry::Symlink(format!("{ns}:[1]").into()),
            );
            fs.insert(
                format!("/proc/42/ns/{ns}"),
                Entry::Symlink(format!("{ns}:[2]").into()),
            );
            fs.insert(
                format!("/proc/77/ns/{ns}"),
                Entry::Symlink(format!("{ns}:[3]").into()),
            );
        }
        fs.insert_text("/proc/77/uid_map", "0 100000 65536\n");
        fs.insert_text("/proc/77/gid_map", "0 100000 65536\n");
        fs
    })
}

fn below_root(c: &CString) -> bool {
    let b = c.as_bytes();
    b.starts_with(ROOT.as_bytes())
        && (b.len() == ROOT.len() || b[ROOT.len()] == b'/')
        && !b.windows(4).any(|w| w == b"/../")
        && !b.ends_with(b"/..")
}

const NS_FLAGS: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWTIME;

fn check(plan: &LaunchPlan, container: bool, input_len: usize) {
    assert!(!plan.args.is_empty() && !plan.args[0].is_empty());
    assert!(plan
        .args
        .iter()
        .chain(plan.env.iter().flat_map(|(k, v)| [k, v]))
        .all(|s| !s.contains('\0')));
    assert_eq!(
        plan.unshare_flags & !NS_FLAGS,
        0,
        "{:#x}",
        plan.unshare_flags
    );
    assert_eq!(
        plan.unshare_flags & libc::CLONE_NEWPID,
        0,
        "pid namespaces go through pid_ns"
    );
    assert_eq!(
        plan.unshare_flags & libc::CLONE_NEWUSER,
        0,
        "user namespaces go through user_ns"
    );
    if container {
        assert_ne!(plan.unshare_flags & libc::CLONE_NEWNS, 0);
    }
    let uts = plan.unshare_flags & libc::CLONE_NEWUTS != 0;
    assert!(uts || (plan.hostname.is_none() && plan.domainname.is_none()));
    assert!(plan.unshare_flags & libc::CLONE_NEWTIME != 0 || plan.time_offsets.is_none());
    // One entry per namespace type: the child opens at most 8.
    let mut kinds: Vec<_> = plan.join.iter().map(|(_, f)| *f).collect();
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(
        kinds.len(),
        plan.join.len(),
        "a namespace type joined twice"
    );
    assert!(plan.join.len() <= 8);
    for (_, flag) in &plan.join {
        assert_eq!(
            plan.unshare_flags & flag,
            0,
            "{flag:#x} both joined and created"
        );
    }
    if let Some(i) = plan
        .join
        .iter()
        .position(|(_, f)| *f == libc::CLONE_NEWUSER)
    {
        assert_eq!(i, 0, "the user namespace is joined first");
    }
    if let PidNs::Join(p) = &plan.pid_ns {
        assert!(!p.as_bytes().is_empty());
    }
    match &plan.user_ns {
        UserNs::New { uid, gid } => {
            for maps in [uid, gid] {
                assert!(!maps.is_empty() && maps.len() <= 340);
                assert!(husk_agent::plan::userns::map_id(maps, 0).is_some());
            }
            assert!(husk_agent::plan::userns::map_id(uid, plan.uid).is_some());
        }
        UserNs::Join(_) => assert!(container),
        UserNs::Inherit => {}
    }
    for r in &plan.rlimits {
        assert!((0..16).contains(&r.resource) && r.soft <= r.hard, "{r:?}");
    }
    if let Some(caps) = &plan.caps {
        for m in [
            caps.bounding,
            caps.effective,
            caps.permitted,
            caps.inheritable,
            caps.ambient,
        ] {
            assert_eq!(m >> 41, 0, "{caps:?}");
        }
    }
    if let Some(v) = &plan.oom_score_adj {
        let v: i32 = v.to_str().unwrap().parse().unwrap();
        assert!((-1000..=1000).contains(&v));
    }
    if let Some(p) = plan.ioprio {
        assert!(
            (1..=3).contains(&(p >> 13)) && (0..=7).contains(&(p & 0x1fff)),
            "{p:#x}"
        );
    }
    for (path, _) in &plan.sysctls {
        let p = path.as_bytes();
        assert!(
            p.starts_with(b"/proc/sys/") && !p.windows(2).any(|w| w == b".."),
            "{path:?}"
        );
    }
    if let Some(s) = &plan.seccomp {
        check_program(s);
    }
    if let Some(r) = &plan.rootfs {
        assert!(container);
        assert_eq!(r.root.as_bytes(), ROOT.as_bytes());
        let mut inside: Vec<&CString> = Vec::new();
        for m in &r.mounts {
            inside.push(&m.target);
            inside.extend(&m.mkdirs);
            assert!(
                m.mkdirs.len() <= input_len,
                "more directories than input bytes"
            );
        }
        for d in &r.devices {
            inside.push(&d.path);
        }
        inside.extend(r.symlinks.iter().map(|(_, link)| link));
        inside.extend(&r.masked);
        inside.extend(&r.readonly);
        inside.extend(&r.device_dirs);
        inside.extend(&r.early_mkdirs);
        inside.extend(&r.early_files);
        for p in inside {
            assert!(below_root(p), "{p:?} is not below the rootfs");
        }
        for s in &r.staged_devices {
            assert!(s.path.starts_with("/dev/.husk-devices/0"), "{s:?}");
        }
        assert!(r.bind_devices || r.staged_devices.is_empty());
        assert_eq!(r.bind_devices, !matches!(plan.user_ns, UserNs::Inherit));
    } else {
        assert!(!container);
    }
}

/// A compiled program fits the kernel and, on any call, returns without
/// leaving its bounds.
fn check_program(s: &plan::SeccompProgram) {
    assert!(
        !s.filter.is_empty() && s.filter.len() <= 4096,
        "{}",
        s.filter.len()
    );
    for nr in [0, 1, 59, 135, 0x4000_0000, -1] {
        for arch in [0xc000_003e, 0x4000_0003] {
            let data = SeccompData {
                nr,
                arch,
                args: [0, 1, u64::MAX, 8, 1 << 32, 7],
                ..Default::default()
            };
            if let Err(e) = run(&s.filter, &data) {
                panic!("the compiled program is malformed: {e}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, json)) = data.split_first() else {
        return;
    };
    let fs = guest();
    if mode & 1 == 0 {
        let Ok(spec) = serde_json::from_slice(json) else {
            return;
        };
        let mut shared_mounts = HashMap::new();
        if mode & 2 != 0 {
            shared_mounts.insert("/data".to_string(), "c1/mounts/data".to_string());
            shared_mounts.insert(
                "/etc/resolv.conf".to_string(),
                "../../../etc/../c1/mounts/resolv.conf".to_string(),
            );
        }
        let request = ContainerRequest {
            root: Path::new(ROOT),
            shared_dir: Path::new(SHARED),
            shared_mounts: &shared_mounts,
            cgroup_procs: Path::new(CGROUP_PROCS),
            no_pivot: mode & 4 != 0,
            device_stage: Path::new("/dev/.husk-devices/0"),
        };
        match plan::plan_container(&spec, &request, fs) {
            Ok(p) => check(&p, true, data.len()),
            Err(e) => assert!(e.to_string().starts_with("config.json: "), "{e}"),
        }
    } else {
        let Ok(process) = serde_json::from_slice(json) else {
            return;
        };
        let seccomp = (mode & 2 != 0).then(|| {
            let profile = serde_json::from_value(serde_json::json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["ptrace"], "action": "SCMP_ACT_ERRNO"}]
            }))
            .unwrap();
            Arc::new(plan::seccomp::compile(&profile).unwrap())
        });
        let pid = if mode & 4 != 0 { 42 } else { 77 };
        match plan::plan_exec(
            &process,
            pid,
            Path::new(ROOT),
            Path::new(CGROUP_PROCS),
            seccomp,
            fs,
        ) {
            Ok(p) => check(&p, false, data.len()),
            Err(e) => assert!(e.to_string().starts_with("config.json: "), "{e}"),
        }
    }
});
