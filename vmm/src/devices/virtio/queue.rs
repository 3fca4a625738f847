//! Reading a driver's split virtqueue without trusting it.
//!
//! virtio-queue's `Queue` keeps the ring state; what a device reads *from*
//! the ring goes through here instead of `pop_descriptor_chain` and the
//! crate's chain iterator, because those (a) log every bad avail index at
//! error level, which a guest can repeat without end, and (b) follow
//! indirect descriptor tables, which isola never offers
//! (`VIRTIO_RING_F_INDIRECT_DESC`), up to 65,535 descriptors a chain.
//!
//! [`next_chain`] takes the next head off the avail ring and walks its
//! chain into a caller-owned vector: direct descriptors only, at most the
//! queue size of them, the head and every `next` index checked against
//! the queue size, every buffer inside guest memory, the total length
//! within 4 GiB. A device drains a queue with [`QUEUE_BUDGET`] chains per
//! event at most and re-arms the queue's eventfd when work is left, so one
//! busy queue never keeps the event loop (and with it SIGTERM and the API)
//! waiting.

use std::mem::size_of;

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::metrics::{inc, METRICS};

/// Most descriptor chains a device takes off one queue per event; the
/// rest wait for the next round of the event loop.
pub const QUEUE_BUDGET: usize = 64;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// Why a queue the driver configured cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InvalidQueue {
    #[error("the queue is not ready")]
    NotReady,
    #[error("queue size {0} is not a power of two between 1 and the maximum")]
    Size(u16),
    #[error("the {0} is outside guest memory or misaligned")]
    Ring(&'static str),
}

/// Checks a configured queue against guest memory, without logging (the
/// caller rate-limits what it reports).
pub fn validate(queue: &Queue, mem: &GuestMemoryMmap) -> Result<(), InvalidQueue> {
    if !queue.ready() {
        return Err(InvalidQueue::NotReady);
    }
    let size = queue.size();
    if size == 0 || size > queue.max_size() || !size.is_power_of_two() {
        return Err(InvalidQueue::Size(size));
    }
    let n = u64::from(size);
    let rings = [
        (
            "descriptor table",
            queue.desc_table(),
            16 * n,
            16,
            Permissions::Read,
        ),
        (
            "available ring",
            queue.avail_ring(),
            6 + 2 * n,
            2,
            Permissions::Read,
        ),
        (
            "used ring",
            queue.used_ring(),
            6 + 8 * n,
            4,
            Permissions::Write,
        ),
    ];
    for (name, addr, len, align, perm) in rings {
        let Ok(len) = usize::try_from(len) else {
            return Err(InvalidQueue::Ring(name));
        };
        if addr % align != 0 || !mem.check_range(GuestAddress(addr), len, perm) {
            return Err(InvalidQueue::Ring(name));
        }
    }
    Ok(())
}

/// A copy of a configured queue (virtio-queue's `Queue` is not `Clone`):
/// same size, rings and readiness, at ring position 0, as at activation.
pub fn copy_configured(queue: &Queue) -> Result<Queue, virtio_queue::Error> {
    let mut copy = Queue::new(queue.max_size())?;
    copy.try_set_size(queue.size())?;
    copy.try_set_desc_table_address(GuestAddress(queue.desc_table()))?;
    copy.try_set_avail_ring_address(GuestAddress(queue.avail_ring()))?;
    copy.try_set_used_ring_address(GuestAddress(queue.used_ring()))?;
    copy.set_ready(queue.ready());
    Ok(copy)
}

/// Why the ring itself is unusable (the device stops reading it until the
/// driver notifies again).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("the queue is not ready")]
    NotReady,
    #[error("the avail ring cannot be read or its index is bad: {0}")]
    AvailRing(String),
    #[error("the used ring cannot be written: {0}")]
    UsedRing(String),
}

