//! vhost-user frontend devices: virtio-fs (type 26) and virtio-vsock (type 19).
//!
//! The data path lives in an external backend process (virtiofsd,
//! vhost-device-vsock) that maps guest memory from our memfd, reads the
//! virtqueues directly, is kicked through the ioeventfds of the virtio-mmio
//! notify register and interrupts the guest through the irqfd. The VMM only
//! negotiates features, forwards the queue layout and serves the device
//! configuration space (tag / guest CID) itself.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use super::virtio_mmio::{
    read_config_bytes, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemoryMmap;

/// virtio device id of virtio-fs.
pub const VIRTIO_ID_FS: u32 = 26;
/// virtio device id of virtio-vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Maximum length of a virtio-fs tag (bytes, not NUL terminated when full).
pub const FS_TAG_LEN: usize = 36;
/// Time we wait for a backend reply before declaring it dead.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);

const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_F_NOTIFY_ON_EMPTY: u64 = 1 << 24;
/// Device-specific feature bits (0..=23) plus the transport bits we support.
const TRANSPORT_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_F_NOTIFY_ON_EMPTY;
const DEVICE_FEATURES_MASK: u64 = (1 << 24) - 1;

/// Errors of vhost-user devices.
#[derive(Debug, Error)]
pub enum VhostUserError {
    /// connect() on the backend socket failed.
    #[error("cannot connect to vhost-user backend socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A vhost-user request failed.
    #[error("vhost-user backend {path}: {op} failed: {source}")]
    Request {
        /// Socket path.
        path: PathBuf,
        /// What we asked.
        op: &'static str,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks something we need.
    #[error("vhost-user backend {path}: {reason}")]
    Unsupported {
        /// Socket path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Bad device parameter from the command line.
    #[error("invalid vhost-user device parameter: {0}")]
    InvalidParam(String),
}

/// Which device the backend implements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VhostUserKind {
    /// virtio-fs with a mount tag.
    Fs {
        /// Mount tag shown to the guest.
        tag: String,
    },
    /// virtio-vsock with the guest CID.
    Vsock {
        /// Guest context id.
        cid: u64,
    },
}

impl VhostUserKind {
    fn device_type(&self) -> u32 {
        match self {
            Self::Fs { .. } => VIRTIO_ID_FS,
            Self::Vsock { .. } => VIRTIO_ID_VSOCK,
        }
    }

    fn num_queues(&self) -> usize {
        match self {
            // hiprio + one request queue.
            Self::Fs { .. } => 2,
            // rx, tx, event.
            Self::Vsock { .. } => 3,
        }
    }

