//! virtio-rng (entropy source, device id 4): fills the guest's buffers
//! with bytes from the host's getrandom(2).
//!
//! Measured without it: the guest kernel's CRNG is not yet seeded when the
//! agent is ready (1.6-2.0 s of guest uptime in the emulated host), so a
//! workload that calls getrandom() early would block. With this device the
//! kernel's hwrng core seeds it from the host.
//!
//! The guest is untrusted: only write-only descriptors are filled, chains
//! are walked by [`super::queue`] (direct only, bounded), each request is
//! capped at [`MAX_REQUEST`] bytes, at most [`QUEUE_BUDGET`] requests are
//! served per event, and the bytes handed out are rate-limited
//! ([`RATE_BYTES_PER_SEC`], bursts of [`BURST_BYTES`]): a guest asking for
//! entropy without end costs the host a bounded share of one CPU, and the
//! event loop stays free for everything else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::lifecycle::{DeviceEvent, DeviceLifecycle};
use super::queue::{add_used, pop, QUEUE_BUDGET};
use super::rate_timer::{RateTimer, EV_TIMER};
use super::{device_type, ActivateError, InterruptSignal, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::guest_log::LogLimiter;

pub const QUEUE_SIZE: u16 = 256;
/// Most bytes given for one request (one descriptor chain).
pub const MAX_REQUEST: u32 = 64 << 10;
/// Sustained rate of random bytes a guest gets (far above what a kernel
/// seeding its CRNG asks for: a few hundred bytes).
pub const RATE_BYTES_PER_SEC: u64 = 1 << 20;
/// Bytes a guest may take at once before the rate applies.
pub const BURST_BYTES: u64 = 256 << 10;

/// A token bucket of bytes.
#[derive(Debug)]
struct Bucket {
    tokens: u64,
    last: Instant,
}

impl Bucket {
    fn new(now: Instant) -> Self {
        Bucket {
            tokens: BURST_BYTES,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let add = (elapsed.as_micros().min(u128::from(u32::MAX)) as u64)
            .saturating_mul(RATE_BYTES_PER_SEC)
            / 1_000_000;
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add).min(BURST_BYTES);
            self.last = now;
        }
    }

    /// How long until `n` tokens are there.
    fn wait_for(&self, n: u64) -> Duration {
        let missing = n.saturating_sub(self.tokens);
        Duration::from_micros(missing.saturating_mul(1_000_000) / RATE_BYTES_PER_SEC + 1)
    }
}

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    life: DeviceLifecycle,
    descs: Vec<Descriptor>,
    buf: Vec<u8>,
    bucket: Bucket,
    /// Wakes the device when the bucket has refilled enough.
    timer: RateTimer,
    waiting_for_tokens: bool,
    limiter: LogLimiter,
    /// Bytes given to the guest so far.
    pub bytes_served: u64,
}

impl Rng {
    pub fn new() -> std::io::Result<Rng> {
        Ok(Rng {
            life: DeviceLifecycle::new("virtio-rng", 1)?,
            descs: Vec::new(),
            buf: Vec::new(),
            bucket: Bucket::new(Instant::now()),
            timer: RateTimer::new("virtio-rng")?,
            waiting_for_tokens: false,
            limiter: LogLimiter::new("virtio-rng"),
            bytes_served: 0,
        })
    }

    /// Serves up to [`QUEUE_BUDGET`] requests; returns whether any was
    /// used. Work left over re-arms the queue (or waits for the rate
    /// limit's timer).
    fn process_queue(&mut self, now: Instant) -> bool {
        let Some(active) = self.life.active_mut() else {
            return false;
        };
        if self.waiting_for_tokens {
            return false;
        }
        let Some(queue) = active.queues.first_mut() else {
            return false;
        };
        let mem = &active.mem;
        let mut used = false;
        let mut served = 0;
        loop {
            if served == QUEUE_BUDGET {
                self.life.rearm(0);
                break;
            }
            self.bucket.refill(now);
            if self.bucket.tokens == 0 {
                let wait = self.bucket.wait_for(4096);
                if self.timer.arm(wait) {
                    self.waiting_for_tokens = true;
                }
                break;
            }
            let Some((head, walked)) = pop(
                queue,
                mem,
                &mut self.descs,
                &mut self.limiter,
                "the virtio-rng request queue",
            ) else {
                break;
            };
            if let Err(err) = walked {
                if self.limiter.allow() {
                    tracing::warn!(%err, "virtio-rng: refusing a request");
                }
            }
            served += 1;
            let written = fill_chain(&self.descs, mem, &mut self.buf, &mut self.bucket.tokens);
            if add_used(queue, mem, head, written).is_err() {
                if self.limiter.allow() {
                    tracing::warn!("virtio-rng: cannot return a buffer; stopping");
                }
                break;
            }
            self.bytes_served += u64::from(written);
            used = true;
        }
        if used {
            if let Some(active) = self.life.active() {
                active.signal_used(&mut self.limiter, "virtio-rng");
            }
        }
        used
    }
}