/// Why one descriptor chain was refused (the buffer is returned unused).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor index {index} is outside the queue (size {size})")]
    IndexOutOfRange { index: u16, size: u16 },
    #[error("indirect descriptors were not negotiated")]
    Indirect,
    #[error("the chain is longer than the queue (a loop?)")]
    TooLong,
    #[error("a descriptor points outside guest memory")]
    OutOfMemory,
    #[error("the chain is longer than 4 GiB in total")]
    TooManyBytes,
    #[error("a device-writable descriptor comes before a device-readable one")]
    ReadAfterWrite,
}

/// The next chain on the avail ring, if the driver made one available.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Empty,
    /// `head` must be returned with `add_used` whatever `result` is.
    Chain {
        head: u16,
        result: Result<(), ChainError>,
    },
}

/// Takes the next head off `queue`'s avail ring and walks its chain into
/// `descs` (cleared first). See the module documentation for the checks.
pub fn next_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    descs: &mut Vec<Descriptor>,
) -> Result<Next, QueueError> {
    descs.clear();
    let head = {
        let mut iter = queue.iter(mem).map_err(|e| match e {
            virtio_queue::Error::QueueNotReady => QueueError::NotReady,
            other => {
                inc(&METRICS.invalid_avail_index);
                QueueError::AvailRing(other.to_string())
            }
        })?;
        match iter.next() {
            Some(chain) => chain.head_index(),
            None => return Ok(Next::Empty),
        }
    };
    let result = walk(mem, queue.desc_table(), queue.size(), head, descs);
    if result.is_err() {
        inc(&METRICS.invalid_chains);
        descs.clear();
    }
    Ok(Next::Chain { head, result })
}

/// [`next_chain`] for a device's serving loop: `None` when the ring is
/// empty or unusable (the latter logged through `limiter`, naming `what`),
/// else the head (to return with [`add_used`] whatever the walk gave) and
/// the walk's result.
pub fn pop(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    descs: &mut Vec<Descriptor>,
    limiter: &mut crate::guest_log::LogLimiter,
    what: &str,
) -> Option<(u16, Result<(), ChainError>)> {
    match next_chain(queue, mem, descs) {
        Ok(Next::Empty) => None,
        Ok(Next::Chain { head, result }) => Some((head, result)),
        Err(err) => {
            if limiter.allow() {
                tracing::warn!(%err, "{what} is unusable");
            }
            None
        }
    }
}

/// Walks the direct chain starting at `head` in the descriptor table at
/// `table` of `size` entries.
pub fn walk(
    mem: &GuestMemoryMmap,
    table: u64,
    size: u16,
    head: u16,
    descs: &mut Vec<Descriptor>,
) -> Result<(), ChainError> {
    let mut index = head;
    let mut total: u32 = 0;
    let mut seen_write = false;
    loop {
        if index >= size {
            return Err(ChainError::IndexOutOfRange { index, size });
        }
        if descs.len() >= usize::from(size) {
            return Err(ChainError::TooLong);
        }
        let addr = table
            .checked_add(u64::from(index) * size_of::<RawDescriptor>() as u64)
            .ok_or(ChainError::OutOfMemory)?;
        let raw: RawDescriptor = mem
            .read_obj(GuestAddress(addr))
            .map_err(|_| ChainError::OutOfMemory)?;
        let desc = Descriptor::from(raw);
        if desc.flags() & VRING_DESC_F_INDIRECT != 0 {
            return Err(ChainError::Indirect);
        }
        let writable = desc.flags() & VRING_DESC_F_WRITE != 0;
        if seen_write && !writable {
            return Err(ChainError::ReadAfterWrite);
        }
        seen_write |= writable;
        total = total
            .checked_add(desc.len())
            .ok_or(ChainError::TooManyBytes)?;
        if desc.len() > 0 {
            let perm = if writable {
                Permissions::Write
            } else {
                Permissions::Read
            };
            let in_memory = desc.addr().checked_add(u64::from(desc.len())).is_some()
                && mem.check_range(desc.addr(), desc.len() as usize, perm);
            if !in_memory {
                return Err(ChainError::OutOfMemory);
            }
        }
        descs.push(desc);
        if desc.flags() & VRING_DESC_F_NEXT == 0 {
            return Ok(());
        }
        index = desc.next();
    }
}