    /// Device configuration space (virtio 1.2 §5.11.4 and §5.10.4).
    fn config_space(&self) -> Result<Vec<u8>, VhostUserError> {
        match self {
            Self::Fs { tag } => {
                if tag.is_empty() || tag.len() > FS_TAG_LEN {
                    return Err(VhostUserError::InvalidParam(format!(
                        "virtio-fs tag {tag:?} must be 1 to {FS_TAG_LEN} bytes"
                    )));
                }
                let mut cfg = vec![0u8; FS_TAG_LEN + 4];
                cfg[..tag.len()].copy_from_slice(tag.as_bytes());
                cfg[FS_TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
                Ok(cfg)
            }
            Self::Vsock { cid } => {
                if *cid < 3 || *cid >= u64::from(u32::MAX) {
                    return Err(VhostUserError::InvalidParam(format!(
                        "vsock guest CID {cid} must be between 3 and 4294967294"
                    )));
                }
                Ok(cid.to_le_bytes().to_vec())
            }
        }
    }
}

/// A vhost-user device ready to sit behind a virtio-mmio transport.
pub struct VhostUserDevice {
    kind: VhostUserKind,
    path: PathBuf,
    frontend: Frontend,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    config: Vec<u8>,
    active_queues: Vec<usize>,
}

impl VhostUserDevice {
    /// Connect to the backend at `path` and do the feature handshake.
    pub fn connect(path: &Path, kind: VhostUserKind) -> Result<Self, VhostUserError> {
        let config = kind.config_space()?;
        let stream = UnixStream::connect(path).map_err(|source| VhostUserError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream
            .set_read_timeout(Some(BACKEND_TIMEOUT))
            .and_then(|_| stream.set_write_timeout(Some(BACKEND_TIMEOUT)))
            .map_err(|source| VhostUserError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let mut frontend = Frontend::from_stream(stream, kind.num_queues() as u64);
        let req = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| VhostUserError::Request { path, op, source }
        };
        frontend.set_owner().map_err(req("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(req("GET_FEATURES"))?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserError::Unsupported {
                path: path.to_path_buf(),
                reason: "backend does not offer VIRTIO_F_VERSION_1".into(),
            });
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(req("GET_PROTOCOL_FEATURES"))?;
            let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
            protocol = offered & wanted;
            // The backend must see PROTOCOL_FEATURES acked before SET_PROTOCOL_FEATURES.
            frontend
                .set_features(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
                .map_err(req("SET_FEATURES"))?;
            frontend
                .set_protocol_features(protocol)
                .map_err(req("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let n = frontend.get_queue_num().map_err(req("GET_QUEUE_NUM"))?;
            if n < kind.num_queues() as u64 {
                return Err(VhostUserError::Unsupported {
                    path: path.to_path_buf(),
                    reason: format!("backend has {n} queues, {} needed", kind.num_queues()),
                });
            }
        }
        Ok(Self {
            kind,
            path: path.to_path_buf(),
            frontend,
            backend_features,
            protocol,
            config,
            active_queues: Vec::new(),
        })
    }

    /// vhost-user protocol features negotiated with the backend.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Socket path of the backend.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connected backend socket (the vCPU threads' seccomp filter
    /// allows vhost-user messages on it and on nothing else).
    pub fn socket_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    fn protocol_features_negotiated(&self) -> bool {
        self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn setup(
        &mut self,
        mem: &GuestMemoryMmap,
        acked_features: u64,
        queues: &[(usize, &Queue)],
        kicks: &[EventFd],
        interrupt: &VirtioInterrupt,
    ) -> Result<(), VhostUserError> {
        let path = self.path.clone();
        let req = |op: &'static str| {
            let path = path.clone();
            move |source| VhostUserError::Request { path, op, source }
        };
        let mut features = acked_features & self.features();
        if self.protocol_features_negotiated() {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(features)
            .map_err(req("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(req("describing guest memory"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(req("SET_MEM_TABLE"))?;
        for &(index, queue) in queues {
            let kick = kicks
                .get(index)
                .ok_or_else(|| VhostUserError::Unsupported {
                    path: self.path.clone(),
                    reason: format!("no kick eventfd for queue {index}"),
                })?;
            let hva = |gpa: u64| -> Result<u64, VhostUserError> {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|e| VhostUserError::Unsupported {
                        path: self.path.clone(),
                        reason: format!("queue {index} address {gpa:#x} is not guest RAM: {e}"),
                    })
            };
            let size = queue.size();
            self.frontend
                .set_vring_num(index, size)
                .map_err(req("SET_VRING_NUM"))?;
            let cfg = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: size,
                flags: 0,
                desc_table_addr: hva(queue.desc_table())?,
                used_ring_addr: hva(queue.used_ring())?,
                avail_ring_addr: hva(queue.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_addr(index, &cfg)
                .map_err(req("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, 0)
                .map_err(req("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, &interrupt.evt)
                .map_err(req("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, kick)
                .map_err(req("SET_VRING_KICK"))?;
            self.active_queues.push(index);
        }
        if self.protocol_features_negotiated() {
            for &(index, _) in queues {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(req("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.device_type()
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; self.kind.num_queues()]
    }

    fn features(&self) -> u64 {
        self.backend_features & (DEVICE_FEATURES_MASK | TRANSPORT_FEATURES)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::warn!(
            "vhost-user {}: guest wrote {} bytes of read-only config at {offset:#x}; ignored",
            self.kind.device_type(),
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        acked_features: u64,
        queues: &[(usize, &Queue)],
        kicks: &[EventFd],
        interrupt: &VirtioInterrupt,
    ) -> Result<(), ActivateError> {
        // Queue regions must be single host mappings for the backend.
        for &(index, q) in queues {
            let size = usize::from(q.size());
            let spans = [
                (q.desc_table(), 16 * size),
                (q.avail_ring(), 6 + 2 * size),
                (q.used_ring(), 6 + 8 * size),
            ];
            for (addr, len) in spans {
                if !super::virtio_mmio::guest_range_ok(mem, addr, len) {
                    return Err(ActivateError::BadQueue {
                        index,
                        reason: format!("{len} bytes at {addr:#x} are not contiguous guest RAM"),
                    });
                }
            }
        }
        self.active_queues.clear();
        self.setup(mem, acked_features, queues, kicks, interrupt)
            .map_err(|e| ActivateError::Backend(e.to_string()))
    }

    fn reset(&mut self) -> bool {
        // GET_VRING_BASE stops a ring in the backend.
        let mut ok = true;
        for index in std::mem::take(&mut self.active_queues) {
            if let Err(e) = self.frontend.get_vring_base(index) {
                log::error!(
                    "vhost-user {}: stopping queue {index}: {e}",
                    self.path.display()
                );
                ok = false;
            }
        }
        ok
    }

    fn sticky_vring_interrupt(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_spaces() {
        let fs = VhostUserKind::Fs {
            tag: "rootfs".into(),
        }
        .config_space()
        .unwrap();
        assert_eq!(fs.len(), 40);
        assert_eq!(&fs[..6], b"rootfs");
        assert!(fs[6..36].iter().all(|b| *b == 0));
        assert_eq!(u32::from_le_bytes(fs[36..40].try_into().unwrap()), 1);
        assert!(VhostUserKind::Fs { tag: String::new() }
            .config_space()
            .is_err());
        assert!(VhostUserKind::Fs {
            tag: "x".repeat(37)
        }
        .config_space()
        .is_err());
        assert!(VhostUserKind::Fs {
            tag: "x".repeat(36)
        }
        .config_space()
        .is_ok());
        let vs = VhostUserKind::Vsock { cid: 3 }.config_space().unwrap();
        assert_eq!(vs, 3u64.to_le_bytes().to_vec());
        assert!(VhostUserKind::Vsock { cid: 2 }.config_space().is_err());
        assert!(VhostUserKind::Vsock { cid: u64::MAX }
            .config_space()
            .is_err());
    }

    #[test]
    fn connect_to_missing_socket_names_path() {
        let e = match VhostUserDevice::connect(
            Path::new("/nonexistent/husk.sock"),
            VhostUserKind::Vsock { cid: 3 },
        ) {
            Err(e) => e,
            Ok(_) => panic!("connected to nothing"),
        };
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/husk.sock"), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
    }
}
