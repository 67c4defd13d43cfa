//! An OCI bundle, read once and checked before anything is created: the one
//! model the CLI's monitor and the shim both work on.
//!
//! The spec is kept twice: typed (`oci_spec`), for what husk reads, and as
//! the JSON it came in, for what husk passes on (to the agent, rewritten by
//! the shim for a pod), so fields `oci_spec` does not know survive.

use crate::config::Config;
use crate::share::{BindMode, MountPoint};
use crate::sizing::{self, MAX_VCPUS};
use oci_spec::runtime::Spec;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// CRI: which container of a pod this is (`sandbox` or `container`).
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI: the pod's id.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Pod resources (containerd 1.7+ sets them on the sandbox container).
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// husk's own overrides of the VM size.
pub const HUSK_MEMORY_MIB: &str = "io.husk.vm.memory-mib";
pub const HUSK_VCPUS: &str = "io.husk.vm.vcpus";

/// The smallest VM husk boots: the guest kernel and agent need this much.
const MIN_MEMORY_MIB: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {} does not exist", .0.display())]
    Missing(PathBuf),
    #[error("bundle {}: {source}", .dir.display())]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: malformed JSON: {source}", .path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: unsupported ociVersion {version:?} (husk supports 1.x)", .path.display())]
    Version { path: PathBuf, version: String },
    /// The error names the field (`linux.namespaces[5].type: unknown
    /// variant ...`), not only the bad value.
    #[error("{}: invalid runtime spec: {field}: {message}", .path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{}: root.path: rootfs {} does not exist", .path.display(), .rootfs.display())]
    MissingRootfs { path: PathBuf, rootfs: PathBuf },
    #[error("{}: mounts[{index}] ({destination}): bind source {}: {source}", .path.display(), .bind_source.display())]
    BindSource {
        path: PathBuf,
        index: usize,
        destination: String,
        bind_source: PathBuf,
        source: std::io::Error,
    },
    #[error("config.json: {field} {value:?}: {why}")]
    Field {
        field: &'static str,
        value: String,
        why: String,
    },
    #[error(transparent)]
    Sizing(#[from] sizing::SizeError),
}

/// One bind mount of the spec, with its source as a host path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Its index in `mounts` (it names the share's directory).
    pub index: usize,
    pub source: PathBuf,
    pub destination: String,
    pub mode: BindMode,
}

/// The VM a bundle asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub memory_mib: u32,
    pub vcpus: u32,
}

pub struct Bundle {
    /// The bundle directory, absolute.
    pub dir: PathBuf,
    pub spec: Spec,
    /// config.json as read: what is passed on.
    pub value: Value,
    /// The rootfs on the host (`root.path`, relative to the bundle).
    pub rootfs: PathBuf,
}