/// Returns `head` to the driver with `len` bytes written. A head outside
/// the queue (which `next_chain` reports but cannot refuse to pop) is not
/// returned: virtio-queue would log each such attempt.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    if head >= queue.size() {
        return Err(virtio_queue::Error::InvalidDescriptorIndex);
    }
    queue.add_used(mem, head, len)
}

/// Returns several chains at once: writes every `(head, len)` used
/// element, then moves the used index past all of them with one release
/// store, so the driver sees all of them or none (a virtio-net frame
/// spread over several rx chains). Heads must be inside the queue.
pub fn add_used_batch(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    entries: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let size = queue.size();
    if size == 0 || entries.iter().any(|(head, _)| *head >= size) {
        return Err(virtio_queue::Error::InvalidDescriptorIndex);
    }
    let ring = GuestAddress(queue.used_ring());
    let mut next = queue.next_used();
    for &(head, len) in entries {
        // A used element: id (le32), len (le32), after flags and idx.
        let slot = 4 + 8 * u64::from(next % size);
        let at = ring
            .checked_add(slot)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let len_at = at
            .checked_add(4)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        for (value, at) in [(u32::from(head), at), (len, len_at)] {
            mem.write_obj(value.to_le(), at)
                .map_err(virtio_queue::Error::GuestMemory)?;
        }
        next = next.wrapping_add(1);
    }
    let idx = ring
        .checked_add(2)
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    mem.store(next.to_le(), idx, std::sync::atomic::Ordering::Release)
        .map_err(virtio_queue::Error::GuestMemory)?;
    queue.set_next_used(next);
    Ok(())
}

