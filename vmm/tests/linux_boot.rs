//! Boot the real guest kernel with the husk-vmm binary and check, from the
//! kernel's own console log, that it understood our boot protocol: PVH entry
//! reached C code, the command line, the e820 map, the MP table (2 vCPUs,
//! IOAPIC), the initramfs placement, and the COM1 console.
//!
//! On kvm-pvm (this CI machine) Linux cannot get past its int3 self-test, so
//! the test stops at the console checks; on hardware KVM it boots further.
//! A missing kernel FAILS the test.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn guest_file(env: &str, name: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/guest")
            .join(name)
    })
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn real_kernel_reads_our_boot_protocol() {
    let kernel = guest_file("HUSK_KERNEL", "vmlinux");
    assert!(
        kernel.is_file(),
        "guest kernel {} not found: build it (guest-kernel/build.sh) or set HUSK_KERNEL",
        kernel.display()
    );
    let dir = std::env::temp_dir().join(format!("husk-vmm-boot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A small stand-in initramfs so the placement is deterministic.
    let initrd = dir.join("initrd.img");
    std::fs::write(&initrd, vec![0u8; 300 * 1024]).unwrap();
    let console = dir.join("console.log");
    let cmdline = "console=ttyS0 reboot=t panic=-1 husk.test=1";
    let child = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", cmdline, "--memory-mib", "128", "--vcpus", "2"])
        .arg("--console")
        .arg(&console)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    // 128 MiB guest: initrd page aligned at the top of RAM.
    let rd_start = (128u64 << 20) - ((300 * 1024 + 4095) & !4095);
    let expected = [
        format!("Command line: {cmdline}"),
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".to_string(),
        "BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable".to_string(),
        "found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]".to_string(),
        "Processors: 2".to_string(),
        "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23".to_string(),
        format!("RAMDISK: [mem {:#010x}-0x07ffffff]", rd_start),
        "printk: console [ttyS0] enabled".to_string(),
    ];
    let deadline = Instant::now() + Duration::from_secs(180);
    let log = loop {
        let log = std::fs::read_to_string(&console).unwrap_or_default();
        if expected.iter().all(|e| log.contains(e.as_str())) {
            break log;
        }
        if let Ok(Some(st)) = child.0.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            let _ = child
                .0
                .stderr
                .take()
                .map(|mut s| s.read_to_string(&mut err));
            let missing: Vec<_> = expected
                .iter()
                .filter(|e| !log.contains(e.as_str()))
                .collect();
            panic!("husk-vmm exited ({st}) before the kernel printed {missing:?}; stderr: {err}; console:\n{log}");
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = expected
                .iter()
                .filter(|e| !log.contains(e.as_str()))
                .collect();
            panic!("kernel did not print {missing:?} in time; console:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(log.starts_with("Linux version "), "{log}");
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}
