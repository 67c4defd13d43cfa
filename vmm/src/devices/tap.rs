//! The tap a virtio-net device moves frames through.
//!
//! husk-vmm never creates a tap: the runtime opens it in the container's
//! network namespace (TUNSETIFF) and hands the descriptor over across exec.
//! Here the inherited descriptor is checked to be what the data path
//! expects (an Ethernet tap without packet information), its virtio-net
//! header length is learnt, its offloads are turned off (so the kernel only
//! ever hands over complete, checksummed frames) and it is made
//! non-blocking. All of this happens before any seccomp filter is in place:
//! the device thread itself only reads and writes the descriptor.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};

/// `struct virtio_net_hdr` as a tap with IFF_VNET_HDR uses it by default.
pub const VNET_HDR_LEN_LEGACY: usize = 10;
/// `struct virtio_net_hdr_v1` (with `num_buffers`), the virtio 1.0 header.
pub const VNET_HDR_LEN_V1: usize = 12;

/// The tun requests used here, encoded as <linux/if_tun.h> encodes them.
mod tun_requests {
    use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

    const TUN_TYPE: u32 = b'T' as u32;
    ioctl_ior_nr!(TUNGETIFF, TUN_TYPE, 210, libc::c_uint);
    ioctl_iow_nr!(TUNSETOFFLOAD, TUN_TYPE, 208, libc::c_uint);
    ioctl_ior_nr!(TUNGETVNETHDRSZ, TUN_TYPE, 215, libc::c_int);
}
use tun_requests::{TUNGETIFF, TUNGETVNETHDRSZ, TUNSETOFFLOAD};

const IFF_TAP: libc::c_short = libc::IFF_TAP as libc::c_short;
const IFF_NO_PI: libc::c_short = libc::IFF_NO_PI as libc::c_short;
const IFF_VNET_HDR: libc::c_short = libc::IFF_VNET_HDR as libc::c_short;

