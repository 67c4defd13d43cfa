//! Reading an OCI bundle: config.json checked before anything is created.

use anyhow::{bail, Context};
use husk_runtime::share::BindMode;
use oci_spec::runtime::Spec;
use std::path::{Path, PathBuf};

pub struct Bundle {
    pub dir: PathBuf,
    pub spec: Spec,
    pub spec_json: Vec<u8>,
    pub rootfs: PathBuf,
}

impl Bundle {
    pub fn load(dir: &Path) -> anyhow::Result<Bundle> {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("bundle {}", dir.display()))?;
        let path = dir.join("config.json");
        let spec_json =
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let value: serde_json::Value = serde_json::from_slice(&spec_json)
            .with_context(|| format!("{}: malformed JSON", path.display()))?;
        let version = value
            .get("ociVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if version.split('.').next() != Some("1") {
            bail!(
                "{}: unsupported ociVersion {version:?} (husk supports 1.x)",
                path.display()
            );
        }
        // The error names the field (`linux.namespaces[5].type: unknown
        // variant ...`), not only the bad value.
        let spec: Spec = serde_path_to_error::deserialize(value).map_err(|e| {
            anyhow::anyhow!(
                "{}: invalid runtime spec: {}: {}",
                path.display(),
                e.path(),
                e.inner()
            )
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
            bail!(
                "{}: root.path: rootfs {} does not exist",
                path.display(),
                rootfs.display()
            );
        }
        let bundle = Bundle {
            dir,
            spec,
            spec_json,
            rootfs,
        };
        bundle.check_bind_sources(&path)?;
        Ok(bundle)
    }

    /// A bind mount whose host source is missing fails here, naming the
    /// mount, before a VM is started (runc fails `create` the same way).
    fn check_bind_sources(&self, config: &Path) -> anyhow::Result<()> {
        for (index, source, destination, _) in self.bind_mounts() {
            let source = self.host_source(&source);
            if let Err(e) = std::fs::metadata(&source) {
                bail!(
                    "{}: mounts[{index}] ({destination}): bind source {}: {e}",
                    config.display(),
                    source.display()
                );
            }
        }
        Ok(())
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

    /// Guest memory for this container: its limit plus the guest's own
    /// overhead, or the default.
    pub fn memory_mib(&self, config: &husk_runtime::config::Config) -> anyhow::Result<u32> {
        let limit = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
            .filter(|l| *l > 0);
        use husk_runtime::sizing;
        Ok(match limit {
            Some(bytes) => sizing::memory_for_limit(
                "config.json: linux.resources.memory.limit",
                bytes,
                config.guest_overhead_mib,
                sizing::host_memory_mib(),
            )?,
            None => config.default_memory_mib,
        })
    }

    /// vCPUs: the CPU quota rounded up, or the default; at least enough for
    /// every CPU `cpu.cpus` names, since the guest applies that cpuset to
    /// its own CPUs.
    pub fn vcpus(&self, config: &husk_runtime::config::Config) -> anyhow::Result<u32> {
        let cpu = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.cpu().as_ref());
        let by_quota = match cpu.and_then(|c| Some((c.quota()?, c.period().unwrap_or(100_000)))) {
            Some((q, p)) if q > 0 && p > 0 => husk_runtime::sizing::vcpus_for_quota(
                q,
                i64::try_from(p).unwrap_or(i64::MAX),
                MAX_VCPUS,
            ),
            _ => config.default_vcpus,
        };
        let by_cpuset = match cpu.and_then(|c| c.cpus().as_deref()) {
            Some(list) => highest_cpu(list)
                .map_err(|e| {
                    anyhow::anyhow!("config.json: linux.resources.cpu.cpus {list:?}: {e}")
                })?
                .map_or(0, |highest| highest + 1),
            None => 0,
        };
        if by_cpuset > MAX_VCPUS {
            bail!(
                "config.json: linux.resources.cpu.cpus names CPU {}: a husk VM has at most {MAX_VCPUS} vCPUs",
                by_cpuset - 1
            );
        }
        Ok(by_quota.max(by_cpuset))
    }

    /// Whether the rootfs is read-only (`root.readonly`), and then the
    /// mount points the host makes in it first.
    pub fn readonly_rootfs(&self) -> Option<Vec<husk_runtime::share::MountPoint>> {
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
                let bind = m.typ().as_deref() == Some("bind")
                    || m.options()
                        .as_deref()
                        .unwrap_or(&[])
                        .iter()
                        .any(|o| o == "bind" || o == "rbind");
                let source = m
                    .source()
                    .as_ref()
                    .filter(|_| bind)
                    .map(|s| self.host_source(s));
                (m.destination().display().to_string(), source)
            })
            .collect();
        let cwd = self
            .spec
            .process()
            .as_ref()
            .map(|p| p.cwd().display().to_string());
        Some(husk_runtime::share::rootfs_mount_points(
            mounts.iter().map(|(d, s)| (d.as_str(), s.as_deref())),
            cwd.as_deref(),
        ))
    }

    /// Host paths of bind mounts to share into the guest: (index, source, destination).
    /// The spec's bind mounts: index, source, destination, and how
    /// read-only the host makes them.
    pub fn bind_mounts(&self) -> Vec<(usize, PathBuf, String, BindMode)> {
        self.spec
            .mounts()
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                m.typ().as_deref() == Some("bind")
                    || m.options()
                        .as_deref()
                        .unwrap_or(&[])
                        .iter()
                        .any(|o| o == "bind" || o == "rbind")
            })
            .filter_map(|(i, m)| {
                Some((
                    i,
                    m.source().clone()?,
                    m.destination().display().to_string(),
                    BindMode::from_options(m.options().as_deref().unwrap_or(&[])),
                ))
            })
            .collect()
    }
}

/// The most vCPUs husk gives one VM.
const MAX_VCPUS: u32 = 64;

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
    use super::highest_cpu;

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
}
