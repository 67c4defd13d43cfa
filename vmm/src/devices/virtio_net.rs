//! virtio-net (device id 1) on a tap, in the VMM (virtio 1.2 §5.1).
//!
//! One receive and one transmit queue, no offloads: the device offers
//! VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC and, when configured,
//! VIRTIO_NET_F_MTU. Without checksum or segmentation offload every frame is
//! a complete Ethernet frame behind a 12-byte `virtio_net_hdr_v1`, and the
//! header carries nothing the device has to act on.
//!
//! The data path runs on a thread of its own ([`NetWorker`]), woken by epoll
//! on the tap (edge triggered), the two queue kick eventfds (KVM ioeventfds)
//! and a wake eventfd the transport's activation writes. It owns two frame
//! buffers allocated once, one per direction; no frame allocates:
//!
//! * transmit: a chain is gathered into the transmit buffer behind a zeroed
//!   tap header, then written to the tap in one write. Copying first means
//!   the tap is handed exactly what was checked, whatever the guest does to
//!   its memory meanwhile; the guest's own header is never passed on (a
//!   guest cannot ask the host kernel for segmentation or checksum work);
//! * receive: a frame is read from the tap into the receive buffer, its
//!   header replaced by a zeroed one (`num_buffers` 1), then copied into the
//!   next receive chain. With no receive chain available the frame stays in
//!   the buffer and the tap is not read again until the driver adds buffers
//!   and kicks the receive queue (Firecracker's deferred frame): the kernel
//!   queues or drops what arrives meanwhile, the VMM holds one frame.
//!
//! Everything in a chain is the guest's: descriptor directions, lengths,
//! addresses, chain length and loops (bounded by virtio-queue's per-chain
//! budget and by the frame buffer's size). A malformed chain is returned
//! used with length 0 and its frame dropped; nothing panics, the VMM goes
//! on, and the warning is rate limited.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::tap::{Tap, TapError, VNET_HDR_LEN_V1};
use super::virtio_mmio::{
    read_config_bytes, ActivateError, VirtioDevice, VirtioInterrupt, INT_VRING, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;

/// virtio device id of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// The device's maximum MTU is in its configuration space.
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
/// The device has a MAC address in its configuration space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Largest buffer a frame takes, virtio-net header included.
pub const FRAME_BUF_LEN: usize = 65562;
/// Largest Ethernet frame the device moves (headers included, no FCS).
pub const MAX_FRAME_LEN: usize = FRAME_BUF_LEN - VNET_HDR_LEN_V1;
/// Shortest frame: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Smallest MTU (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// Largest MTU: a frame of it (Ethernet and VLAN headers included) fits.
pub const MAX_MTU: u16 = (MAX_FRAME_LEN - 18) as u16;
/// Chains handled per queue before the other direction gets a turn.
const BUDGET: usize = QUEUE_SIZE as usize;
/// Byte offset of `gso_type` in a virtio-net header.
const HDR_GSO_TYPE: usize = 1;
/// Byte offset of `num_buffers` in a `virtio_net_hdr_v1`.
const HDR_NUM_BUFFERS: usize = 10;
/// Length of the configuration space: mac, status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;

/// Errors setting up a virtio-net device.
#[derive(Debug, Error)]
pub enum NetError {
    /// A bad `--net` parameter.
    #[error("invalid --net parameter: {0}")]
    InvalidParam(String),
    /// The tap.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// epoll/eventfd/thread plumbing.
    #[error("virtio-net: {what}: {source}")]
    Os {
        /// What failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// One network device as configured: the inherited tap, the guest's MAC
/// and, optionally, the MTU announced to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Inherited tap descriptor.
    pub tap_fd: RawFd,
    /// MAC address of the guest's device.
    pub mac: [u8; 6],
    /// MTU offered to the guest (VIRTIO_NET_F_MTU).
    pub mtu: Option<u16>,
}

impl NetConfig {
    /// Parse `tap-fd=<N>,mac=<xx:xx:xx:xx:xx:xx>[,mtu=<N>]`.
    pub fn parse(arg: &str) -> Result<NetConfig, NetError> {
        let bad = |m: String| NetError::InvalidParam(format!("{arg:?}: {m}"));
        let (mut tap_fd, mut mac, mut mtu) = (None, None, None);
        for part in arg.split(',') {
            let Some((key, value)) = part.split_once('=') else {
                return Err(bad(format!("{part:?} is not key=value")));
            };
            let slot_taken = match key {
                "tap-fd" => tap_fd
                    .replace(
                        value
                            .parse::<RawFd>()
                            .ok()
                            .filter(|fd| *fd > 2)
                            .ok_or_else(|| {
                                bad(format!(
                                    "tap-fd {value:?} is not a descriptor number above 2"
                                ))
                            })?,
                    )
                    .is_some(),
                "mac" => mac.replace(parse_mac(value).map_err(bad)?).is_some(),
                "mtu" => mtu
                    .replace(
                        value
                            .parse::<u16>()
                            .ok()
                            .filter(|m| (MIN_MTU..=MAX_MTU).contains(m))
                            .ok_or_else(|| {
                                bad(format!(
                                    "mtu {value:?} is not between {MIN_MTU} and {MAX_MTU}"
                                ))
                            })?,
                    )
                    .is_some(),
                _ => return Err(bad(format!("unknown key {key:?} (tap-fd, mac, mtu)"))),
            };
            if slot_taken {
                return Err(bad(format!("{key} given twice")));
            }
        }
        Ok(NetConfig {
            tap_fd: tap_fd.ok_or_else(|| bad("tap-fd is required".into()))?,
            mac: mac.ok_or_else(|| bad("mac is required".into()))?,
            mtu,
        })
    }
}

/// Six two-digit hex octets separated by colons, unicast.
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = parts
            .next()
            .filter(|p| p.len() == 2)
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .ok_or_else(|| format!("mac {s:?} is not six hex octets like 02:00:00:00:00:01"))?;
    }
    if parts.next().is_some() {
        return Err(format!(
            "mac {s:?} is not six hex octets like 02:00:00:00:00:01"
        ));
    }
    if mac[0] & 1 != 0 {
        return Err(format!("mac {s:?} is a multicast address"));
    }
    Ok(mac)
}

