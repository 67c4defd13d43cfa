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
