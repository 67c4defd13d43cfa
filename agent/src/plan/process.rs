//! `process`: args, env, user, the executable looked up as execvp will
//! inside the rootfs, capabilities, rlimits, oomScoreAdj, ioPriority and
//! scheduler.

use super::fs::{Entry, GuestFs};
use super::mounts::{cstr, join_inside};
use super::{CapSets, Rlimit, SpecError};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// Environment as (name, value) pairs.
pub(super) type EnvPairs = Vec<(String, String)>;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Finds `program` the way execvp will inside the container: directly if it
/// has a slash, else along PATH, resolving symlinks inside `root`.
pub fn find_executable(root: &Path, program: &str, path_var: &str, fs: &dyn GuestFs) -> bool {
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![PathBuf::from(program)]
    } else {
        path_var
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(program))
            .collect()
    };
    candidates.iter().any(|c| is_executable_inside(root, c, fs))
}

fn is_executable_inside(root: &Path, path: &Path, fs: &dyn GuestFs) -> bool {
    let mut current = path.to_path_buf();
    for _ in 0..40 {
        let host = join_inside(root, &current);
        match fs.lstat(&host) {
            Ok(Entry::Symlink(target)) => {
                current = if target.is_absolute() {
                    target
                } else {
                    current.parent().unwrap_or(Path::new("/")).join(target)
                };
            }
            Ok(entry) => return entry == Entry::File { executable: true },
            Err(_) => return false,
        }
    }
    false
}

pub(super) fn process_plan(
    process: &oci_spec::runtime::Process,
) -> Result<(Vec<String>, EnvPairs), SpecError> {
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err(SpecError::Invalid("process.args must not be empty".into()));
    }
    // exec takes C strings: refused here, at create, naming the entry.
    for (field, list) in [
        ("args", &args),
        ("env", process.env().as_ref().unwrap_or(&Vec::new())),
    ] {
        if let Some(i) = list.iter().position(|s| s.contains('\0')) {
            return Err(SpecError::Invalid(format!(
                "process.{field}[{i}] contains a NUL byte"
            )));
        }
    }
    let env = process
        .env()
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.clone(), String::new()),
        })
        .collect();
    Ok((args, env))
}

pub(super) fn path_of(env: &[(String, String)]) -> String {
    env.iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| DEFAULT_PATH.to_string())
}

pub(super) fn user_plan(
    process: &oci_spec::runtime::Process,
) -> (u32, u32, Vec<libc::gid_t>, Option<u32>) {
    let user = process.user();
    (
        user.uid(),
        user.gid(),
        user.additional_gids().clone().unwrap_or_default(),
        user.umask(),
    )
}

/// Process fields beyond args/env/user: capabilities, rlimits, oomScoreAdj,
/// ioPriority, scheduler.
pub(super) struct ProcessExtras {
    pub caps: Option<CapSets>,
    pub rlimits: Vec<Rlimit>,
    pub oom_score_adj: Option<CString>,
    pub ioprio: Option<libc::c_int>,
    pub scheduler: Option<(libc::c_int, libc::c_int)>,
}

/// Number of a capability by OCI name (the `caps` crate's table of
/// linux/capability.h). Spelled as runc accepts it: any ASCII case, `CAP_`
/// optional. ASCII only, not `caps::to_canonical`: its Unicode
/// uppercasing turns other spellings (`ſ` into `S`) into valid names.
pub fn cap_number(name: &str) -> Option<u32> {
    let name = name.to_ascii_uppercase();
    let name = if name.starts_with("CAP_") {
        name
    } else {
        format!("CAP_{name}")
    };
    name.parse::<caps::Capability>()
        .ok()
        .map(|c| u32::from(c.index()))
}

fn cap_mask(set: &Option<oci_spec::runtime::Capabilities>, field: &str) -> Result<u64, SpecError> {
    let mut mask = 0u64;
    for c in set.iter().flatten() {
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let n = cap_number(&name).ok_or_else(|| {
            SpecError::Invalid(format!(
                "process.capabilities.{field}: unknown capability {name:?}"
            ))
        })?;
        // Every capability the crate knows is below 64 (the kernel's
        // two-word capset layout).
        mask |= 1u64.checked_shl(n).ok_or_else(|| {
            SpecError::Invalid(format!(
                "process.capabilities.{field}: capability {name:?} is past bit 63"
            ))
        })?;
    }
    Ok(mask)
}

