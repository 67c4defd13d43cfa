//! Runtime configuration: `/etc/husk/config.toml` (or `$HUSK_CONFIG`), then
//! environment overrides (`HUSK_HYPERVISOR`).

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/husk/config.toml";

/// Default `pool_dir`.
pub const DEFAULT_POOL_DIR: &str = "/run/husk/pool";

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
    #[error("{path}: [[pool]] entry {index}: {message}")]
    Pool {
        path: PathBuf,
        index: usize,
        message: String,
    },
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
    /// The warm pool's size classes (`[[pool]]` entries; none: no pool).
    pub pool: Vec<PoolClass>,
    /// Where the pool service keeps its sandboxes and keepers' sockets.
    pub pool_dir: PathBuf,
}

/// One size class of the warm pool (see `pool`): `pool_size` sandboxes of
/// exactly `vcpus` and `memory_mib` kept booted for specs that size to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolClass {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub pool_size: u32,
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
            pool: Vec::new(),
            pool_dir: PathBuf::from(DEFAULT_POOL_DIR),
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
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.message().to_string(),
        })?;
        config.check_pool(path, host_cpus(), host_memory_mib())?;
        Ok(config)
    }

    /// Each `[[pool]]` class must be one a sandbox can have on this host:
    /// at least one sandbox, at least one vCPU and 64 MiB, no more vCPUs or
    /// memory than the host has, each class once, and an absolute pool_dir.
    fn check_pool(
        &self,
        path: &Path,
        host_cpus: u32,
        host_memory_mib: u64,
    ) -> Result<(), ConfigError> {
        let bad = |index: usize, message: String| ConfigError::Pool {
            path: path.to_path_buf(),
            index,
            message,
        };
        if !self.pool.is_empty() && !self.pool_dir.is_absolute() {
            return Err(bad(
                0,
                format!(
                    "pool_dir {} is not an absolute path",
                    self.pool_dir.display()
                ),
            ));
        }
        for (i, class) in self.pool.iter().enumerate() {
            if class.pool_size == 0 {
                return Err(bad(
                    i,
                    "pool_size 0: remove the entry to keep no sandboxes of this size".into(),
                ));
            }
            if class.pool_size > MAX_POOL_SIZE {
                return Err(bad(
                    i,
                    format!("pool_size {} is more than {MAX_POOL_SIZE}", class.pool_size),
                ));
            }
            if class.vcpus == 0 || class.vcpus > host_cpus {
                return Err(bad(
                    i,
                    format!(
                        "vcpus {}: this host has {host_cpus} CPUs (1 to {host_cpus})",
                        class.vcpus
                    ),
                ));
            }
            if class.memory_mib < 64 || u64::from(class.memory_mib) > host_memory_mib {
                return Err(bad(
                    i,
                    format!(
                        "memory_mib {}: this host has {host_memory_mib} MiB (64 to {host_memory_mib})",
                        class.memory_mib
                    ),
                ));
            }
            if self.pool[..i]
                .iter()
                .any(|c| (c.vcpus, c.memory_mib) == (class.vcpus, class.memory_mib))
            {
                return Err(bad(
                    i,
                    format!(
                        "the class of {} vCPUs and {} MiB is listed twice",
                        class.vcpus, class.memory_mib
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The most sandboxes one class may keep booted.
pub const MAX_POOL_SIZE: u32 = 64;

/// The CPUs this process may run on.
fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// The host's memory (MemTotal), in MiB; unknown reads as no limit.
fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(u64::MAX)
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

    #[test]
    fn pool_classes_are_checked_against_the_host() {
        let check = |text: &str| {
            let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
            c.check_pool(Path::new("/c.toml"), 4, 8192)
                .map_err(|e| e.to_string())
        };
        let good = "[[pool]]\nvcpus = 1\nmemory_mib = 192\npool_size = 2\n";
        assert_eq!(check(good), Ok(()));
        assert!(check("").is_ok(), "no pool is the default");
        let c: Config = toml::from_str(good).unwrap();
        assert_eq!(c.pool_dir, Path::new(DEFAULT_POOL_DIR));
        for (text, words) in [
            ("[[pool]]\nvcpus = 1\nmemory_mib = 192\npool_size = 0\n", "pool_size 0"),
            ("[[pool]]\nvcpus = 8\nmemory_mib = 192\npool_size = 1\n", "vcpus 8: this host has 4 CPUs"),
            ("[[pool]]\nvcpus = 1\nmemory_mib = 9000\npool_size = 1\n", "memory_mib 9000: this host has 8192 MiB"),
            ("[[pool]]\nvcpus = 1\nmemory_mib = 192\npool_size = 1\n[[pool]]\nvcpus = 1\nmemory_mib = 192\npool_size = 2\n", "entry 1: the class of 1 vCPUs and 192 MiB is listed twice"),
            ("pool_dir = \"rel\"\n[[pool]]\nvcpus = 1\nmemory_mib = 192\npool_size = 1\n", "not an absolute path"),
        ] {
            let e = check(text).unwrap_err();
            assert!(e.contains(words), "{text:?}: {e}");
        }
        let e =
            check("[[pool]]\nvcpus = 1\nmemory_mib = 192\npool_size = 1\nsize = 3\n").unwrap_err();
        assert!(e.contains("unknown field `size`"), "{e}");
    }
}
