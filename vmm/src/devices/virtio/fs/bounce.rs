//! The bounce memory: the only memory virtiofsd is given.
//!
//! One shared memfd per device, created with the device (before the
//! seccomp filters and the jail), sealed against shrinking and growing (a
//! back end truncating it would make the VMM's own accesses fault), mapped
//! here and handed to the back end in SET_MEM_TABLE as guest physical
//! addresses `0..size`. For each queue it holds a split virtqueue the VMM
//! drives as the *driver* (descriptor table, avail ring, used ring) and the
//! queue's data slots:
//!
//! ```text
//! per queue, page aligned:
//!   descriptor table  16 x ring_size      (ring_size: 2 descriptors a slot,
//!   avail ring        6 + 2 x ring_size    rounded up to a power of two)
//!   used ring         6 + 8 x ring_size   (4-byte aligned)
//!   small slots       small x SMALL_SLOT
//!   large slots       large x LARGE_SLOT
//! ```
//!
//! Slot `s` of a queue always uses descriptors `2s` (the device-readable
//! part: FUSE in-header and arguments) and `2s + 1` (the device-writable
//! part), so a chain's head is `2s` and what the back end returns as a
//! used id maps back to one slot with no lookup table (or is refused).
//!
//! Why fixed slots in two sizes rather than a ring allocator: the back
//! end completes requests out of order (a thread pool), and one slow
//! request would pin a ring allocator's tail and stall every later one.
//! With slots, a slow request holds one slot. Nearly every FUSE request
//! (LOOKUP, GETATTR, OPEN, READDIRPLUS of a page, I/O of a page or two)
//! fits a small slot; only I/O up to `max_pages` (256 pages: 1 MiB plus
//! headers) needs a large one. The memfd is sparse: a slot costs host
//! memory only for the bytes that went through it, slots are reused last
//! freed first (a warm slot again), and idle large slots are given back
//! ([`Bounce::trim`]).

use std::fs::File;
use std::sync::atomic::Ordering;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice,
};

/// Bytes of a small slot: the readable part (rounded up to
/// [`WRITABLE_ALIGN`]) and the writable part together.
pub const SMALL_SLOT: u64 = 8 << 10;
/// Bytes of a large slot: a FUSE request of `max_pages` = 256 pages
/// (1 MiB of data) with its headers (a WRITE's in-header and write_in:
/// 80 bytes; a READ's out-header: 16), and room to spare.
pub const LARGE_SLOT: u64 = (1 << 20) + (8 << 10);
/// Where the writable part of a slot starts, after the readable part.
pub const WRITABLE_ALIGN: u64 = 64;
const PAGE: u64 = 4096;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;

/// How many slots of each size a queue has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSizing {
    pub small: u16,
    pub large: u16,
}

/// The high-priority queue: Linux sends FORGETs there (40 + 8 bytes, no
/// reply), one request at a time per forgotten inode.
pub const HIPRIO: QueueSizing = QueueSizing {
    small: 16,
    large: 0,
};
/// A request queue: 128 small requests in flight at once, and 8 large
/// ones (enough for a sequential reader's readahead and the guest's 12
/// background requests to keep virtiofsd's threads busy). At most
/// 1 MiB + 8.1 MiB of host memory, touched only as used.
pub const REQUEST: QueueSizing = QueueSizing {
    small: 128,
    large: 8,
};

impl QueueSizing {
    pub fn slots(self) -> u16 {
        self.small.saturating_add(self.large)
    }
}

/// Where a queue's ring lives, as back-end ("guest physical") addresses in
/// the bounce memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// One queue's part of the bounce memory.
#[derive(Debug, Clone, Copy)]
pub struct QueueLayout {
    pub ring: RingAddrs,
    pub sizing: QueueSizing,
    small_base: u64,
    large_base: u64,
}

impl QueueLayout {
    /// Lays the queue out at `base` (page aligned); returns it and the
    /// first page after it.
    fn at(base: u64, sizing: QueueSizing) -> (QueueLayout, u64) {
        let slots = u64::from(sizing.slots()).max(1);
        let size = (2 * slots).next_power_of_two();
        let desc = base;
        let avail = desc + 16 * size;
        let used = align(avail + 6 + 2 * size, 4);
        let small_base = align(used + 6 + 8 * size, PAGE);
        let large_base = small_base + u64::from(sizing.small) * SMALL_SLOT;
        let end = align(large_base + u64::from(sizing.large) * LARGE_SLOT, PAGE);
        let layout = QueueLayout {
            ring: RingAddrs {
                // At most 2 x 65535 rounded up: clamped, and checked by
                // `Bounce::new` (the virtio maximum is 32768).
                size: u16::try_from(size).unwrap_or(u16::MAX),
                desc,
                avail,
                used,
            },
            sizing,
            small_base,
            large_base,
        };
        (layout, end)
    }