/// `struct ifreq` as TUNGETIFF fills it: the name, then the flags.
#[repr(C)]
struct TunIfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Errors taking over a tap descriptor.
#[derive(Debug, Error)]
pub enum TapError {
    /// 0-2 are stdio, never a tap we were given.
    #[error("tap descriptor {0} is one of stdin/stdout/stderr")]
    Stdio(RawFd),
    /// The descriptor is not open in this process.
    #[error("tap descriptor {fd} is not open (was it passed to husk-vmm?): {source}")]
    NotOpen {
        /// Descriptor number.
        fd: RawFd,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// TUNGETIFF failed: not a tun/tap descriptor, or one not attached.
    #[error("descriptor {fd} is not an attached tun/tap device: {source}")]
    NotATap {
        /// Descriptor number.
        fd: RawFd,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A tun (IP) device, or a tap with packet information.
    #[error("descriptor {fd} is a tun/tap device with flags {flags:#x}; an Ethernet tap without packet information (IFF_TAP|IFF_NO_PI) is needed")]
    WrongKind {
        /// Descriptor number.
        fd: RawFd,
        /// Its TUNGETIFF flags.
        flags: u16,
    },
    /// A virtio-net header length the data path does not handle.
    #[error("tap descriptor {fd} has a {len}-byte virtio-net header; 10 or 12 is needed")]
    HeaderLength {
        /// Descriptor number.
        fd: RawFd,
        /// What the tap says.
        len: i64,
    },
    /// An ioctl or fcntl on the tap failed.
    #[error("tap descriptor {fd}: {op}: {source}")]
    Setup {
        /// Descriptor number.
        fd: RawFd,
        /// What failed.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A non-blocking Ethernet tap queue, with or without a virtio-net header
/// before each frame.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    vnet_hdr_len: usize,
}

impl Tap {
    /// Take over the inherited descriptor `fd` (named on the command line).
    ///
    /// The caller must name each descriptor once: the number becomes owned
    /// by the returned `Tap` and is closed with it.
    pub fn from_inherited(fd: RawFd) -> Result<Tap, TapError> {
        if (0..=2).contains(&fd) {
            return Err(TapError::Stdio(fd));
        }
        // SAFETY: F_GETFD only reads the descriptor flags of `fd`.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::NotOpen {
                fd,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is open (F_GETFD succeeded), was inherited for this
        // device, and nothing else in this process owns it: the command line
        // names each tap descriptor once and only here is it taken.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Tap::from_fd(owned)
    }

    /// Check and set up an open tap descriptor.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let setup = |op: &'static str| {
            move |source: std::io::Error| TapError::Setup {
                fd: raw,
                op,
                source,
            }
        };
        let mut ifreq = TunIfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes one `struct ifreq` (laid out as TunIfReq,
        // 40 bytes) into the memory we pass, which lives across the call.
        if unsafe { ioctl_with_mut_ref(&fd, TUNGETIFF(), &mut ifreq) } < 0 {
            return Err(TapError::NotATap {
                fd: raw,
                source: std::io::Error::last_os_error(),
            });
        }
        if ifreq.flags & IFF_TAP == 0 || ifreq.flags & IFF_NO_PI == 0 {
            return Err(TapError::WrongKind {
                fd: raw,
                flags: ifreq.flags as u16,
            });
        }
        let vnet_hdr_len = if ifreq.flags & IFF_VNET_HDR != 0 {
            let mut len: libc::c_int = 0;
            // SAFETY: TUNGETVNETHDRSZ writes one int into `len`.
            if unsafe { ioctl_with_mut_ref(&fd, TUNGETVNETHDRSZ(), &mut len) } < 0 {
                return Err(setup("TUNGETVNETHDRSZ")(std::io::Error::last_os_error()));
            }
            match usize::try_from(len) {
                Ok(n @ (VNET_HDR_LEN_LEGACY | VNET_HDR_LEN_V1)) => n,
                _ => {
                    return Err(TapError::HeaderLength {
                        fd: raw,
                        len: i64::from(len),
                    })
                }
            }
        } else {
            0
        };
        // No offloads: the kernel then checksums and segments every frame
        // before handing it over, and the device offers the guest none.
        // SAFETY: TUNSETOFFLOAD takes its flags by value and touches no memory.
        if unsafe { ioctl_with_val(&fd, TUNSETOFFLOAD(), 0) } < 0 {
            return Err(setup("TUNSETOFFLOAD")(std::io::Error::last_os_error()));
        }
        set_nonblocking_cloexec(raw).map_err(setup("fcntl"))?;
        Ok(Tap { fd, vnet_hdr_len })
    }

    /// A datagram socket standing in for a tap in unit tests: one frame
    /// per read and write, like a tap queue.
    #[cfg(test)]
    pub(crate) fn from_datagram_socket(fd: OwnedFd, vnet_hdr_len: usize) -> Tap {
        set_nonblocking_cloexec(fd.as_raw_fd()).unwrap();
        Tap { fd, vnet_hdr_len }
    }

    /// Length of the virtio-net header before each frame (0, 10 or 12).
    pub fn vnet_hdr_len(&self) -> usize {
        self.vnet_hdr_len
    }

    /// Read one frame (with its header, if any) into `buf`.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: read writes at most `buf.len()` bytes into `buf`, which we
        // borrow mutably for the call.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    /// Write one frame (with its header, if any) from `buf`.
    pub fn write_frame(&self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: write reads at most `buf.len()` bytes from `buf`.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn set_nonblocking_cloexec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL/F_SETFD only read and change flags of `fd`.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_and_closed_descriptors_are_refused() {
        assert!(matches!(Tap::from_inherited(1), Err(TapError::Stdio(1))));
        let err = Tap::from_inherited(999_999).unwrap_err();
        assert!(
            matches!(err, TapError::NotOpen { fd: 999_999, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_descriptor_that_is_no_tap_is_refused() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let err = Tap::from_fd(OwnedFd::from(f)).unwrap_err();
        assert!(matches!(err, TapError::NotATap { .. }), "{err}");
        assert!(err.to_string().contains("not an attached tun/tap"), "{err}");
    }
}
