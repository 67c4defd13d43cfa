//! virtio-mmio + vhost-user frontend against the real virtiofsd.
//!
//! A fake guest (tests/common) programs the transport registers through the
//! MMIO bus, builds the hiprio and request virtqueues in memfd-backed guest
//! memory, and speaks FUSE: INIT, LOOKUP, GETATTR, OPEN, READ of a file the
//! test wrote, checking the bytes. Also: malformed chains must not hurt the VMM.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use husk_vmm::devices::vhost_user::{VhostUserDevice, VhostUserKind};
use husk_vmm::devices::virtio_mmio::regs;
use vm_memory::{Bytes, GuestAddress};

const FUSE_LOOKUP: u32 = 1;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_INIT: u32 = 26;
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;

fn virtiofsd() -> std::path::PathBuf {
    tool("HUSK_VIRTIOFSD", "tools/virtiofsd-1.14.0/bin/virtiofsd")
}

struct Fs {
    g: FakeGuest,
    /// The vhost-user socket (what the vCPU filter lets a vCPU message).
    backend_fd: std::os::fd::RawFd,
    req: DriverQueue,
    unique: u64,
    _backend: ChildGuard,
    dir: std::path::PathBuf,
}

fn in_header(len: usize, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(IN_HEADER);
    h.extend_from_slice(&(len as u32).to_le_bytes());
    h.extend_from_slice(&opcode.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // uid
    h.extend_from_slice(&0u32.to_le_bytes()); // gid
    h.extend_from_slice(&1u32.to_le_bytes()); // pid
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h
}

impl Fs {
    /// Re-run the driver init sequence on the same device (after a reset).
    fn reinit(&mut self) {
        self.g.negotiate(0);
        let hiprio = DriverQueue::new(0, 64, 0x40000);
        self.req = DriverQueue::new(1, 64, 0x50000);
        self.g.setup_queue(&hiprio);
        self.g.setup_queue(&self.req);
        self.g.driver_ok();
    }

    fn start(name: &str) -> Self {
        Self::start_with(name, false)
    }

    /// With `vcpu_seccomp`, DRIVER_OK (which runs the whole vhost-user
    /// activation: SET_FEATURES, SET_MEM_TABLE with fds, vring setup) is
    /// written from a thread confined by the vCPU seccomp filter, as on a
    /// real vCPU thread. A missing syscall kills the test with SIGSYS.
    fn start_with(name: &str, vcpu_seccomp: bool) -> Self {
        let bin = virtiofsd();
        let dir = scratch(name);
        let shared = dir.join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::write(
            shared.join("hello.txt"),
            b"hello from the host, via virtio-fs\n",
        )
        .unwrap();
        let sock = dir.join("fs.sock");
        let mut backend = spawn(
            Command::new(&bin)
                .arg(format!("--socket-path={}", sock.display()))
                .arg(format!("--shared-dir={}", shared.display()))
                .arg("--cache=never")
                .arg("--sandbox=none"),
            &dir.join("virtiofsd.log"),
        );
        wait_for_path(&sock, &mut backend.0);
        let dev = VhostUserDevice::connect(
            &sock,
            VhostUserKind::Fs {
                tag: "hostshare".into(),
            },
        )
        .expect("connect to virtiofsd");
        let backend_fd = dev.socket_fd();
        let g = FakeGuest::new(Box::new(dev));
        assert_eq!(g.read32(regs::DEVICE_ID), 26);
        // Config space: tag, then num_request_queues.
        let cfg = g.config(0, 40);
        assert_eq!(&cfg[..9], b"hostshare");
        assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 1);
        g.negotiate(0);
        let hiprio = DriverQueue::new(0, 64, 0x10000);
        let req = DriverQueue::new(1, 64, 0x20000);
        g.setup_queue(&hiprio);
        g.setup_queue(&req);
        if vcpu_seccomp {
            as_vcpu_thread(backend_fd, || g.driver_ok());
        } else {
            g.driver_ok();
        }
        assert!(g.transport.lock().unwrap().is_activated());
        Fs {
            g,
            backend_fd,
            req,
            unique: 1,
            _backend: backend,
            dir,
        }
    }

    /// Send one FUSE request; returns (error, payload after the out header).
    fn call(&mut self, opcode: u32, nodeid: u64, args: &[u8], out_len: u32) -> (i32, Vec<u8>) {
        self.unique += 1;
        let mut req = in_header(IN_HEADER + args.len(), opcode, self.unique, nodeid);
        req.extend_from_slice(args);
        let in_addr = self.g.alloc(req.len() as u64);
        self.g.mem.write_slice(&req, GuestAddress(in_addr)).unwrap();
        let out_total = OUT_HEADER as u32 + out_len;
        let out_addr = self.g.alloc(u64::from(out_total));
        let head = self.req.add_chain(
            &self.g.mem,
            &[
                (in_addr, req.len() as u32, false),
                (out_addr, out_total, true),
            ],
        );
        self.g.notify(&self.req);
        let (id, len) = self
            .req
            .wait_used(&self.g.mem, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("virtiofsd did not answer opcode {opcode}"));
        assert_eq!(id, u32::from(head));
        let mut out = vec![0u8; len as usize];
        self.g
            .mem
            .read_slice(&mut out, GuestAddress(out_addr))
            .unwrap();
        let olen = u32::from_le_bytes(out[0..4].try_into().unwrap());
        let error = i32::from_le_bytes(out[4..8].try_into().unwrap());
        let unique = u64::from_le_bytes(out[8..16].try_into().unwrap());
        assert_eq!(unique, self.unique);
        assert_eq!(olen, len, "out header length matches used length");
        (error, out[OUT_HEADER..].to_vec())
    }
}

