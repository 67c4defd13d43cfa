//! A warm pool for a test: a husk configuration with `[[pool]]` classes and
//! a `pool_dir` in the test's directory, and a `husk pool serve` running
//! for it until dropped (SIGTERM, then waited for).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// One size class: (vcpus, memory_mib, pool_size).
pub type Class = (u32, u32, u32);

/// The default sandbox's class: 1 vCPU, 128 MiB (a spec without limits).
pub const DEFAULT_CLASS: Class = (1, 128, 1);

pub struct TestPool {
    pub config: PathBuf,
    pub pool_dir: PathBuf,
    pub log: PathBuf,
    service: Option<Child>,
}

/// Writes a configuration with `classes` at `<dir>/husk-pool.toml`, the
/// pool in `<dir>/pool`.
pub fn write_config(dir: &Path, classes: &[Class], extra: &str) -> (PathBuf, PathBuf) {
    let pool_dir = dir.join("pool");
    let mut text = format!("pool_dir = \"{}\"\n{extra}\n", pool_dir.display());
    for (vcpus, memory_mib, pool_size) in classes {
        text.push_str(&format!(
            "[[pool]]\nvcpus = {vcpus}\nmemory_mib = {memory_mib}\npool_size = {pool_size}\n"
        ));
    }
    let config = dir.join("husk-pool.toml");
    std::fs::write(&config, text).unwrap_or_else(|e| panic!("{}: {e}", config.display()));
    (config, pool_dir)
}

impl TestPool {
    /// Starts `husk pool serve` for `classes` and waits until every class
    /// has its sandboxes idle.
    pub fn start(dir: &Path, classes: &[Class]) -> TestPool {
        crate::require_guest();
        let (config, pool_dir) = write_config(dir, classes, "");
        let log = dir.join("pool-serve.log");
        let out = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let service = Command::new(crate::husk_bin())
            .args(["pool", "serve"])
            .env("HUSK_CONFIG", &config)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap_or_else(|e| panic!("{e}")))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting husk pool serve: {e}"));
        let pool = TestPool {
            config,
            pool_dir,
            log,
            service: Some(service),
        };
        let want: u32 = classes.iter().map(|c| c.2).sum();
        pool.wait_idle(want as usize, Duration::from_secs(120));
        pool
    }

    /// The environment a husk command needs to use this pool.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![("HUSK_CONFIG", self.config.display().to_string())]
    }

    pub fn service_pid(&self) -> Option<u32> {
        self.service.as_ref().map(Child::id)
    }

    /// `husk pool status --format json`.
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(crate::husk_bin())
            .args(["pool", "status", "--format", "json"])
            .env("HUSK_CONFIG", &self.config)
            .output()
            .unwrap_or_else(|e| panic!("husk pool status: {e}"));
        assert!(
            out.status.success(),
            "husk pool status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("pool status JSON: {e}"))
    }

    /// The directory of the (first) class.
    pub fn class_dir(&self) -> PathBuf {
        let status = self.status();
        let key = status["classes"][0]["class"].as_str().unwrap_or_default();
        self.pool_dir.join(key)
    }

    /// The ids offered now in the first class.
    pub fn idle_ids(&self) -> Vec<String> {
        husk_runtime::pool::ClassDirs::ids_in(&self.class_dir().join("idle"))
    }

    /// The ids claimed (their keepers alive) in the first class.
    pub fn claimed_ids(&self) -> Vec<String> {
        husk_runtime::pool::ClassDirs::ids_in(&self.class_dir().join("claimed"))
    }

    /// Waits until `n` sandboxes are idle in all (the service booted them).
    pub fn wait_idle(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            let idle: u64 = status["classes"]
                .as_array()
                .map(|cs| cs.iter().filter_map(|c| c["idle"].as_u64()).sum())
                .unwrap_or(0);
            if idle as usize >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the pool has {idle} idle sandboxes, not {n}, after {timeout:?}: {status}; service log: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs the service (its keepers see it die) and reaps it.
    pub fn kill_service(&mut self) {
        if let Some(mut s) = self.service.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }

    /// Stops the service as systemd does (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut s) = self.service.take() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(s.id() as i32, libc::SIGTERM) };
            let _ = s.wait();
        }
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What names the pool's unclaimed sandboxes under `marker` (booting or
/// idle: their keeper is alive and their socket is not in `claimed/`):
/// their directories, and the directories of the jails claimed for them.
pub fn unclaimed_markers(marker: &Path) -> Vec<String> {
    sandbox_markers(marker, false)
}

/// What names the pool's claimed sandboxes under `marker` (their keeper
/// alive, their socket in `claimed/`): the VMs of the test's containers.
pub fn claimed_markers(marker: &Path) -> Vec<String> {
    sandbox_markers(marker, true)
}

fn sandbox_markers(marker: &Path, claimed_ones: bool) -> Vec<String> {
    let pool_dir = marker.join("pool");
    let Ok(classes) = std::fs::read_dir(&pool_dir) else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    for class in classes.flatten().filter(|c| c.path().is_dir()) {
        let dirs_of = husk_runtime::pool::ClassDirs { root: class.path() };
        let claimed = husk_runtime::pool::ClassDirs::ids_in(&dirs_of.claimed());
        for id in dirs_of.live_keepers() {
            if claimed.contains(&id) == claimed_ones {
                dirs.push(dirs_of.vms().join(&id).display().to_string());
            }
        }
    }
    let mut markers = dirs.clone();
    let jail = Path::new(husk_runtime::jail::JAIL_ROOT);
    if let Ok(claims) = std::fs::read_dir(jail.join("uids")) {
        for claim in claims.flatten() {
            let owner = std::fs::read_to_string(claim.path()).unwrap_or_default();
            if dirs.contains(&owner) {
                let uid = claim.file_name().to_string_lossy().into_owned();
                markers.push(format!("{}/", jail.join(uid).display()));
            }
        }
    }
    markers
}
