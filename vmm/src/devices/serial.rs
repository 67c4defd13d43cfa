//! 8250/16550 UART at COM1 (0x3f8, IRQ 4) built on vm-superio.
//!
//! Guest output goes to the console writer (a file opened for append, or
//! stdout). There is no guest input: the runtime talks to the guest through
//! vsock, the console is for logs.

use std::io::Write;

use vm_superio::{Serial as SuperioSerial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// COM1 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports of a 16550.
pub const COM1_LEN: u16 = 8;
/// Legacy IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// Interrupt trigger writing to an eventfd registered as a KVM irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The serial port device.
pub struct Serial {
    inner: SuperioSerial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// New UART raising `irq` and writing guest output to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            inner: SuperioSerial::new(EventFdTrigger(irq), out),
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset >= u64::from(COM1_LEN) {
            data.fill(0xff);
            return;
        }
        data[0] = self.inner.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= u64::from(COM1_LEN) {
            log::debug!(
                "serial: ignoring {}-byte write at offset {offset}",
                data.len()
            );
            return;
        }
        if let Err(e) = self.inner.write(offset as u8, data[0]) {
            // A full disk or closed console must not kill the guest.
            log::warn!("serial: cannot write guest output: {e:?}");
        }
        if offset == 0 {
            let _ = self.inner.writer_mut().flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_bad_accesses() {
        let buf = SharedBuf::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(buf.clone()));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        // Malformed accesses are ignored.
        s.write(0, b"xy");
        s.write(9, b"z");
        s.write(0, &[]);
        let mut d = [0u8; 2];
        s.read(0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty bit set");
        assert_eq!(&*buf.0.lock().unwrap(), b"hi");
        // Enabling the THR-empty interrupt raises the irq.
        s.write(1, &[0x02]);
        assert!(irq.read().is_ok());
    }
}
