//! Can this host's KVM run an unmodified Linux guest?
//!
//! `/dev/kvm` existing is not enough: kvm-pvm (a software hypervisor without
//! VT-x/AMD-V) answers every ioctl but an unmodified guest dies at its first
//! user-space syscall. Hardware KVM needs the CPU's vmx or svm flag.

use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmSupport {
    Usable,
    /// Why not, in words.
    Unusable(String),
}

impl KvmSupport {
    pub fn is_usable(&self) -> bool {
        matches!(self, KvmSupport::Usable)
    }
}

pub fn probe() -> KvmSupport {
    probe_with(
        Path::new("/dev/kvm"),
        Path::new("/proc/cpuinfo"),
        Path::new("/sys/module"),
    )
}

fn probe_with(dev: &Path, cpuinfo: &Path, modules: &Path) -> KvmSupport {
    if !dev.exists() {
        return KvmSupport::Unusable(format!("{} does not exist", dev.display()));
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return KvmSupport::Unusable(format!("{} cannot be opened: {e}", dev.display()));
    }
    if modules.join("kvm_pvm").exists() {
        return KvmSupport::Unusable(format!(
            "{} is kvm-pvm (software, no VT-x/AMD-V), which cannot run an unmodified Linux guest",
            dev.display()
        ));
    }
    let flags = std::fs::read_to_string(cpuinfo).unwrap_or_default();
    let hw = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return KvmSupport::Unusable(format!(
            "the CPU has no vmx/svm flag, so {} is not hardware KVM",
            dev.display()
        ));
    }
    KvmSupport::Usable
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(
        name: &str,
        flags: &str,
        pvm: bool,
    ) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("husk-kvm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("modules")).unwrap();
        std::fs::write(dir.join("dev"), b"").unwrap();
        std::fs::write(
            dir.join("cpuinfo"),
            format!("processor\t: 0\nflags\t\t: fpu {flags} sse\n"),
        )
        .unwrap();
        if pvm {
            std::fs::create_dir_all(dir.join("modules/kvm_pvm")).unwrap();
        }
        (dir.join("dev"), dir.join("cpuinfo"), dir.join("modules"))
    }

    #[test]
    fn hardware_flags_and_pvm_decide() {
        let (d, c, m) = fixture("hw", "vmx", false);
        assert_eq!(probe_with(&d, &c, &m), KvmSupport::Usable);
        let (d, c, m) = fixture("pvm", "vmx", true);
        assert!(matches!(probe_with(&d, &c, &m), KvmSupport::Unusable(w) if w.contains("kvm-pvm")));
        let (d, c, m) = fixture("noflag", "", false);
        assert!(matches!(probe_with(&d, &c, &m), KvmSupport::Unusable(w) if w.contains("vmx/svm")));
        assert!(!probe_with(Path::new("/nonexistent/kvm"), &c, &m).is_usable());
    }
}
