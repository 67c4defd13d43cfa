//! virtio-net against a real tap, guest-less: the fake guest drives the
//! device through the virtio-mmio registers and split queues in guest
//! memory, exactly as a guest kernel would; the device's data path runs on
//! its own thread under its real seccomp filter, activation runs under a
//! vCPU thread's filter. The tap lives in a network namespace the test makes
//! and removes (also on failure); the host side reads and writes frames with
//! an AF_PACKET socket bound to the tap there, and the namespace's kernel
//! answers the fake guest's ARP and ping. Nothing touches the host's own
//! interfaces.
//!
//! Needs root (network namespaces, /dev/net/tun) and iproute2's `ip`.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::thread::JoinHandle;
use std::time::Duration;

use common::net::{self, ip, open_tap, packet_socket, NetNs, TAP};
use common::*;
use husk_vmm::devices::tap::Tap;
use husk_vmm::devices::virtio_net::{NetDevice, NetWorker, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU};
use husk_vmm::seccomp::net_filter;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const TAP_MAC: [u8; 6] = [0x02, 0x48, 0x55, 0x00, 0x00, 0x01];
const GUEST_MAC: [u8; 6] = [0x02, 0x48, 0x55, 0x00, 0x00, 0x02];
const TAP_IP: [u8; 4] = [10, 99, 0, 1];
const GUEST_IP: [u8; 4] = [10, 99, 0, 2];
/// IEEE 802 "local experimental" EtherType: no stack in the namespace reacts to it.
const ETH_TEST: u16 = 0x88b5;
const HDR: usize = 12;
const RX_BUF: u32 = 2048;
const TIMEOUT: Duration = Duration::from_secs(10);

/// The device on a tap in its namespace, the fake guest driving it, and
/// the host's raw socket on the tap.
struct Bench {
    guest: FakeGuest,
    rx: DriverQueue,
    tx: DriverQueue,
    irq: EventFd,
    packet: OwnedFd,
    tap_hdr: usize,
    stop: EventFd,
    worker: Option<JoinHandle<()>>,
    /// Last: the namespace goes after every descriptor in it.
    _ns: NetNs,
}

impl Bench {
    fn new(tag: &str, vnet_hdr: bool) -> Bench {
        let ns = NetNs::new(tag);
        let tap_fd = ns.run(|| open_tap(vnet_hdr));
        let mac = TAP_MAC.map(|b| format!("{b:02x}")).join(":");
        ip(&["-n", &ns.0, "link", "set", TAP, "address", &mac]);
        ip(&["-n", &ns.0, "addr", "add", "10.99.0.1/24", "dev", TAP]);
        ip(&["-n", &ns.0, "link", "set", TAP, "up"]);
        let packet = ns.run(packet_socket);

        let tap = Tap::from_fd(tap_fd).expect("husk-vmm takes the tap");
        let tap_hdr = tap.vnet_hdr_len();
        assert_eq!(tap_hdr, if vnet_hdr { 10 } else { 0 });
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (dev, parts) =
            NetDevice::new(tap, GUEST_MAC, Some(1500), irq.try_clone().unwrap()).unwrap();
        let guest = FakeGuest::with_irq(Box::new(dev), EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let worker = NetWorker::new(parts, guest.transport.lock().unwrap().queue_evts()).unwrap();
        let stop = worker.stopper().unwrap();
        let filter = net_filter(worker.epoll_fd()).unwrap();
        let worker = worker
            .spawn(0, Some(filter), |e| panic!("the data path failed: {e}"))
            .unwrap();

        let acked = guest.negotiate(VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU);
        assert_eq!(
            acked & (VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU),
            VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU
        );
        assert_eq!(guest.config(0, 6), GUEST_MAC);
        assert_eq!(guest.config(10, 2), 1500u16.to_le_bytes());
        let rx = DriverQueue::new(0, 64, 0x10000);
        let tx = DriverQueue::new(1, 64, 0x20000);
        guest.setup_queue(&rx);
        guest.setup_queue(&tx);
        // Activation runs on a vCPU thread in husk-vmm: under its filter here too.
        as_vcpu_thread(irq.as_raw_fd(), || guest.driver_ok());
        Bench {
            guest,
            rx,
            tx,
            irq,
            packet,
            tap_hdr,
            stop,
            worker: Some(worker),
            _ns: ns,
        }
    }

    /// The guest sends `frame` split at `cuts` (offsets into header+frame).
    fn guest_send(&mut self, frame: &[u8], cuts: &[usize]) {
        let mut bytes = vec![0u8; HDR];
        bytes.extend_from_slice(frame);
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied().filter(|c| *c < bytes.len()));
        bounds.push(bytes.len());
        let mut chain = Vec::new();
        for w in bounds.windows(2) {
            let addr = self.guest.alloc((w[1] - w[0]) as u64);
            self.guest
                .mem
                .write_slice(&bytes[w[0]..w[1]], GuestAddress(addr))
                .unwrap();
            chain.push((addr, (w[1] - w[0]) as u32, false));
        }
        let head = self.tx.add_chain(&self.guest.mem, &chain);
        self.guest.notify(&self.tx);
        let used = self.tx.wait_used(&self.guest.mem, TIMEOUT);
        assert_eq!(used, Some((u32::from(head), 0)), "transmit chain returned");
    }