/// Why a descriptor chain was dropped (always the guest driver's doing).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ChainError {
    /// A transmit chain with a device-writable descriptor.
    #[error("transmit chain has a device-writable descriptor")]
    WritableInTx,
    /// A receive chain with a device-readable descriptor.
    #[error("receive chain has a device-readable descriptor")]
    ReadableInRx,
    /// Not even a virtio-net header and an Ethernet header.
    #[error("transmit chain of {0} bytes is shorter than a virtio-net and an Ethernet header")]
    TooShort(usize),
    /// More than the largest frame.
    #[error("transmit chain holds a frame longer than {MAX_FRAME_LEN} bytes")]
    TooLong,
    /// The receive chain is too small for the frame.
    #[error("receive chain of {have} bytes cannot hold a {need}-byte frame")]
    NoRoom {
        /// Bytes the chain could take.
        have: usize,
        /// Bytes of the frame with its header.
        need: usize,
    },
    /// The chain ends on a descriptor that names a next one: a loop (cut
    /// by the queue's per-chain budget) or a next index out of the table.
    #[error("chain does not end (a loop, or a next descriptor out of the table)")]
    Unterminated,
    /// A descriptor outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is not in guest memory")]
    Memory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: usize,
    },
}

/// Counters of the data path.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames written to the tap.
    pub tx_frames: u64,
    /// Their bytes (frames only).
    pub tx_bytes: u64,
    /// Transmit chains dropped as malformed.
    pub tx_bad_chains: u64,
    /// Frames the tap refused.
    pub tx_tap_errors: u64,
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Their bytes (frames only).
    pub rx_bytes: u64,
    /// Frames dropped (malformed receive chain, or a frame the data path
    /// does not take from the tap).
    pub rx_dropped: u64,
    /// Times receiving stopped for lack of guest buffers.
    pub rx_deferred: u64,
}

/// At most one warning a second; the rest are counted.
#[derive(Debug, Default)]
struct RateLimitedWarn {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedWarn {
    fn warn(&mut self, args: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            log::warn!(
                "virtio-net: {args} ({} similar warnings suppressed)",
                self.suppressed
            );
        } else {
            log::warn!("virtio-net: {args}");
        }
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// The queues of an activated device.
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    irq_status: Arc<AtomicU32>,
}

/// The data path: the tap, the two frame buffers and, once the driver set
/// DRIVER_OK, the queues. Shared by the transport (activation, reset, on a
/// vCPU thread) and the [`NetWorker`] thread.
pub struct NetDataPath {
    tap: Tap,
    /// `[virtio_net_hdr_v1][frame]`, read from the tap at
    /// `VNET_HDR_LEN_V1 - tap header length`.
    rx_buf: Vec<u8>,
    /// Bytes at the start of `rx_buf` waiting for a receive chain (0: none).
    rx_pending: usize,
    /// `[tap header, zero][frame]`.
    tx_buf: Vec<u8>,
    active: Option<Active>,
    irq: EventFd,
    stats: NetStats,
    warn: RateLimitedWarn,
}

impl NetDataPath {
    fn new(tap: Tap, irq: EventFd) -> Self {
        let tx_len = tap.vnet_hdr_len() + MAX_FRAME_LEN;
        NetDataPath {
            tap,
            rx_buf: vec![0; FRAME_BUF_LEN],
            rx_pending: 0,
            tx_buf: vec![0; tx_len],
            active: None,
            irq,
            stats: NetStats::default(),
            warn: RateLimitedWarn::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Whether a frame read from the tap waits for a receive buffer.
    pub fn has_deferred_frame(&self) -> bool {
        self.rx_pending > 0
    }

    /// Send every available transmit chain (at most [`BUDGET`]); returns
    /// whether chains are left for another turn.
    pub fn process_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let hdr = self.tap.vnet_hdr_len();
        let mut used = 0;
        while used < BUDGET {
            let Some(chain) = active.tx.pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            match gather_tx_frame(&active.mem, chain, &mut self.tx_buf[hdr..]) {
                Ok(len) => match self.tap.write_frame(&self.tx_buf[..hdr + len]) {
                    Ok(_) => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += len as u64;
                    }
                    Err(e) => {
                        self.stats.tx_tap_errors += 1;
                        self.warn
                            .warn(format_args!("tap refused a {len}-byte frame: {e}"));
                    }
                },
                Err(e) => {
                    self.stats.tx_bad_chains += 1;
                    self.warn
                        .warn(format_args!("transmit chain {head} dropped: {e}"));
                }
            }
            // The device writes nothing into a transmit chain.
            if let Err(e) = active.tx.add_used(&active.mem, head, 0) {
                self.warn
                    .warn(format_args!("cannot return transmit chain {head}: {e}"));
            }
            used += 1;
        }
        if used > 0 {
            signal_used(active, TX_QUEUE, &self.irq);
        }
        used == BUDGET
    }

