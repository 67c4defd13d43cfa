//! Intel MultiProcessor Specification 1.4 table, so that Linux (booted
//! without ACPI) finds the vCPUs, the IOAPIC and the legacy IRQ routing.
//!
//! The table lives in the last KiB of base memory (0x9fc00, marked reserved in
//! the memory map), where Linux scans for the `_MP_` floating pointer.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::loader::EBDA_START;
use crate::memory::GuestMemoryMmap;

/// Local APIC base.
pub const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
/// IOAPIC base.
pub const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
/// Number of IOAPIC pins (KVM's IOAPIC has 24).
pub const IOAPIC_PINS: u8 = 24;
/// Most vCPUs the table can describe within one KiB.
pub const MAX_VCPUS: u8 = 32;

/// Errors of MP table creation.
#[derive(Debug, Error)]
pub enum MptableError {
    /// Too many vCPUs.
    #[error("{0} vCPUs do not fit in the MP table (max {MAX_VCPUS})")]
    TooManyCpus(u8),
    /// Guest memory too small / write failed.
    #[error("cannot write the MP table at {EBDA_START:#x}: {0}")]
    Write(String),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Build the floating pointer + configuration table for `nr_cpus` at `base`.
pub fn build_mptable(nr_cpus: u8, base: u32) -> Result<Vec<u8>, MptableError> {
    if nr_cpus == 0 || nr_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(nr_cpus));
    }
    let ioapic_id = nr_cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..nr_cpus {
        entries.push(0); // processor
        entries.push(cpu); // local APIC id
        entries.push(0x14); // local APIC version
        entries.push(1 | if cpu == 0 { 2 } else { 0 }); // enabled, bootstrap
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0 = ISA
    count += 1;
    entries.push(2); // IOAPIC
    entries.push(ioapic_id);
    entries.push(0x11);
    entries.push(1);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // INT, default polarity/trigger, ISA bus irq -> IOAPIC pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 = ExtINT, LINT1 = NMI on all local APICs.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"HUSK    "); // OEM id
    table.extend_from_slice(b"husk-vmm    "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table
    table.push(0);
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(base + 16).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4);
    fp.push(0); // checksum
    fp.extend_from_slice(&[0; 5]);
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    if fp.len() > 1024 {
        return Err(MptableError::TooManyCpus(nr_cpus));
    }
    Ok(fp)
}

/// Write the MP table for `nr_cpus` into guest memory.
pub fn setup_mptable(mem: &GuestMemoryMmap, nr_cpus: u8) -> Result<(), MptableError> {
    let bytes = build_mptable(nr_cpus, EBDA_START as u32)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|e| MptableError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_well_formed() {
        for n in [1u8, 2, 32] {
            let t = build_mptable(n, EBDA_START as u32).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()),
                EBDA_START as u32 + 16
            );
            let cfg = &t[16..];
            assert_eq!(&cfg[..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(cfg.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([cfg[34], cfg[35]]);
            assert_eq!(count, u16::from(n) + 1 + 1 + 24 + 2);
            // First processor entry is the enabled bootstrap processor.
            assert_eq!(&cfg[44..48], &[0, 0, 0x14, 3]);
            assert!(t.len() <= 1024);
        }
        assert!(build_mptable(0, 0).is_err());
        assert!(build_mptable(33, 0).is_err());
    }
}
