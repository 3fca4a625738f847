//! virtio-balloon (device id 5) with free page reporting only: the guest
//! kernel tells the host which of its pages are free (in blocks of at
//! least 2 MiB, a few seconds after they were freed), and the host gives
//! their memory back with `madvise(MADV_REMOVE)` on the guest RAM's memfd:
//! the pages are freed in the host's page cache, for isola-vmm's mapping
//! and virtiofsd's alike, and read as zeros when the guest touches them
//! again. A container that allocated and freed a lot does not leave its
//! VM holding that memory.
//!
//! The device never asks for memory (`num_pages` stays 0), so the inflate
//! and deflate queues only ever get a hostile guest's buffers: they are
//! returned untouched. Only `VIRTIO_BALLOON_F_PAGE_REPORTING` is offered:
//! a driver that does not take it sets up two queues, which activation
//! refuses (the guest then runs without the device; the guest kernel isola
//! builds has `CONFIG_PAGE_REPORTING`).
//!
//! The guest is untrusted: a reported range must be page-aligned and lie
//! in one region of guest RAM, or it is skipped (counted, logged at a
//! bounded rate); chains are walked by [`super::queue`] (direct only,
//! bounded) and at most [`QUEUE_BUDGET`] are served per event; at most
//! [`RANGES_PER_SEC`] ranges are given back a second (a Linux guest
//! reports a few hundred blocks every two seconds at most), past which
//! the device waits on a timer, so a guest reporting without end costs
//! the host a bounded share of a CPU. Whatever a guest reports, it can
//! only zero its own memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::lifecycle::{DeviceEvent, DeviceLifecycle};
use super::queue::{add_used, pop, QUEUE_BUDGET};
use super::rate_timer::{RateTimer, EV_TIMER};
use super::{
    device_type, read_config_space, ActivateError, InterruptSignal, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::guest_log::LogLimiter;
use crate::metrics::{self, METRICS};

/// VIRTIO_BALLOON_F_PAGE_REPORTING (virtio 1.2, 5.5.3).
pub const F_PAGE_REPORTING: u64 = 1 << 5;
pub const QUEUE_SIZE: u16 = 128;
/// inflateq, deflateq, reporting_vq: without STATS_VQ and FREE_PAGE_HINT
/// the reporting queue is the driver's third (Linux numbers the queues it
/// sets up in order).
const QUEUES: usize = 3;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const REPORTING: usize = 2;
/// The granule a range must be aligned to: the host's page.
const PAGE: u64 = 4096;
/// Most ranges given back per second (8 GiB/s in 2 MiB blocks).
pub const RANGES_PER_SEC: u32 = 4096;

/// What the device did, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Bytes the guest reported free and the host gave back.
    pub reported_bytes: u64,
    /// Ranges given back.
    pub reported_ranges: u64,
    /// Ranges refused (misaligned, outside guest RAM, or the host's
    /// madvise failed).
    pub refused_ranges: u64,
    /// Buffers of the inflate and deflate queues, returned untouched.
    pub ignored_buffers: u64,
}

/// The balloon device.
#[derive(Debug)]
pub struct Balloon {
    life: DeviceLifecycle,
    acked: u64,
    descs: Vec<Descriptor>,
    limiter: LogLimiter,
    /// The current one-second window of the range limit and the ranges
    /// taken in it.
    window: (Instant, u32),
    /// Wakes the device when the window has passed.
    timer: RateTimer,
    waiting: bool,
    pub counters: BalloonCounters,
}

impl Balloon {
    pub fn new() -> std::io::Result<Balloon> {
        Ok(Balloon {
            life: DeviceLifecycle::new("virtio-balloon", QUEUES)?,
            acked: 0,
            descs: Vec::new(),
            limiter: LogLimiter::new("virtio-balloon"),
            window: (Instant::now(), 0),
            timer: RateTimer::new("virtio-balloon")?,
            waiting: false,
            counters: BalloonCounters::default(),
        })
    }

