//! What the shim reads from and changes in a container's OCI spec: the CRI
//! annotations that make a pod, the VM size, and namespace paths that only
//! mean something inside the pod's VM.

use husk_runtime::config::Config;
use husk_runtime::share::BindMode;
use husk_runtime::share::MountPoint;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Pod resources (containerd 1.7+ sets them on the sandbox container).
const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// husk's own overrides of the VM size, on the sandbox (or plain) container.
pub const HUSK_MEMORY_MIB: &str = "io.husk.vm.memory-mib";
pub const HUSK_VCPUS: &str = "io.husk.vm.vcpus";

/// The role of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// No CRI annotations: a container with a VM of its own.
    Standalone,
    /// The pod's sandbox (pause) container: boots the pod's VM.
    PodSandbox { pod: String },
    /// A container of the pod `pod`, joining its VM.
    PodMember { pod: String },
}

pub fn role(id: &str, annotations: &HashMap<String, String>) -> Role {
    match (
        annotations.get(CONTAINER_TYPE).map(String::as_str),
        annotations.get(SANDBOX_ID),
    ) {
        (Some("sandbox"), pod) => Role::PodSandbox {
            pod: pod.cloned().unwrap_or_else(|| id.to_string()),
        },
        (Some("container"), Some(pod)) if pod != id => Role::PodMember { pod: pod.clone() },
        _ => Role::Standalone,
    }
}

/// Which shim serves the container: the pod's, else its own.
pub fn grouping(id: &str, annotations: &HashMap<String, String>) -> String {
    match role(id, annotations) {
        Role::Standalone => id.to_string(),
        Role::PodSandbox { pod } | Role::PodMember { pod } => pod,
    }
}

/// The bundle's config.json, checked.
pub struct BundleSpec {
    pub value: Value,
    pub rootfs: PathBuf,
}

pub fn read_annotations(bundle: &Path) -> anyhow::Result<HashMap<String, String>> {
    let text = std::fs::read(bundle.join("config.json"))?;
    let value: Value = serde_json::from_slice(&text)?;
    Ok(annotations(&value))
}

pub fn annotations(spec: &Value) -> HashMap<String, String> {
    spec.get("annotations")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

pub fn load(bundle: &Path) -> anyhow::Result<BundleSpec> {
    if !bundle.is_dir() {
        anyhow::bail!("bundle {} does not exist", bundle.display());
    }
    let path = bundle.join("config.json");
    let text =
        std::fs::read(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let value: Value = serde_json::from_slice(&text)
        .map_err(|e| anyhow::anyhow!("{}: malformed JSON: {e}", path.display()))?;
    let version = value
        .get("ociVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if version.split('.').next() != Some("1") {
        anyhow::bail!(
            "{}: unsupported ociVersion {version:?} (husk supports 1.x)",
            path.display()
        );
    }
    if let Err(e) = serde_json::from_value::<oci_spec::runtime::Spec>(value.clone()) {
        anyhow::bail!("{}: invalid runtime spec: {e}", path.display());
    }
    let root = value
        .pointer("/root/path")
        .and_then(Value::as_str)
        .unwrap_or("rootfs");
    let root = PathBuf::from(root);
    let rootfs = if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    };
    Ok(BundleSpec { value, rootfs })
}

/// VM memory (MiB) and vCPUs for a pod or plain container.
pub fn vm_size(spec: &Value, config: &Config) -> anyhow::Result<(u32, u32)> {
    use husk_runtime::sizing;
    let host_mib = sizing::host_memory_mib();
    let ann = annotations(spec);
    let num = |k: &str| {
        ann.get(k)
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|v| *v > 0)
    };
    let memory = if let Some(m) = num(HUSK_MEMORY_MIB) {
        sizing::checked_memory(HUSK_MEMORY_MIB, m.unsigned_abs(), host_mib)?
    } else if let Some(bytes) = num(SANDBOX_MEMORY) {
        sizing::memory_for_limit(SANDBOX_MEMORY, bytes, config.guest_overhead_mib, host_mib)?
    } else if let Some(bytes) = spec
        .pointer("/linux/resources/memory/limit")
        .and_then(Value::as_i64)
        .filter(|v| *v > 0)
    {
        sizing::memory_for_limit(
            "linux.resources.memory.limit",
            bytes,
            config.guest_overhead_mib,
            host_mib,
        )?
    } else {
        config.default_memory_mib
    };
    let quota_vcpus = |q: i64, p: i64| sizing::vcpus_for_quota(q, p, 64);
    let vcpus = if let Some(v) = num(HUSK_VCPUS) {
        u32::try_from(v.clamp(1, 64)).unwrap_or(1)
    } else if let Some(q) = num(SANDBOX_CPU_QUOTA) {
        quota_vcpus(q, num(SANDBOX_CPU_PERIOD).unwrap_or(100_000))
    } else if let Some(q) = spec
        .pointer("/linux/resources/cpu/quota")
        .and_then(Value::as_i64)
        .filter(|v| *v > 0)
    {
        let p = spec
            .pointer("/linux/resources/cpu/period")
            .and_then(Value::as_i64)
            .unwrap_or(100_000);
        quota_vcpus(q, p)
    } else {
        config.default_vcpus
    };
    Ok((memory.max(64), vcpus))
}