#[test]
fn virtiofsd_init_lookup_getattr_read() {
    let mut fs = Fs::start("fs");
    // FUSE_INIT (7.31, no flags).
    let mut init = Vec::new();
    for v in [7u32, 31, 0, 0] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    let (err, out) = fs.call(FUSE_INIT, 0, &init, 64);
    assert_eq!(err, 0, "FUSE_INIT failed");
    assert_eq!(
        u32::from_le_bytes(out[0..4].try_into().unwrap()),
        7,
        "major"
    );
    assert!(fs.g.irq_fired(), "backend interrupts through our irqfd");

    // LOOKUP hello.txt in the root.
    let (err, entry) = fs.call(FUSE_LOOKUP, 1, b"hello.txt\0", 128);
    assert_eq!(err, 0, "LOOKUP failed");
    let nodeid = u64::from_le_bytes(entry[0..8].try_into().unwrap());
    let size = u64::from_le_bytes(entry[48..56].try_into().unwrap());
    assert_ne!(nodeid, 0);
    assert_eq!(size, 35);

    // Missing file: ENOENT.
    let (err, _) = fs.call(FUSE_LOOKUP, 1, b"nope\0", 128);
    assert_eq!(err, -libc::ENOENT);

    // GETATTR.
    let (err, attr) = fs.call(FUSE_GETATTR, nodeid, &[0u8; 16], 104);
    assert_eq!(err, 0, "GETATTR failed");
    assert_eq!(u64::from_le_bytes(attr[24..32].try_into().unwrap()), 35);
    let mode = u32::from_le_bytes(attr[16 + 60..16 + 64].try_into().unwrap());
    assert_eq!(mode & libc::S_IFMT, libc::S_IFREG);

    // OPEN read-only, READ everything.
    let (err, open) = fs.call(FUSE_OPEN, nodeid, &[0u8; 8], 16);
    assert_eq!(err, 0, "OPEN failed");
    let fh = u64::from_le_bytes(open[0..8].try_into().unwrap());
    let mut read = Vec::new();
    read.extend_from_slice(&fh.to_le_bytes());
    read.extend_from_slice(&0u64.to_le_bytes()); // offset
    read.extend_from_slice(&4096u32.to_le_bytes()); // size
    read.extend_from_slice(&[0u8; 20]);
    let (err, data) = fs.call(FUSE_READ, nodeid, &read, 4096);
    assert_eq!(err, 0, "READ failed");
    assert_eq!(data, b"hello from the host, via virtio-fs\n");
    let _ = std::fs::remove_dir_all(&fs.dir);
}