    /// Offer `n` receive buffers of [`RX_BUF`] bytes; returns their addresses by head.
    fn add_rx_buffers(&mut self, n: usize) -> Vec<(u16, u64)> {
        let mut heads = Vec::new();
        for _ in 0..n {
            let addr = self.guest.alloc(u64::from(RX_BUF));
            heads.push((
                self.rx.add_chain(&self.guest.mem, &[(addr, RX_BUF, true)]),
                addr,
            ));
        }
        self.guest.notify(&self.rx);
        heads
    }

    /// The next frame the guest received: (its virtio-net header, frame).
    fn guest_recv(&mut self, heads: &[(u16, u64)]) -> Option<(Vec<u8>, Vec<u8>)> {
        let (id, len) = self.rx.wait_used(&self.guest.mem, TIMEOUT)?;
        let addr = heads
            .iter()
            .find(|(h, _)| u32::from(*h) == id)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("used id {id} was never offered"));
        assert!(len as usize > HDR, "used length {len}");
        let mut b = vec![0u8; len as usize];
        self.guest
            .mem
            .read_slice(&mut b, GuestAddress(addr))
            .unwrap();
        let frame = b.split_off(HDR);
        Some((b, frame))
    }

    /// The host sends `frame` out of the tap (towards the guest).
    fn host_send(&self, frame: &[u8]) {
        net::send_frame(&self.packet, frame);
    }

    /// The next frame the tap received from the guest that `want` accepts.
    fn host_recv(&self, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        net::recv_frame(&self.packet, TIMEOUT, want)
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn is_test_frame(f: &[u8]) -> bool {
    f.len() >= 14 && u16::from_be_bytes([f[12], f[13]]) == ETH_TEST
}

#[test]
fn frames_move_both_ways_between_the_fake_guest_and_a_tap() {
    for vnet_hdr in [true, false] {
        let mut b = Bench::new(if vnet_hdr { "both" } else { "both-nohdr" }, vnet_hdr);

        // Guest to host: small, full-size and split frames arrive intact.
        for (len, cuts) in [
            (46, &[][..]),
            (1500, &[12][..]),
            (1000, &[5, 12, 13, 700][..]),
        ] {
            let f = eth(TAP_MAC, GUEST_MAC, ETH_TEST, &payload(len, len as u8));
            b.guest_send(&f, cuts);
            let got = b.host_recv(|g| is_test_frame(g) && g[14..] == f[14..]);
            assert_eq!(got.as_deref(), Some(&f[..]), "{len}-byte frame to the tap");
        }
        assert!(
            b.irq.read().is_ok(),
            "the transmit queue raised the interrupt"
        );

        // Host to guest: frames arrive with a clean header (num_buffers 1).
        let heads = b.add_rx_buffers(8);
        for len in [46, 1500, 333] {
            let f = eth(GUEST_MAC, TAP_MAC, ETH_TEST, &payload(len, !(len as u8)));
            b.host_send(&f);
            let (hdr, got) = loop {
                let (hdr, got) = b.guest_recv(&heads).expect("a frame in the guest");
                if is_test_frame(&got) {
                    break (hdr, got);
                }
            };
            let mut want_hdr = vec![0u8; HDR];
            want_hdr[10] = 1;
            assert_eq!(hdr, want_hdr);
            assert_eq!(
                got, f,
                "{len}-byte frame to the guest (vnet_hdr {vnet_hdr})"
            );
        }
        assert!(
            b.irq.read().is_ok(),
            "the receive queue raised the interrupt"
        );
        assert_eq!(b.tap_hdr, if vnet_hdr { 10 } else { 0 });
    }
}

#[test]
fn frames_wait_for_receive_buffers_and_arrive_in_order() {
    let mut b = Bench::new("defer", true);
    let frames: Vec<_> = (0..3u8)
        .map(|i| {
            eth(
                GUEST_MAC,
                TAP_MAC,
                ETH_TEST,
                &payload(100 + usize::from(i), i),
            )
        })
        .collect();
    for f in &frames {
        b.host_send(f);
    }
    // No buffers: nothing is used, the frames wait (one in the device, the
    // rest in the tap).
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(b.rx.used_idx(&b.guest.mem), 0);
    let heads = b.add_rx_buffers(8);
    let mut got = Vec::new();
    while got.len() < frames.len() {
        let (_, f) = b
            .guest_recv(&heads)
            .expect("a deferred frame after the refill");
        if is_test_frame(&f) {
            got.push(f);
        }
    }
    assert_eq!(got, frames);
}

#[test]
fn the_namespace_kernel_answers_the_guests_arp_and_ping() {
    let mut b = Bench::new("arp", true);
    let heads = b.add_rx_buffers(16);

    // ARP: who has 10.99.0.1? tell 10.99.0.2.
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&GUEST_IP);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&TAP_IP);
    b.guest_send(&eth([0xff; 6], GUEST_MAC, 0x0806, &arp), &[]);
    let reply = loop {
        let (_, f) = b.guest_recv(&heads).expect("an ARP reply");
        if f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2] {
            break f;
        }
    };
    assert_eq!(&reply[..6], &GUEST_MAC, "reply to the guest");
    assert_eq!(&reply[22..28], &TAP_MAC, "sender is the tap");
    assert_eq!(&reply[28..32], &TAP_IP);
    assert_eq!(&reply[38..42], &GUEST_IP);

    // ICMP echo request 10.99.0.2 -> 10.99.0.1.
    let data = payload(56, 0x5a);
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend_from_slice(&data);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ipv4 = vec![0x45, 0];
    ipv4.extend_from_slice(&total.to_be_bytes());
    ipv4.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
    ipv4.extend_from_slice(&GUEST_IP);
    ipv4.extend_from_slice(&TAP_IP);
    let c = checksum(&ipv4);
    ipv4[10..12].copy_from_slice(&c.to_be_bytes());
    ipv4.extend_from_slice(&icmp);
    b.guest_send(&eth(TAP_MAC, GUEST_MAC, 0x0800, &ipv4), &[14]);
    let reply = loop {
        let (_, f) = b.guest_recv(&heads).expect("an echo reply");
        if f.len() >= 42 && f[12..14] == [8, 0] && f[23] == 1 && f[34] == 0 {
            break f;
        }
    };
    assert_eq!(&reply[..6], &GUEST_MAC);
    assert_eq!(&reply[26..30], &TAP_IP);
    assert_eq!(&reply[30..34], &GUEST_IP);
    assert_eq!(&reply[38..42], &[0x12, 0x34, 0, 1], "id and sequence");
    assert_eq!(&reply[42..], &data[..], "echoed data");
    assert_eq!(checksum(&reply[14..34]), 0, "IPv4 header checksum");
    assert_eq!(checksum(&reply[34..]), 0, "ICMP checksum");
}
