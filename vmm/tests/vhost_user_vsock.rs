//! virtio-mmio + vhost-user frontend against the real vhost-device-vsock.
//!
//! The fake guest exchanges virtio-vsock packets on the rx/tx queues; the host
//! side uses the hybrid Unix socket convention (CONNECT <port> / <uds>_<port>).
//! Data flows both ways in host-initiated and guest-initiated connections.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use husk_vmm::devices::vhost_user::{VhostUserDevice, VhostUserKind};
use husk_vmm::devices::virtio_mmio::regs;
use vm_memory::{Bytes, GuestAddress};

const HDR: usize = 44;
const HOST_CID: u64 = 2;
const GUEST_CID: u64 = 3;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const RX_BUF: u32 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pkt {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    op: u16,
    ty: u16,
    data: Vec<u8>,
}

impl Pkt {
    fn guest(op: u16, src_port: u32, dst_port: u32, data: &[u8]) -> Self {
        Pkt {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            op,
            ty: TYPE_STREAM,
            data: data.to_vec(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HDR + self.data.len());
        b.extend_from_slice(&self.src_cid.to_le_bytes());
        b.extend_from_slice(&self.dst_cid.to_le_bytes());
        b.extend_from_slice(&self.src_port.to_le_bytes());
        b.extend_from_slice(&self.dst_port.to_le_bytes());
        b.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.ty.to_le_bytes());
        b.extend_from_slice(&self.op.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes()); // flags
        b.extend_from_slice(&65536u32.to_le_bytes()); // buf_alloc
        b.extend_from_slice(&0u32.to_le_bytes()); // fwd_cnt
        b.extend_from_slice(&self.data);
        b
    }

    fn decode(b: &[u8]) -> Self {
        let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        let len = u32at(24) as usize;
        Pkt {
            src_cid: u64at(0),
            dst_cid: u64at(8),
            src_port: u32at(16),
            dst_port: u32at(20),
            ty: u16at(28),
            op: u16at(30),
            data: b[HDR..HDR + len].to_vec(),
        }
    }
}

struct Vsock {
    g: FakeGuest,
    rx: DriverQueue,
    tx: DriverQueue,
    rx_bufs: HashMap<u16, u64>,
    uds: std::path::PathBuf,
    dir: std::path::PathBuf,
    _backend: ChildGuard,
}

impl Vsock {
    fn start(name: &str) -> Self {
        let bin = tool(
            "HUSK_VSOCK_BACKEND",
            "tools/vhost-device-vsock-0.3.0/bin/vhost-device-vsock",
        );
        let dir = scratch(name);
        let sock = dir.join("vsock.sock");
        let uds = dir.join("v.vsock");
        let mut backend = spawn(
            Command::new(&bin).arg("--vm").arg(format!(
                "guest-cid={GUEST_CID},socket={},uds-path={}",
                sock.display(),
                uds.display()
            )),
            &dir.join("backend.log"),
        );
        wait_for_path(&sock, &mut backend.0);
        let dev = VhostUserDevice::connect(&sock, VhostUserKind::Vsock { cid: GUEST_CID })
            .expect("connect to vhost-device-vsock");
        let backend_fd = dev.socket_fd();
        let mut g = FakeGuest::new(Box::new(dev));
        assert_eq!(g.read32(regs::DEVICE_ID), 19);
        assert_eq!(g.config(0, 8), GUEST_CID.to_le_bytes().to_vec());
        g.negotiate(0);
        let mut rx = DriverQueue::new(0, 64, 0x10000);
        let tx = DriverQueue::new(1, 64, 0x20000);
        let ev = DriverQueue::new(2, 64, 0x30000);
        for q in [&rx, &tx, &ev] {
            g.setup_queue(q);
        }
        let mut rx_bufs = HashMap::new();
        for _ in 0..32 {
            let a = g.alloc(u64::from(RX_BUF));
            let head = rx.add_chain(&g.mem, &[(a, RX_BUF, true)]);
            rx_bufs.insert(head, a);
        }
        // The activation runs where husk-vmm runs it: on a vCPU thread,
        // under its seccomp filter.
        as_vcpu_thread(backend_fd, || g.driver_ok());
        g.notify(&rx);
        // The backend creates the hybrid socket once it runs.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !uds.exists() {
            assert!(
                Instant::now() < deadline,
                "backend never created {}",
                uds.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Vsock {
            g,
            rx,
            tx,
            rx_bufs,
            uds,
            dir,
            _backend: backend,
        }
    }

    fn send(&mut self, p: &Pkt) {
        let bytes = p.encode();
        let a = self.g.alloc(bytes.len() as u64);
        self.g.mem.write_slice(&bytes, GuestAddress(a)).unwrap();
        let head = self
            .tx
            .add_chain(&self.g.mem, &[(a, bytes.len() as u32, false)]);
        self.g.notify(&self.tx);
        let (id, _) = self
            .tx
            .wait_used(&self.g.mem, Duration::from_secs(10))
            .expect("backend consumed the tx packet");
        assert_eq!(id, u32::from(head));
    }

    /// Next packet from the backend, skipping credit updates/requests.
    fn recv(&mut self) -> Pkt {
        loop {
            let (id, len) = self
                .rx
                .wait_used(&self.g.mem, Duration::from_secs(10))
                .expect("packet from backend on the rx queue");
            let head = u16::try_from(id).unwrap();
            let addr = self.rx_bufs.remove(&head).expect("known rx buffer");
            let mut b = vec![0u8; len as usize];
            self.g.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            // Recycle the buffer.
            let new_head = self.rx.add_chain(&self.g.mem, &[(addr, RX_BUF, true)]);
            self.rx_bufs.insert(new_head, addr);
            self.g.notify(&self.rx);
            let p = Pkt::decode(&b);
            if p.op == 6 || p.op == 7 {
                continue;
            }
            return p;
        }
    }
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).expect("host side read");
    b
}

