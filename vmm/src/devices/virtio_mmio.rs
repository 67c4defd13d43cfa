//! virtio-mmio transport, version 2 (non-legacy), as in the virtio 1.2 spec §4.2.
//!
//! The transport owns the register file, feature negotiation, the status
//! state machine and per-queue configuration (held in `virtio_queue::Queue`,
//! which validates sizes and addresses). When the driver sets DRIVER_OK the
//! device backend is activated with the negotiated features, the queues, one
//! kick eventfd per queue (registered as KVM ioeventfds on the notify
//! register by the VMM) and the interrupt eventfd (a KVM irqfd).
//!
//! Every register access is guest controlled: bad widths, offsets, values or
//! state transitions are logged and ignored, never a panic.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::memory::GuestMemoryMmap;

/// Size of one virtio-mmio device window.
pub const MMIO_LEN: u64 = 0x1000;
/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Non-legacy transport version.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id we report ("HUSK" would be cute; QEMU uses 0x554d4551).
pub const VENDOR_ID: u32 = 0x4b53_5548;

/// Register offsets.
pub mod regs {
    #![allow(missing_docs)]
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    #![allow(missing_docs)]
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Interrupt status bit: a used buffer was published.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Errors of device activation (all caused by guest programming or a backend).
#[derive(Debug, Error)]
pub enum ActivateError {
    /// A queue the driver enabled is not usable.
    #[error("queue {index} is invalid: {reason}")]
    BadQueue {
        /// Queue index.
        index: usize,
        /// Why.
        reason: String,
    },
    /// The backend refused.
    #[error("backend failed: {0}")]
    Backend(String),
}

/// Interrupt line of one virtio-mmio device.
pub struct VirtioInterrupt {
    /// InterruptStatus register.
    pub status: Arc<AtomicU32>,
    /// Eventfd wired to the device's GSI through KVM_IRQFD.
    pub evt: EventFd,
}

impl VirtioInterrupt {
    /// Set `bits` in InterruptStatus and raise the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            log::error!("virtio-mmio: cannot raise interrupt: {e}");
        }
    }
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (26 = fs, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Read device configuration space; out of range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Driver write to configuration space (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start the device once the driver set DRIVER_OK.
    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        acked_features: u64,
        queues: &[(usize, &Queue)],
        kicks: &[EventFd],
        interrupt: &VirtioInterrupt,
    ) -> Result<(), ActivateError>;
    /// Stop the device after a driver reset. Returns false if the device cannot be reused.
    fn reset(&mut self) -> bool;
    /// Whether InterruptStatus should read "used buffer" permanently.
    ///
    /// vhost-user backends signal the irqfd directly, so the VMM never sees
    /// the notification and cannot set the bit itself; the driver handles a
    /// spurious vring check gracefully.
    fn sticky_vring_interrupt(&self) -> bool {
        false
    }
}

/// The virtio-mmio transport device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    /// Per queue: the driver wrote a value the queue refused (bad size or alignment).
    queue_bad: Vec<bool>,
    kicks: Vec<EventFd>,
    interrupt: VirtioInterrupt,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    shm_sel: u32,
    config_generation: u32,
    activated: bool,
    broken: bool,
}