/// Makes the spec mean the right thing inside the VM.
///
/// Namespace paths name host files (`/var/run/netns/cni-…`, or
/// `/proc/<task pid>/ns/net` of the pod's sandbox container, whose task pid
/// is this shim's): a VM's own container gets fresh namespaces instead, a
/// pod member joins the namespace of that type of the pod's sandbox process
/// in the guest (`pause_pid`).
pub fn rewrite_for_guest(spec: &mut Value, pause_pid: Option<u32>) {
    // The guest has cgroup v2 only: a `cgroup` (v1) mount, as CRI asks for
    // at /sys/fs/cgroup, is the unified hierarchy there (as runc does on a
    // cgroup v2 host).
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        for m in mounts.iter_mut() {
            if m.get("type").and_then(Value::as_str) == Some("cgroup") {
                m["type"] = Value::String("cgroup2".into());
                m["source"] = Value::String("cgroup2".into());
            }
        }
    }
    if let Some(namespaces) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        for ns in namespaces.iter_mut() {
            let Some(obj) = ns.as_object_mut() else {
                continue;
            };
            if obj
                .get("path")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                obj.remove("path");
                continue;
            }
            let typ = obj
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            match (pause_pid, proc_ns_name(&typ)) {
                (Some(pid), Some(name)) => {
                    obj.insert(
                        "path".into(),
                        Value::String(format!("/proc/{pid}/ns/{name}")),
                    );
                }
                _ => {
                    obj.remove("path");
                }
            }
        }
    }
}

fn proc_ns_name(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "network" => "net",
        "ipc" => "ipc",
        "uts" => "uts",
        "mount" => "mnt",
        "pid" => "pid",
        "cgroup" => "cgroup",
        "user" => "user",
        "time" => "time",
        _ => return None,
    })
}

/// The VM's directory name for a pod or container id: the id itself when
/// short, else a prefix and a hash of it. containerd's ids are 64 hex
/// digits, and the VM's Unix sockets live in that directory: their paths
/// must stay under the 108 bytes a socket address holds.
pub fn vm_dir_name(id: &str) -> String {
    if id.len() <= 24 {
        return id.to_string();
    }
    let h = husk_runtime::sandbox::fnv1a(id.as_bytes());
    let prefix: String = id.chars().take(8).collect();
    format!("{prefix}-{h:016x}")
}

/// Host paths of bind mounts to share into the guest: (index, source, destination).
pub fn bind_mounts(spec: &Value, bundle: &Path) -> Vec<(usize, PathBuf, String, BindMode)> {
    let Some(mounts) = spec.get("mounts").and_then(Value::as_array) else {
        return Vec::new();
    };
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| {
            m.get("type").and_then(Value::as_str) == Some("bind")
                || m.get("options")
                    .and_then(Value::as_array)
                    .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
        })
        .filter_map(|(i, m)| {
            let source = PathBuf::from(m.get("source")?.as_str()?);
            let source = if source.is_absolute() {
                source
            } else {
                bundle.join(source)
            };
            let options: Vec<&str> = m
                .get("options")
                .and_then(Value::as_array)
                .map(|o| o.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            Some((
                i,
                source,
                m.get("destination")?.as_str()?.to_string(),
                BindMode::from_options(&options),
            ))
        })
        .collect()
}