#[test]
fn vsock_host_initiated_connection_carries_data_both_ways() {
    let mut v = Vsock::start("vsock-host");
    let mut host = UnixStream::connect(&v.uds).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();

    let req = v.recv();
    assert_eq!((req.op, req.ty), (OP_REQUEST, TYPE_STREAM), "{req:?}");
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, GUEST_CID, 1234)
    );
    let host_port = req.src_port;
    v.send(&Pkt::guest(OP_RESPONSE, 1234, host_port, &[]));

    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(host.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("OK "), "hybrid handshake reply {line:?}");

    host.write_all(b"ping from host").unwrap();
    let mut got = Vec::new();
    while got.len() < 14 {
        let p = v.recv();
        assert_eq!(p.op, OP_RW, "{p:?}");
        assert_eq!((p.src_port, p.dst_port), (host_port, 1234));
        got.extend_from_slice(&p.data);
    }
    assert_eq!(got, b"ping from host");

    v.send(&Pkt::guest(OP_RW, 1234, host_port, b"pong from guest"));
    assert_eq!(read_exact_timeout(&mut host, 15), b"pong from guest");

    v.send(&Pkt::guest(OP_SHUTDOWN, 1234, host_port, &[]));
    let _ = std::fs::remove_dir_all(&v.dir);
}

#[test]
fn vsock_guest_initiated_connection_reaches_uds_port_listener() {
    let mut v = Vsock::start("vsock-guest");
    let listen_path = format!("{}_5000", v.uds.display());
    let listener = UnixListener::bind(&listen_path).unwrap();

    v.send(&Pkt::guest(OP_REQUEST, 40000, 5000, &[]));
    let (mut conn, _) = listener.accept().expect("backend connects to <uds>_5000");
    let resp = v.recv();
    assert_eq!(resp.op, OP_RESPONSE, "{resp:?}");
    assert_eq!(
        (resp.src_cid, resp.src_port, resp.dst_port),
        (HOST_CID, 5000, 40000)
    );

    v.send(&Pkt::guest(OP_RW, 40000, 5000, b"hello host"));
    assert_eq!(read_exact_timeout(&mut conn, 10), b"hello host");

    conn.write_all(b"hello guest").unwrap();
    let mut got = Vec::new();
    while got.len() < 11 {
        let p = v.recv();
        assert_eq!(p.op, OP_RW, "{p:?}");
        got.extend_from_slice(&p.data);
    }
    assert_eq!(got, b"hello guest");

    // Host closes: the guest sees a shutdown or reset.
    drop(conn);
    let p = v.recv();
    assert!(p.op == OP_SHUTDOWN || p.op == OP_RST, "{p:?}");
    let _ = std::fs::remove_dir_all(&v.dir);
}
