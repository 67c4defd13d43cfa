//! Hypervisor backends behind one trait. Both boot the same kernel and
//! initramfs and connect the same vhost-user device backends; they differ
//! only in the process that runs the VM.

pub mod husk_vmm;
pub mod kvm;
pub mod qemu;

use crate::child::HelperProcess;
use crate::config::HypervisorChoice;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("starting {name} ({program}): {source}")]
    Spawn {
        name: &'static str,
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("hypervisor husk-vmm needs KVM that can run a guest, and {0}")]
    KvmUnusable(String),
    #[error(transparent)]
    Artifact(#[from] crate::artifacts::ArtifactError),
    #[error("hypervisor {0} cannot give the guest virtio-net devices: a sandbox with network devices needs one that can")]
    NoVirtioNet(&'static str),
}

/// A virtio-net device of the VM: the tap whose descriptor the VMM is
/// given (open in the spawner, kept open across the jail's exec) and the
/// guest device's MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmNetDevice {
    pub tap_fd: std::os::fd::RawFd,
    pub mac: [u8; 6],
}

/// What a VM is made of; the same for every backend.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The kernel command line, without device announcements (the backend
    /// adds those for its own device layout).
    pub cmdline: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// vhost-user socket of virtiofsd and the tag the guest mounts.
    pub fs_socket: PathBuf,
    pub fs_tag: String,
    /// vhost-user socket of the vsock backend and the guest's CID.
    pub vsock_socket: PathBuf,
    pub guest_cid: u32,
    /// The serial console is appended here.
    pub console_log: PathBuf,
    /// The VMM's own messages.
    pub vmm_log: PathBuf,
    /// Network devices, in the order the guest enumerates them.
    pub net_devices: Vec<VmNetDevice>,
}

/// A hypervisor backend.
pub trait Hypervisor: Send + Sync {
    /// Short name for logs and `husk check`.
    fn name(&self) -> &'static str;
    /// How the backend runs the guest (e.g. "KVM", "TCG").
    fn acceleration(&self) -> &'static str;
    /// The program it runs (bound into its jail).
    fn program(&self) -> &std::path::Path;
    /// Whether it opens /dev/kvm.
    fn uses_kvm(&self) -> bool;
    /// Whether it can give the guest virtio-net devices on taps.
    fn has_virtio_net(&self) -> bool;
    /// Starts the VM process in `jail`; returns once it is spawned.
    fn launch(
        &self,
        vm: &VmConfig,
        jail: crate::jail::Jail,
    ) -> Result<HelperProcess, HypervisorError>;
}

/// The backend chosen for this machine and why.
pub struct Selection {
    pub hypervisor: Box<dyn Hypervisor>,
    pub reason: String,
}

/// Why `auto` picks QEMU even where KVM can run guests: husk-vmm has never
/// booted Linux to user space (the machines it was written on have no
/// hardware virtualisation), so it is not the default until it has passed
/// the end-to-end suite on a hardware-KVM host. It stays one setting away.
pub const AUTO_PREFERS_QEMU: &str = "husk-vmm has not yet passed the end-to-end suite on a \
hardware-KVM host; set hypervisor = \"husk-vmm\" to use it";

/// What `auto` chooses for a machine's KVM, and why (a pure function, so the
/// policy is tested without the machine).
/// The answer is always QEMU today: whether with KVM, and the reason.
pub fn auto_choice(kvm: &kvm::KvmSupport) -> (bool, String) {
    match kvm {
        kvm::KvmSupport::Usable => (true, format!("auto: QEMU with KVM ({AUTO_PREFERS_QEMU})")),
        kvm::KvmSupport::Unusable(why) => {
            (false, format!("auto: QEMU, TCG fallback because {why}"))
        }
    }
}

/// Picks the backend: `auto` uses QEMU, with KVM where KVM can run a guest
/// and TCG otherwise (see [`auto_choice`]); `husk-vmm` and `qemu` are taken
/// as configured.
pub fn select(
    choice: HypervisorChoice,
    config: &crate::config::Config,
) -> Result<Selection, HypervisorError> {
    let kvm = kvm::probe();
    match choice {
        HypervisorChoice::HuskVmm => match &kvm {
            kvm::KvmSupport::Usable => Ok(Selection {
                hypervisor: Box::new(husk_vmm::HuskVmm::new(crate::artifacts::husk_vmm(
                    config.husk_vmm.as_deref(),
                )?)),
                reason: "configured".into(),
            }),
            kvm::KvmSupport::Unusable(why) => Err(HypervisorError::KvmUnusable(why.clone())),
        },
        HypervisorChoice::Qemu => Ok(Selection {
            hypervisor: Box::new(qemu::Qemu::new(
                crate::artifacts::qemu(config.qemu.as_deref())?,
                kvm.is_usable(),
            )),
            reason: match &kvm {
                kvm::KvmSupport::Usable => "configured, with KVM".into(),
                kvm::KvmSupport::Unusable(why) => format!("configured; TCG because {why}"),
            },
        }),
        HypervisorChoice::Auto => {
            let (with_kvm, reason) = auto_choice(&kvm);
            Ok(Selection {
                hypervisor: Box::new(qemu::Qemu::new(
                    crate::artifacts::qemu(config.qemu.as_deref())?,
                    with_kvm,
                )),
                reason,
            })
        }
    }
}

#[cfg(test)]
mod auto_tests {
    use super::*;

    #[test]
    fn auto_is_qemu_with_kvm_where_kvm_runs_guests_and_says_why() {
        let (with_kvm, reason) = auto_choice(&kvm::KvmSupport::Usable);
        assert!(with_kvm);
        assert!(
            reason.contains("husk-vmm") && reason.contains("hardware-KVM"),
            "{reason}"
        );
        let (with_kvm, reason) = auto_choice(&kvm::KvmSupport::Unusable("kvm-pvm".into()));
        assert!(!with_kvm);
        assert!(reason.contains("TCG fallback because kvm-pvm"), "{reason}");
    }
}
