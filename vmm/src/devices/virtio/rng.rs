//! virtio-rng (entropy source, device id 4): fills the guest's buffers
//! with bytes from the host's getrandom(2).
//!
//! Measured without it: the guest kernel's CRNG is not yet seeded when the
//! agent is ready (1.6-2.0 s of guest uptime in the emulated host), so a
//! workload that calls getrandom() early would block. With this device the
//! kernel's hwrng core seeds it from the host.
//!
//! The guest is untrusted: only write-only descriptors are filled, each
//! request is capped at [`MAX_REQUEST`] bytes, and a bad chain is returned
//! with nothing written.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{device_type, ActivateError, InterruptSignal, VirtioDevice, VIRTIO_F_VERSION_1};

pub const QUEUE_SIZE: u16 = 256;
/// Most bytes given for one request (one descriptor chain).
pub const MAX_REQUEST: u32 = 64 << 10;

const EV_ACTIVATE: u32 = 1;
const EV_QUEUE: u32 = 2;

#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    queue_evt: EventFd,
    interrupt: Arc<dyn InterruptSignal>,
}

/// The entropy device.
#[derive(Debug)]
pub struct Rng {
    activate_evt: EventFd,
    active: Option<Active>,
    registered: bool,
    /// Bytes given to the guest so far.
    pub bytes_served: u64,
}

impl Rng {
    pub fn new() -> std::io::Result<Rng> {
        Ok(Rng {
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            active: None,
            registered: false,
            bytes_served: 0,
        })
    }

    /// Serves every available request; returns whether any was used.
    fn process_queue(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mut buf = Vec::new();
        let mut used = false;
        while let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let mut written: u32 = 0;
            for desc in chain {
                if !desc.is_write_only() {
                    break;
                }
                let len = desc.len().min(MAX_REQUEST - written);
                if len == 0 {
                    break;
                }
                buf.resize(len as usize, 0);
                if fill_random(&mut buf).is_err()
                    || active.mem.write_slice(&buf, desc.addr()).is_err()
                {
                    break;
                }
                written += len;
            }
            if active.queue.add_used(&active.mem, head, written).is_err() {
                tracing::warn!("virtio-rng: cannot return a buffer; stopping");
                break;
            }
            self.bytes_served += u64::from(written);
            used = true;
        }
        if used {
            if let Err(err) = active.interrupt.signal_used_queue() {
                tracing::warn!(%err, "virtio-rng: raising the interrupt");
            }
        }
        used
    }
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

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        mut queue_evts: Vec<EventFd>,
        interrupt: Arc<dyn InterruptSignal>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != 1 || queue_evts.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let (Some(queue), Some(queue_evt)) = (queues.pop(), queue_evts.pop()) else {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: 0,
            });
        };
        if !queue.is_valid(&mem) {
            return Err(ActivateError::InvalidQueue(0));
        }
        self.active = Some(Active {
            mem,
            queue,
            queue_evt,
            interrupt,
        });
        self.activate_evt.write(1)?;
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // The queue eventfd leaves the event loop with the old activation;
        // a re-activation registers the new one.
        self.active = None;
        true
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        if let Err(err) = ops.add(Events::with_data(
            &self.activate_evt,
            EV_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!(?err, "virtio-rng: registering the activate event");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps<'_>) {
        match events.data() {
            EV_ACTIVATE => {
                let _ = self.activate_evt.read();
                if let Some(active) = &self.active {
                    let fd = active.queue_evt.as_raw_fd();
                    if self.registered {
                        let _ = ops.remove(Events::with_data_raw(fd, EV_QUEUE, EventSet::IN));
                    }
                    match ops.add(Events::with_data_raw(fd, EV_QUEUE, EventSet::IN)) {
                        Ok(()) => self.registered = true,
                        Err(err) => tracing::error!(?err, "virtio-rng: registering the queue"),
                    }
                }
                self.process_queue();
            }
            EV_QUEUE => {
                if let Some(active) = &self.active {
                    let _ = active.queue_evt.read();
                }
                self.process_queue();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    #[derive(Debug, Default)]
    struct Irq(std::sync::atomic::AtomicUsize);
    impl InterruptSignal for Irq {
        fn signal_used_queue(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn signal_config_change(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// One chain per (addr, len, flags) with a single descriptor each.
    fn run(descs: &[(u64, u32, u16)]) -> (Rng, GuestMemoryMmap, Vec<u32>, Arc<Irq>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
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
        let irq = Arc::new(Irq::default());
        let mut rng = Rng::new().unwrap();
        rng.activate(
            mem.clone(),
            vec![mock.create_queue().unwrap()],
            vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            irq.clone(),
        )
        .unwrap();
        rng.process_queue();
        let used: Vec<u32> = (0..descs.len() as u64)
            .map(|i| {
                mem.read_obj::<u32>(mock.used_addr().unchecked_add(4 + 8 * i + 4))
                    .unwrap()
            })
            .collect();
        (rng, mem, used, irq)
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
            .activate(mem, vec![], vec![], Arc::new(Irq::default()))
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