    /// Move frames from the tap into receive chains until the tap is empty,
    /// the guest has no buffer left (the frame is deferred) or the budget is
    /// spent; returns whether frames may be left for another turn.
    pub fn process_rx(&mut self) -> bool {
        if self.active.is_none() {
            // Frames wait in the tap's queue until the driver is ready.
            return false;
        }
        let mut delivered = 0;
        let mut budget_spent = true;
        while delivered < BUDGET {
            if self.rx_pending == 0 && !self.read_tap_frame() {
                budget_spent = false;
                break;
            }
            if !self.deliver_pending() {
                self.stats.rx_deferred += 1;
                budget_spent = false;
                break;
            }
            delivered += 1;
        }
        if delivered > 0 {
            if let Some(active) = self.active.as_mut() {
                signal_used(active, RX_QUEUE, &self.irq);
            }
        }
        budget_spent
    }

    /// Read the next usable frame from the tap into `rx_buf` behind a fresh
    /// header; false when the tap has nothing (or fails).
    fn read_tap_frame(&mut self) -> bool {
        let hdr = self.tap.vnet_hdr_len();
        let start = VNET_HDR_LEN_V1 - hdr;
        loop {
            let n = match self.tap.read_frame(&mut self.rx_buf[start..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.warn.warn(format_args!("reading the tap: {e}"));
                    return false;
                }
            };
            // Offloads are off: a segmentation request from the kernel is
            // not something this device can hand on; drop it.
            if n < hdr + MIN_FRAME_LEN || (hdr > 0 && self.rx_buf[start + HDR_GSO_TYPE] != 0) {
                self.stats.rx_dropped += 1;
                self.warn.warn(format_args!(
                    "dropped a {n}-byte unusable frame from the tap"
                ));
                continue;
            }
            self.rx_buf[..VNET_HDR_LEN_V1].fill(0);
            self.rx_buf[HDR_NUM_BUFFERS..VNET_HDR_LEN_V1].copy_from_slice(&1u16.to_le_bytes());
            self.rx_pending = VNET_HDR_LEN_V1 + n - hdr;
            return true;
        }
    }

    /// Copy the pending frame into the next receive chain; false (frame
    /// kept) when the guest has none.
    fn deliver_pending(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let Some(chain) = active.rx.pop_descriptor_chain(&active.mem) else {
            return false;
        };
        let head = chain.head_index();
        let frame = &self.rx_buf[..self.rx_pending];
        let len = match fill_rx_chain(&active.mem, chain, frame) {
            Ok(len) => {
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += (frame.len() - VNET_HDR_LEN_V1) as u64;
                len
            }
            Err(e) => {
                self.stats.rx_dropped += 1;
                self.warn
                    .warn(format_args!("receive chain {head} dropped a frame: {e}"));
                0
            }
        };
        self.rx_pending = 0;
        if let Err(e) = active.rx.add_used(&active.mem, head, len) {
            self.warn
                .warn(format_args!("cannot return receive chain {head}: {e}"));
        }
        true
    }
}

/// Raise the interrupt for `queue` unless the driver suppressed it.
fn signal_used(active: &mut Active, queue: usize, irq: &EventFd) {
    let q = if queue == RX_QUEUE {
        &mut active.rx
    } else {
        &mut active.tx
    };
    if q.needs_notification(&active.mem).unwrap_or(true) {
        active.irq_status.fetch_or(INT_VRING, Ordering::SeqCst);
        if let Err(e) = irq.write(1) {
            log::error!("virtio-net: cannot raise the interrupt: {e}");
        }
    }
}

/// Gather the frame of a transmit chain (after its virtio-net header) into
/// `buf`; returns the frame's length.
pub fn gather_tx_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Result<usize, ChainError> {
    let mut header_left = VNET_HDR_LEN_V1;
    let mut len = 0usize;
    let mut total = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        last_has_next = desc.has_next();
        if desc.is_write_only() {
            return Err(ChainError::WritableInTx);
        }
        let desc_len = desc.len() as usize;
        total = total.saturating_add(desc_len);
        let skip = header_left.min(desc_len);
        header_left -= skip;
        let data_len = desc_len - skip;
        if data_len == 0 {
            continue;
        }
        let Some(dst) = buf.get_mut(len..len + data_len) else {
            return Err(ChainError::TooLong);
        };
        let addr = desc.addr().0.checked_add(skip as u64);
        addr.and_then(|a| mem.read_slice(dst, GuestAddress(a)).ok())
            .ok_or(ChainError::Memory {
                addr: desc.addr().0,
                len: desc_len,
            })?;
        len += data_len;
    }
    if last_has_next {
        return Err(ChainError::Unterminated);
    }
    if header_left > 0 || len < MIN_FRAME_LEN {
        return Err(ChainError::TooShort(total));
    }
    Ok(len)
}

/// Copy `frame` (virtio-net header included) into a receive chain; returns
/// the bytes written.
pub fn fill_rx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
) -> Result<u32, ChainError> {
    let mut written = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        if written == frame.len() {
            break;
        }
        last_has_next = desc.has_next();
        if !desc.is_write_only() {
            return Err(ChainError::ReadableInRx);
        }
        let n = (desc.len() as usize).min(frame.len() - written);
        mem.write_slice(&frame[written..written + n], desc.addr())
            .map_err(|_| ChainError::Memory {
                addr: desc.addr().0,
                len: desc.len() as usize,
            })?;
        written += n;
    }
    if written < frame.len() && last_has_next {
        return Err(ChainError::Unterminated);
    }
    if written < frame.len() {
        return Err(ChainError::NoRoom {
            have: written,
            need: frame.len(),
        });
    }
    // `frame` is at most FRAME_BUF_LEN bytes.
    Ok(written as u32)
}