    /// Serves up to [`QUEUE_BUDGET`] chains of queue `index`; returns
    /// whether any was used. Reporting waits (on the timer) once the
    /// second's ranges are taken.
    fn process_queue(&mut self, index: usize, now: Instant) -> bool {
        if index == REPORTING && self.waiting {
            return false;
        }
        let Some(active) = self.life.active_mut() else {
            return false;
        };
        let mem = &active.mem;
        let Some(queue) = active.queues.get_mut(index) else {
            return false;
        };
        let mut used = false;
        let mut rearm = false;
        for served in 0.. {
            if served == QUEUE_BUDGET {
                rearm = true;
                break;
            }
            if index == REPORTING {
                if now.saturating_duration_since(self.window.0) >= Duration::from_secs(1) {
                    self.window = (now, 0);
                }
                if self.window.1 >= RANGES_PER_SEC {
                    let left = Duration::from_secs(1)
                        .saturating_sub(now.saturating_duration_since(self.window.0))
                        .max(Duration::from_millis(1));
                    self.waiting = self.timer.arm(left);
                    break;
                }
            }
            let Some((head, walked)) = pop(
                queue,
                mem,
                &mut self.descs,
                &mut self.limiter,
                "a virtio-balloon queue",
            ) else {
                break;
            };
            match walked {
                Err(err) => {
                    if self.limiter.allow() {
                        tracing::warn!(%err, "virtio-balloon: refusing a chain");
                    }
                }
                Ok(_) if index == REPORTING => {
                    self.window.1 = self.window.1.saturating_add(self.descs.len() as u32);
                    for desc in &self.descs {
                        match discard(mem, desc.addr(), u64::from(desc.len())) {
                            Ok(()) => {
                                self.counters.reported_ranges += 1;
                                self.counters.reported_bytes += u64::from(desc.len());
                                metrics::inc(&METRICS.balloon_reported_ranges);
                                metrics::add(
                                    &METRICS.balloon_reported_bytes,
                                    u64::from(desc.len()),
                                );
                            }
                            Err(why) => {
                                self.counters.refused_ranges += 1;
                                if self.limiter.allow() {
                                    tracing::warn!(
                                        addr = desc.addr().0,
                                        len = desc.len(),
                                        "virtio-balloon: not giving back a reported range: {why}"
                                    );
                                }
                            }
                        }
                    }
                }
                Ok(_) => self.counters.ignored_buffers += self.descs.len() as u64,
            }
            if add_used(queue, mem, head, 0).is_err() {
                if self.limiter.allow() {
                    tracing::warn!("virtio-balloon: cannot return a buffer; stopping");
                }
                break;
            }
            used = true;
        }
        if rearm {
            self.life.rearm(index);
        }
        if used {
            if let Some(active) = self.life.active() {
                active.signal_used(&mut self.limiter, "virtio-balloon");
            }
        }
        used
    }

    fn config_space(&self) -> [u8; 8] {
        // num_pages (what the host wants back): never anything; actual: the
        // driver's, which it never raises.
        [0; 8]
    }
}

