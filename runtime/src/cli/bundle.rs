//! Reading an OCI bundle: config.json checked before anything is created.

use anyhow::{bail, Context};
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
        let spec: Spec = serde_json::from_value(value)
            .with_context(|| format!("{}: invalid runtime spec", path.display()))?;
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
        Ok(Bundle {
            dir,
            spec,
            spec_json,
            rootfs,
        })
    }

    /// Guest memory for this container: its limit plus the guest's own
    /// overhead, or the default.
    pub fn memory_mib(&self, config: &husk_runtime::config::Config) -> u32 {
        let limit = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
            .filter(|l| *l > 0);
        match limit {
            Some(bytes) => {
                ((bytes as u64).div_ceil(1 << 20) as u32).saturating_add(config.guest_overhead_mib)
            }
            None => config.default_memory_mib,
        }
    }

    /// vCPUs: the CPU quota rounded up, or the default.
    pub fn vcpus(&self, config: &husk_runtime::config::Config) -> u32 {
        let cpu = self
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.cpu().as_ref());
        match cpu.and_then(|c| Some((c.quota()?, c.period().unwrap_or(100_000)))) {
            Some((q, p)) if q > 0 && p > 0 => (q as u64).div_ceil(p).clamp(1, 64) as u32,
            _ => config.default_vcpus,
        }
    }

    /// Host paths of bind mounts to share into the guest: (index, source, destination).
    pub fn bind_mounts(&self) -> Vec<(usize, PathBuf, String)> {
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
                ))
            })
            .collect()
    }
}