/// Fills the chain's device-writable buffers with random bytes, at most
/// [`MAX_REQUEST`] and `tokens` of them (taken from `tokens`). Returns the
/// bytes written.
fn fill_chain(
    descs: &[Descriptor],
    mem: &GuestMemoryMmap,
    buf: &mut Vec<u8>,
    tokens: &mut u64,
) -> u32 {
    let mut written: u32 = 0;
    for desc in descs {
        if !desc.is_write_only() {
            continue;
        }
        let room = (MAX_REQUEST - written).min((*tokens).min(u64::from(u32::MAX)) as u32);
        let len = desc.len().min(room);
        if len == 0 {
            break;
        }
        buf.resize(len as usize, 0);
        if fill_random(buf).is_err() || mem.write_slice(buf, desc.addr()).is_err() {
            break;
        }
        written += len;
        *tokens -= u64::from(len);
    }
    written
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most rest.len() bytes into rest.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn set_acked_features(&mut self, _features: u64) {}
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
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

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        self.life.register(ops);
        self.timer.register(ops);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps<'_>) {
        match self.life.event(&events) {
            DeviceEvent::StateChanged | DeviceEvent::Queue(_) => {}
            DeviceEvent::Other(EV_TIMER) => {
                self.timer.drain();
                self.waiting_for_tokens = false;
            }
            DeviceEvent::Other(other) => {
                tracing::debug!(data = other, "virtio-rng: unknown event");
                return;
            }
        }
        self.process_queue(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    use crate::devices::virtio::test_utils::{single_descriptor_ring, CountingIrq as Irq};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80000)]).unwrap()
    }

    use single_descriptor_ring as ring;

    /// An activated device on a ring made by [`ring`].
    fn active<'a>(
        mem: &'a GuestMemoryMmap,
        size: u16,
        descs: &[(u64, u32, u16)],
    ) -> (Rng, MockSplitQueue<'a, GuestMemoryMmap>) {
        let mock = ring(mem, size, descs);
        let mut rng = Rng::new().unwrap();
        rng.activate(
            mem.clone(),
            vec![mock.create_queue().unwrap()],
            Arc::new(Irq::default()),
        )
        .unwrap();
        (rng, mock)
    }

    /// One chain per (addr, len, flags) with a single descriptor each.
    fn run(descs: &[(u64, u32, u16)]) -> (Rng, GuestMemoryMmap, Vec<u32>, Arc<Irq>) {
        let mem = mem();
        let mock = ring(&mem, 16, descs);
        let irq = Arc::new(Irq::default());
        let mut rng = Rng::new().unwrap();
        rng.activate(mem.clone(), vec![mock.create_queue().unwrap()], irq.clone())
            .unwrap();
        rng.process_queue(Instant::now());
        let used: Vec<u32> = (0..descs.len() as u64)
            .map(|i| {
                mem.read_obj::<u32>(mock.used_addr().unchecked_add(4 + 8 * i + 4))
                    .unwrap()
            })
            .collect();
        (rng, mem, used, irq)
    }

    #[test]
    fn reset_then_notify_does_not_spin_the_event_loop() {
        use event_manager::{EventManager, SubscriberOps};
        use std::sync::Mutex;
        let mem = mem();
        let mock = ring(&mem, 16, &[]);
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut events: EventManager<Arc<Mutex<Rng>>> = EventManager::new().unwrap();
        events.add_subscriber(rng.clone());
        let notify = rng.lock().unwrap().queue_events()[0].try_clone().unwrap();
        for round in 0..3 {
            rng.lock()
                .unwrap()
                .activate(
                    mem.clone(),
                    vec![mock.create_queue().unwrap()],
                    Arc::new(Irq::default()),
                )
                .unwrap();
            assert!(rng.lock().unwrap().reset());
            // The guest notifies the reset device (as a hostile one did).
            notify.write(1).unwrap();
            let mut dispatched = 0;
            while events.run_with_timeout(0).unwrap() > 0 {
                dispatched += 1;
                assert!(
                    dispatched < 10,
                    "round {round}: the event loop keeps waking up"
                );
            }
            // Nothing is left readable: an idle device costs nothing.
            assert_eq!(events.run_with_timeout(0).unwrap(), 0);
        }
        assert_eq!(rng.lock().unwrap().life.activations(), 3);
    }

    #[test]
    fn a_full_ring_is_served_in_budgeted_rounds() {
        let w = VRING_DESC_F_WRITE as u16;
        let mem = mem();
        let descs: Vec<(u64, u32, u16)> = (0..256).map(|_| (0x20000, 16, w)).collect();
        let (mut rng, _mock) = active(&mem, 256, &descs);
        let evt = rng.queue_events()[0].try_clone().unwrap();
        let mut rounds = 0;
        loop {
            rounds += 1;
            rng.process_queue(Instant::now());
            // Re-armed while work is left; drained by the event loop.
            match evt.read() {
                Ok(_) => assert!(rounds < 10),
                Err(_) => break,
            }
        }
        assert_eq!(rng.bytes_served, 256 * 16);
        assert_eq!(rounds, 256 / QUEUE_BUDGET + 1);
    }

    #[test]
    fn the_rate_limit_stops_a_greedy_guest() {
        let w = VRING_DESC_F_WRITE as u16;
        let mem = mem();
        // 16 requests of 64 KiB: four times the burst.
        let descs: Vec<(u64, u32, u16)> = (0..16).map(|_| (0x30000, 64 << 10, w)).collect();
        let (mut rng, _mock) = active(&mem, 16, &descs);
        let now = Instant::now();
        rng.bucket = Bucket::new(now);
        rng.process_queue(now);
        assert_eq!(rng.bytes_served, BURST_BYTES);
        assert!(rng.waiting_for_tokens);
        // Until the timer fires, notifications do nothing.
        assert!(!rng.process_queue(now));
        rng.waiting_for_tokens = false;
        rng.process_queue(now + Duration::from_millis(100));
        assert!(rng.bytes_served > BURST_BYTES);
        assert!(rng.bytes_served <= BURST_BYTES + RATE_BYTES_PER_SEC / 10 + 1);
    }

    #[test]
    fn fills_write_only_buffers() {
        let w = VRING_DESC_F_WRITE as u16;
        let (rng, mem, used, irq) = run(&[(0x10000, 64, w), (0x11000, 4096, w)]);
        assert_eq!(used, vec![64, 4096]);
        assert_eq!(rng.bytes_served, 64 + 4096);
        let mut b = vec![0u8; 4096];
        mem.read_slice(&mut b, GuestAddress(0x11000)).unwrap();
        assert!(b.iter().any(|x| *x != 0), "random bytes were written");
        assert_eq!(irq.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn bad_buffers_get_nothing_and_no_panic() {
        let w = VRING_DESC_F_WRITE as u16;
        let (rng, _, used, _) = run(&[
            (0x10000, 64, 0),      // read-only: not filled
            (0xffff_0000, 64, w),  // outside guest memory
            (0x10000, 1 << 20, w), // oversized: capped, then fails the bounds
        ]);
        assert_eq!(used[0], 0);
        assert_eq!(used[1], 0);
        assert!(used[2] <= MAX_REQUEST);
        assert!(rng.bytes_served <= u64::from(MAX_REQUEST));
    }

    #[test]
    fn activation_needs_one_valid_queue() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut rng = Rng::new().unwrap();
        let err = rng
            .activate(mem, vec![], Arc::new(Irq::default()))
            .unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 1,
                got: 0
            }
        ));
        assert!(rng.reset());
    }
}
