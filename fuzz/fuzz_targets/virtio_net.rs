//! husk-vmm's virtio-net chain handling, driven by a hostile guest: guest
//! RAM filled with the fuzzer's bytes (descriptor tables and rings of a
//! transmit and a receive queue, the buffers), then every chain offered is
//! gathered as a transmit frame or filled with a receive frame, exactly as
//! the device's data path does. Nothing may panic, hang or touch memory
//! outside guest RAM, and what comes out must respect the frame limits.
#![no_main]

use husk_vmm::devices::virtio_net::{
    fill_rx_chain, gather_tx_frame, FRAME_BUF_LEN, MAX_FRAME_LEN, MIN_FRAME_LEN,
};
use husk_vmm::memory::create_guest_memory;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const RAM: u64 = 1 << 20;
/// (descriptor table, avail ring, used ring, transmit?)
const QUEUES: [(u64, u64, u64, bool); 2] = [
    (0x1000, 0x2000, 0x3000, true),
    (0x4000, 0x5000, 0x6000, false),
];

fuzz_target!(|data: &[u8]| {
    // Input: queue size (log2), receive frame length (u16), a spare byte,
    // then what guest RAM holds from address 0.
    let Some((head, ram)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Ok(mem) = create_guest_memory(RAM) else {
        return;
    };
    let _ = mem.write_slice(&ram[..ram.len().min(RAM as usize)], GuestAddress(0));
    let size = 1u16 << (head[0] % 9);
    let rx_len = usize::from(u16::from_le_bytes([head[1], head[2]])) % (FRAME_BUF_LEN + 1);
    let rx_frame: Vec<u8> = (0..rx_len).map(|i| i as u8).collect();
    let mut tx_buf = vec![0u8; MAX_FRAME_LEN];
    for (desc, avail, used, transmit) in QUEUES {
        let Ok(mut q) = Queue::new(256) else {
            return;
        };
        q.set_size(size);
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        if !q.is_valid(&mem) {
            continue;
        }
        // Bounded: a ring offers at most 256 heads per pass.
        for _ in 0..256 {
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let used_len = if transmit {
                if let Ok(len) = gather_tx_frame(&mem, chain, &mut tx_buf) {
                    assert!((MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len));
                }
                0
            } else {
                match fill_rx_chain(&mem, chain, &rx_frame) {
                    Ok(n) => {
                        assert_eq!(n as usize, rx_frame.len());
                        n
                    }
                    Err(_) => 0,
                }
            };
            let _ = q.add_used(&mem, head, used_len);
        }
    }
});
