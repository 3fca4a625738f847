//! What the devices' unit tests share: an interrupt that counts, and a
//! ring of single-descriptor chains on virtio-queue's mock queue.

use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::InterruptSignal;

/// Counts the used-queue interrupts.
#[derive(Debug, Default)]
pub struct CountingIrq(pub AtomicUsize);

impl CountingIrq {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl InterruptSignal for CountingIrq {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A ring of `size` entries at guest address 0 whose chain `i` is the
/// single descriptor `descs[i]` (addr, len, flags), all made available.
pub fn single_descriptor_ring<'a>(
    mem: &'a GuestMemoryMmap,
    size: u16,
    descs: &[(u64, u32, u16)],
) -> MockSplitQueue<'a, GuestMemoryMmap> {
    let mock = MockSplitQueue::create(mem, GuestAddress(0), size);
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let d = SplitDescriptor::new(addr, len, flags, 0);
        mem.write_obj(
            RawDescriptor::from(d),
            mock.desc_table_addr().unchecked_add(16 * i as u64),
        )
        .unwrap();
        mem.write_obj(i as u16, mock.avail_addr().unchecked_add(4 + 2 * i as u64))
            .unwrap();
    }
    mem.write_obj(descs.len() as u16, mock.avail_addr().unchecked_add(2))
        .unwrap();
    mock
}