/// With `root.readonly`, the mount points the host makes in the rootfs
/// before sharing it read-only (`share::rootfs_mount_points`).
pub fn readonly_rootfs(spec: &Value, bundle: &Path) -> Option<Vec<MountPoint>> {
    if spec.pointer("/root/readonly").and_then(Value::as_bool) != Some(true) {
        return None;
    }
    let binds: HashMap<usize, PathBuf> = bind_mounts(spec, bundle)
        .into_iter()
        .map(|(i, source, _, _)| (i, source))
        .collect();
    let destinations: Vec<(usize, &str)> = spec
        .get("mounts")
        .and_then(Value::as_array)
        .map(|m| {
            m.iter()
                .enumerate()
                .filter_map(|(i, m)| Some((i, m.get("destination")?.as_str()?)))
                .collect()
        })
        .unwrap_or_default();
    Some(husk_runtime::share::rootfs_mount_points(
        destinations
            .iter()
            .map(|(i, d)| (*d, binds.get(i).map(PathBuf::as_path))),
        spec.pointer("/process/cwd").and_then(Value::as_str),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn roles_follow_cri_annotations() {
        let mut a = HashMap::new();
        assert_eq!(role("c1", &a), Role::Standalone);
        a.insert(CONTAINER_TYPE.to_string(), "sandbox".to_string());
        a.insert(SANDBOX_ID.to_string(), "p1".to_string());
        assert_eq!(role("p1", &a), Role::PodSandbox { pod: "p1".into() });
        a.insert(CONTAINER_TYPE.to_string(), "container".to_string());
        assert_eq!(role("c1", &a), Role::PodMember { pod: "p1".into() });
        assert_eq!(grouping("c1", &a), "p1");
    }

    #[test]
    fn namespace_paths_point_into_the_pod() {
        let mut spec = json!({"linux": {"namespaces": [
            {"type": "network", "path": "/proc/4242/ns/net"},
            {"type": "ipc", "path": "/proc/4242/ns/ipc"},
            {"type": "mount"},
            {"type": "pid", "path": ""}
        ]}});
        let mut sandbox = spec.clone();
        rewrite_for_guest(&mut spec, Some(17));
        assert_eq!(
            spec.pointer("/linux/namespaces/0/path").unwrap(),
            "/proc/17/ns/net"
        );
        assert_eq!(
            spec.pointer("/linux/namespaces/1/path").unwrap(),
            "/proc/17/ns/ipc"
        );
        assert!(spec.pointer("/linux/namespaces/2/path").is_none());
        assert!(spec.pointer("/linux/namespaces/3/path").is_none());
        sandbox["linux"]["namespaces"][0]["path"] = json!("/var/run/netns/cni-1");
        sandbox["mounts"] =
            json!([{"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}]);
        rewrite_for_guest(&mut sandbox, None);
        assert!(sandbox.pointer("/linux/namespaces/0/path").is_none());
        assert_eq!(sandbox.pointer("/mounts/0/type").unwrap(), "cgroup2");
    }

    #[test]
    fn vm_dir_names_are_short_and_distinct() {
        assert_eq!(vm_dir_name("box"), "box");
        let a = vm_dir_name(&"a".repeat(64));
        let b = vm_dir_name(&format!("{}b", "a".repeat(63)));
        assert_eq!(a.len(), 25);
        assert_ne!(a, b);
        assert!(husk_runtime::sandbox::valid_id(&a));
    }

    #[test]
    fn vm_size_from_annotations_resources_or_defaults() {
        let config = Config::default();
        assert_eq!(
            vm_size(&json!({}), &config).ok(),
            Some((config.default_memory_mib, config.default_vcpus))
        );
        let spec =
            json!({"annotations": {SANDBOX_MEMORY: "268435456", SANDBOX_CPU_QUOTA: "150000"}});
        assert_eq!(
            vm_size(&spec, &config).ok(),
            Some((256 + config.guest_overhead_mib, 2))
        );
        let spec = json!({"linux": {"resources": {"memory": {"limit": 100 << 20}}}});
        assert_eq!(
            vm_size(&spec, &config).ok().map(|s| s.0),
            Some(100 + config.guest_overhead_mib)
        );
        // More than the host has: refused, naming the field, never wrapped.
        let spec = json!({"linux": {"resources": {"memory": {"limit": i64::MAX}}}});
        let e = vm_size(&spec, &config).expect_err("accepted").to_string();
        assert!(e.contains("linux.resources.memory.limit"), "{e}");
    }
}
