//! What the shim reads from and changes in a container's OCI spec: the CRI
//! annotations that make a pod, the VM size, and namespace paths that only
//! mean something inside the pod's VM.

use husk_runtime::supervisor::bundle::{annotations, CONTAINER_TYPE, SANDBOX_ID};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

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

/// The annotations of a bundle's config.json (read before the shim
/// serves, to find the pod's shim).
pub fn read_annotations(bundle: &Path) -> anyhow::Result<HashMap<String, String>> {
    let text = std::fs::read(bundle.join("config.json"))?;
    let value: Value = serde_json::from_slice(&text)?;
    Ok(annotations(&value))
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
}
