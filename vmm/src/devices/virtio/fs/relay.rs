//! The shadow virtqueues: guest chains copied into the bounce memory,
//! posted to the back end's rings, and its answers copied back.
//!
//! For each queue the relay is the *device* of the guest's ring (read
//! through [`queue::pop`]: direct chains, every index and buffer checked)
//! and the *driver* of the back end's ring in the bounce memory
//! ([`super::bounce`]). A guest chain goes:
//!
//! 1. off the guest's avail ring, walked; its readable bytes `R` and
//!    writable bytes `W` add up;
//! 2. into a free slot big enough for `align(R, 64) + W` (a small one,
//!    else a large one). None free: the chain is put back on the guest's
//!    ring (the avail position steps back), the queue waits, and the next
//!    completion takes it again: nothing is queued in the VMM and nothing
//!    spins. Too large for any slot (more than a FUSE request of
//!    `max_pages` = 256): answered at once with a FUSE error (out-header
//!    `len = 16, error = -EIO`, the request's `unique`) if it has room for
//!    one, else returned with 0 bytes;
//! 3. the readable bytes are copied into the slot, and the chain
//!    (descriptor `2s` readable, `2s + 1` writable of `W` bytes) goes on
//!    the back end's avail ring; the caller kicks the back end once per
//!    batch.
//!
//! On the back end's call, its used ring is read: the index may move at
//! most a ring's worth (else the back end is broken: an error), each
//! element's id must be the head of a slot in flight (else it is counted
//! and ignored), its length is bounded by the `W` reserved; that many
//! bytes go back into the guest's writable buffers, the guest's head is
//! returned with that length, the slot is freed.
//!
//! Neither side is trusted: no value read from guest memory or from the
//! bounce memory is used as an index or a length without a check, nothing
//! panics, and every warning goes through the device's [`LogLimiter`].

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory, VolatileSlice,
};

use super::bounce::{
    align, Bounce, BounceError, QueueSizing, RingAddrs, SMALL_SLOT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE, WRITABLE_ALIGN,
};
use crate::devices::virtio::queue::{add_used, pop, QUEUE_BUDGET};
use crate::guest_log::LogLimiter;
use crate::metrics::{self, METRICS};

/// A FUSE in-header's size and where its `unique` is.
const FUSE_IN_HEADER: usize = 40;
const UNIQUE_AT: usize = 8;
/// A FUSE out-header: len (u32), error (i32), unique (u64).
const FUSE_OUT_HEADER: u32 = 16;

/// Counters of what the relay saw (for tests and the fuzzer).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Guest chains posted to the back end.
    pub posted: u64,
    /// Completions returned to the guest.
    pub completed: u64,
    /// Guest chains refused (bad chain, or nothing the back end can use).
    pub refused: u64,
    /// Guest chains too large for a slot (answered with an error).
    pub oversized: u64,
    /// Used elements of the back end with an id not in flight.
    pub bogus_ids: u64,
    /// Used elements of the back end longer than the space reserved.
    pub long_lens: u64,
}

impl Stats {
    /// A guest chain refused, also in the VMM's metrics.
    fn refuse(&mut self) {
        self.refused += 1;
        metrics::inc(&METRICS.fs_refused);
    }
}

/// What serving a queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Chains posted to the back end: kick it.
    pub posted: usize,
    /// Buffers returned to the guest: interrupt it.
    pub used: bool,
    /// The budget ran out with chains left: come back (re-arm).
    pub more: bool,
    /// A large slot was freed and none is in use now: the trim's delay
    /// starts again.
    pub large_idle: bool,
}

/// The back end broke its ring: the device cannot go on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("the back end's used index of queue {queue} moved by {moved} (ring of {size})")]
    UsedIndex { queue: usize, moved: u16, size: u16 },
}

