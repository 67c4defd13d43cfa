//! QEMU's microvm machine: no PCI, no ACPI, virtio-mmio devices that QEMU
//! announces on the kernel command line itself.

use super::{Hypervisor, HypervisorError, VmConfig};
use crate::child::HelperProcess;
use std::path::PathBuf;
use std::process::Command;

pub struct Qemu {
    program: PathBuf,
    kvm: bool,
}

/// The `-sandbox` option every QEMU of a sandbox runs with.
pub const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The host's TSC rate in kHz. Under TCG the guest reads the host TSC, and
/// telling the kernel its rate skips a calibration that can hang there.
fn host_tsc_khz() -> u64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz").and_then(|v| {
                v.trim_start_matches([' ', '\t', ':'])
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        })
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(2_000_000)
}

/// `-netdev`/`-device` pairs for the VM's taps: QEMU takes each tap by
/// descriptor (opened by husk in the client's namespace, inherited across
/// the jail's exec, see [`crate::jail::Jail::keep_fds`]), so QEMU itself
/// needs no network namespace, no /dev/net/tun and no privilege. The
/// vhost-net kernel accelerator stays off: it would need /dev/vhost-net in
/// the jail.
pub fn net_device_args(devices: &[super::VmNetDevice]) -> Vec<String> {
    let mut args = Vec::new();
    for (n, device) in devices.iter().enumerate() {
        let mac = device
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        args.extend([
            "-netdev".into(),
            format!("tap,id=net{n},fd={},vhost=off", device.tap_fd),
            "-device".into(),
            format!("virtio-net-device,netdev=net{n},mac={mac}"),
        ]);
    }
    args
}

/// The emulated CPU under TCG: everything TCG offers, except the "fast
/// string" flags. With ERMS or FSRM the guest kernel copies and clears
/// memory with `rep movsb`/`rep stosb`, which TCG runs one byte per
/// iteration; without them it takes the 8-byte loops, which TCG translates
/// well: measured here, `dd if=/dev/zero bs=1M | cat` in the guest went
/// from 129 to 457 MiB/s and 256 MiB from /dev/zero from 0.46 s to 0.07 s.
/// Nothing is lost for the guest but speed of an emulated instruction.
pub const TCG_CPU: &str = "max,-erms,-fsrm";

/// TCG with a 64 MiB translation cache. A container's create, start and
/// teardown run much guest code the boot never ran (the agent's planner,
/// namespaces, mounts, netlink); with 16 MiB the cache filled and was
/// flushed, and every path was translated again: measured here, `husk run
/// true` took 1036 ms with 16 MiB, 1006 with 32 and 908 to 960 with 64, 128
/// or 256 (the first netlink dump after create: 9 ms, then 1 ms). The cost
/// is resident memory: about 23 MiB more per VM (113 -> 136 MiB RSS after a
/// run and three execs), bounded by the size.
pub const TCG_ACCEL: &str = "tcg,tb-size=64";

impl Qemu {
    pub fn new(program: PathBuf, kvm: bool) -> Self {
        Qemu { program, kvm }
    }