/// Gives the host memory behind the guest range `[addr, addr + len)` back:
/// it must be page-aligned, non-empty and inside one region of guest RAM.
fn discard(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<(), &'static str> {
    if len == 0 || addr.0 % PAGE != 0 || len % PAGE != 0 {
        return Err("not page-aligned");
    }
    let len = usize::try_from(len).map_err(|_| "too long")?;
    let slice = mem
        .get_slice(addr, len)
        .map_err(|_| "not inside one region of guest RAM")?;
    let host = slice.ptr_guard_mut().as_ptr();
    // SAFETY: `host..host + len` lies inside one live mapping of guest RAM
    // owned by `mem` (get_slice checked the bounds). MADV_REMOVE frees the
    // memfd's pages behind it, which then read as zeros: only the guest's
    // memory changes, as the guest asked, never the VMM's own.
    let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_REMOVE) };
    if rc != 0 {
        // Guest RAM that is not a shared mapping (tests' anonymous memory):
        // dropping the pages has the same effect.
        // SAFETY: as above; MADV_DONTNEED on a private mapping zero-fills.
        let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err("madvise failed");
        }
    }
    Ok(())
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUES]
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_PAGE_REPORTING
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space(), offset, data);
    }
    /// `actual` is the driver's to write; the device has no use for it.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn queue_events(&self) -> &[EventFd] {
        self.life.queue_events()
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<dyn InterruptSignal>,
    ) -> Result<(), ActivateError> {
        if self.acked & F_PAGE_REPORTING == 0 {
            tracing::warn!(
                "virtio-balloon: the driver does not report free pages; the device is not used"
            );
        }
        self.life.activate(mem, queues, interrupt)
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.life.queue_states()
    }

    fn reset(&mut self) -> bool {
        self.life.reset();
        true
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        self.life.register(ops);
        self.timer.register(ops);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps<'_>) {
        let now = Instant::now();
        match self.life.event(&events) {
            DeviceEvent::StateChanged => {
                for q in [INFLATE, DEFLATE, REPORTING] {
                    self.process_queue(q, now);
                }
            }
            DeviceEvent::Queue(q) => {
                self.process_queue(q, now);
            }
            DeviceEvent::Other(EV_TIMER) => {
                self.timer.drain();
                self.waiting = false;
                self.process_queue(REPORTING, now);
            }
            DeviceEvent::Other(other) => {
                tracing::debug!(data = other, "virtio-balloon: unknown event");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, FileOffset};

    use crate::devices::virtio::test_utils::{single_descriptor_ring, CountingIrq as Irq};

    const MEM: u64 = 4 << 20;

    /// 4 MiB of guest RAM in a memfd mapped shared, as the VMM's.
    fn memfd_memory() -> (GuestMemoryMmap, File) {
        let fd =
            nix::sys::memfd::memfd_create(c"balloon-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap();
        let file = File::from(fd);
        file.set_len(MEM).unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM as usize,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        (mem, file)
    }

    /// Bytes of the memfd that are backed by memory.
    fn resident(file: &File) -> u64 {
        use std::os::fd::AsRawFd;
        // SAFETY: fstat into a zeroed struct of the right type.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd and a valid out pointer.
        assert_eq!(unsafe { libc::fstat(file.as_raw_fd(), &mut st) }, 0);
        st.st_blocks as u64 * 512
    }

    /// A ring at 0 with one single-descriptor chain per (addr, len, flags).
    fn ring<'a>(
        mem: &'a GuestMemoryMmap,
        descs: &[(u64, u32, u16)],
    ) -> MockSplitQueue<'a, GuestMemoryMmap> {
        single_descriptor_ring(mem, 16, descs)
    }

    /// A device activated with `reporting` as its reporting queue (and
    /// empty inflate and deflate queues elsewhere in memory).
    fn activated(
        mem: &GuestMemoryMmap,
        reporting: &MockSplitQueue<'_, GuestMemoryMmap>,
        irq: Arc<Irq>,
    ) -> Balloon {
        let empty = |at: u64| {
            MockSplitQueue::create(mem, GuestAddress(at), 16)
                .create_queue()
                .unwrap()
        };
        let mut b = Balloon::new().unwrap();
        b.set_acked_features(VIRTIO_F_VERSION_1 | F_PAGE_REPORTING);
        b.activate(
            mem.clone(),
            vec![
                empty(0x8000),
                empty(0xc000),
                reporting.create_queue().unwrap(),
            ],
            irq,
        )
        .unwrap();
        b
    }

    #[test]
    fn reported_ranges_are_given_back_and_read_as_zeros() {
        let (mem, file) = memfd_memory();
        let w = VRING_DESC_F_WRITE as u16;
        // The guest touches 2 MiB at 2 MiB, then reports it free.
        let mock = ring(&mem, &[(2 << 20, 2 << 20, w)]);
        mem.write_slice(&vec![0xaa; 2 << 20], GuestAddress(2 << 20))
            .unwrap();
        let before = resident(&file);
        assert!(before >= 2 << 20, "{before}");
        let irq = Arc::new(Irq::default());
        let mut b = activated(&mem, &mock, irq.clone());
        assert!(b.process_queue(REPORTING, Instant::now()));
        assert_eq!(
            b.counters,
            BalloonCounters {
                reported_bytes: 2 << 20,
                reported_ranges: 1,
                ..Default::default()
            }
        );
        assert!(
            // (the used ring's page, written since, is new)
            resident(&file) + (2 << 20) <= before + (16 << 10),
            "{} of {before}",
            resident(&file)
        );
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back, GuestAddress(3 << 20)).unwrap();
        assert!(back.iter().all(|b| *b == 0));
        // Returned to the driver, which was told.
        assert_eq!(
            mem.read_obj::<u16>(mock.used_addr().unchecked_add(2))
                .unwrap(),
            1
        );
        assert_eq!(irq.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn a_hostile_guests_ranges_are_refused_without_harm() {
        let (mem, _file) = memfd_memory();
        let w = VRING_DESC_F_WRITE as u16;
        // The ring itself lives in the first pages: it must survive.
        let mock = ring(
            &mem,
            &[
                (0x10001, 4096, w),     // misaligned address
                (0x10000, 100, w),      // misaligned length
                (MEM - 4096, 8192, w),  // runs past guest RAM
                (0xffff_f000, 4096, w), // outside guest RAM
                (0x20000, 0, w),        // empty
            ],
        );
        let mut b = activated(&mem, &mock, Arc::new(Irq::default()));
        assert!(b.process_queue(REPORTING, Instant::now()));
        assert_eq!(b.counters.reported_ranges, 0);
        assert_eq!(b.counters.reported_bytes, 0);
        // Chains outside memory are refused by the queue walk itself;
        // whatever got to the device was refused there.
        assert!(b.counters.refused_ranges >= 3, "{:?}", b.counters);
        assert_eq!(
            mem.read_obj::<u16>(mock.used_addr().unchecked_add(2))
                .unwrap(),
            5
        );
    }

    #[test]
    fn a_guest_reporting_without_end_waits_out_the_second() {
        let (mem, _file) = memfd_memory();
        let w = VRING_DESC_F_WRITE as u16;
        let descs: Vec<(u64, u32, u16)> = (0..8).map(|i| (0x100000 + i * 4096, 4096, w)).collect();
        let mock = ring(&mem, &descs);
        let mut b = activated(&mem, &mock, Arc::new(Irq::default()));
        let now = Instant::now();
        b.window = (now, RANGES_PER_SEC - 3);
        assert!(b.process_queue(REPORTING, now));
        assert_eq!(b.counters.reported_ranges, 3);
        assert!(b.waiting);
        // Until the timer fires, notifications do nothing.
        assert!(!b.process_queue(REPORTING, now));
        b.waiting = false;
        assert!(b.process_queue(REPORTING, now + Duration::from_millis(1001)));
        assert_eq!(b.counters.reported_ranges, 8);
    }

    #[test]
    fn inflate_buffers_are_returned_untouched() {
        let (mem, _file) = memfd_memory();
        mem.write_slice(&[0x55; 4096], GuestAddress(0x40000))
            .unwrap();
        // A page-frame list asking to give back the page at 0x40000.
        mem.write_obj(0x40u32, GuestAddress(0x30000)).unwrap();
        let inflate = ring(&mem, &[(0x30000, 4, 0)]);
        let empty = |at: u64| {
            MockSplitQueue::create(&mem, GuestAddress(at), 16)
                .create_queue()
                .unwrap()
        };
        let mut b = Balloon::new().unwrap();
        b.activate(
            mem.clone(),
            vec![
                inflate.create_queue().unwrap(),
                empty(0x8000),
                empty(0xc000),
            ],
            Arc::new(Irq::default()),
        )
        .unwrap();
        assert!(b.process_queue(INFLATE, Instant::now()));
        assert_eq!(b.counters.ignored_buffers, 1);
        let mut page = [0u8; 4096];
        mem.read_slice(&mut page, GuestAddress(0x40000)).unwrap();
        assert!(page.iter().all(|b| *b == 0x55));
    }

    #[test]
    fn offers_reporting_and_asks_for_no_pages() {
        let b = Balloon::new().unwrap();
        assert_eq!(b.device_type(), 5);
        assert_eq!(b.avail_features(), VIRTIO_F_VERSION_1 | F_PAGE_REPORTING);
        assert_eq!(b.queue_max_sizes().len(), 3);
        let mut num_pages = [0xffu8; 4];
        b.read_config(0, &mut num_pages);
        assert_eq!(num_pages, [0; 4]);
    }
}
