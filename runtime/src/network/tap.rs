//! husk's taps: their names, and opening one (`/dev/net/tun`, TUNSETIFF).
//!
//! A tap's name is derived from the index of the client interface it is
//! joined to (`tap<index>_husk`, Kata's `tap0_kata` pattern), so that
//! discovery skips it and a cleanup after a crash finds every tap husk made
//! in a namespace by its name alone. The tap is not persistent: it lives as
//! long as a descriptor of it is open (the monitor's and the VMM's), so a
//! crash of both removes it, with its qdisc and filters, by itself.

use std::os::fd::{AsRawFd, OwnedFd};

/// The kernel's limit on interface names, without the NUL.
pub const MAX_IFNAME: usize = libc::IFNAMSIZ - 1;

const TAP_PREFIX: &str = "tap";
const TAP_SUFFIX: &str = "_husk";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap for interface index {0}: the name would exceed {MAX_IFNAME} bytes")]
    IndexTooLarge(u32),
    #[error("tap {name}: opening /dev/net/tun: {source}")]
    Open {
        name: String,
        source: std::io::Error,
    },
    #[error("tap {name}: an interface of that name already exists in the network namespace (husk names its taps tap<index>_husk and never takes over another's)")]
    Exists { name: String },
    #[error("tap {name}: TUNSETIFF: {source}")]
    SetIff {
        name: String,
        source: std::io::Error,
    },
}

/// The name of the tap joined to the client interface of index
/// `interface_index`.
pub fn tap_name(interface_index: u32) -> Result<String, TapError> {
    let name = format!("{TAP_PREFIX}{interface_index}{TAP_SUFFIX}");
    if name.len() > MAX_IFNAME {
        return Err(TapError::IndexTooLarge(interface_index));
    }
    Ok(name)
}

/// The interface index a tap name was made from, if `name` is one of
/// husk's tap names.
pub fn parse_tap_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix(TAP_PREFIX)?.strip_suffix(TAP_SUFFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Leading zeros would give two names one index.
    if digits.len() > 1 && digits.starts_with('0') {
        return None;
    }
    digits.parse().ok()
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct TunIfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

nix::ioctl_write_ptr_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    TunIfReq
);

/// Creates the tap `name` in the calling thread's network namespace and
/// returns its queue's descriptor (close-on-exec, blocking): an Ethernet
/// tap without packet information, with a virtio-net header before each
/// frame (IFF_VNET_HDR), which is what QEMU's virtio-net wants to be given.
pub fn open_tap(name: &str) -> Result<OwnedFd, TapError> {
    use std::os::unix::fs::OpenOptionsExt;
    if name.len() > MAX_IFNAME || name.as_bytes().contains(&0) {
        return Err(TapError::SetIff {
            name: name.to_string(),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|source| TapError::Open {
            name: name.to_string(),
            source,
        })?;
    let mut request = TunIfReq {
        name: [0; libc::IFNAMSIZ],
        // IFF_TUN_EXCL: a tap of that name that exists (a client's
        // persistent one) is refused, not attached to: husk would take it
        // over and remove it at delete.
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL)
            as libc::c_short,
        _pad: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads a `struct ifreq` (a NUL-terminated name and
    // the flags, laid out as TunIfReq) from memory that lives across the
    // call, on a descriptor of /dev/net/tun we own.
    unsafe { tun_set_iff(file.as_raw_fd(), &request) }.map_err(|e| match e {
        // EBUSY under IFF_TUN_EXCL; EINVAL when the name is another kind
        // of interface.
        nix::errno::Errno::EBUSY | nix::errno::Errno::EEXIST => TapError::Exists {
            name: name.to_string(),
        },
        e => TapError::SetIff {
            name: name.to_string(),
            source: std::io::Error::from(e),
        },
    })?;
    Ok(OwnedFd::from(file))
}

/// A tap as the VM gets it: its descriptor (shared, so that a
/// [`crate::sandbox::SandboxConfig`] can be cloned) and the MAC of the
/// guest's device.
#[derive(Debug, Clone)]
pub struct VmTap {
    tap: std::sync::Arc<OwnedFd>,
    mac: [u8; 6],
}

impl VmTap {
    /// Takes a tap's descriptor. One numbered 0-2 (a process started with
    /// its stdio closed) is moved above 2 first: the VMM's stdio is set up
    /// over those numbers before the jail keeps the taps open.
    pub fn new(tap: OwnedFd, mac: [u8; 6]) -> Result<VmTap, std::io::Error> {
        let tap = if tap.as_raw_fd() <= 2 {
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new
            // one (or -1), which the OwnedFd then owns alone.
            let fd = unsafe { libc::fcntl(tap.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `fd` was just returned by fcntl and nothing else owns it.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        } else {
            tap
        };
        Ok(VmTap {
            tap: std::sync::Arc::new(tap),
            mac,
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device as the hypervisor is given it.
    pub fn vm_device(&self) -> crate::hypervisor::VmNetDevice {
        crate::hypervisor::VmNetDevice {
            tap_fd: self.tap.as_raw_fd(),
            mac: self.mac,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_the_kernels_limit_and_parse_back() {
        for index in [1, 2, 42, 9_999_999] {
            let name = tap_name(index).unwrap();
            assert!(name.len() <= MAX_IFNAME, "{name}");
            assert_eq!(parse_tap_name(&name), Some(index), "{name}");
        }
        assert_eq!(tap_name(2).unwrap(), "tap2_husk");
        assert!(matches!(
            tap_name(10_000_000),
            Err(TapError::IndexTooLarge(10_000_000))
        ));
    }

    #[test]
    fn only_huskss_tap_names_parse() {
        for name in [
            "eth0",
            "tap0",
            "tap_husk",
            "tapx_husk",
            "tap01_husk",
            "tap1_husk2",
            "tap-1_husk",
            "tap1_kata",
            "vethabc",
        ] {
            assert_eq!(parse_tap_name(name), None, "{name}");
        }
    }
}