    /// The offset and capacity of slot `s` (small slots first).
    pub fn slot(&self, s: u16) -> Option<(u64, u64)> {
        if s < self.sizing.small {
            Some((self.small_base + u64::from(s) * SMALL_SLOT, SMALL_SLOT))
        } else if s < self.sizing.slots() {
            let l = u64::from(s - self.sizing.small);
            Some((self.large_base + l * LARGE_SLOT, LARGE_SLOT))
        } else {
            None
        }
    }

    fn large_area(&self) -> (u64, u64) {
        (self.large_base, u64::from(self.sizing.large) * LARGE_SLOT)
    }
}

/// Rounds `v` up to a multiple of `to` (a power of two).
pub fn align(v: u64, to: u64) -> u64 {
    (v + to - 1) & !(to - 1)
}

/// What went wrong making the bounce memory.
#[derive(Debug, thiserror::Error)]
pub enum BounceError {
    #[error("creating the bounce memfd: {0}")]
    Create(std::io::Error),
    #[error("mapping the bounce memory: {0}")]
    Map(String),
    #[error("a queue of {0} slots needs a ring larger than virtio's 32768 entries")]
    TooManySlots(u16),
}

/// The device's bounce memory and its layout.
#[derive(Debug)]
pub struct Bounce {
    mem: GuestMemoryMmap,
    queues: Vec<QueueLayout>,
    size: u64,
}

impl Bounce {
    /// A memfd laid out for queues of `sizings`, mapped.
    pub fn new(sizings: &[QueueSizing]) -> Result<Bounce, BounceError> {
        let mut queues = Vec::with_capacity(sizings.len());
        let mut end = 0;
        for sizing in sizings {
            if u64::from(sizing.slots()) * 2 > 32768 {
                return Err(BounceError::TooManySlots(sizing.slots()));
            }
            let (layout, next) = QueueLayout::at(end, *sizing);
            queues.push(layout);
            end = next;
        }
        let size = end.max(PAGE);
        let fd = memfd_create(
            c"isola-fs-bounce",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|e| BounceError::Create(e.into()))?;
        let file = File::from(fd);
        file.set_len(size).map_err(BounceError::Create)?;
        // The back end gets this fd: it must not be able to shrink the
        // file under the VMM's mapping (its accesses would fault).
        fcntl(
            &file,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )
        .map_err(|e| BounceError::Create(e.into()))?;
        let len = usize::try_from(size).map_err(|e| BounceError::Map(e.to_string()))?;
        let mem = GuestMemoryMmap::from_ranges_with_files(vec![(
            GuestAddress(0),
            len,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| BounceError::Map(e.to_string()))?;
        Ok(Bounce { mem, queues, size })
    }

    /// The memory, as the back end's address space (one region at 0).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn layout(&self, q: usize) -> Option<&QueueLayout> {
        self.queues.get(q)
    }

    /// Every queue's ring addresses, for SET_VRING_ADDR.
    pub fn rings(&self) -> Vec<RingAddrs> {
        self.queues.iter().map(|q| q.ring).collect()
    }

    /// `len` bytes at `addr` of the bounce memory as one slice (every slot
    /// is inside the one region).
    pub fn slice(&self, addr: u64, len: usize) -> Option<VolatileSlice<'_>> {
        self.mem.get_slice(GuestAddress(addr), len).ok()
    }

    /// Empties queue `q`'s rings (flags and indexes to 0): a new start.
    pub fn clear_ring(&self, q: usize) {
        if let Some(l) = self.queues.get(q) {
            let ring = l.ring;
            for at in [ring.avail, ring.used] {
                let _ = self.mem.store(0u32, GuestAddress(at), Ordering::Release);
            }
        }
    }

    /// Writes descriptor `index` of queue `ring`.
    pub fn write_desc(
        &self,
        ring: &RingAddrs,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let d = Descriptor::new(addr, len, flags, next);
        let at = ring.desc + 16 * u64::from(index);
        // Inside the ring by construction (index < ring size).
        let _ = self.mem.write_obj(RawDescriptor::from(d), GuestAddress(at));
    }

    /// Puts `head` in avail ring slot `idx` (not yet published).
    pub fn put_avail(&self, ring: &RingAddrs, idx: u16, head: u16) {
        let at = ring.avail + 4 + 2 * u64::from(idx % ring.size);
        let _ = self.mem.write_obj(head.to_le(), GuestAddress(at));
    }

