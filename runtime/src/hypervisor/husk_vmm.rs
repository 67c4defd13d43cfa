//! husk-vmm, our own KVM VMM (vmm/ in this repository). It announces its
//! virtio-mmio devices on the kernel command line itself.

use super::{Hypervisor, HypervisorError, VmConfig};
use crate::child::HelperProcess;
use std::path::PathBuf;
use std::process::Command;

pub struct HuskVmm {
    program: PathBuf,
}

impl HuskVmm {
    pub fn new(program: PathBuf) -> Self {
        HuskVmm { program }
    }

    pub fn args(&self, vm: &VmConfig) -> Vec<String> {
        vec![
            "--kernel".into(),
            vm.kernel.display().to_string(),
            "--initrd".into(),
            vm.initramfs.display().to_string(),
            "--cmdline".into(),
            vm.cmdline.clone(),
            "--memory-mib".into(),
            vm.memory_mib.to_string(),
            "--vcpus".into(),
            vm.vcpus.to_string(),
            "--fs-socket".into(),
            vm.fs_socket.display().to_string(),
            "--fs-tag".into(),
            vm.fs_tag.clone(),
            "--vsock-socket".into(),
            vm.vsock_socket.display().to_string(),
            "--vsock-cid".into(),
            vm.guest_cid.to_string(),
            "--console".into(),
            vm.console_log.display().to_string(),
            // No --api-socket: the host never drives a running VM, and a
            // control socket nobody uses is only something to attack.
        ]
    }
}

impl Hypervisor for HuskVmm {
    fn name(&self) -> &'static str {
        "husk-vmm"
    }

    fn acceleration(&self) -> &'static str {
        "KVM"
    }

    fn program(&self) -> &std::path::Path {
        &self.program
    }

    fn uses_kvm(&self) -> bool {
        true
    }

    fn has_virtio_net(&self) -> bool {
        false
    }

    fn launch(
        &self,
        vm: &VmConfig,
        jail: crate::jail::Jail,
    ) -> Result<HelperProcess, HypervisorError> {
        if !vm.net_devices.is_empty() {
            return Err(HypervisorError::NoVirtioNet("husk-vmm"));
        }
        let mut cmd = Command::new(&self.program);
        cmd.args(self.args(vm));
        jail.apply(&mut cmd);
        HelperProcess::spawn("husk-vmm", cmd, &vm.vmm_log).map_err(|source| {
            HypervisorError::Spawn {
                name: "husk-vmm",
                program: self.program.clone(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_is_refused_clearly_before_anything_starts() {
        let p = |s: &str| PathBuf::from(format!("/s/{s}"));
        let vm = VmConfig {
            kernel: p("vmlinux"),
            initramfs: p("initramfs.img"),
            cmdline: "console=ttyS0".into(),
            memory_mib: 128,
            vcpus: 1,
            fs_socket: p("fs.sock"),
            fs_tag: "husk".into(),
            vsock_socket: p("vsock.sock"),
            guest_cid: 3,
            console_log: p("console.log"),
            vmm_log: p("vmm.log"),
            net_devices: vec![crate::hypervisor::VmNetDevice {
                tap_fd: 7,
                mac: [2, 0, 0, 0, 0, 1],
            }],
        };
        let vmm = HuskVmm::new(PathBuf::from("/nonexistent/husk-vmm"));
        assert!(!vmm.has_virtio_net());
        let jail = crate::jail::Jail::for_backend(1_999_999).expect("jail");
        let err = vmm.launch(&vm, jail).expect_err("a tap with husk-vmm");
        assert!(
            matches!(err, HypervisorError::NoVirtioNet("husk-vmm")),
            "{err}"
        );
        assert!(err.to_string().contains("no virtio-net yet"), "{err}");
    }
}
