//! Linux loading: vmlinux (ELF) via linux-loader, PVH boot protocol.
//!
//! The kernel is entered at its PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY) in
//! 32-bit protected mode with `%ebx` pointing at an `hvm_start_info` that
//! carries the e820-style memory map, the command line and the initramfs as
//! module 0. See <https://xenbits.xen.org/docs/unstable/misc/pvh.html>.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use thiserror::Error;
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryRegion, ReadVolatile};

use crate::memory::{GuestMemoryMmap, MMIO_GAP_START};

/// Boot GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// hvm_start_info location.
pub const PVH_INFO_START: u64 = 0x6000;
/// hvm_modlist_entry array location.
pub const MODLIST_START: u64 = 0x6040;
/// Memory map (hvm_memmap_table_entry array) location.
pub const MEMMAP_START: u64 = 0x7000;
/// Start of the Extended BIOS Data Area (where the MP table goes).
pub const EBDA_START: u64 = 0x9fc00;
/// Kernel command line location.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line size, including the NUL (x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Where high memory starts (the kernel must be loaded above).
pub const HIMEM_START: u64 = 0x10_0000;
/// XEN_HVM_START_MAGIC_VALUE.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

/// Errors while loading the guest kernel.
#[derive(Debug, Error)]
pub enum LoaderError {
    /// Opening the kernel image failed.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        /// Kernel path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The ELF loader rejected the kernel.
    #[error("cannot load kernel {path} (an uncompressed vmlinux ELF is required): {source}")]
    LoadKernel {
        /// Kernel path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// No PVH entry point note.
    #[error("kernel {path} has no usable PVH entry point (build it with CONFIG_PVH=y)")]
    NoPvhEntry {
        /// Kernel path.
        path: PathBuf,
    },
    /// Opening / reading the initramfs failed.
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        /// Initrd path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Initramfs does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge {
        /// Initrd path.
        path: PathBuf,
        /// Size in bytes.
        size: u64,
    },
    /// Bad command line.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures failed.
    #[error("cannot write {what} to guest memory: {reason}")]
    BootParams {
        /// Which structure.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// A virtio-mmio device as announced on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Base address of the register window.
    pub addr: u64,
    /// Window size.
    pub size: u64,
    /// Legacy IRQ / GSI.
    pub irq: u32,
}

/// Result of loading Linux.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfo {
    /// PVH entry point (32-bit protected mode).
    pub entry: GuestAddress,
    /// Address of `hvm_start_info` (goes into %ebx).
    pub start_info: GuestAddress,
    /// First byte after the kernel image.
    pub kernel_end: u64,
    /// Initramfs placement.
    pub initrd: Option<(GuestAddress, u64)>,
    /// Final command line.
    pub cmdline: String,
}

/// Build the kernel command line: the user's plus one `virtio_mmio.device=` per device.
pub fn build_cmdline(base: &str, devices: &[MmioDeviceInfo]) -> Result<Cmdline, LoaderError> {
    if let Some(c) = base
        .chars()
        .find(|c| !(c.is_ascii_graphic() || *c == ' ' || *c == '\t'))
    {
        return Err(LoaderError::Cmdline(format!(
            "character {c:?} is not allowed (printable ASCII only)"
        )));
    }
    let mut cmdline = Cmdline::try_from(base.trim(), CMDLINE_MAX_SIZE)
        .map_err(|e| LoaderError::Cmdline(format!("{e} (in {base:?})")))?;
    for d in devices {
        let entry = format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            d.size >> 10,
            d.addr,
            d.irq
        );
        cmdline
            .insert_str(&entry)
            .map_err(|e| LoaderError::Cmdline(format!("appending {entry}: {e}")))?;
    }
    Ok(cmdline)
}

/// Load the vmlinux at `path`; returns (PVH entry, kernel end).
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<(GuestAddress, u64), LoaderError> {
    let mut file = File::open(path).map_err(|source| LoaderError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })?;
    let result =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            LoaderError::LoadKernel {
                path: path.to_path_buf(),
                source,
            }
        })?;
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok((entry, result.kernel_end)),
        _ => Err(LoaderError::NoPvhEntry {
            path: path.to_path_buf(),
        }),
    }
}

/// Highest usable RAM address + 1 below the 32-bit MMIO hole.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .filter(|r| r.start_addr().0 < MMIO_GAP_START)
        .map(|r| (r.start_addr().0 + r.len()).min(MMIO_GAP_START))
        .max()
        .unwrap_or(0)
}

