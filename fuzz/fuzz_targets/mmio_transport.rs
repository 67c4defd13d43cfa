//! husk-vmm's virtio-mmio transport and the virtqueues behind it, driven by
//! a hostile guest: guest RAM filled with the fuzzer's bytes (descriptor
//! tables, rings), then any sequence of 32-bit register reads and writes.
//! When the driver activates the device, the device walks every descriptor
//! chain the rings offer, as a device would. Nothing may panic, hang or
//! touch memory outside guest RAM.
#![no_main]

use husk_vmm::devices::virtio_mmio::{
    read_config_bytes, ActivateError, MmioTransport, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use husk_vmm::devices::BusDevice;
use husk_vmm::memory::{create_guest_memory, GuestMemoryMmap};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const RAM: u64 = 1 << 20;

struct ChainWalker;

impl VirtioDevice for ChainWalker {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16, 256]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 0b111
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data)
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        mem: &GuestMemoryMmap,
        _acked_features: u64,
        queues: &[(usize, &Queue)],
        _kicks: &[EventFd],
        _interrupt: &VirtioInterrupt,
    ) -> Result<(), ActivateError> {
        for (_, queue) in queues {
            // The device's own copy of the queue the driver set up.
            let Ok(mut q) = Queue::new(queue.max_size()) else {
                continue;
            };
            q.set_size(queue.size());
            let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
            let (lo, hi) = split(queue.desc_table());
            q.set_desc_table_address(lo, hi);
            let (lo, hi) = split(queue.avail_ring());
            q.set_avail_ring_address(lo, hi);
            let (lo, hi) = split(queue.used_ring());
            q.set_used_ring_address(lo, hi);
            q.set_ready(true);
            if !q.is_valid(mem) {
                continue;
            }
            // Bounded: a ring of 256 entries offers at most that many heads.
            for _ in 0..256 {
                let Some(chain) = q.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                for desc in chain.take(64) {
                    let len = (desc.len() as usize).min(4096);
                    let mut buf = vec![0u8; len];
                    let _ = mem.read_slice(&mut buf, desc.addr());
                    if desc.is_write_only() {
                        let _ = mem.write_slice(&buf, desc.addr());
                    }
                }
                let _ = q.add_used(mem, head, 0);
            }
        }
        Ok(())
    }
    fn reset(&mut self) -> bool {
        true
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = create_guest_memory(RAM) else {
        return;
    };
    // Input: a u16 count of register accesses, the accesses (7 bytes
    // each), then what guest RAM holds from address 0 (descriptor tables,
    // rings, buffers).
    let Some((count, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let op_bytes = (usize::from(u16::from_le_bytes(*count)) * 7).min(rest.len());
    let (ops, ram) = rest.split_at(op_bytes);
    let ram = &ram[..ram.len().min(RAM as usize)];
    let _ = mem.write_slice(ram, GuestAddress(0));
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let Ok(mut transport) = MmioTransport::new(mem, Box::new(ChainWalker), irq) else {
        return;
    };
    // Each op: kind (read/write, width), offset (16 bits), value (32 bits).
    for op in ops.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x200;
        let value = [op[3], op[4], op[5], op[6]];
        let width = match op[0] >> 2 & 3 {
            0 => 1,
            1 => 2,
            _ => 4,
        };
        if op[0] & 1 == 0 {
            let mut out = [0u8; 4];
            transport.read(offset, &mut out[..width]);
        } else {
            transport.write(offset, &value[..width]);
        }
    }
    let _ = transport.status();
});