    /// Publishes the avail index: the descriptors and ring entries written
    /// before are visible to the back end before the index is.
    pub fn publish_avail(&self, ring: &RingAddrs, idx: u16) {
        let _ = self
            .mem
            .store(idx.to_le(), GuestAddress(ring.avail + 2), Ordering::Release);
    }

    /// The back end's used index (acquire: the entries it wrote before
    /// are visible after).
    pub fn used_idx(&self, ring: &RingAddrs) -> u16 {
        self.mem
            .load::<u16>(GuestAddress(ring.used + 2), Ordering::Acquire)
            .map(u16::from_le)
            .unwrap_or(0)
    }

    /// Used element `idx` (modulo the ring size): (id, len).
    pub fn used_elem(&self, ring: &RingAddrs, idx: u16) -> (u32, u32) {
        let at = ring.used + 4 + 8 * u64::from(idx % ring.size);
        let id = self
            .mem
            .read_obj::<u32>(GuestAddress(at))
            .unwrap_or(u32::MAX);
        let len = self.mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap_or(0);
        (u32::from_le(id), u32::from_le(len))
    }

    /// Gives the host memory behind every large slot back (their contents
    /// read as zeros afterwards): only while none is in use.
    pub fn trim(&self, q: usize) -> std::io::Result<()> {
        let Some(layout) = self.queues.get(q) else {
            return Ok(());
        };
        let (start, len) = layout.large_area();
        if len == 0 {
            return Ok(());
        }
        let Ok(host) = self.mem.get_host_address(GuestAddress(start)) else {
            return Ok(());
        };
        // SAFETY: the range (the queue's large slots, page aligned) is
        // inside this process's mapping of the memfd; MADV_REMOVE frees the file's pages there, which
        // only makes later reads of the range return zeros. No Rust
        // reference points into the bounce memory (every access is
        // volatile, through vm-memory).
        let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_REMOVE) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_layout_is_aligned_and_disjoint() {
        let b = Bounce::new(&[HIPRIO, REQUEST]).unwrap();
        let h = *b.layout(0).unwrap();
        let r = *b.layout(1).unwrap();
        assert_eq!(h.ring.size, 32);
        assert_eq!(r.ring.size, 512);
        for l in [h, r] {
            assert_eq!(l.ring.desc % PAGE, 0);
            assert_eq!(l.ring.avail % 2, 0);
            assert_eq!(l.ring.used % 4, 0);
            assert!(l.ring.avail >= l.ring.desc + 16 * u64::from(l.ring.size));
            assert!(l.ring.used >= l.ring.avail + 6 + 2 * u64::from(l.ring.size));
            let (first, _) = l.slot(0).unwrap();
            assert!(first >= l.ring.used + 6 + 8 * u64::from(l.ring.size));
            assert!(l.slot(l.sizing.slots()).is_none());
        }
        let (last, cap) = h.slot(15).unwrap();
        assert!(last + cap <= r.ring.desc);
        let (last, cap) = r.slot(135).unwrap();
        assert_eq!(cap, LARGE_SLOT);
        assert!(last + cap <= b.size());
        // Sparse: the whole thing is a few MiB of address space.
        assert!(b.size() < 10 << 20, "{}", b.size());
    }

    #[test]
    fn the_memfd_cannot_be_shrunk_by_whoever_holds_it() {
        let b = Bounce::new(&[HIPRIO]).unwrap();
        let region = b.memory().iter().next().unwrap();
        let file = region.file_offset().unwrap().file();
        assert!(file.set_len(0).is_err());
        assert!(file.set_len(b.size() * 2).is_err());
    }

    #[test]
    fn trim_zeroes_the_large_slots_only() {
        let b = Bounce::new(&[REQUEST]).unwrap();
        let l = *b.layout(0).unwrap();
        let (small, _) = l.slot(0).unwrap();
        let (large, _) = l.slot(128).unwrap();
        b.memory()
            .write_slice(b"keep", GuestAddress(small))
            .unwrap();
        b.memory()
            .write_slice(b"gone", GuestAddress(large))
            .unwrap();
        b.trim(0).unwrap();
        let mut buf = [0u8; 4];
        b.memory()
            .read_slice(&mut buf, GuestAddress(small))
            .unwrap();
        assert_eq!(&buf, b"keep");
        b.memory()
            .read_slice(&mut buf, GuestAddress(large))
            .unwrap();
        assert_eq!(buf, [0; 4]);
    }
}
