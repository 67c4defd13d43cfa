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

/// Syncs file systems unless nothing is waiting to be written back.
///
/// The guest's only written-back file system is the virtio-fs share, and
/// FUSE without writeback caching sends every write(2) through at once:
/// what can be left is pages dirtied through shared mappings, which
/// `Dirty` and `Writeback` in /proc/meminfo count (tmpfs pages are never
/// counted there). With both at zero a sync has nothing to do but ask
/// virtiofsd for a syncfs(2) of the host's file system, which flushes
/// the whole host file system: runc does not do that at delete either.
pub fn sync_if_dirty() {
    let pending = std::fs::read_to_string("/proc/meminfo")
        .map(|m| pending_writeback_kib(&m))
        .unwrap_or(None);
    if pending != Some(0) {
        nix::unistd::sync();
    }
}

/// `Dirty` + `Writeback` of a /proc/meminfo, in KiB; None if either is
/// missing or unreadable.
fn pending_writeback_kib(meminfo: &str) -> Option<u64> {
    let field = |name: &str| {
        meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    Some(field("Dirty")?.saturating_add(field("Writeback")?))
}

/// Reports a fatal error on the console, then ends the VM.
pub fn fatal(reason: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "husk-agent: fatal: {reason}");
    power_off()
}

#[cfg(test)]
mod tests {
    use super::pending_writeback_kib;

    #[test]
    fn pending_writeback_reads_dirty_and_writeback() {
        let m = "MemTotal: 100 kB\nDirty:              12 kB\nWriteback:           3 kB\nWritebackTmp: 9 kB\n";
        assert_eq!(pending_writeback_kib(m), Some(15));
        let clean = "Dirty: 0 kB\nWriteback: 0 kB\n";
        assert_eq!(pending_writeback_kib(clean), Some(0));
        assert_eq!(pending_writeback_kib("Dirty: 0 kB\n"), None);
        assert_eq!(
            pending_writeback_kib("Dirty: lots\nWriteback: 0 kB\n"),
            None
        );
    }
}
