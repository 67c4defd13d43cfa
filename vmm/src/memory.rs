//! Guest memory: anonymous shared memory (memfd) mapped with vm-memory.
//!
//! The memory is backed by a `memfd` so that vhost-user backends (virtiofsd,
//! vhost-device-vsock) can map the very same pages from the file descriptor we
//! hand them in `VHOST_USER_SET_MEM_TABLE`.
//!
//! Layout (x86_64): RAM starts at guest physical address 0. Anything above
//! [`MMIO_GAP_START`] is placed above 4 GiB so that the 32-bit MMIO window
//! (virtio-mmio devices, IOAPIC, LAPIC) stays free.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemory, GuestMemoryRegion};

/// Guest memory type used everywhere in husk-vmm.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// First address of the 32-bit MMIO hole (3 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Smallest guest we accept.
pub const MIN_MEMORY_MIB: u64 = 16;

/// Errors while creating guest memory.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// Requested size is unusable.
    #[error("guest memory of {mib} MiB is invalid: {reason}")]
    InvalidSize {
        /// Requested MiB.
        mib: u64,
        /// Why it is rejected.
        reason: String,
    },
    /// memfd_create failed.
    #[error("cannot create the guest memory memfd: {0}")]
    Memfd(#[source] std::io::Error),
    /// ftruncate of the memfd failed.
    #[error("cannot size the guest memory memfd to {size} bytes: {source}")]
    Truncate {
        /// Requested bytes.
        size: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// vm-memory refused to map the regions.
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        /// Requested bytes.
        size: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Total memory of the host in KiB, from /proc/meminfo (None if unreadable).
pub fn host_mem_total_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo_field(&text, "MemTotal:")
}

/// Available memory of the host in KiB, from /proc/meminfo (None if unreadable).
pub fn host_mem_available_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo_field(&text, "MemAvailable:")
}

/// Parse one `Key:   1234 kB` line.
pub fn parse_meminfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Check a memory size request against sanity limits and the host.
///
/// `available_kib` is the host's MemAvailable + free swap style budget; the
/// guest memory is lazily allocated, but asking for more than the host has at
/// all is refused early with a clear message.
pub fn check_memory_size(mib: u64, host_total_kib: Option<u64>) -> Result<u64, MemoryError> {
    if mib < MIN_MEMORY_MIB {
        return Err(MemoryError::InvalidSize {
            mib,
            reason: format!("the minimum is {MIN_MEMORY_MIB} MiB"),
        });
    }
    // 1 TiB is far beyond anything a container sandbox should get.
    if mib > 1024 * 1024 {
        return Err(MemoryError::InvalidSize {
            mib,
            reason: "the maximum is 1048576 MiB".to_string(),
        });
    }
    if let Some(total) = host_total_kib {
        if mib.saturating_mul(1024) > total {
            return Err(MemoryError::InvalidSize {
                mib,
                reason: format!("the host only has {} MiB of memory in total", total / 1024),
            });
        }
    }
    Ok(mib << 20)
}

/// Split a RAM size into guest physical ranges around the MMIO hole.
pub fn arch_memory_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Create a memfd of `size` bytes.
fn create_memfd(size: u64) -> Result<File, MemoryError> {
    let name = CString::new("husk-guest-ram")
        .map_err(|_| MemoryError::Memfd(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call;
    // memfd_create does not retain the pointer.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Truncate { size, source })?;
    Ok(file)
}

/// Create guest memory of `size` bytes backed by one shared memfd.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let file = create_memfd(size)?;
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (addr, len) in arch_memory_ranges(size) {
        let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
        ranges.push((addr, len as usize, Some(fo)));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|source| MemoryError::Map { size, source })
}

/// End of the last RAM byte + 1 (guest physical).
pub fn guest_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_split_around_hole() {
        assert_eq!(
            arch_memory_ranges(128 << 20),
            vec![(GuestAddress(0), 128 << 20)]
        );
        let r = arch_memory_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            r[1],
            (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
        );
    }

    #[test]
    fn size_checks() {
        assert!(check_memory_size(1, None).is_err());
        assert!(check_memory_size(128, Some(1024 * 1024)).is_ok());
        let e = check_memory_size(4096, Some(1024 * 1024)).unwrap_err();
        assert!(e.to_string().contains("host only has 1024 MiB"), "{e}");
        assert!(check_memory_size(u64::MAX, None).is_err());
    }

    #[test]
    fn meminfo_parse() {
        let t = "MemTotal:       24683656 kB\nMemFree:        21289368 kB\n";
        assert_eq!(parse_meminfo_field(t, "MemTotal:"), Some(24683656));
        assert_eq!(parse_meminfo_field(t, "Nope:"), None);
    }

    #[test]
    fn memfd_backed_and_shared() {
        let mem = create_guest_memory(32 << 20).unwrap();
        assert_eq!(guest_ram_end(&mem), 32 << 20);
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert!(region.file_offset().is_some());
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        // Read the same bytes through the memfd: the backend's view.
        let fo = region.file_offset().unwrap();
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        fo.file().read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        // Out of range accesses fail, they do not panic.
        assert!(mem.write_obj(1u32, GuestAddress(32 << 20)).is_err());
    }
}
