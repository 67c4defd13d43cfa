//! A "fake guest" virtio driver for integration tests: it programs the
//! virtio-mmio registers through the MMIO bus and drives split virtqueues it
//! lays out in guest memory with vm-memory, exactly like a guest kernel would.
#![allow(dead_code)]

pub mod net;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_vmm::devices::virtio_mmio::{regs, status, MmioTransport, MMIO_LEN, VIRTIO_F_VERSION_1};
use husk_vmm::devices::Bus;
use husk_vmm::memory::{create_guest_memory, GuestMemoryMmap};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub const MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Resolve a tool binary: env override, else `in_cache` under `$HUSK_CACHE`
/// (default /var/cache/husk, where scripts/install-tools.sh puts it); a
/// missing tool is a test FAILURE with a clear message, never a skip.
pub fn tool(env: &str, in_cache: &str) -> PathBuf {
    let cache = std::env::var_os("HUSK_CACHE")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/husk"));
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join(in_cache));
    assert!(
        path.is_file(),
        "required backend binary {} is missing (set {env} to override); this test cannot run without it",
        path.display()
    );
    path
}

/// Run `f` on a thread under the seccomp filter of a real vCPU thread (made
/// for a real vCPU fd and the vhost-user socket `backend_fd`), as the MMIO
/// exits of a guest's driver run in husk-vmm. A system call missing from the
/// vCPU allow-list kills the test with SIGSYS.
pub fn as_vcpu_thread(backend_fd: std::os::fd::RawFd, f: impl FnOnce() + Send) {
    use husk_vmm::seccomp::{apply, vcpu_filter, ThreadKind};
    use std::os::fd::AsRawFd;
    let (_kvm, vm) = husk_vmm::vm::create_kvm_vm().expect("KVM must be usable for this test");
    let vcpu = husk_vmm::vcpu::Vcpu::new(&vm, 0).unwrap();
    let filter = vcpu_filter(vcpu.fd().as_raw_fd(), &[backend_fd]).unwrap();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            apply(ThreadKind::Vcpu, &filter).unwrap();
            f();
        });
    });
}

/// Fresh scratch directory under /tmp.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("husk-vmm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Wait until `path` exists (a backend's listening socket).
pub fn wait_for_path(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "backend exited early with {st} before creating {}",
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "backend did not create {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the backend when the test ends (also on panic).
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawn a backend with stderr captured into a file for diagnostics.
pub fn spawn(cmd: &mut Command, log: &Path) -> ChildGuard {
    let f = std::fs::File::create(log).unwrap();
    ChildGuard(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}")),
    )
}

/// A split virtqueue owned by the fake driver.
pub struct DriverQueue {
    pub index: u32,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    pub last_used: u16,
}