impl Bundle {
    /// Reads and checks `dir/config.json`: the version, the typed spec, the
    /// rootfs and every bind source, so a bad bundle fails before a VM is
    /// started, naming what is wrong (runc fails `create` the same way).
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let dir = dir.canonicalize().map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => BundleError::Missing(dir.to_path_buf()),
            _ => BundleError::Dir {
                dir: dir.to_path_buf(),
                source,
            },
        })?;
        let path = dir.join("config.json");
        let text = std::fs::read(&path).map_err(|source| BundleError::Read {
            path: path.clone(),
            source,
        })?;
        let value: Value = serde_json::from_slice(&text).map_err(|source| BundleError::Json {
            path: path.clone(),
            source,
        })?;
        let version = value
            .get("ociVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        if version.split('.').next() != Some("1") {
            return Err(BundleError::Version {
                path,
                version: version.to_string(),
            });
        }
        let spec: Spec =
            serde_path_to_error::deserialize(value.clone()).map_err(|e| BundleError::Invalid {
                path: path.clone(),
                field: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let rootfs = if root.is_absolute() {
            root
        } else {
            dir.join(root)
        };
        if !rootfs.is_dir() {
            return Err(BundleError::MissingRootfs { path, rootfs });
        }
        let bundle = Bundle {
            dir,
            spec,
            value,
            rootfs,
        };
        for m in bundle.bind_mounts() {
            if let Err(source) = std::fs::metadata(&m.source) {
                return Err(BundleError::BindSource {
                    path,
                    index: m.index,
                    destination: m.destination,
                    bind_source: m.source,
                    source,
                });
            }
        }
        Ok(bundle)
    }

    /// The spec as JSON bytes for the guest (with whatever the caller
    /// rewrote in `value`).
    pub fn spec_json(&self) -> Vec<u8> {
        // Serialising a `Value` cannot fail: every map key is a string.
        serde_json::to_vec(&self.value).unwrap_or_default()
    }

    pub fn annotations(&self) -> HashMap<String, String> {
        annotations(&self.value)
    }

    /// A bind source as a host path: relative sources are relative to the
    /// bundle, as in runc.
    pub fn host_source(&self, source: &Path) -> PathBuf {
        if source.is_absolute() {
            source.to_path_buf()
        } else {
            self.dir.join(source)
        }
    }

    /// The spec's bind mounts (`type: bind`, or a `bind`/`rbind` option),
    /// with host sources and how read-only the host makes them.
    pub fn bind_mounts(&self) -> Vec<BindMount> {
        self.spec
            .mounts()
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .enumerate()
            .filter(|(_, m)| is_bind(m))
            .filter_map(|(index, m)| {
                Some(BindMount {
                    index,
                    source: self.host_source(m.source().as_ref()?),
                    destination: m.destination().display().to_string(),
                    mode: BindMode::from_options(m.options().as_deref().unwrap_or(&[])),
                })
            })
            .collect()
    }

    /// With `root.readonly`, the mount points the host makes in the rootfs
    /// before sharing it read-only (`share::rootfs_mount_points`); None for
    /// a writable rootfs.
    pub fn readonly_rootfs(&self) -> Option<Vec<MountPoint>> {
        let readonly = self
            .spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false);
        if !readonly {
            return None;
        }
        let mounts: Vec<(String, Option<PathBuf>)> = self
            .spec
            .mounts()
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .map(|m| {
                let source = m
                    .source()
                    .as_ref()
                    .filter(|_| is_bind(m))
                    .map(|s| self.host_source(s));
                (m.destination().display().to_string(), source)
            })
            .collect();
        let cwd = self
            .spec
            .process()
            .as_ref()
            .map(|p| p.cwd().display().to_string());
        Some(crate::share::rootfs_mount_points(
            mounts.iter().map(|(d, s)| (d.as_str(), s.as_deref())),
            cwd.as_deref(),
        ))
    }

    /// The VM for this bundle. Memory: husk's annotation, else the pod's
    /// (CRI), else the container's limit, each plus the guest's overhead,
    /// else the default. vCPUs: husk's annotation, else the pod's CPU
    /// quota, else the container's, rounded up, else the default; and at
    /// least one more than the highest CPU `cpu.cpus` names, since the
    /// guest applies that cpuset to its own CPUs.
    pub fn vm_size(&self, config: &Config) -> Result<VmSize, BundleError> {
        let host_mib = sizing::host_memory_mib();
        let annotations = self.annotations();
        let positive = |key: &str| {
            annotations
                .get(key)
                .and_then(|v| v.trim().parse::<i64>().ok())
                .filter(|v| *v > 0)
        };
        let resources = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref());
        let memory_limit = resources
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
            .filter(|l| *l > 0);
        let memory_mib = if let Some(mib) = positive(HUSK_MEMORY_MIB) {
            sizing::checked_memory(HUSK_MEMORY_MIB, mib.unsigned_abs(), host_mib)?
        } else if let Some(bytes) = positive(SANDBOX_MEMORY) {
            sizing::memory_for_limit(SANDBOX_MEMORY, bytes, config.guest_overhead_mib, host_mib)?
        } else if let Some(bytes) = memory_limit {
            sizing::memory_for_limit(
                "config.json: linux.resources.memory.limit",
                bytes,
                config.guest_overhead_mib,
                host_mib,
            )?
        } else {
            config.default_memory_mib
        };

        let cpu = resources.and_then(|r| r.cpu().as_ref());
        let by_quota = if let Some(n) = positive(HUSK_VCPUS) {
            u32::try_from(n).unwrap_or(MAX_VCPUS).clamp(1, MAX_VCPUS)
        } else if let Some(quota) = positive(SANDBOX_CPU_QUOTA) {
            let period = positive(SANDBOX_CPU_PERIOD).unwrap_or(100_000);
            sizing::vcpus_for_quota(quota, period, MAX_VCPUS)
        } else {
            match cpu.and_then(|c| Some((c.quota()?, c.period().unwrap_or(100_000)))) {
                Some((quota, period)) if quota > 0 && period > 0 => sizing::vcpus_for_quota(
                    quota,
                    i64::try_from(period).unwrap_or(i64::MAX),
                    MAX_VCPUS,
                ),
                _ => config.default_vcpus,
            }
        };
        let by_cpuset = match cpu.and_then(|c| c.cpus().as_deref()) {
            Some(list) => highest_cpu(list)
                .map_err(|why| BundleError::Field {
                    field: "linux.resources.cpu.cpus",
                    value: list.to_string(),
                    why,
                })?
                .map_or(0, |highest| highest.saturating_add(1)),
            None => 0,
        };
        if by_cpuset > MAX_VCPUS {
            return Err(BundleError::Field {
                field: "linux.resources.cpu.cpus",
                value: cpu.and_then(|c| c.cpus().clone()).unwrap_or_default(),
                why: format!(
                    "names CPU {}: a husk VM has at most {MAX_VCPUS} vCPUs",
                    by_cpuset - 1
                ),
            });
        }
        Ok(VmSize {
            memory_mib: memory_mib.max(MIN_MEMORY_MIB),
            vcpus: by_quota.max(by_cpuset),
        })
    }
}

fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .any(|o| o == "bind" || o == "rbind")
}

/// The string annotations of a spec.
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

/// The highest CPU of a cpuset list (`0-3,7`), None for an empty list.
fn highest_cpu(list: &str) -> Result<Option<u32>, String> {
    let mut highest = None;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let parse = |n: &str| {
            n.trim()
                .parse::<u32>()
                .map_err(|_| format!("{part:?} is not a CPU number or range"))
        };
        let (first, last) = (parse(first)?, parse(last)?);
        if first > last {
            return Err(format!("{part:?} is a descending range"));
        }
        highest = highest.max(Some(last));
    }
    Ok(highest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cpuset_lists_parse() {
        assert_eq!(highest_cpu("0"), Ok(Some(0)));
        assert_eq!(highest_cpu("0-3,7"), Ok(Some(7)));
        assert_eq!(highest_cpu(" 2 , 0-1 "), Ok(Some(2)));
        assert_eq!(highest_cpu(""), Ok(None));
        assert!(highest_cpu("3-1").is_err());
        assert!(highest_cpu("a").is_err());
        assert!(highest_cpu("1-").is_err());
    }

    struct TestBundle(PathBuf);

    impl TestBundle {
        fn new(name: &str, spec: Value) -> TestBundle {
            let dir = std::env::temp_dir()
                .join(format!("husk-bundle-test-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("rootfs")).expect("rootfs dir");
            std::fs::write(dir.join("config.json"), spec.to_string()).expect("config.json");
            TestBundle(dir)
        }
    }

    impl Drop for TestBundle {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn spec_with(extra: Value) -> Value {
        let mut spec = json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
            "process": {"cwd": "/", "args": ["true"], "user": {"uid": 0, "gid": 0}}});
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        spec
    }

    fn size_of(name: &str, extra: Value) -> Result<VmSize, BundleError> {
        let b = TestBundle::new(name, spec_with(extra));
        Bundle::load(&b.0)?.vm_size(&Config::default())
    }

    #[test]
    fn vm_size_from_annotations_resources_cpuset_or_defaults() {
        let config = Config::default();
        let size = size_of("default", json!({})).expect("default");
        assert_eq!(
            size,
            VmSize {
                memory_mib: config.default_memory_mib.max(MIN_MEMORY_MIB),
                vcpus: config.default_vcpus
            }
        );
        let pod = size_of(
            "pod",
            json!({"annotations": {SANDBOX_MEMORY: "268435456", SANDBOX_CPU_QUOTA: "150000"}}),
        )
        .expect("pod");
        assert_eq!(pod.memory_mib, 256 + config.guest_overhead_mib);
        assert_eq!(pod.vcpus, 2);
        let limit = size_of(
            "limit",
            json!({"linux": {"resources": {"memory": {"limit": 100 << 20}}}}),
        )
        .expect("limit");
        assert_eq!(limit.memory_mib, 100 + config.guest_overhead_mib);
        // cpu.cpus "2-3" needs CPUs 0 to 3 in the guest, whatever the quota.
        let cpuset = size_of(
            "cpuset",
            json!({"linux": {"resources": {"cpu": {"cpus": "2-3", "quota": 100000}}}}),
        )
        .expect("cpuset");
        assert_eq!(cpuset.vcpus, 4);
        let husk = size_of(
            "husk",
            json!({"annotations": {HUSK_VCPUS: "3", HUSK_MEMORY_MIB: "300"}}),
        )
        .expect("husk annotations");
        assert_eq!(
            husk,
            VmSize {
                memory_mib: 300,
                vcpus: 3
            }
        );
    }

    #[test]
    fn bad_sizes_are_refused_naming_the_field() {
        let e = size_of(
            "huge",
            json!({"linux": {"resources": {"memory": {"limit": i64::MAX}}}}),
        )
        .expect_err("accepted")
        .to_string();
        assert!(e.contains("linux.resources.memory.limit"), "{e}");
        let e = size_of(
            "manycpus",
            json!({"linux": {"resources": {"cpu": {"cpus": "0-99"}}}}),
        )
        .expect_err("accepted")
        .to_string();
        assert!(
            e.contains("linux.resources.cpu.cpus") && e.contains("CPU 99"),
            "{e}"
        );
        let e = size_of(
            "badcpus",
            json!({"linux": {"resources": {"cpu": {"cpus": "3-1"}}}}),
        )
        .expect_err("accepted")
        .to_string();
        assert!(e.contains("descending"), "{e}");
    }

    #[test]
    fn bad_bundles_are_refused_naming_what_is_wrong() {
        let b = TestBundle::new("version", json!({"ociVersion": "2.0.0"}));
        let e = Bundle::load(&b.0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("unsupported ociVersion"), "{e}");
        let b = TestBundle::new(
            "field",
            spec_with(json!({"linux": {"namespaces": [{"type": "nope"}]}})),
        );
        let e = Bundle::load(&b.0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("linux.namespaces[0]"), "{e}");
        let b = TestBundle::new(
            "bind",
            spec_with(json!({"mounts": [{"destination": "/x", "type": "bind",
                "source": "/nonexistent-husk-source", "options": ["rbind"]}]})),
        );
        let e = Bundle::load(&b.0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("mounts[0] (/x)"), "{e}");
    }

    #[test]
    fn binds_have_host_sources_and_modes() {
        let b = TestBundle::new(
            "binds",
            spec_with(
                json!({"root": {"path": "rootfs", "readonly": true}, "mounts": [
                    {"destination": "/proc", "type": "proc", "source": "proc"},
                    {"destination": "/data", "type": "none", "source": "rootfs", "options": ["rbind", "ro"]}
                ]}),
            ),
        );
        let bundle = Bundle::load(&b.0).expect("load");
        let binds = bundle.bind_mounts();
        assert_eq!(binds.len(), 1);
        assert_eq!(binds[0].index, 1);
        assert_eq!(binds[0].source, bundle.dir.join("rootfs"));
        assert_eq!(binds[0].destination, "/data");
        assert_ne!(binds[0].mode.readonly, crate::share::ReadOnly::No);
        assert!(bundle.readonly_rootfs().is_some());
    }
}