    /// The full QEMU argument list for `vm`.
    pub fn args(&self, vm: &VmConfig) -> Vec<String> {
        let mut cmdline = format!("{} acpi=off", vm.cmdline);
        if !self.kvm {
            // noapictimer: TCG offers no TSC-deadline timer, so the guest
            // kernel calibrates its local APIC timer against jiffies at
            // boot, which under TCG costs about 250 ms of the boot (730 ->
            // 477 ms to a bare /init, 6 alternations). Without it the
            // kernel ticks from the PIT, which microvm emulates; under KVM
            // the TSC deadline timer needs no calibration and stays.
            cmdline.push_str(&format!(" tsc_early_khz={} noapictimer", host_tsc_khz()));
        }
        let mem = format!("{}M", vm.memory_mib);
        let mut args: Vec<String> = vec![
            "-M".into(),
            "microvm,acpi=off,x-option-roms=off,memory-backend=mem".into(),
        ];
        if self.kvm {
            args.extend(["-enable-kvm".into(), "-cpu".into(), "host".into()]);
        } else {
            args.extend([
                "-accel".into(),
                TCG_ACCEL.into(),
                "-cpu".into(),
                TCG_CPU.into(),
            ]);
        }
        args.extend([
            "-m".into(),
            mem.clone(),
            "-smp".into(),
            vm.vcpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            // The guest ends by rebooting (reboot=t): make that an exit.
            "-no-reboot".into(),
            "-serial".into(),
            format!("file:{}", vm.console_log.display()),
            "-kernel".into(),
            vm.kernel.display().to_string(),
            "-initrd".into(),
            vm.initramfs.display().to_string(),
            "-append".into(),
            cmdline,
            // vhost-user backends map guest RAM: it must be a shared memfd.
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            "-global".into(),
            "virtio-mmio.force-legacy=false".into(),
            "-chardev".into(),
            format!("socket,id=fs0,path={}", vm.fs_socket.display()),
            "-device".into(),
            format!("vhost-user-fs-device,chardev=fs0,tag={}", vm.fs_tag),
            "-chardev".into(),
            format!("socket,id=vsock0,path={}", vm.vsock_socket.display()),
            "-device".into(),
            "vhost-user-vsock-device,chardev=vsock0".into(),
            // QEMU's own seccomp filter: TCG is no security boundary by
            // QEMU's own policy, so what a guest that takes QEMU over can ask
            // the host kernel for is cut down: no obsolete syscalls, no
            // setuid/setgid/capability changes, no fork/exec (so no
            // `migrate exec:`), no scheduler or affinity changes.
            "-sandbox".into(),
            QEMU_SANDBOX.into(),
        ]);
        args.extend(net_device_args(&vm.net_devices));
        // No QMP socket: the host never talks to QEMU, and a monitor socket
        // is a root-level control channel nobody should be handed.
        args
    }
}

impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn acceleration(&self) -> &'static str {
        if self.kvm {
            "KVM"
        } else {
            "TCG"
        }
    }

    fn program(&self) -> &std::path::Path {
        &self.program
    }

    fn uses_kvm(&self) -> bool {
        self.kvm
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
        HelperProcess::spawn("qemu", cmd, &vm.vmm_log).map_err(|source| HypervisorError::Spawn {
            name: "qemu",
            program: self.program.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmConfig {
        let p = |s: &str| PathBuf::from(format!("/s/{s}"));
        VmConfig {
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
            net_devices: Vec::new(),
        }
    }

    #[test]
    fn qemu_runs_sandboxed_and_without_a_monitor_socket() {
        for kvm in [false, true] {
            let args = Qemu::new(PathBuf::from("/qemu"), kvm).args(&vm());
            let at = args.iter().position(|a| a == "-sandbox").expect("-sandbox");
            let sandbox = &args[at + 1];
            for part in [
                "on",
                "obsolete=deny",
                "elevateprivileges=deny",
                "spawn=deny",
                "resourcecontrol=deny",
            ] {
                assert!(
                    sandbox.split(',').any(|p| p == part),
                    "{sandbox}: no {part}"
                );
            }
            assert!(
                !args.iter().any(|a| a == "-qmp" || a == "-monitor"),
                "{args:?}"
            );
        }
    }

    #[test]
    fn each_tap_becomes_a_virtio_net_device_with_its_mac() {
        let mut config = vm();
        assert!(!Qemu::new(PathBuf::from("/qemu"), false)
            .args(&config)
            .iter()
            .any(|a| a == "-netdev"));
        config.net_devices = vec![
            crate::hypervisor::VmNetDevice {
                tap_fd: 7,
                mac: [0x02, 0x42, 0xac, 0x11, 0x00, 0x02],
            },
            crate::hypervisor::VmNetDevice {
                tap_fd: 9,
                mac: [0x0a, 0, 0, 0, 0, 0xff],
            },
        ];
        let args = Qemu::new(PathBuf::from("/qemu"), false).args(&config);
        let after = |flag: &str| -> Vec<&String> {
            args.windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| &w[1])
                .collect()
        };
        assert_eq!(
            after("-netdev"),
            ["tap,id=net0,fd=7,vhost=off", "tap,id=net1,fd=9,vhost=off"]
        );
        let devices: Vec<&String> = after("-device")
            .into_iter()
            .filter(|d| d.starts_with("virtio-net-device"))
            .collect();
        assert_eq!(
            devices,
            [
                "virtio-net-device,netdev=net0,mac=02:42:ac:11:00:02",
                "virtio-net-device,netdev=net1,mac=0a:00:00:00:00:ff"
            ]
        );
    }
}