/// Malformed descriptor chains reach the real backend; the VMM side must
/// stay healthy (no panic, registers still sane) whatever the backend does.
#[test]
fn virtiofsd_malformed_chains_do_not_hurt_the_vmm() {
    let mut fs = Fs::start("fsbad");
    let mem = fs.g.mem.clone();
    // 1. A descriptor loop: 0 -> 1 -> 0.
    fs.req
        .write_desc(&mem, 10, 0x100_0000, 40, VIRTQ_DESC_F_NEXT, 11);
    fs.req
        .write_desc(&mem, 11, 0x100_0000, 40, VIRTQ_DESC_F_NEXT, 10);
    fs.req.publish(&mem, 10);
    fs.g.notify(&fs.req);
    // 2. A descriptor pointing outside guest memory.
    fs.req.write_desc(&mem, 12, 0x7fff_ffff_0000, 64, 0, 0);
    fs.req.publish(&mem, 12);
    fs.g.notify(&fs.req);
    // 3. A head index beyond the queue size.
    fs.req.publish(&mem, 999);
    fs.g.notify(&fs.req);
    // Bogus notifies.
    fs.g.write32(regs::QUEUE_NOTIFY, 77);
    fs.g.write32(regs::QUEUE_NOTIFY, u32::MAX);
    std::thread::sleep(Duration::from_millis(300));
    // The transport is still answering and consistent.
    assert_eq!(fs.g.read32(regs::MAGIC_VALUE), 0x7472_6976);
    assert!(fs.g.transport.lock().unwrap().is_activated());
    // A driver reset stops the rings (GET_VRING_BASE) cleanly, or reports a dead backend.
    fs.g.write32(regs::STATUS, 0);
    assert_eq!(fs.g.read32(regs::STATUS), 0);
    let log = std::fs::read_to_string(fs.dir.join("virtiofsd.log")).unwrap_or_default();
    eprintln!("virtiofsd log after malformed chains:\n{log}");
    let _ = std::fs::remove_dir_all(&fs.dir);
}

/// A guest driver reset followed by a fresh init re-activates the backend
/// (new SET_MEM_TABLE / vring setup) and requests work again.
#[test]
fn virtiofsd_survives_driver_reset_and_reinit() {
    let mut fs = Fs::start("fsreset");
    let mut init = Vec::new();
    for v in [7u32, 31, 0, 0] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(fs.call(FUSE_INIT, 0, &init, 64).0, 0);
    fs.g.write32(regs::STATUS, 0);
    assert!(!fs.g.transport.lock().unwrap().is_activated());
    fs.reinit();
    assert!(fs.g.transport.lock().unwrap().is_activated());
    let (err, _) = fs.call(FUSE_INIT, 0, &init, 64);
    let (lerr, entry) = fs.call(FUSE_LOOKUP, 1, b"hello.txt\0", 128);
    let log = std::fs::read_to_string(fs.dir.join("virtiofsd.log")).unwrap_or_default();
    assert_eq!(
        (err, lerr),
        (0, 0),
        "requests after re-init; virtiofsd log:\n{log}"
    );
    assert_eq!(u64::from_le_bytes(entry[48..56].try_into().unwrap()), 35);
    let _ = std::fs::remove_dir_all(&fs.dir);
}

#[test]
fn virtiofsd_activation_from_a_seccomp_confined_vcpu_thread() {
    let mut fs = Fs::start_with("fsseccomp", true);
    let mut init = Vec::new();
    for v in [7u32, 31, 0, 0] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(fs.call(FUSE_INIT, 0, &init, 64).0, 0);
    // A driver reset (GET_VRING_BASE per queue) and a fresh activation, both
    // from confined threads too.
    as_vcpu_thread(fs.backend_fd, || fs.g.write32(regs::STATUS, 0));
    assert!(!fs.g.transport.lock().unwrap().is_activated());
    let backend_fd = fs.backend_fd;
    as_vcpu_thread(backend_fd, || fs.reinit());
    assert!(fs.g.transport.lock().unwrap().is_activated());
    assert_eq!(fs.call(FUSE_INIT, 0, &init, 64).0, 0);
    let _ = std::fs::remove_dir_all(&fs.dir);
}