impl DriverQueue {
    pub fn new(index: u32, size: u16, base: u64) -> Self {
        Self {
            index,
            size,
            desc: base,
            avail: base + 16 * u64::from(size),
            used: (base + 16 * u64::from(size) + 6 + 2 * u64::from(size) + 4095) & !4095,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Write a descriptor chain (addr, len, device-writable) and publish it.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let mut flags = if write { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = (idx + 1) % self.size;
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(mem, idx, addr, len, flags, next);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let d = self.desc + 16 * u64::from(idx);
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    /// Put `head` in the avail ring and bump the index.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        fence(Ordering::SeqCst);
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Next used element (id, len), waiting up to `timeout`.
    pub fn wait_used(&mut self, mem: &GuestMemoryMmap, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        while self.used_idx(mem) == self.last_used {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }
}

/// The fake guest: memory, the MMIO bus with one transport, and its irq.
pub struct FakeGuest {
    pub mem: GuestMemoryMmap,
    pub bus: Bus,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub irq: EventFd,
    /// Bump allocator for guest buffers.
    next_buf: u64,
}

impl FakeGuest {
    pub fn new(device: Box<dyn husk_vmm::devices::virtio_mmio::VirtioDevice>) -> Self {
        Self::with_irq(device, EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    /// Like [`FakeGuest::new`] with the interrupt eventfd `irq` (for a
    /// device that raises it itself and was given a duplicate).
    pub fn with_irq(
        device: Box<dyn husk_vmm::devices::virtio_mmio::VirtioDevice>,
        irq: EventFd,
    ) -> Self {
        let mem = create_guest_memory(64 << 20).unwrap();
        let t = MmioTransport::new(mem.clone(), device, irq.try_clone().unwrap()).unwrap();
        let transport = Arc::new(Mutex::new(t));
        let mut bus = Bus::new();
        bus.insert(transport.clone(), MMIO_BASE, MMIO_LEN).unwrap();
        Self {
            mem,
            bus,
            transport,
            irq,
            next_buf: 0x100_0000,
        }
    }

    pub fn read32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.bus.read(MMIO_BASE + off, &mut b));
        u32::from_le_bytes(b)
    }

    pub fn write32(&self, off: u64, v: u32) {
        assert!(self.bus.write(MMIO_BASE + off, &v.to_le_bytes()));
    }

    pub fn config(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        assert!(self.bus.read(MMIO_BASE + regs::CONFIG + off, &mut b));
        b
    }

    /// Allocate a zeroed guest buffer.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf = (self.next_buf + len + 63) & !63;
        self.mem
            .write_slice(&vec![0u8; len as usize], GuestAddress(a))
            .unwrap();
        a
    }

    /// Standard init up to FEATURES_OK; acks VERSION_1 plus `extra` offered bits.
    pub fn negotiate(&self, extra: u64) -> u64 {
        assert_eq!(self.read32(regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.read32(regs::VERSION), 2);
        self.write32(regs::STATUS, 0);
        self.write32(regs::STATUS, status::ACKNOWLEDGE);
        self.write32(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write32(regs::DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.read32(regs::DEVICE_FEATURES));
        self.write32(regs::DEVICE_FEATURES_SEL, 1);
        let hi = u64::from(self.read32(regs::DEVICE_FEATURES));
        let offered = lo | (hi << 32);
        assert_ne!(
            offered & VIRTIO_F_VERSION_1,
            0,
            "device must offer VERSION_1"
        );
        let acked = offered & (VIRTIO_F_VERSION_1 | extra);
        self.write32(regs::DRIVER_FEATURES_SEL, 0);
        self.write32(regs::DRIVER_FEATURES, acked as u32);
        self.write32(regs::DRIVER_FEATURES_SEL, 1);
        self.write32(regs::DRIVER_FEATURES, (acked >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write32(regs::STATUS, s);
        assert_eq!(self.read32(regs::STATUS), s, "FEATURES_OK accepted");
        acked
    }

    /// Program queue `q` into the transport.
    pub fn setup_queue(&self, q: &DriverQueue) {
        self.write32(regs::QUEUE_SEL, q.index);
        assert!(self.read32(regs::QUEUE_NUM_MAX) >= u32::from(q.size));
        self.write32(regs::QUEUE_NUM, u32::from(q.size));
        self.write32(regs::QUEUE_DESC_LOW, q.desc as u32);
        self.write32(regs::QUEUE_DESC_HIGH, (q.desc >> 32) as u32);
        self.write32(regs::QUEUE_DRIVER_LOW, q.avail as u32);
        self.write32(regs::QUEUE_DRIVER_HIGH, (q.avail >> 32) as u32);
        self.write32(regs::QUEUE_DEVICE_LOW, q.used as u32);
        self.write32(regs::QUEUE_DEVICE_HIGH, (q.used >> 32) as u32);
        self.write32(regs::QUEUE_READY, 1);
        assert_eq!(self.read32(regs::QUEUE_READY), 1);
    }

    pub fn driver_ok(&self) {
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.write32(regs::STATUS, s);
        assert_eq!(
            self.read32(regs::STATUS),
            s,
            "device accepted DRIVER_OK (no DEVICE_NEEDS_RESET)"
        );
    }

    pub fn notify(&self, q: &DriverQueue) {
        self.write32(regs::QUEUE_NOTIFY, q.index);
    }

    /// Whether the backend raised our interrupt since last asked.
    pub fn irq_fired(&self) -> bool {
        self.irq.read().is_ok()
    }
}