/// The virtio-net device as the virtio-mmio transport sees it.
pub struct NetDevice {
    config: [u8; CONFIG_LEN],
    features: u64,
    data: Arc<Mutex<NetDataPath>>,
    wake: EventFd,
}

/// What the data path thread is built from, once the transport exists.
pub struct NetWorkerParts {
    data: Arc<Mutex<NetDataPath>>,
    wake: EventFd,
}

impl NetDevice {
    /// A device on `tap` with `mac` (and `mtu` offered, if any); `irq` is
    /// (a duplicate of) the transport's interrupt eventfd.
    pub fn new(
        tap: Tap,
        mac: [u8; 6],
        mtu: Option<u16>,
        irq: EventFd,
    ) -> Result<(NetDevice, NetWorkerParts), NetError> {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        let mut features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC;
        if let Some(mtu) = mtu {
            if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                return Err(NetError::InvalidParam(format!(
                    "mtu {mtu} is not between {MIN_MTU} and {MAX_MTU}"
                )));
            }
            config[10..12].copy_from_slice(&mtu.to_le_bytes());
            features |= VIRTIO_NET_F_MTU;
        }
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| NetError::Os {
            what: "creating an eventfd",
            source,
        })?;
        let worker_wake = wake.try_clone().map_err(|source| NetError::Os {
            what: "duplicating an eventfd",
            source,
        })?;
        let data = Arc::new(Mutex::new(NetDataPath::new(tap, irq)));
        Ok((
            NetDevice {
                config,
                features,
                data: data.clone(),
                wake,
            },
            NetWorkerParts {
                data,
                wake: worker_wake,
            },
        ))
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only for a virtio 1 driver.
        log::warn!(
            "virtio-net: {}-byte configuration write at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        _acked_features: u64,
        queues: &[(usize, &Queue)],
        _kicks: &[EventFd],
        interrupt: &VirtioInterrupt,
    ) -> Result<(), ActivateError> {
        // The data path works on its own copy of each queue's state.
        let queue = |index: usize| {
            let (_, q) = queues.iter().find(|(i, _)| *i == index).ok_or_else(|| {
                ActivateError::BadQueue {
                    index,
                    reason: "the receive and the transmit queue must both be ready".into(),
                }
            })?;
            Queue::try_from(q.state()).map_err(|e| ActivateError::BadQueue {
                index,
                reason: e.to_string(),
            })
        };
        let (rx, tx) = (queue(RX_QUEUE)?, queue(TX_QUEUE)?);
        let mut data = self
            .data
            .lock()
            .map_err(|_| ActivateError::Backend("the data path is poisoned".into()))?;
        data.active = Some(Active {
            mem: mem.clone(),
            rx,
            tx,
            irq_status: interrupt.status.clone(),
        });
        drop(data);
        // The worker looks at both queues (the driver may have filled them
        // before DRIVER_OK) and drains what waited in the tap.
        self.wake
            .write(1)
            .map_err(|e| ActivateError::Backend(format!("cannot wake the data path: {e}")))
    }

    fn reset(&mut self) -> bool {
        match self.data.lock() {
            Ok(mut data) => {
                data.active = None;
                data.rx_pending = 0;
                true
            }
            Err(_) => false,
        }
    }
}

/// epoll tokens of the worker.
const TOKEN_TAP: u64 = 0;
const TOKEN_RX_KICK: u64 = 1;
const TOKEN_TX_KICK: u64 = 2;
const TOKEN_WAKE: u64 = 3;
const TOKEN_STOP: u64 = 4;

/// The data path thread of one device.
pub struct NetWorker {
    epoll: Epoll,
    data: Arc<Mutex<NetDataPath>>,
    wake: EventFd,
    rx_kick: EventFd,
    tx_kick: EventFd,
    stop: EventFd,
}

impl NetWorker {
    /// Build the worker from the device's parts and the transport's kick
    /// eventfds (duplicated here, before any seccomp filter).
    pub fn new(parts: NetWorkerParts, kicks: &[EventFd]) -> Result<NetWorker, NetError> {
        let os = |what: &'static str| move |source| NetError::Os { what, source };
        let (Some(rx), Some(tx)) = (kicks.get(RX_QUEUE), kicks.get(TX_QUEUE)) else {
            return Err(NetError::InvalidParam(
                "the transport has no receive and transmit kicks".into(),
            ));
        };
        let rx_kick = rx.try_clone().map_err(os("duplicating a kick eventfd"))?;
        let tx_kick = tx.try_clone().map_err(os("duplicating a kick eventfd"))?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(os("creating an eventfd"))?;
        let epoll = Epoll::new().map_err(os("epoll_create"))?;
        let tap_fd = parts
            .data
            .lock()
            .map_err(|_| NetError::InvalidParam("the data path is poisoned".into()))?
            .tap
            .as_raw_fd();
        let sources = [
            (tap_fd, TOKEN_TAP, EventSet::IN | EventSet::EDGE_TRIGGERED),
            (rx_kick.as_raw_fd(), TOKEN_RX_KICK, EventSet::IN),
            (tx_kick.as_raw_fd(), TOKEN_TX_KICK, EventSet::IN),
            (parts.wake.as_raw_fd(), TOKEN_WAKE, EventSet::IN),
            (stop.as_raw_fd(), TOKEN_STOP, EventSet::IN),
        ];
        for (fd, token, events) in sources {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(os("epoll_ctl"))?;
        }
        Ok(NetWorker {
            epoll,
            data: parts.data,
            wake: parts.wake,
            rx_kick,
            tx_kick,
            stop,
        })
    }

