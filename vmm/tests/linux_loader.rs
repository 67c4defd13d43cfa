//! The real guest kernel (target/guest/vmlinux, or $HUSK_KERNEL) loaded the
//! way husk-vmm boots it, checked field by field against an independent parse
//! of the ELF file. A missing kernel FAILS the test.

use std::path::PathBuf;

use husk_vmm::loader::{
    self, MmioDeviceInfo, CMDLINE_START, E820_RAM, E820_RESERVED, EBDA_START, HIMEM_START,
    MEMMAP_START, MODLIST_START, PVH_INFO_START, XEN_HVM_START_MAGIC,
};
use husk_vmm::memory::create_guest_memory;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 128 << 20;

fn kernel_path() -> PathBuf {
    let p = std::env::var_os("HUSK_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest/vmlinux")
        });
    assert!(
        p.is_file(),
        "guest kernel {} not found: build it (guest-kernel/build.sh) or set HUSK_KERNEL",
        p.display()
    );
    p
}

/// Minimal independent ELF64 parsing: PT_LOAD segments and the PVH note.
struct ElfInfo {
    loads: Vec<(
        u64, /* paddr */
        u64, /* offset */
        u64, /* filesz */
        u64, /* memsz */
    )>,
    pvh_entry: Option<u64>,
}

fn parse_elf(b: &[u8]) -> ElfInfo {
    assert_eq!(&b[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(b[4], 2, "not ELF64");
    let u16at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) as usize;
    let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let phoff = u64at(0x20) as usize;
    let phentsize = u16at(0x36);
    let phnum = u16at(0x38);
    let mut info = ElfInfo {
        loads: Vec::new(),
        pvh_entry: None,
    };
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let ty = u32at(ph);
        let off = u64at(ph + 8);
        let paddr = u64at(ph + 24);
        let filesz = u64at(ph + 32);
        let memsz = u64at(ph + 40);
        if ty == 1 {
            info.loads.push((paddr, off, filesz, memsz));
        }
        if ty == 4 {
            let mut n = off as usize;
            let end = (off + filesz) as usize;
            while n + 12 <= end {
                let namesz = u32at(n) as usize;
                let descsz = u32at(n + 4) as usize;
                let ntype = u32at(n + 8);
                let name_off = n + 12;
                let desc_off = name_off + ((namesz + 3) & !3);
                if ntype == 18 && &b[name_off..name_off + 3] == b"Xen" {
                    info.pvh_entry = Some(if descsz >= 8 {
                        u64at(desc_off)
                    } else {
                        u64::from(u32at(desc_off))
                    });
                }
                n = desc_off + ((descsz + 3) & !3);
            }
        }
    }
    info
}

