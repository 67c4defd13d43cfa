//! Finding the guest kernel, the initramfs and the helper programs, without
//! configuration: next to the `husk` binary (a cargo build: `target/guest/`),
//! in the installed location, on PATH, or in the machine's tool cache.

use std::path::{Path, PathBuf};

/// Where `make install` puts guest artifacts.
pub const INSTALLED_GUEST_DIR: &str = "/usr/local/share/husk";
/// The machine-wide cache the Makefile installs helper tools into, unless
/// `HUSK_CACHE` names another (as it does for the install scripts).
pub const DEFAULT_CACHE: &str = "/var/cache/husk";

/// `$HUSK_CACHE/tools` (default `/var/cache/husk/tools`): where
/// `scripts/install-tools.sh` puts the vhost-user backends.
pub fn tool_cache() -> PathBuf {
    std::env::var_os("HUSK_CACHE")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
        .join("tools")
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{what} not found (looked in {looked}); {hint}")]
    NotFound {
        what: &'static str,
        looked: String,
        hint: &'static str,
    },
    #[error("{what} {path}: {reason}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// Directories that may hold `vmlinux` and `initramfs.img`.
pub fn guest_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("HUSK_GUEST_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}/husk -> target/guest; deps/ for test binaries.
        for up in exe.ancestors().skip(1).take(3) {
            dirs.push(up.join("guest"));
        }
    }
    dirs.push(PathBuf::from(INSTALLED_GUEST_DIR));
    dirs
}

fn find_in(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn looked(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The guest kernel: an uncompressed ELF vmlinux.
pub fn kernel(configured: Option<&Path>) -> Result<PathBuf, ArtifactError> {
    let path = match configured {
        Some(p) => p.to_path_buf(),
        None => {
            let dirs = guest_dirs();
            find_in(&dirs, "vmlinux").ok_or(ArtifactError::NotFound {
                what: "guest kernel vmlinux",
                looked: looked(&dirs),
                hint: "run `make kernel`",
            })?
        }
    };
    check_magic(&path, "guest kernel", &[b"\x7fELF"], "not an ELF vmlinux")?;
    Ok(path)
}

/// The agent initramfs: a gzip'd (or plain) newc cpio.
pub fn initramfs(configured: Option<&Path>) -> Result<PathBuf, ArtifactError> {
    let path = match configured {
        Some(p) => p.to_path_buf(),
        None => {
            let dirs = guest_dirs();
            find_in(&dirs, "initramfs.img").ok_or(ArtifactError::NotFound {
                what: "agent initramfs initramfs.img",
                looked: looked(&dirs),
                hint: "run `make initramfs`",
            })?
        }
    };
    check_magic(
        &path,
        "agent initramfs",
        &[b"\x1f\x8b", b"070701"],
        "neither gzip nor a newc cpio",
    )?;
    Ok(path)
}

fn check_magic(
    path: &Path,
    what: &'static str,
    magics: &[&[u8]],
    reason: &str,
) -> Result<(), ArtifactError> {
    use std::io::Read;
    let invalid = |reason: String| ArtifactError::Invalid {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let mut head = [0u8; 6];
    let mut file = std::fs::File::open(path).map_err(|e| invalid(e.to_string()))?;
    let n = file.read(&mut head).map_err(|e| invalid(e.to_string()))?;
    if magics
        .iter()
        .any(|m| n >= m.len() && &head[..m.len()] == *m)
    {
        Ok(())
    } else {
        Err(invalid(format!("{reason} (corrupt or wrong file)")))
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The newest `<tool cache>/<name>-<version>/bin/<name>`.
fn in_tool_cache(name: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(tool_cache())
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}-"))
        })
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| is_executable(p))
        .collect();
    found.sort();
    found.pop()
}

fn program(
    configured: Option<&Path>,
    env: &str,
    name: &'static str,
    extra: &[&str],
    hint: &'static str,
) -> Result<PathBuf, ArtifactError> {
    if let Some(p) = configured
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(env).map(PathBuf::from))
    {
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(ArtifactError::Invalid {
                what: name,
                path: p,
                reason: "not an executable file".into(),
            })
        };
    }
    on_path(name)
        .or_else(|| extra.iter().map(PathBuf::from).find(|p| is_executable(p)))
        .or_else(|| in_tool_cache(name))
        .ok_or(ArtifactError::NotFound {
            what: name,
            looked: format!("${env}, PATH, {}", tool_cache().display()),
            hint,
        })
}

pub fn qemu(configured: Option<&Path>) -> Result<PathBuf, ArtifactError> {
    program(
        configured,
        "HUSK_QEMU",
        "qemu-system-x86_64",
        &[],
        "apt-get install qemu-system-x86",
    )
}

pub fn virtiofsd(configured: Option<&Path>) -> Result<PathBuf, ArtifactError> {
    program(
        configured,
        "HUSK_VIRTIOFSD",
        "virtiofsd",
        &["/usr/libexec/virtiofsd"],
        "run `make tools`",
    )
}

pub fn vsock_backend(configured: Option<&Path>) -> Result<PathBuf, ArtifactError> {
    program(
        configured,
        "HUSK_VSOCK_BACKEND",
        "vhost-device-vsock",
        &[],
        "run `make tools`",
    )
}

pub fn husk_vmm(configured: Option<&Path>) -> Result<PathBuf, ArtifactError> {
    if configured.is_none() && std::env::var_os("HUSK_VMM").is_none() {
        if let Ok(exe) = std::env::current_exe() {
            for up in exe.ancestors().skip(1).take(2) {
                let p = up.join("husk-vmm");
                if is_executable(&p) {
                    return Ok(p);
                }
            }
        }
    }
    program(configured, "HUSK_VMM", "husk-vmm", &[], "run `make build`")
}