    /// The epoll descriptor (the only one the thread's filter lets it wait on).
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// An eventfd that ends [`NetWorker::run`] when written.
    pub fn stopper(&self) -> Result<EventFd, NetError> {
        self.stop.try_clone().map_err(|source| NetError::Os {
            what: "duplicating an eventfd",
            source,
        })
    }

    /// The data path (tests and diagnostics).
    pub fn data_path(&self) -> Arc<Mutex<NetDataPath>> {
        self.data.clone()
    }

    /// Serve the device until the stop eventfd is written (Ok) or the
    /// data path cannot go on (Err, why).
    pub fn run(self) -> Result<(), String> {
        let mut events = [EpollEvent::default(); 8];
        let (mut rx_more, mut tx_more) = (false, false);
        loop {
            let timeout = if rx_more || tx_more { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("epoll_wait failed: {e}")),
            };
            let (mut rx, mut tx) = (rx_more, tx_more);
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_TAP => rx = true,
                    TOKEN_RX_KICK => {
                        let _ = self.rx_kick.read();
                        rx = true;
                    }
                    TOKEN_TX_KICK => {
                        let _ = self.tx_kick.read();
                        tx = true;
                    }
                    TOKEN_WAKE => {
                        let _ = self.wake.read();
                        rx = true;
                        tx = true;
                    }
                    TOKEN_STOP => return Ok(()),
                    _ => {}
                }
            }
            let Ok(mut data) = self.data.lock() else {
                return Err("the data path is poisoned".into());
            };
            tx_more = tx && data.process_tx();
            rx_more = rx && data.process_rx();
        }
    }

    /// Run on a thread named `net<index>`, under `filter` when given
    /// (installed first thing on the new thread); `on_failure` gets the
    /// reason if the filter cannot be installed or the data path stops.
    pub fn spawn(
        self,
        index: usize,
        filter: Option<seccompiler::BpfProgram>,
        on_failure: impl FnOnce(String) + Send + 'static,
    ) -> Result<JoinHandle<()>, NetError> {
        std::thread::Builder::new()
            .name(format!("net{index}"))
            .spawn(move || {
                let filtered = match filter {
                    Some(f) => crate::seccomp::apply(crate::seccomp::ThreadKind::Net, &f)
                        .map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                if let Err(e) = filtered.and_then(|()| self.run()) {
                    on_failure(format!("virtio-net device {index}: {e}"));
                }
            })
            .map_err(|source| NetError::Os {
                what: "spawning the device thread",
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::atomic::{fence, AtomicU32};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const SIZE: u16 = 16;
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];
    /// Guest buffers start here; the rings sit below.
    const BUFS: u64 = 0x10_0000;

    /// The driver side of one split queue, laid out as a guest would.
    struct Ring {
        desc: u64,
        avail: u64,
        used: u64,
        next_desc: u16,
        avail_idx: u16,
        last_used: u16,
    }

    impl Ring {
        fn new(base: u64) -> Ring {
            Ring {
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
            }
        }

        fn queue(&self) -> Queue {
            let mut q = Queue::new(SIZE).unwrap();
            q.set_size(SIZE);
            q.try_set_desc_table_address(GuestAddress(self.desc))
                .unwrap();
            q.try_set_avail_ring_address(GuestAddress(self.avail))
                .unwrap();
            q.try_set_used_ring_address(GuestAddress(self.used))
                .unwrap();
            q.set_ready(true);
            q
        }

        fn write_desc(
            &self,
            mem: &GuestMemoryMmap,
            i: u16,
            addr: u64,
            len: u32,
            flags: u16,
            next: u16,
        ) {
            let d = self.desc + 16 * u64::from(i);
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }

        /// Write a chain of (addr, len, device-writable) and publish it.
        fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, write)) in bufs.iter().enumerate() {
                let idx = (head + i as u16) % SIZE;
                let mut flags = if write { F_WRITE } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= F_NEXT;
                }
                self.write_desc(mem, idx, addr, len, flags, (idx + 1) % SIZE);
            }
            self.next_desc = (head + bufs.len() as u16) % SIZE;
            self.publish(mem, head);
            head
        }

        fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
            let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % SIZE);
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        /// Used elements (id, len) published since the last call.
        fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
            let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            let mut out = Vec::new();
            while self.last_used != idx {
                let e = self.used + 4 + 8 * u64::from(self.last_used % SIZE);
                out.push((
                    mem.read_obj(GuestAddress(e)).unwrap(),
                    mem.read_obj(GuestAddress(e + 4)).unwrap(),
                ));
                self.last_used = self.last_used.wrapping_add(1);
            }
            out
        }
    }

    /// An activated device on a datagram socket standing in for the tap.
    struct Bench {
        mem: GuestMemoryMmap,
        dev: NetDevice,
        data: Arc<Mutex<NetDataPath>>,
        /// The host's side of the "tap".
        peer: OwnedFd,
        irq: EventFd,
        irq_status: Arc<AtomicU32>,
        rx: Ring,
        tx: Ring,
        hdr: usize,
    }

    impl Bench {
        fn new(hdr: usize) -> Bench {
            let mut fds = [0; 2];
            // SAFETY: socketpair writes two descriptors into `fds`.
            let r =
                unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, fds.as_mut_ptr()) };
            assert_eq!(r, 0);
            // SAFETY: both descriptors were just created and are owned here only.
            let (dev_end, peer) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            set_peer_nonblocking(&peer);
            let tap = Tap::from_datagram_socket(dev_end, hdr);
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let (dev, parts) =
                NetDevice::new(tap, MAC, Some(1500), irq.try_clone().unwrap()).unwrap();
            let mut b = Bench {
                mem: crate::memory::create_guest_memory(16 << 20).unwrap(),
                dev,
                data: parts.data,
                peer,
                irq,
                irq_status: Arc::new(AtomicU32::new(0)),
                rx: Ring::new(0x1_0000),
                tx: Ring::new(0x2_0000),
                hdr,
            };
            b.activate();
            b
        }

        fn activate(&mut self) {
            let (rxq, txq) = (self.rx.queue(), self.tx.queue());
            let interrupt = VirtioInterrupt {
                status: self.irq_status.clone(),
                evt: self.irq.try_clone().unwrap(),
            };
            self.dev
                .activate(
                    &self.mem,
                    VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC,
                    &[(RX_QUEUE, &rxq), (TX_QUEUE, &txq)],
                    &[],
                    &interrupt,
                )
                .unwrap();
        }

        fn tx(&self) -> bool {
            self.data.lock().unwrap().process_tx()
        }

        fn rx(&self) -> bool {
            self.data.lock().unwrap().process_rx()
        }

        fn stats(&self) -> NetStats {
            self.data.lock().unwrap().stats()
        }

        /// What the host side received, if anything.
        fn host_recv(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; FRAME_BUF_LEN + 64];
            // SAFETY: recv writes at most buf.len() bytes into buf.
            let n =
                unsafe { libc::recv(self.peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let n = usize::try_from(n).ok()?;
            buf.truncate(n);
            Some(buf)
        }

        /// The host sends `frame` behind a tap header of `hdr` bytes.
        fn host_send(&self, hdr: &[u8], frame: &[u8]) {
            assert_eq!(hdr.len(), self.hdr);
            let mut b = hdr.to_vec();
            b.extend_from_slice(frame);
            // SAFETY: send reads b.len() bytes from b.
            let n = unsafe { libc::send(self.peer.as_raw_fd(), b.as_ptr().cast(), b.len(), 0) };
            assert_eq!(n, b.len() as isize);
        }

        fn write(&self, addr: u64, bytes: &[u8]) {
            self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }

        /// Whether the interrupt was raised (and the status bit set) since asked.
        fn took_interrupt(&self) -> bool {
            let raised = self.irq.read().is_ok();
            let bit = self.irq_status.swap(0, Ordering::SeqCst) & INT_VRING != 0;
            assert_eq!(raised, bit, "eventfd and InterruptStatus disagree");
            raised
        }
    }

    fn set_peer_nonblocking(fd: &OwnedFd) {
        // SAFETY: F_GETFL/F_SETFL only change the flags of our own socket.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
        f[..6].copy_from_slice(&MAC);
        f
    }

    #[test]
    fn config_space_and_features() {
        let b = Bench::new(12);
        assert_eq!(b.dev.device_type(), 1);
        assert_eq!(b.dev.queue_max_sizes(), [QUEUE_SIZE, QUEUE_SIZE]);
        assert_eq!(
            b.dev.features(),
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU
        );
        let mut cfg = [0xaa; 16];
        b.dev.read_config(0, &mut cfg);
        assert_eq!(&cfg[..6], &MAC);
        assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500);
        assert_eq!(&cfg[12..], &[0; 4]);
        b.dev.read_config(u64::MAX, &mut cfg);
        assert_eq!(cfg, [0; 16]);
        // Without an MTU the feature is not offered.
        let (s, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let tap = Tap::from_datagram_socket(OwnedFd::from(s), 0);
        let irq = EventFd::new(0).unwrap();
        let (dev, _) = NetDevice::new(tap, MAC, None, irq).unwrap();
        assert_eq!(dev.features(), VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
    }

    #[test]
    fn tx_frame_split_over_descriptors_reaches_the_tap_intact() {
        for hdr in [0, 10, 12] {
            let mut b = Bench::new(hdr);
            let f = frame(300, 1);
            // A header asking for offloads the device never offered.
            let mut guest_hdr = [0u8; 12];
            guest_hdr[0] = 1; // NEEDS_CSUM
            guest_hdr[1] = 4; // GSO_TCPV6
            let mut bytes = guest_hdr.to_vec();
            bytes.extend_from_slice(&f);
            // Header split across descriptors, frame in four uneven pieces.
            let cuts = [0, 7, 19, 20, 150, bytes.len()];
            let mut chain = Vec::new();
            for w in cuts.windows(2) {
                let addr = BUFS + 0x1000 * chain.len() as u64;
                b.write(addr, &bytes[w[0]..w[1]]);
                chain.push((addr, (w[1] - w[0]) as u32, false));
            }
            let head = b.tx.add(&b.mem, &chain);
            assert!(!b.tx());
            let got = b.host_recv().expect("a frame on the tap");
            assert_eq!(&got[..hdr], &vec![0u8; hdr][..], "tap header is zeroed");
            assert_eq!(&got[hdr..], &f[..], "hdr {hdr}");
            assert!(b.host_recv().is_none());
            assert_eq!(b.tx.take_used(&b.mem), [(u32::from(head), 0)]);
            assert!(b.took_interrupt());
            let st = b.stats();
            assert_eq!((st.tx_frames, st.tx_bytes, st.tx_bad_chains), (1, 300, 0));
        }
    }

    #[test]
    fn tx_malformed_chains_are_returned_empty_and_nothing_reaches_the_tap() {
        let mut b = Bench::new(10);
        b.write(BUFS, &frame(64, 2));
        let mem = b.mem.clone();
        let mut heads = vec![
            // Header only.
            b.tx.add(&mem, &[(BUFS, 12, false)]),
            // Header and a frame shorter than an Ethernet header.
            b.tx.add(&mem, &[(BUFS, 25, false)]),
            // A device-writable descriptor in a transmit chain.
            b.tx.add(&mem, &[(BUFS, 12, false), (BUFS + 64, 64, true)]),
            // Beyond guest memory, and wrapping the address space.
            b.tx.add(&mem, &[(BUFS, 12, false), (0x7fff_0000_0000, 64, false)]),
            b.tx.add(&mem, &[(u64::MAX - 8, 64, false)]),
            // Zero-length descriptors only.
            b.tx.add(&mem, &[(BUFS, 0, false), (BUFS, 0, false)]),
            // Longer than the largest frame (two 40000-byte pieces).
            b.tx.add(&mem, &[(BUFS, 40_000, false), (BUFS, 40_000, false)]),
        ];
        // A loop: descriptor 14 -> 15 -> 14 ...
        b.tx.write_desc(&mem, 14, BUFS, 12, F_NEXT, 15);
        b.tx.write_desc(&mem, 15, BUFS + 12, 40, F_NEXT, 14);
        b.tx.publish(&mem, 14);
        heads.push(14);
        // A next index outside the table.
        b.tx.write_desc(&mem, 13, BUFS, 60, F_NEXT, 999);
        b.tx.publish(&mem, 13);
        heads.push(13);
        assert!(!b.tx());
        assert!(b.host_recv().is_none(), "nothing malformed reaches the tap");
        let used = b.tx.take_used(&mem);
        assert_eq!(
            used,
            heads.iter().map(|h| (u32::from(*h), 0)).collect::<Vec<_>>()
        );
        assert_eq!(b.stats().tx_bad_chains, heads.len() as u64);
        assert_eq!(b.stats().tx_frames, 0);
        // A head index outside the table: no chain at all; add_used refuses
        // it, the device goes on.
        b.tx.publish(&mem, 200);
        assert!(!b.tx());
        // The queue still works.
        b.tx.next_desc = 0;
        let head = b.tx.add(&mem, &[(BUFS - 12, 12, false), (BUFS, 64, false)]);
        b.tx();
        let got = b.host_recv().expect("the good frame");
        assert_eq!(&got[10..], &frame(64, 2)[..]);
        assert_eq!(b.tx.take_used(&mem).last(), Some(&(u32::from(head), 0)));
    }

    #[test]
    fn rx_into_a_chain_of_several_descriptors() {
        for hdr in [0, 10, 12] {
            let mut b = Bench::new(hdr);
            let f = frame(1000, 3);
            // The kernel's header claims the checksum valid: not passed on.
            let mut tap_hdr = vec![0u8; hdr];
            if hdr > 0 {
                tap_hdr[0] = 2;
            }
            b.host_send(&tap_hdr, &f);
            let pieces = [(BUFS, 5u32), (BUFS + 0x1000, 20), (BUFS + 0x2000, 2000)];
            let head = b.rx.add(&b.mem.clone(), &pieces.map(|(a, l)| (a, l, true)));
            assert!(!b.rx());
            assert_eq!(b.rx.take_used(&b.mem), [(u32::from(head), 12 + 1000)]);
            assert!(b.took_interrupt());
            let mut got = b.read(BUFS, 5);
            got.extend(b.read(BUFS + 0x1000, 20));
            got.extend(b.read(BUFS + 0x2000, 12 + 1000 - 25));
            let mut want = vec![0u8; 12];
            want[10] = 1; // num_buffers
            want.extend_from_slice(&f);
            assert_eq!(got, want, "hdr {hdr}");
            let st = b.stats();
            assert_eq!((st.rx_frames, st.rx_bytes, st.rx_dropped), (1, 1000, 0));
        }
    }

    #[test]
    fn rx_without_buffers_defers_the_frame_until_the_queue_is_refilled() {
        let mut b = Bench::new(12);
        let (f1, f2) = (frame(100, 4), frame(200, 5));
        b.host_send(&[0; 12], &f1);
        b.host_send(&[0; 12], &f2);
        assert!(!b.rx());
        assert!(b.data.lock().unwrap().has_deferred_frame());
        assert_eq!(b.stats().rx_deferred, 1);
        assert!(b.rx.take_used(&b.mem).is_empty());
        assert!(!b.took_interrupt());
        // The second frame was not taken from the tap.
        let mem = b.mem.clone();
        let h1 = b.rx.add(&mem, &[(BUFS, 2048, true)]);
        b.rx();
        assert_eq!(b.rx.take_used(&mem), [(u32::from(h1), 112)]);
        assert_eq!(&b.read(BUFS + 12, 100), &f1);
        // Out of buffers again: the second frame is now the deferred one.
        assert!(b.data.lock().unwrap().has_deferred_frame());
        assert_eq!(b.stats().rx_deferred, 2);
        assert!(b.took_interrupt());
        let h2 = b.rx.add(&mem, &[(BUFS + 0x1000, 2048, true)]);
        b.rx();
        assert_eq!(b.rx.take_used(&mem), [(u32::from(h2), 212)]);
        assert_eq!(&b.read(BUFS + 0x1000 + 12, 200), &f2);
        assert_eq!(b.stats().rx_frames, 2);
        // A reset drops a deferred frame and stops the data path.
        b.host_send(&[0; 12], &f1);
        b.rx();
        assert!(b.data.lock().unwrap().has_deferred_frame());
        assert!(b.dev.reset());
        assert!(!b.data.lock().unwrap().has_deferred_frame());
        b.rx.add(&mem, &[(BUFS, 2048, true)]);
        b.host_send(&[0; 12], &f1);
        assert!(!b.rx());
        assert!(!b.tx());
        assert!(b.rx.take_used(&mem).is_empty());
    }

    #[test]
    fn rx_malformed_chains_drop_the_frame_and_are_returned_empty() {
        let mut b = Bench::new(12);
        let mem = b.mem.clone();
        let mut heads = vec![
            // Device-readable descriptor.
            b.rx.add(&mem, &[(BUFS, 2048, false)]),
            b.rx.add(&mem, &[(BUFS, 6, true), (BUFS + 6, 2048, false)]),
            // Too small for header and frame.
            b.rx.add(&mem, &[(BUFS, 12, true), (BUFS + 12, 50, true)]),
            // Zero-length descriptors.
            b.rx.add(&mem, &[(BUFS, 0, true)]),
            // Beyond guest memory.
            b.rx.add(&mem, &[(BUFS, 12, true), (0x7fff_0000_0000, 2048, true)]),
            b.rx.add(&mem, &[(u64::MAX - 4, 2048, true)]),
        ];
        // A loop of small buffers (16 turns of 4 bytes: too few for the
        // frame, so the chain's end is reached and found missing).
        b.rx.write_desc(&mem, 14, BUFS, 4, F_WRITE | F_NEXT, 15);
        b.rx.write_desc(&mem, 15, BUFS + 4, 4, F_WRITE | F_NEXT, 14);
        b.rx.publish(&mem, 14);
        heads.push(14);
        for i in 0..heads.len() {
            b.host_send(&[0; 12], &frame(100, i as u8));
        }
        b.host_send(&[0; 12], &frame(100, 0xee));
        b.rx();
        assert_eq!(
            b.rx.take_used(&mem),
            heads.iter().map(|h| (u32::from(*h), 0)).collect::<Vec<_>>()
        );
        assert_eq!(b.stats().rx_dropped, heads.len() as u64);
        assert!(b.took_interrupt());
        // The last frame waits for, then lands in, a good chain.
        assert!(b.data.lock().unwrap().has_deferred_frame());
        b.rx.next_desc = 0;
        let head = b.rx.add(&mem, &[(BUFS + 0x4000, 4096, true)]);
        b.rx();
        assert_eq!(b.rx.take_used(&mem), [(u32::from(head), 112)]);
        assert_eq!(b.read(BUFS + 0x4000 + 12, 100), frame(100, 0xee));
    }

    #[test]
    fn rx_drops_what_the_tap_should_never_hand_over() {
        let mut b = Bench::new(10);
        let mem = b.mem.clone();
        b.rx.add(&mem, &[(BUFS, 4096, true)]);
        // A segmentation request, and a runt.
        let mut gso = [0u8; 10];
        gso[1] = 1;
        b.host_send(&gso, &frame(100, 1));
        b.host_send(&[0; 10], &[1, 2, 3]);
        b.rx();
        assert_eq!(b.stats().rx_dropped, 2);
        assert!(b.rx.take_used(&mem).is_empty(), "the chain stays available");
        b.host_send(&[0; 10], &frame(60, 9));
        b.rx();
        assert_eq!(b.rx.take_used(&mem), [(0, 72)]);
    }

    #[test]
    fn activation_needs_both_queues_and_no_frame_moves_before_it() {
        let mut b = Bench::new(12);
        assert_eq!(b.dev.wake.read().unwrap(), 1, "activation wakes the worker");
        assert!(b.dev.reset());
        b.host_send(&[0; 12], &frame(80, 1));
        b.tx.add(&b.mem.clone(), &[(BUFS, 100, false)]);
        assert!(!b.tx());
        assert!(!b.rx());
        assert!(b.host_recv().is_none());
        let rxq = b.rx.queue();
        let interrupt = VirtioInterrupt {
            status: b.irq_status.clone(),
            evt: b.irq.try_clone().unwrap(),
        };
        let err = b
            .dev
            .activate(
                &b.mem,
                VIRTIO_F_VERSION_1,
                &[(RX_QUEUE, &rxq)],
                &[],
                &interrupt,
            )
            .unwrap_err();
        assert!(err.to_string().contains("queue 1"), "{err}");
        assert!(
            b.dev.wake.read().is_err(),
            "a refused activation wakes nothing"
        );
        // Activation wakes the worker, which then sends what waited.
        b.activate();
        assert_eq!(b.dev.wake.read().unwrap(), 1);
        b.tx();
        assert_eq!(b.host_recv().map(|f| f.len()), Some(12 + 88));
    }
}