#[test]
fn real_kernel_pvh_boot_layout() {
    let kpath = kernel_path();
    let kbytes = std::fs::read(&kpath).unwrap();
    let elf = parse_elf(&kbytes);
    let pvh = elf
        .pvh_entry
        .expect("kernel has a XEN_ELFNOTE_PHYS32_ENTRY note (CONFIG_PVH)");

    let mem = create_guest_memory(MEM).unwrap();
    let dir = std::env::temp_dir().join(format!("husk-vmm-loader-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let initrd_path = dir.join("initrd");
    let initrd: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&initrd_path, &initrd).unwrap();

    let devices = [
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
    let cmdline = loader::build_cmdline("console=ttyS0 reboot=t panic=-1", &devices).unwrap();
    let boot = loader::load_linux(&mem, &kpath, Some(&initrd_path), &cmdline).unwrap();

    // Entry point: the PVH note, not the ELF e_entry.
    assert_eq!(boot.entry.0, pvh);
    assert_eq!(boot.start_info.0, PVH_INFO_START);

    // Kernel segments are where the ELF says, with the file's bytes.
    let mut max_end = 0;
    for &(paddr, off, filesz, memsz) in &elf.loads {
        assert!(paddr >= HIMEM_START, "segment below 1 MiB");
        let n = filesz.min(4096) as usize;
        let mut got = vec![0u8; n];
        mem.read_slice(&mut got, GuestAddress(paddr)).unwrap();
        assert_eq!(
            got,
            kbytes[off as usize..off as usize + n],
            "segment at {paddr:#x}"
        );
        max_end = max_end.max(paddr + memsz);
    }
    assert!(boot.kernel_end >= max_end - 4096 && boot.kernel_end <= max_end + 4096);
    let (entry_lo, entry_hi) = (elf.loads[0].0, max_end);
    assert!(
        pvh >= entry_lo && pvh < entry_hi,
        "entry inside the kernel image"
    );

    // hvm_start_info.
    let si = |o: u64| GuestAddress(PVH_INFO_START + o);
    assert_eq!(mem.read_obj::<u32>(si(0)).unwrap(), XEN_HVM_START_MAGIC);
    assert_eq!(mem.read_obj::<u32>(si(4)).unwrap(), 1, "version");
    assert_eq!(mem.read_obj::<u32>(si(12)).unwrap(), 1, "nr_modules");
    assert_eq!(mem.read_obj::<u64>(si(16)).unwrap(), MODLIST_START);
    assert_eq!(mem.read_obj::<u64>(si(24)).unwrap(), CMDLINE_START);
    assert_eq!(mem.read_obj::<u64>(si(32)).unwrap(), 0, "no RSDP");
    assert_eq!(mem.read_obj::<u64>(si(40)).unwrap(), MEMMAP_START);
    assert_eq!(mem.read_obj::<u32>(si(48)).unwrap(), 3, "memmap entries");

    // Memory map (addr, size, type).
    let e = |i: u64| {
        let a = MEMMAP_START + 24 * i;
        (
            mem.read_obj::<u64>(GuestAddress(a)).unwrap(),
            mem.read_obj::<u64>(GuestAddress(a + 8)).unwrap(),
            mem.read_obj::<u32>(GuestAddress(a + 16)).unwrap(),
        )
    };
    assert_eq!(e(0), (0, EBDA_START, E820_RAM));
    assert_eq!(e(1), (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED));
    assert_eq!(e(2), (HIMEM_START, MEM - HIMEM_START, E820_RAM));

    // Initrd module: page aligned, above the kernel, inside RAM, same bytes.
    let paddr = mem.read_obj::<u64>(GuestAddress(MODLIST_START)).unwrap();
    let size = mem
        .read_obj::<u64>(GuestAddress(MODLIST_START + 8))
        .unwrap();
    assert_eq!(size, initrd.len() as u64);
    assert_eq!(paddr % 4096, 0);
    assert!(paddr >= boot.kernel_end);
    assert!(paddr + size <= MEM);
    assert_eq!(boot.initrd, Some((GuestAddress(paddr), size)));
    let mut got = vec![0u8; initrd.len()];
    mem.read_slice(&mut got, GuestAddress(paddr)).unwrap();
    assert!(got == initrd, "initrd bytes in guest memory");

    // Command line: NUL terminated at CMDLINE_START.
    let expected = "console=ttyS0 reboot=t panic=-1 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6";
    let mut c = vec![0u8; expected.len() + 1];
    mem.read_slice(&mut c, GuestAddress(CMDLINE_START)).unwrap();
    assert_eq!(&c[..expected.len()], expected.as_bytes());
    assert_eq!(c[expected.len()], 0);
    assert_eq!(boot.cmdline, expected);

    // MP table for 2 vCPUs.
    husk_vmm::mptable::setup_mptable(&mem, 2).unwrap();
    let mut sig = [0u8; 4];
    mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
    assert_eq!(&sig, b"_MP_");

    let _ = std::fs::remove_dir_all(&dir);
}

/// The whole VM build (KVM VM, irqchip, memory slots, serial, loader, vCPU
/// registers) with the real kernel; vCPU 0 is left at the PVH entry state.
#[test]
fn real_kernel_vm_build_and_vcpu_entry_state() {
    let kpath = kernel_path();
    let cfg = husk_vmm::vm::VmConfig {
        kernel: kpath.clone(),
        initrd: None,
        cmdline: "console=ttyS0 reboot=t".into(),
        memory_mib: 256,
        vcpus: 2,
        console: Some(
            std::env::temp_dir().join(format!("husk-vmm-console-{}", std::process::id())),
        ),
        ..Default::default()
    };
    let vm = husk_vmm::vm::Vm::build(&cfg).unwrap();
    let pvh = parse_elf(&std::fs::read(&kpath).unwrap())
        .pvh_entry
        .unwrap();
    assert_eq!(vm.boot_info().entry.0, pvh);
    assert_eq!(vm.boot_info().cmdline, "console=ttyS0 reboot=t");
    assert_eq!(vm.nr_vcpus(), 2);
    let regs = vm.vcpu_regs(0).unwrap();
    assert_eq!(regs.0.rip, pvh);
    assert_eq!(regs.0.rbx, PVH_INFO_START);
    assert_eq!(regs.0.rflags, 2);
    let s = regs.1;
    assert_eq!(s.cr0 & 1, 1, "protected mode");
    assert_eq!(s.cr0 & 0x8000_0000, 0, "paging off");
    assert_eq!(
        (s.cs.base, s.cs.limit, s.cs.db, s.cs.l, s.cs.selector),
        (0, 0xffff_ffff, 1, 0, 0x08)
    );
    assert_eq!(
        (s.ds.base, s.ds.limit, s.ds.selector),
        (0, 0xffff_ffff, 0x10)
    );
    assert_eq!(s.tr.type_, 0xb);
    let _ = std::fs::remove_file(cfg.console.unwrap());
}
