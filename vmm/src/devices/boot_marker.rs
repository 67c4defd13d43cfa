//! Boot marker: a one-port I/O device the guest agent writes to when ready.
//!
//! Every byte written to port [`BOOT_MARKER_PORT`] is logged on stderr as
//! `husk-vmm: boot marker <value> at <ms> ms` (milliseconds since VMM start)
//! and remembered for tests.

use std::sync::{Arc, Mutex};

use super::BusDevice;

/// I/O port of the boot marker.
pub const BOOT_MARKER_PORT: u16 = 0x3f0;

/// The boot marker device.
#[derive(Default)]
pub struct BootMarker {
    seen: Arc<Mutex<Vec<u8>>>,
    quiet: bool,
}

impl BootMarker {
    /// New marker that logs to stderr.
    pub fn new() -> Self {
        Self::default()
    }

    /// New marker that only records values (for tests).
    pub fn quiet() -> Self {
        Self {
            quiet: true,
            ..Self::default()
        }
    }

    /// Shared list of values written so far.
    pub fn seen(&self) -> Arc<Mutex<Vec<u8>>> {
        self.seen.clone()
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if offset != 0 {
            return;
        }
        if !self.quiet {
            eprintln!(
                "husk-vmm: boot marker {value} at {} ms",
                crate::process_uptime().as_millis()
            );
        }
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_values_and_ignores_junk() {
        let mut m = BootMarker::quiet();
        let seen = m.seen();
        m.write(0, &[42]);
        m.write(0, &[]);
        m.write(1, &[9]);
        m.write(0, &[1, 2, 3, 4]);
        let mut b = [0xaa; 4];
        m.read(0, &mut b);
        assert_eq!(b, [0; 4]);
        assert_eq!(*seen.lock().unwrap(), vec![42, 1]);
    }
}