#[derive(Debug, Default)]
struct Slot {
    busy: bool,
    /// The guest's head.
    head: u16,
    /// Bytes reserved for the back end's answer, and where (in the
    /// bounce memory).
    writable: u32,
    wbase: u64,
    /// The guest's writable buffers (address, length).
    bufs: Vec<(u64, u32)>,
}

#[derive(Debug)]
struct QueueRelay {
    ring: RingAddrs,
    sizing: QueueSizing,
    slots: Vec<Slot>,
    /// Free slots, last freed on top.
    free_small: Vec<u16>,
    free_large: Vec<u16>,
    /// The back end's ring: our next avail index, its used index read so
    /// far.
    next_avail: u16,
    last_used: u16,
    in_flight: usize,
    /// A guest chain is left on the guest's ring for want of a slot.
    waiting: bool,
    /// A large slot was used since the last trim.
    large_dirty: bool,
}

impl QueueRelay {
    fn new(ring: RingAddrs, sizing: QueueSizing) -> Self {
        let mut q = QueueRelay {
            ring,
            sizing,
            slots: (0..sizing.slots()).map(|_| Slot::default()).collect(),
            free_small: Vec::with_capacity(usize::from(sizing.small)),
            free_large: Vec::with_capacity(usize::from(sizing.large)),
            next_avail: 0,
            last_used: 0,
            in_flight: 0,
            waiting: false,
            large_dirty: false,
        };
        q.clear();
        q
    }

    fn clear(&mut self) {
        // Reversed, so slot 0 is on top of the stack.
        self.free_small = (0..self.sizing.small).rev().collect();
        self.free_large = (self.sizing.small..self.sizing.slots()).rev().collect();
        for slot in &mut self.slots {
            slot.busy = false;
            slot.bufs.clear();
        }
        self.next_avail = 0;
        self.last_used = 0;
        self.in_flight = 0;
        self.waiting = false;
    }

    /// A free slot that holds `need` bytes: a small one if it fits, else
    /// a large one.
    fn take(&mut self, need: u64) -> Option<u16> {
        if need <= SMALL_SLOT {
            if let Some(s) = self.free_small.pop() {
                return Some(s);
            }
        }
        let s = self.free_large.pop()?;
        self.large_dirty = true;
        Some(s)
    }

    fn large_all_free(&self) -> bool {
        self.free_large.len() == usize::from(self.sizing.large)
    }

    fn give_back(&mut self, s: u16) {
        if s < self.sizing.small {
            self.free_small.push(s);
        } else {
            self.free_large.push(s);
        }
    }
}

/// The relay of one device: the bounce memory and every queue's state.
#[derive(Debug)]
pub struct Relay {
    bounce: Bounce,
    queues: Vec<QueueRelay>,
    descs: Vec<Descriptor>,
    limiter: LogLimiter,
    pub stats: Stats,
}

impl Relay {
    /// A relay for queues of `sizings` (queue 0 is the high-priority one).
    pub fn new(sizings: &[QueueSizing]) -> Result<Relay, BounceError> {
        let bounce = Bounce::new(sizings)?;
        let queues = (0..sizings.len())
            .filter_map(|q| bounce.layout(q).map(|l| QueueRelay::new(l.ring, l.sizing)))
            .collect();
        Ok(Relay {
            bounce,
            queues,
            descs: Vec::new(),
            limiter: LogLimiter::new("virtio-fs relay"),
            stats: Stats::default(),
        })
    }

    pub fn bounce(&self) -> &Bounce {
        &self.bounce
    }

    /// Requests of queue `q` the back end has not answered yet.
    pub fn in_flight(&self, q: usize) -> usize {
        self.queues.get(q).map_or(0, |r| r.in_flight)
    }

    /// Whether queue `q` left a guest chain on its ring for want of a slot.
    pub fn waiting(&self, q: usize) -> bool {
        self.queues.get(q).is_some_and(|r| r.waiting)
    }