fn rlimit_number(name: &str) -> Option<libc::c_int> {
    const NAMES: [&str; 16] = [
        "RLIMIT_CPU",
        "RLIMIT_FSIZE",
        "RLIMIT_DATA",
        "RLIMIT_STACK",
        "RLIMIT_CORE",
        "RLIMIT_RSS",
        "RLIMIT_NPROC",
        "RLIMIT_NOFILE",
        "RLIMIT_MEMLOCK",
        "RLIMIT_AS",
        "RLIMIT_LOCKS",
        "RLIMIT_SIGPENDING",
        "RLIMIT_MSGQUEUE",
        "RLIMIT_NICE",
        "RLIMIT_RTPRIO",
        "RLIMIT_RTTIME",
    ];
    NAMES
        .iter()
        .position(|n| *n == name)
        .map(|i| i as libc::c_int)
}

pub(super) fn process_extras(
    process: &oci_spec::runtime::Process,
) -> Result<ProcessExtras, SpecError> {
    let caps = match process.capabilities() {
        Some(c) => Some(CapSets {
            bounding: cap_mask(c.bounding(), "bounding")?,
            effective: cap_mask(c.effective(), "effective")?,
            permitted: cap_mask(c.permitted(), "permitted")?,
            inheritable: cap_mask(c.inheritable(), "inheritable")?,
            ambient: cap_mask(c.ambient(), "ambient")?,
        }),
        None => None,
    };
    let mut rlimits = Vec::new();
    for (i, r) in process
        .rlimits()
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .enumerate()
    {
        let name = serde_json::to_value(r.typ())
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let res = rlimit_number(&name).ok_or_else(|| {
            SpecError::Invalid(format!("process.rlimits[{i}]: unknown type {name:?}"))
        })?;
        if r.soft() > r.hard() {
            return Err(SpecError::Invalid(format!(
                "process.rlimits[{i}] ({name}): soft limit {} above hard limit {}",
                r.soft(),
                r.hard()
            )));
        }
        rlimits.push(Rlimit {
            resource: res,
            soft: r.soft(),
            hard: r.hard(),
        });
    }
    let oom_score_adj = match process.oom_score_adj() {
        Some(v) if !(-1000..=1000).contains(&v) => {
            return Err(SpecError::Invalid(format!(
                "process.oomScoreAdj: {v} is outside -1000..1000"
            )))
        }
        Some(v) => Some(cstr(v.to_string())?),
        None => None,
    };
    let ioprio = match process.io_priority() {
        Some(p) => {
            use oci_spec::runtime::IOPriorityClass;
            let class = match p.class() {
                IOPriorityClass::IoprioClassRt => 1,
                IOPriorityClass::IoprioClassBe => 2,
                IOPriorityClass::IoprioClassIdle => 3,
            };
            if !(0..=7).contains(&p.priority()) {
                return Err(SpecError::Invalid(format!(
                    "process.ioPriority.priority: {} is outside 0..7",
                    p.priority()
                )));
            }
            Some((class << 13) | p.priority() as libc::c_int)
        }
        None => None,
    };
    let scheduler = match process.scheduler() {
        Some(s) => {
            let policy = serde_json::to_value(s.policy())
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let p = match policy.as_str() {
                "SCHED_OTHER" => libc::SCHED_OTHER,
                "SCHED_FIFO" => libc::SCHED_FIFO,
                "SCHED_RR" => libc::SCHED_RR,
                "SCHED_BATCH" => libc::SCHED_BATCH,
                "SCHED_IDLE" => libc::SCHED_IDLE,
                other => {
                    return Err(SpecError::Invalid(format!(
                        "process.scheduler.policy: {other} is not supported in the guest"
                    )))
                }
            };
            Some((p, s.priority().unwrap_or(0)))
        }
        None => None,
    };
    Ok(ProcessExtras {
        caps,
        rlimits,
        oom_score_adj,
        ioprio,
        scheduler,
    })
}

#[cfg(test)]
mod tests {
    use super::cap_number;

    #[test]
    fn capability_names_resolve_as_runc_spells_them() {
        for (name, nr) in [
            ("CAP_CHOWN", 0),
            ("CAP_KILL", 5),
            ("kill", 5),
            ("Cap_Sys_Admin", 21),
            ("CAP_CHECKPOINT_RESTORE", 40),
        ] {
            assert_eq!(cap_number(name), Some(nr), "{name}");
        }
        // Every capability the crate knows resolves to its own number.
        for cap in caps::all() {
            assert_eq!(cap_number(&cap.to_string()), Some(u32::from(cap.index())));
        }
        // Unknown, empty, and a non-ASCII spelling that Unicode uppercasing
        // would turn into CAP_SYS_ADMIN.
        for name in [
            "CAP_NOSUCH",
            "",
            "CAP_",
            "CAP_\u{17f}YS_ADMIN",
            "CAP_CHOWN\0",
        ] {
            assert_eq!(cap_number(name), None, "{name:?}");
        }
    }
}