/// Errors creating a transport.
#[derive(Debug, Error)]
pub enum TransportError {
    /// Queue object creation failed (bad max size).
    #[error("virtio device type {device_type}: queue {index} with max size {max}: {source}")]
    Queue {
        /// Device id.
        device_type: u32,
        /// Queue index.
        index: usize,
        /// Max size requested.
        max: u16,
        /// Cause.
        #[source]
        source: virtio_queue::Error,
    },
    /// eventfd creation failed.
    #[error("cannot create an eventfd for virtio device type {device_type}: {source}")]
    EventFd {
        /// Device id.
        device_type: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl MmioTransport {
    /// Wrap `device`; `irq_evt` is the eventfd raising the device's interrupt.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
        irq_evt: EventFd,
    ) -> Result<Self, TransportError> {
        let device_type = device.device_type();
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        for (index, max) in device.queue_max_sizes().into_iter().enumerate() {
            queues.push(Queue::new(max).map_err(|source| TransportError::Queue {
                device_type,
                index,
                max,
                source,
            })?);
            kicks.push(EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
                TransportError::EventFd {
                    device_type,
                    source,
                }
            })?);
        }
        let status = Arc::new(AtomicU32::new(0));
        Ok(Self {
            device,
            mem,
            queue_bad: vec![false; queues.len()],
            queues,
            kicks,
            interrupt: VirtioInterrupt {
                status,
                evt: irq_evt,
            },
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            shm_sel: 0,
            config_generation: 0,
            activated: false,
            broken: false,
        })
    }

    /// Kick eventfds, one per queue, in queue order (to register as ioeventfds).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.kicks
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the backend was activated.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only be written between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            regs::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            regs::INTERRUPT_STATUS => {
                let mut v = self.interrupt.status.load(Ordering::SeqCst);
                if self.activated && self.device.sticky_vring_interrupt() {
                    v |= INT_VRING;
                }
                v
            }
            regs::STATUS => self.status,
            // No shared memory regions: length all ones means "absent".
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH => u32::MAX,
            regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => u32::MAX,
            regs::CONFIG_GENERATION => self.config_generation,
            _ => {
                log::warn!(
                    "virtio-mmio (type {}): read of unknown/write-only register {offset:#x}",
                    self.device.device_type()
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let ty = self.device.device_type();
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            regs::DRIVER_FEATURES => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    log::warn!("virtio-mmio (type {ty}): driver features written in status {:#x}; ignored", self.status);
                    return;
                }
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    sel => {
                        log::warn!("virtio-mmio (type {ty}): driver feature select {sel} out of range");
                        return;
                    }
                };
                let offered = self.device.features();
                let mut v = u64::from(value) << shift;
                if v & !offered != 0 {
                    log::warn!(
                        "virtio-mmio (type {ty}): driver acked unoffered features {:#x}; dropped",
                        v & !offered
                    );
                    v &= offered;
                }
                let mask = 0xffff_ffffu64 << shift;
                self.acked_features = (self.acked_features & !mask) | v;
            }
            regs::QUEUE_SEL => self.queue_sel = value,
            regs::QUEUE_NUM
            | regs::QUEUE_READY
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_DRIVER_LOW
            | regs::QUEUE_DRIVER_HIGH
            | regs::QUEUE_DEVICE_LOW
            | regs::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, value),
            regs::QUEUE_NOTIFY => self.notify(value),
            regs::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            regs::STATUS => self.write_status(value),
            regs::SHM_SEL => self.shm_sel = value,
            _ => log::warn!(
                "virtio-mmio (type {ty}): write {value:#x} to unknown/read-only register {offset:#x}"
            ),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        let ty = self.device.device_type();
        if !self.queue_config_allowed() {
            log::warn!(
                "virtio-mmio (type {ty}): queue register {offset:#x} written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        let sel = self.queue_sel as usize;
        let Some(q) = self.queues.get_mut(sel) else {
            log::warn!(
                "virtio-mmio (type {ty}): queue {sel} does not exist; write to {offset:#x} ignored"
            );
            return;
        };
        let addr = |old: u64, low: bool| {
            if low {
                (old & !0xffff_ffff) | u64::from(value)
            } else {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            }
        };
        let result = match offset {
            regs::QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => q.try_set_size(size).map_err(|e| e.to_string()),
                Err(_) => Err(format!("size {value} exceeds 65535")),
            },
            regs::QUEUE_READY => {
                q.set_ready(value == 1);
                Ok(())
            }
            regs::QUEUE_DESC_LOW | regs::QUEUE_DESC_HIGH => q
                .try_set_desc_table_address(GuestAddress(addr(
                    q.desc_table(),
                    offset == regs::QUEUE_DESC_LOW,
                )))
                .map_err(|e| e.to_string()),
            regs::QUEUE_DRIVER_LOW | regs::QUEUE_DRIVER_HIGH => q
                .try_set_avail_ring_address(GuestAddress(addr(
                    q.avail_ring(),
                    offset == regs::QUEUE_DRIVER_LOW,
                )))
                .map_err(|e| e.to_string()),
            regs::QUEUE_DEVICE_LOW | regs::QUEUE_DEVICE_HIGH => q
                .try_set_used_ring_address(GuestAddress(addr(
                    q.used_ring(),
                    offset == regs::QUEUE_DEVICE_LOW,
                )))
                .map_err(|e| e.to_string()),
            _ => Ok(()),
        };
        if let Err(e) = result {
            log::warn!("virtio-mmio (type {ty}): queue {sel}: register {offset:#x} value {value:#x} refused: {e}");
            if let Some(bad) = self.queue_bad.get_mut(sel) {
                *bad = true;
            }
        }
    }

    fn notify(&mut self, value: u32) {
        // With KVM the notify register is an ioeventfd and never reaches us;
        // this path serves the bus (tests, or a VMM without ioeventfds).
        match self.kicks.get(value as usize) {
            Some(evt) if self.activated => {
                if let Err(e) = evt.write(1) {
                    log::error!("virtio-mmio: cannot signal queue {value}: {e}");
                }
            }
            Some(_) => log::warn!("virtio-mmio: notify of queue {value} before DRIVER_OK ignored"),
            None => log::warn!("virtio-mmio: notify of nonexistent queue {value} ignored"),
        }
    }

    fn write_status(&mut self, value: u32) {
        let ty = self.device.device_type();
        if value == 0 {
            self.reset();
            return;
        }
        if value & status::FAILED != 0 {
            log::warn!("virtio-mmio (type {ty}): driver reported FAILED");
            self.status |= status::FAILED;
            return;
        }
        // The driver may only add bits, in order: ACK, DRIVER, FEATURES_OK, DRIVER_OK.
        let added = value & !self.status;
        if value & self.status != self.status {
            log::warn!(
                "virtio-mmio (type {ty}): status {value:#x} clears bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let order = [
            status::ACKNOWLEDGE,
            status::DRIVER,
            status::FEATURES_OK,
            status::DRIVER_OK,
        ];
        for (i, bit) in order.iter().enumerate() {
            if value & bit != 0 && order[..i].iter().any(|b| value & b == 0) {
                log::warn!(
                    "virtio-mmio (type {ty}): status {value:#x} sets bit {bit:#x} out of order; ignored"
                );
                return;
            }
        }
        let expected = value;
        if added & !(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK)
            != 0
        {
            log::warn!("virtio-mmio (type {ty}): unknown status bits {added:#x}; ignored");
            return;
        }
        if added & status::FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // Leave FEATURES_OK clear: the driver reads it back and gives up.
            log::warn!("virtio-mmio (type {ty}): driver did not accept VIRTIO_F_VERSION_1");
            self.status = expected & !(status::FEATURES_OK | status::DRIVER_OK);
            return;
        }
        self.status = expected;
        if added & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let ty = self.device.device_type();
        if self.broken {
            log::error!("virtio-mmio (type {ty}): device is broken after a failed reset");
            self.status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        let mut ready = Vec::new();
        for (index, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if self.queue_bad.get(index).copied().unwrap_or(true) || !q.is_valid(&self.mem) {
                log::error!(
                    "virtio-mmio (type {ty}): queue {index} (size {}, desc {:#x}, avail {:#x}, used {:#x}) is not valid for guest memory",
                    q.size(), q.desc_table(), q.avail_ring(), q.used_ring()
                );
                self.fail_device();
                return;
            }
            ready.push((index, q));
        }
        if ready.is_empty() {
            log::warn!("virtio-mmio (type {ty}): DRIVER_OK without any ready queue");
        }
        match self.device.activate(
            &self.mem,
            self.acked_features,
            &ready,
            &self.kicks,
            &self.interrupt,
        ) {
            Ok(()) => self.activated = true,
            Err(e) => {
                log::error!("virtio-mmio (type {ty}): activation failed: {e}");
                self.fail_device();
            }
        }
    }

    fn fail_device(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.trigger(INT_CONFIG);
    }

    fn reset(&mut self) {
        if self.activated && !self.device.reset() {
            self.broken = true;
        }
        self.activated = false;
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_bad.fill(false);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            data.fill(0);
            self.device.read_config(offset - regs::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            log::warn!(
                "virtio-mmio: {}-byte read at {offset:#x} is not an aligned 32-bit access",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            self.device.write_config(offset - regs::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::warn!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if offset & 3 != 0 {
            log::warn!("virtio-mmio: unaligned write at {offset:#x} ignored");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

/// Copy `src` config bytes at `offset` into `data` (zero fill beyond the end).
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= src.len() {
        return;
    }
    let n = data.len().min(src.len() - start);
    data[..n].copy_from_slice(&src[start..start + n]);
}

/// Whether `[addr, addr+len)` is one contiguous piece of guest RAM.
pub fn guest_range_ok(mem: &GuestMemoryMmap, addr: u64, len: usize) -> bool {
    mem.get_slice(GuestAddress(addr), len).is_ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A device recording activations, for transport tests.
    pub struct DummyDevice {
        pub activations: Arc<Mutex<Vec<Vec<usize>>>>,
        pub fail: bool,
    }

    impl VirtioDevice for DummyDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[1, 2, 3, 4], offset, data)
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: &GuestMemoryMmap,
            _acked: u64,
            queues: &[(usize, &Queue)],
            _kicks: &[EventFd],
            _interrupt: &VirtioInterrupt,
        ) -> Result<(), ActivateError> {
            if self.fail {
                return Err(ActivateError::Backend("told to fail".into()));
            }
            self.activations
                .lock()
                .unwrap()
                .push(queues.iter().map(|(i, _)| *i).collect());
            Ok(())
        }
        fn reset(&mut self) -> bool {
            true
        }
    }

    fn transport(fail: bool) -> (MmioTransport, Arc<Mutex<Vec<Vec<usize>>>>, EventFd) {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let acts = Arc::new(Mutex::new(Vec::new()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            mem,
            Box::new(DummyDevice {
                activations: acts.clone(),
                fail,
            }),
            irq.try_clone().unwrap(),
        )
        .unwrap();
        (t, acts, irq)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport) {
        w(t, regs::STATUS, status::ACKNOWLEDGE);
        w(t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, regs::DRIVER_FEATURES_SEL, 1);
        w(t, regs::DRIVER_FEATURES, 1);
        w(t, regs::DRIVER_FEATURES_SEL, 0);
        w(t, regs::DRIVER_FEATURES, 0b1);
        w(
            t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, idx: u32, size: u32, base: u64) {
        w(t, regs::QUEUE_SEL, idx);
        w(t, regs::QUEUE_NUM, size);
        w(t, regs::QUEUE_DESC_LOW, base as u32);
        w(t, regs::QUEUE_DESC_HIGH, (base >> 32) as u32);
        w(t, regs::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, regs::QUEUE_DRIVER_HIGH, ((base + 0x1000) >> 32) as u32);
        w(t, regs::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, regs::QUEUE_DEVICE_HIGH, ((base + 0x2000) >> 32) as u32);
        w(t, regs::QUEUE_READY, 1);
    }

    const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identity_registers() {
        let (mut t, _, _) = transport(false);
        assert_eq!(r(&mut t, regs::MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(r(&mut t, regs::VERSION), 2);
        assert_eq!(r(&mut t, regs::DEVICE_ID), 42);
        assert_eq!(r(&mut t, regs::DEVICE_FEATURES), 0b101);
        w(&mut t, regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, regs::DEVICE_FEATURES), 1);
        w(&mut t, regs::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, regs::DEVICE_FEATURES), 0);
        assert_eq!(r(&mut t, regs::QUEUE_NUM_MAX), 16);
        w(&mut t, regs::QUEUE_SEL, 5);
        assert_eq!(r(&mut t, regs::QUEUE_NUM_MAX), 0);
        let mut c = [0u8; 8];
        t.read(regs::CONFIG + 2, &mut c);
        assert_eq!(c, [3, 4, 0, 0, 0, 0, 0, 0]);
        t.read(u64::MAX - 8, &mut c);
        assert_eq!(c, [0; 8]);
    }

    #[test]
    fn full_negotiation_activates() {
        let (mut t, acts, _) = transport(false);
        negotiate(&mut t);
        assert_eq!(
            r(&mut t, regs::STATUS) & status::FEATURES_OK,
            status::FEATURES_OK
        );
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1 | 1);
        setup_queue(&mut t, 1, 8, 0x10000);
        w(&mut t, regs::STATUS, ALL);
        assert!(t.is_activated());
        assert_eq!(*acts.lock().unwrap(), vec![vec![1]]);
        // Notify goes to the kick eventfd of the queue.
        w(&mut t, regs::QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        w(&mut t, regs::QUEUE_NOTIFY, 99);
        // Queue registers are frozen after DRIVER_OK.
        w(&mut t, regs::QUEUE_SEL, 1);
        w(&mut t, regs::QUEUE_NUM, 4);
        assert_eq!(t.queues[1].size(), 8);
        // Reset clears everything.
        w(&mut t, regs::STATUS, 0);
        assert_eq!(r(&mut t, regs::STATUS), 0);
        assert!(!t.is_activated());
        assert!(!t.queues[1].ready());
    }

    #[test]
    fn malformed_register_writes() {
        let (mut t, acts, _) = transport(false);
        // Byte and unaligned accesses to registers are ignored.
        t.write(regs::STATUS, &[1]);
        t.write(regs::STATUS + 1, &1u32.to_le_bytes());
        t.write(regs::STATUS, &[]);
        assert_eq!(r(&mut t, regs::STATUS), 0);
        let mut b = [0u8; 2];
        t.read(regs::MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        // Jumping to DRIVER_OK without negotiating VERSION_1 is refused.
        w(&mut t, regs::STATUS, ALL);
        assert_eq!(
            r(&mut t, regs::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        assert!(!t.is_activated());
        w(&mut t, regs::STATUS, 0);
        // Out-of-order bits are refused.
        w(&mut t, regs::STATUS, status::DRIVER);
        assert_eq!(r(&mut t, regs::STATUS), 0);
        // Queue setup before FEATURES_OK is ignored.
        setup_queue(&mut t, 0, 8, 0x10000);
        assert!(!t.queues[0].ready());
        // Features outside the offer are dropped; without VERSION_1 FEATURES_OK is refused.
        w(&mut t, regs::STATUS, status::ACKNOWLEDGE);
        w(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, regs::DRIVER_FEATURES, u32::MAX);
        assert_eq!(t.acked_features(), 0b101);
        w(
            &mut t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, regs::STATUS) & status::FEATURES_OK, 0);
        // Unknown registers and read-only registers.
        w(&mut t, 0x0f0, 1);
        w(&mut t, regs::MAGIC_VALUE, 1);
        assert_eq!(r(&mut t, regs::MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(r(&mut t, 0x0f0), 0);
        assert!(acts.lock().unwrap().is_empty());
    }

    #[test]
    fn bad_queues_fail_device_not_vmm() {
        // Size not a power of two: size stays unset -> ready queue invalid.
        let (mut t, acts, irq) = transport(false);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 6, 0x10000);
        assert_eq!(t.queues[0].size(), 16, "non power of two size rejected");
        // Too big.
        w(&mut t, regs::QUEUE_NUM, 32);
        assert_eq!(t.queues[0].size(), 16);
        w(&mut t, regs::QUEUE_NUM, 0x1_0008);
        assert_eq!(t.queues[0].size(), 16);
        // Queue beyond guest memory.
        setup_queue(&mut t, 1, 8, 0x7fff_0000_0000);
        w(&mut t, regs::STATUS, ALL);
        assert!(!t.is_activated());
        assert_ne!(r(&mut t, regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(r(&mut t, regs::INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
        assert!(irq.read().is_ok());
        assert!(acts.lock().unwrap().is_empty());
        // Notifies on a failed device are ignored.
        w(&mut t, regs::QUEUE_NOTIFY, 0);
        assert!(t.queue_evts()[0].read().is_err());
        // A reset brings it back.
        w(&mut t, regs::STATUS, 0);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, 0x10000);
        w(&mut t, regs::STATUS, ALL);
        assert!(t.is_activated());

        // Misaligned descriptor table: the address is refused, queue invalid.
        let (mut t, _, _) = transport(false);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 8, 0x10003);
        w(&mut t, regs::STATUS, ALL);
        assert!(!t.is_activated());

        // Queue straddling the end of RAM.
        let (mut t, _, _) = transport(false);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 16, (16 << 20) - 0x2000);
        w(&mut t, regs::STATUS, ALL);
        assert!(!t.is_activated());
    }

    #[test]
    fn backend_failure_sets_needs_reset() {
        let (mut t, _, _) = transport(true);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 8, 0x10000);
        w(&mut t, regs::STATUS, ALL);
        assert!(!t.is_activated());
        assert_ne!(r(&mut t, regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn interrupt_ack() {
        let (mut t, _, irq) = transport(false);
        t.interrupt.trigger(INT_VRING);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(r(&mut t, regs::INTERRUPT_STATUS), INT_VRING);
        w(&mut t, regs::INTERRUPT_ACK, INT_VRING);
        assert_eq!(r(&mut t, regs::INTERRUPT_STATUS), 0);
    }
}