    /// Forgets every request in flight and empties the back end's rings
    /// (after the back end stopped them, before it starts them again).
    pub fn reset(&mut self) {
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.clear();
            self.bounce.clear_ring(i);
        }
    }

    /// Whether a queue's large slots hold memory that [`Relay::trim`]
    /// would give back: used since the last trim, none in use now.
    pub fn trim_due(&self) -> bool {
        self.queues
            .iter()
            .any(|q| q.large_dirty && q.large_all_free())
    }

    /// Gives the host memory of idle large slots back (those of queues
    /// with no large request in flight).
    pub fn trim(&mut self) {
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !(q.large_dirty && q.large_all_free()) {
                continue;
            }
            q.large_dirty = false;
            if let Err(err) = self.bounce.trim(i) {
                if self.limiter.allow() {
                    tracing::warn!(%err, "virtio-fs: giving idle bounce memory back");
                }
            }
        }
    }

    /// Takes up to [`QUEUE_BUDGET`] chains off guest queue `q` and posts
    /// them to the back end (see the module documentation).
    pub fn serve_guest(&mut self, q: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Served {
        let mut served = Served::default();
        let Some(relay) = self.queues.get_mut(q) else {
            return served;
        };
        relay.waiting = false;
        let mut taken = 0;
        loop {
            if taken == QUEUE_BUDGET {
                served.more = true;
                break;
            }
            if relay.free_small.is_empty() && relay.free_large.is_empty() {
                // Not even a look at the ring: a completion comes back.
                relay.waiting = true;
                break;
            }
            let Some((head, walked)) = pop(
                queue,
                mem,
                &mut self.descs,
                &mut self.limiter,
                "a virtio-fs guest queue",
            ) else {
                break;
            };
            taken += 1;
            if let Err(err) = walked {
                if self.limiter.allow() {
                    tracing::warn!(%err, queue = q, "virtio-fs: refusing a guest chain");
                }
                self.stats.refuse();
                served.used |= return_to_guest(queue, mem, head, 0, &mut self.limiter);
                continue;
            }
            let (readable, writable) = lengths(&self.descs);
            let need = align(readable, WRITABLE_ALIGN) + writable;
            let fits_any = need <= max_slot(relay.sizing);
            if readable == 0 && writable == 0 {
                // Nothing the back end could read a request from.
                self.stats.refuse();
                served.used |= return_to_guest(queue, mem, head, 0, &mut self.limiter);
                continue;
            }
            if !fits_any {
                self.stats.oversized += 1;
                metrics::inc(&METRICS.fs_refused);
                if self.limiter.allow() {
                    tracing::warn!(
                        queue = q,
                        readable,
                        writable,
                        "virtio-fs: a guest request larger than the device carries; answered EIO"
                    );
                }
                let len = error_reply(&self.descs, mem, libc::EIO);
                served.used |= return_to_guest(queue, mem, head, len, &mut self.limiter);
                continue;
            }
            let Some(s) = relay.take(need) else {
                // Its size class is full: back on the guest's ring.
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                relay.waiting = true;
                break;
            };
            let Some((base, _)) = self.bounce.layout(q).and_then(|l| l.slot(s)) else {
                relay.give_back(s);
                break;
            };
            // Both fit in u32: the walk bounds a chain to 4 GiB and `need`
            // to a slot.
            let (r32, w32) = (readable as u32, writable as u32);
            if !copy_in(&self.bounce, base, &self.descs, mem) {
                relay.give_back(s);
                self.stats.refuse();
                served.used |= return_to_guest(queue, mem, head, 0, &mut self.limiter);
                continue;
            }
            let wbase = base + align(readable, WRITABLE_ALIGN);
            let slot = &mut relay.slots[usize::from(s)];
            slot.busy = true;
            slot.head = head;
            slot.writable = w32;
            slot.wbase = wbase;
            slot.bufs.clear();
            slot.bufs.extend(
                self.descs
                    .iter()
                    .filter(|d| d.is_write_only() && d.len() > 0)
                    .map(|d| (d.addr().0, d.len())),
            );
            let ring = &relay.ring;
            let (first, second) = (2 * s, 2 * s + 1);
            if r32 > 0 {
                let flags = if w32 > 0 { VRING_DESC_F_NEXT } else { 0 };
                self.bounce
                    .write_desc(ring, first, base, r32, flags, second);
                if w32 > 0 {
                    self.bounce
                        .write_desc(ring, second, wbase, w32, VRING_DESC_F_WRITE, 0);
                }
            } else {
                self.bounce
                    .write_desc(ring, first, wbase, w32, VRING_DESC_F_WRITE, 0);
            }
            self.bounce.put_avail(ring, relay.next_avail, first);
            relay.next_avail = relay.next_avail.wrapping_add(1);
            relay.in_flight += 1;
            self.stats.posted += 1;
            metrics::inc(&METRICS.fs_requests);
            metrics::add(&METRICS.fs_request_bytes, readable);
            served.posted += 1;
        }
        if served.posted > 0 {
            self.bounce.publish_avail(&relay.ring, relay.next_avail);
        }
        served
    }

    /// Reads the back end's used ring of queue `q` and completes what it
    /// answered to the guest.
    pub fn complete(
        &mut self,
        q: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<Served, RingError> {
        let mut served = Served::default();
        let Some(relay) = self.queues.get_mut(q) else {
            return Ok(served);
        };
        let ring = relay.ring;
        let used = self.bounce.used_idx(&ring);
        let moved = used.wrapping_sub(relay.last_used);
        if moved > ring.size {
            return Err(RingError::UsedIndex {
                queue: q,
                moved,
                size: ring.size,
            });
        }
        for _ in 0..moved {
            let (id, len) = self.bounce.used_elem(&ring, relay.last_used);
            relay.last_used = relay.last_used.wrapping_add(1);
            let slot_index = (id % 2 == 0)
                .then(|| u16::try_from(id / 2).ok())
                .flatten()
                .filter(|s| usize::from(*s) < relay.slots.len());
            let Some(s) = slot_index.filter(|s| relay.slots[usize::from(*s)].busy) else {
                self.stats.bogus_ids += 1;
                if self.limiter.allow() {
                    tracing::warn!(
                        queue = q,
                        id,
                        "virtio-fs: the back end used an id not in flight"
                    );
                }
                continue;
            };
            let slot = &mut relay.slots[usize::from(s)];
            if len > slot.writable {
                self.stats.long_lens += 1;
                if self.limiter.allow() {
                    tracing::warn!(
                        queue = q,
                        len,
                        reserved = slot.writable,
                        "virtio-fs: the back end wrote more than the buffer holds"
                    );
                }
            }
            let len = len.min(slot.writable);
            let copied = copy_out(&self.bounce, slot.wbase, len, &slot.bufs, mem);
            let head = slot.head;
            slot.busy = false;
            slot.bufs.clear();
            relay.in_flight = relay.in_flight.saturating_sub(1);
            relay.give_back(s);
            served.large_idle |= s >= relay.sizing.small && relay.large_all_free();
            self.stats.completed += 1;
            metrics::add(&METRICS.fs_reply_bytes, u64::from(copied));
            served.used |= return_to_guest(queue, mem, head, copied, &mut self.limiter);
        }
        Ok(served)
    }
}

/// The largest request queue `sizing` carries.
fn max_slot(sizing: QueueSizing) -> u64 {
    if sizing.large > 0 {
        super::bounce::LARGE_SLOT
    } else if sizing.small > 0 {
        SMALL_SLOT
    } else {
        0
    }
}

/// Readable and writable bytes of a walked chain.
fn lengths(descs: &[Descriptor]) -> (u64, u64) {
    descs.iter().fold((0, 0), |(r, w), d| {
        if d.is_write_only() {
            (r, w + u64::from(d.len()))
        } else {
            (r + u64::from(d.len()), w)
        }
    })
}

/// Copies the chain's readable bytes into the bounce memory at `base`.
fn copy_in(bounce: &Bounce, base: u64, descs: &[Descriptor], mem: &GuestMemoryMmap) -> bool {
    let mut at = base;
    for d in descs.iter().filter(|d| !d.is_write_only() && d.len() > 0) {
        let Some(dst) = bounce.slice(at, d.len() as usize) else {
            return false;
        };
        if !copy_guest(mem, d.addr(), d.len() as usize, dst, true) {
            return false;
        }
        at += u64::from(d.len());
    }
    true
}

/// Copies `len` bytes at `base` in the bounce memory into the guest's
/// writable buffers, in order; returns the bytes copied.
fn copy_out(
    bounce: &Bounce,
    base: u64,
    len: u32,
    bufs: &[(u64, u32)],
    mem: &GuestMemoryMmap,
) -> u32 {
    let mut done: u32 = 0;
    for &(addr, cap) in bufs {
        let n = cap.min(len - done);
        if n == 0 {
            break;
        }
        let Some(src) = bounce.slice(base + u64::from(done), n as usize) else {
            break;
        };
        if !copy_guest(mem, GuestAddress(addr), n as usize, src, false) {
            break;
        }
        done += n;
    }
    done
}

/// Copies between guest memory at `addr` (`len` bytes, possibly across
/// regions) and `bounce` (exactly `len` bytes): from the guest if
/// `from_guest`, else to it.
fn copy_guest(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    bounce: VolatileSlice<'_>,
    from_guest: bool,
) -> bool {
    let mut off = 0;
    for part in mem.get_slices(addr, len) {
        let Ok(part) = part else {
            return false;
        };
        let Ok(other) = bounce.get_slice(off, part.len()) else {
            return false;
        };
        if from_guest {
            part.copy_to_volatile_slice(other);
        } else {
            other.copy_to_volatile_slice(part);
        }
        off += part.len();
    }
    off == len
}

/// Writes a FUSE error reply (`-errno`, the request's unique) into the
/// chain's writable buffers if both the in-header and the out-header fit;
/// returns the bytes written (16 or 0).
fn error_reply(descs: &[Descriptor], mem: &GuestMemoryMmap, errno: i32) -> u32 {
    let (readable, writable) = lengths(descs);
    if readable < FUSE_IN_HEADER as u64 || writable < u64::from(FUSE_OUT_HEADER) {
        return 0;
    }
    // The in-header's first 16 bytes, gathered across descriptors.
    let mut head = [0u8; UNIQUE_AT + 8];
    let mut got = 0;
    for d in descs.iter().filter(|d| !d.is_write_only()) {
        let n = (d.len() as usize).min(head.len() - got);
        if n == 0 {
            continue;
        }
        if mem.read_slice(&mut head[got..got + n], d.addr()).is_err() {
            return 0;
        }
        got += n;
        if got == head.len() {
            break;
        }
    }
    let mut reply = [0u8; FUSE_OUT_HEADER as usize];
    reply[..4].copy_from_slice(&FUSE_OUT_HEADER.to_le_bytes());
    reply[4..8].copy_from_slice(&(-errno).to_le_bytes());
    reply[8..].copy_from_slice(&head[UNIQUE_AT..]);
    let mut put = 0;
    for d in descs.iter().filter(|d| d.is_write_only()) {
        let n = (d.len() as usize).min(reply.len() - put);
        if n == 0 {
            continue;
        }
        if mem.write_slice(&reply[put..put + n], d.addr()).is_err() {
            return 0;
        }
        put += n;
        if put == reply.len() {
            break;
        }
    }
    FUSE_OUT_HEADER
}

/// Returns `head` to the guest with `len` bytes; true if it was.
fn return_to_guest(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    limiter: &mut LogLimiter,
) -> bool {
    match add_used(queue, mem, head, len) {
        Ok(()) => true,
        Err(err) => {
            if limiter.allow() {
                tracing::warn!(%err, "virtio-fs: cannot return a buffer to the guest");
            }
            false
        }
    }
}
