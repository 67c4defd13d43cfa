//! Runtime configuration: `/etc/husk/config.toml` (or `$HUSK_CONFIG`), then
//! environment overrides (`HUSK_HYPERVISOR`).

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/husk/config.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("hypervisor {0:?} is not one of auto, qemu, husk-vmm")]
    UnknownHypervisor(String),
}

/// Which hypervisor backend runs sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorChoice {
    /// QEMU, with KVM where KVM can run a guest and TCG otherwise; husk-vmm
    /// becomes the default once it has passed the end-to-end suite on a
    /// hardware-KVM host (`hypervisor::AUTO_PREFERS_QEMU`).
    Auto,
    Qemu,
    HuskVmm,
}

impl std::str::FromStr for HypervisorChoice {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "qemu" => Ok(Self::Qemu),
            "husk-vmm" => Ok(Self::HuskVmm),
            other => Err(ConfigError::UnknownHypervisor(other.to_string())),
        }
    }
}

/// The settings of `/etc/husk/config.toml`. Every field is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub hypervisor: HypervisorChoice,
    /// Guest memory of a sandbox when the spec sets no limit (MiB).
    pub default_memory_mib: u32,
    pub default_vcpus: u32,
    /// Added to a container's memory limit to size its VM (MiB): the guest
    /// kernel and the agent live there too.
    pub guest_overhead_mib: u32,
    /// What the host processes of a sandbox (VMM, backends, monitor) may
    /// use beyond the guest's RAM (MiB): the sandbox's host cgroup gets
    /// `memory.max` = guest memory + this. Measured: an idle pod's host
    /// processes take 115 MiB PSS for a 128 MiB guest (docs/benchmarks.md).
    pub host_overhead_mib: u32,
    /// `pids.max` of the sandbox's host cgroup: the threads of the VMM, the
    /// backends and the monitor.
    pub host_pids_max: u32,
    /// The uids (= gids) jailed helpers run as: one per sandbox, from
    /// `jail_uid_base` to `jail_uid_base + jail_uid_count - 1`. Nothing
    /// else on the host may use this range.
    pub jail_uid_base: u32,
    pub jail_uid_count: u32,
    /// How long a sandbox may take from VMM start to agent ready (seconds).
    pub boot_timeout_secs: u64,
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
    pub husk_vmm: Option<PathBuf>,
    pub virtiofsd: Option<PathBuf>,
    pub vsock_backend: Option<PathBuf>,
    /// virtio-fs cache mode passed to virtiofsd (never, auto, always).
    pub virtiofs_cache: String,
    /// Extra words for the guest kernel command line.
    pub kernel_params: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hypervisor: HypervisorChoice::Auto,
            default_memory_mib: 128,
            default_vcpus: 1,
            guest_overhead_mib: 64,
            host_overhead_mib: 256,
            host_pids_max: 1024,
            jail_uid_base: 1_800_000_000,
            jail_uid_count: 1_000_000,
            boot_timeout_secs: 30,
            kernel: None,
            initramfs: None,
            qemu: None,
            husk_vmm: None,
            virtiofsd: None,
            vsock_backend: None,
            virtiofs_cache: "auto".into(),
            kernel_params: String::new(),
        }
    }
}

impl Config {
    /// Loads the file named by `$HUSK_CONFIG`, else `/etc/husk/config.toml`
    /// if it exists, else the defaults; then applies `$HUSK_HYPERVISOR`.
    pub fn load() -> Result<Self, ConfigError> {
        let explicit = std::env::var_os("HUSK_CONFIG").map(PathBuf::from);
        let path = explicit
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        let mut config = if explicit.is_some() || path.exists() {
            Self::from_file(&path)?
        } else {
            Config::default()
        };
        if let Ok(h) = std::env::var("HUSK_HYPERVISOR") {
            if !h.is_empty() {
                config.hypervisor = h.parse()?;
            }
        }
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.message().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file_and_rejects_unknown_keys() {
        let c: Config =
            toml::from_str("hypervisor = \"qemu\"\ndefault_memory_mib = 256\n").unwrap();
        assert_eq!(c.hypervisor, HypervisorChoice::Qemu);
        assert_eq!(c.default_memory_mib, 256);
        assert_eq!(c.default_vcpus, 1);
        assert!(toml::from_str::<Config>("hypervisr = \"qemu\"").is_err());
        assert!(toml::from_str::<Config>("hypervisor = \"xen\"").is_err());
    }
}
