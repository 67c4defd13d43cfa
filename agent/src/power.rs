//! Ending the guest. The guest runs with `reboot=t` and the VMM treats a
//! reboot as power-off (`-no-reboot` for QEMU), so a restart is how the VM
//! ends: microvm has no ACPI, and RB_POWER_OFF would only halt the CPU.

use std::io::Write;

/// Syncs file systems and ends the VM. Never returns.
pub fn power_off() -> ! {
    nix::unistd::sync();
    if std::process::id() == 1 {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    }
    std::process::exit(0);
}

/// Reports a fatal error on the console, then ends the VM.
pub fn fatal(reason: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "husk-agent: fatal: {reason}");
    power_off()
}
