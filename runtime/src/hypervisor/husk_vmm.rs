//! husk-vmm, our own KVM VMM (vmm/ in this repository). It announces its
//! virtio-mmio devices on the kernel command line itself.
//!
//! Its virtio-net devices sit on taps husk opened in the client's network
//! namespace: each descriptor is inherited across the jail's exec (see
//! [`crate::jail::Jail::keep_fds`]) and named with `--net tap-fd=N,mac=..`;
//! husk-vmm checks it is a tap, turns its offloads off and moves frames
//! through it from a thread of its own, so it needs no network namespace,
//! no /dev/net/tun and no privilege either.

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
        let mut args: Vec<String> = vec![
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
        ];
        args.extend(net_device_args(&vm.net_devices));
        args
    }
}

/// One `--net tap-fd=<N>,mac=<mac>` per tap, in the guest's order.
pub fn net_device_args(devices: &[super::VmNetDevice]) -> Vec<String> {
    let mut args = Vec::new();
    for device in devices {
        let mac = device
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        args.push("--net".into());
        args.push(format!("tap-fd={},mac={mac}", device.tap_fd));
    }
    args
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
        true
    }

    fn launch(
        &self,
        vm: &VmConfig,
        jail: crate::jail::Jail,
    ) -> Result<HelperProcess, HypervisorError> {
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
    fn each_tap_becomes_a_net_device_with_its_descriptor_and_mac() {
        let p = |s: &str| PathBuf::from(format!("/s/{s}"));
        let mut vm = VmConfig {
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
            net_devices: vec![
                crate::hypervisor::VmNetDevice {
                    tap_fd: 7,
                    mac: [2, 0, 0, 0, 0, 1],
                },
                crate::hypervisor::VmNetDevice {
                    tap_fd: 9,
                    mac: [0x0a, 0xbc, 0xde, 0xf0, 0x12, 0x34],
                },
            ],
        };
        let vmm = HuskVmm::new(PathBuf::from("/nonexistent/husk-vmm"));
        assert!(vmm.has_virtio_net());
        let args = vmm.args(&vm);
        let nets: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "--net")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            nets,
            [
                "tap-fd=7,mac=02:00:00:00:00:01",
                "tap-fd=9,mac=0a:bc:de:f0:12:34"
            ]
        );
        // The devices come after everything else, in the guest's order.
        assert_eq!(args[args.len() - 4], "--net");
        vm.net_devices.clear();
        assert!(!vmm.args(&vm).iter().any(|a| a == "--net"));
    }
}