/// Counts a queue left with work at the end of its budget.
pub fn note_budget_exhausted() {
    inc(&METRICS.queue_budget_exhausted);
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const W: u16 = VRING_DESC_F_WRITE;
    const N: u16 = VRING_DESC_F_NEXT;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap()
    }

    /// Writes descriptors at the table and makes `heads` available.
    fn ring<'a>(
        mem: &'a GuestMemoryMmap,
        descs: &[(u64, u32, u16, u16)],
        heads: &[u16],
    ) -> MockSplitQueue<'a, GuestMemoryMmap> {
        let mock = MockSplitQueue::create(mem, GuestAddress(0), 16);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = Descriptor::new(addr, len, flags, next);
            mem.write_obj(
                RawDescriptor::from(d),
                mock.desc_table_addr().unchecked_add(16 * i as u64),
            )
            .unwrap();
        }
        for (i, h) in heads.iter().enumerate() {
            mem.write_obj(*h, mock.avail_addr().unchecked_add(4 + 2 * i as u64))
                .unwrap();
        }
        mem.write_obj(heads.len() as u16, mock.avail_addr().unchecked_add(2))
            .unwrap();
        mock
    }

    fn one(descs: &[(u64, u32, u16, u16)]) -> (Next, Vec<Descriptor>) {
        let m = mem();
        let mock = ring(&m, descs, &[0]);
        let mut q = mock.create_queue::<Queue>().unwrap();
        let mut out = Vec::new();
        let next = next_chain(&mut q, &m, &mut out).unwrap();
        (next, out)
    }

    #[test]
    fn walks_a_direct_chain() {
        let (next, descs) = one(&[(0x10000, 16, N, 1), (0x11000, 32, W, 0)]);
        assert_eq!(
            next,
            Next::Chain {
                head: 0,
                result: Ok(())
            }
        );
        assert_eq!(descs.len(), 2);
        assert_eq!(descs[1].len(), 32);
    }

    #[test]
    fn refuses_indirect_loops_and_bad_indexes() {
        type Descs = &'static [(u64, u32, u16, u16)];
        let cases: [(Descs, ChainError); 5] = [
            (
                &[(0x10000, 16, VRING_DESC_F_INDIRECT, 0)],
                ChainError::Indirect,
            ),
            (&[(0x10000, 16, N, 0)], ChainError::TooLong),
            (
                &[(0x10000, 16, N, 99)],
                ChainError::IndexOutOfRange {
                    index: 99,
                    size: 16,
                },
            ),
            (&[(0xffff_f000, 0x2000, 0, 0)], ChainError::OutOfMemory),
            (
                &[(0x10000, 16, W | N, 1), (0x11000, 16, 0, 0)],
                ChainError::ReadAfterWrite,
            ),
        ];
        for (descs, want) in cases {
            let (next, out) = one(descs);
            assert_eq!(
                next,
                Next::Chain {
                    head: 0,
                    result: Err(want)
                }
            );
            assert!(out.is_empty());
        }
    }

    #[test]
    fn a_head_outside_the_queue_is_refused_not_followed() {
        let m = mem();
        let mock = ring(&m, &[(0x10000, 16, 0, 0)], &[400]);
        let mut q = mock.create_queue::<Queue>().unwrap();
        let mut out = Vec::new();
        let next = next_chain(&mut q, &m, &mut out).unwrap();
        assert!(matches!(
            next,
            Next::Chain {
                head: 400,
                result: Err(ChainError::IndexOutOfRange { .. })
            }
        ));
        assert_eq!(next_chain(&mut q, &m, &mut out).unwrap(), Next::Empty);
    }

    #[test]
    fn a_bad_avail_index_is_an_error_not_a_panic() {
        let m = mem();
        let mock = ring(&m, &[], &[]);
        // An index 1000 ahead of the device: more than the queue holds.
        m.write_obj(1000u16, mock.avail_addr().unchecked_add(2))
            .unwrap();
        let mut q = mock.create_queue::<Queue>().unwrap();
        let mut out = Vec::new();
        assert!(matches!(
            next_chain(&mut q, &m, &mut out),
            Err(QueueError::AvailRing(_))
        ));
    }

    #[test]
    fn a_batch_of_used_elements_is_published_at_once() {
        let m = mem();
        let mock = ring(&m, &[], &[]);
        let mut q = mock.create_queue::<Queue>().unwrap();
        add_used(&mut q, &m, 3, 7).unwrap();
        add_used_batch(&mut q, &m, &[(1, 100), (2, 200)]).unwrap();
        let used = mock.used_addr();
        assert_eq!(m.read_obj::<u16>(used.unchecked_add(2)).unwrap(), 3);
        let elem = |i: u64| {
            let at = used.unchecked_add(4 + 8 * i);
            (
                m.read_obj::<u32>(at).unwrap(),
                m.read_obj::<u32>(at.unchecked_add(4)).unwrap(),
            )
        };
        assert_eq!([elem(0), elem(1), elem(2)], [(3, 7), (1, 100), (2, 200)]);
        assert_eq!(q.next_used(), 3);
        // A head outside the queue refuses the whole batch.
        assert!(add_used_batch(&mut q, &m, &[(1, 1), (16, 1)]).is_err());
        assert_eq!(m.read_obj::<u16>(used.unchecked_add(2)).unwrap(), 3);
    }

    #[test]
    fn validation_names_the_bad_part() {
        let m = mem();
        let mock = ring(&m, &[], &[]);
        let q = mock.create_queue::<Queue>().unwrap();
        assert_eq!(validate(&q, &m), Ok(()));
        let mut bad = copy_configured(&q).unwrap();
        bad.set_ready(false);
        assert_eq!(validate(&bad, &m), Err(InvalidQueue::NotReady));
        let mut bad = copy_configured(&q).unwrap();
        bad.set_desc_table_address(Some(0xffff_0000), Some(0));
        assert_eq!(
            validate(&bad, &m),
            Err(InvalidQueue::Ring("descriptor table"))
        );
    }
}