/// Load the initramfs at the top of low memory (page aligned, above the kernel).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(GuestAddress, u64), LoaderError> {
    let err = |source| LoaderError::Initrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let size = file.metadata().map_err(err)?.len();
    let too_large = || LoaderError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
    };
    let top = low_ram_end(mem);
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if size == 0 || addr < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    let mut slice = mem
        .get_slice(GuestAddress(addr), len)
        .map_err(|_| too_large())?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    Ok((GuestAddress(addr), size))
}

/// The guest physical memory map.
pub fn memory_map(mem: &GuestMemoryMmap) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr: u64, size: u64, type_: u32| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

/// Write the cmdline and the PVH start_info (memory map, initrd module).
pub fn configure_pvh(
    mem: &GuestMemoryMmap,
    cmdline: &Cmdline,
    initrd: Option<(GuestAddress, u64)>,
) -> Result<GuestAddress, LoaderError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(|e| {
        LoaderError::BootParams {
            what: "the kernel command line",
            reason: e.to_string(),
        }
    })?;
    let memmap = memory_map(mem);
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { MODLIST_START } else { 0 },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(MEMMAP_START));
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr.raw_value(),
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(|e| LoaderError::BootParams {
        what: "the PVH start_info",
        reason: e.to_string(),
    })?;
    Ok(GuestAddress(PVH_INFO_START))
}

/// Load kernel, initrd and boot parameters.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &Cmdline,
) -> Result<BootInfo, LoaderError> {
    let (entry, kernel_end) = load_kernel(mem, kernel)?;
    let initrd = match initrd {
        Some(p) => Some(load_initrd(mem, p, kernel_end)?),
        None => None,
    };
    let start_info = configure_pvh(mem, cmdline, initrd)?;
    let cmdline = cmdline
        .as_cstring()
        .map_err(|e| LoaderError::Cmdline(e.to_string()))?
        .to_string_lossy()
        .into_owned();
    Ok(BootInfo {
        entry,
        start_info,
        kernel_end,
        initrd,
        cmdline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn cmdline_gets_devices() {
        let devs = [
            MmioDeviceInfo {
                addr: 0xd000_0000,
                size: 0x1000,
                irq: 5,
            },
            MmioDeviceInfo {
                addr: 0xd000_1000,
                size: 0x1000,
                irq: 6,
            },
        ];
        let c = build_cmdline("console=ttyS0 reboot=t", &devs).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 reboot=t virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert!(build_cmdline(&"x".repeat(CMDLINE_MAX_SIZE + 1), &[]).is_err());
        assert!(build_cmdline("a\0b", &[]).is_err());
    }

    #[test]
    fn memmap_for_large_guest() {
        let mem = crate::memory::create_guest_memory(4 << 30).unwrap();
        let m = memory_map(&mem);
        let v: Vec<(u64, u64, u32)> = m.iter().map(|e| (e.addr, e.size, e.type_)).collect();
        assert_eq!(
            v,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, 0x400, E820_RESERVED),
                (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM),
                (1 << 32, (4 << 30) - MMIO_GAP_START, E820_RAM),
            ]
        );
    }

    #[test]
    fn bad_kernels_are_errors() {
        let mem = crate::memory::create_guest_memory(32 << 20).unwrap();
        let e = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
        let dir = std::env::temp_dir().join(format!("husk-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, vec![0x7fu8; 4096]).unwrap();
        let e = load_kernel(&mem, &junk).unwrap_err();
        assert!(matches!(e, LoaderError::LoadKernel { .. }), "{e}");
        // An initrd larger than guest memory.
        let big = dir.join("big");
        let f = File::create(&big).unwrap();
        f.set_len(64 << 20).unwrap();
        let e = load_initrd(&mem, &big, 0x200000).unwrap_err();
        assert!(matches!(e, LoaderError::InitrdTooLarge { .. }), "{e}");
        // A fitting one lands page aligned at the top.
        let small = dir.join("small");
        std::fs::write(&small, b"0707010000").unwrap();
        let (addr, size) = load_initrd(&mem, &small, 0x200000).unwrap();
        assert_eq!(size, 10);
        assert_eq!(addr.0 % 4096, 0);
        assert!(addr.0 + size <= 32 << 20);
        let mut b = [0u8; 10];
        mem.read_slice(&mut b, addr).unwrap();
        assert_eq!(&b, b"0707010000");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
