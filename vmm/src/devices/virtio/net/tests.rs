//! Device tests: a mock driver (virtio-queue's `MockSplitQueue`) on one
//! side, a seqpacket socket pair standing in for the tap on the other
//! (one frame per message, like a tap), the device called directly or driven
//! through a real `EventManager`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::frame::{MAX_BUFFER_LEN, VNET_HDR_LEN};
use super::*;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const SIZE: u16 = 16;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x4000;
const DATA: u64 = 0x1_0000;
const MEM_SIZE: usize = 1 << 20;
const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

#[derive(Debug, Default)]
struct Irq(AtomicUsize);

impl InterruptSignal for Irq {
    fn signal_used_queue(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config_change(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The tap's stand-in: one end of a seqpacket pair; records the offloads
/// set and can pretend to be full.
#[derive(Debug)]
struct FakeTap {
    sock: File,
    offloads: Arc<Mutex<Vec<u32>>>,
    full: Arc<AtomicBool>,
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl Backend for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.read(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        if self.full.load(Ordering::SeqCst) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.sock.write(frame)
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
}

/// The host's side of the fake tap.
struct Host {
    peer: File,
    offloads: Arc<Mutex<Vec<u32>>>,
    full: Arc<AtomicBool>,
}

impl Host {
    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_BUFFER_LEN + 16];
        let n = (&self.peer).read(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    fn send(&self, frame: &[u8]) {
        assert_eq!((&self.peer).write(frame).unwrap(), frame.len());
    }
}

fn device() -> (Net, Host) {
    let (sock, peer) = super::tap::seqpacket_pair().unwrap();
    let offloads = Arc::new(Mutex::new(Vec::new()));
    let full = Arc::new(AtomicBool::new(false));
    let tap = FakeTap {
        sock,
        offloads: offloads.clone(),
        full: full.clone(),
    };
    let net = Net::with_backend("test".into(), MAC, Box::new(tap)).unwrap();
    (
        net,
        Host {
            peer,
            offloads,
            full,
        },
    )
}

/// The driver's side of one queue.
struct Driver<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
    avail: u16,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap, base: u64) -> Self {
        Driver {
            mock: MockSplitQueue::create(mem, GuestAddress(base), SIZE),
            next_desc: 0,
            avail: 0,
        }
    }

    /// Publishes a chain of (addr, len, flags); NEXT links are added.
    fn chain(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = (self.next_desc + k as u16) % SIZE;
            let (flags, next) = if k + 1 < descs.len() {
                (flags | F_NEXT, (index + 1) % SIZE)
            } else {
                (flags, 0)
            };
            self.write_desc(mem, index, addr, len, flags, next);
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % SIZE;
        self.publish(mem, head);
        head
    }

    fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let desc = SplitDescriptor::new(addr, len, flags, next);
        let at = self
            .mock
            .desc_table_addr()
            .unchecked_add(16 * u64::from(index));
        mem.write_obj(RawDescriptor::from(desc), at).unwrap();
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let avail = self.mock.avail_addr();
        let slot = 4 + 2 * u64::from(self.avail % SIZE);
        mem.write_obj(head, avail.unchecked_add(slot)).unwrap();
        self.avail = self.avail.wrapping_add(1);
        mem.write_obj(self.avail, avail.unchecked_add(2)).unwrap();
    }

    /// The used ring: (id, len) of each element so far.
    fn used(&self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let used = self.mock.used_addr();
        let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
        (0..u64::from(idx))
            .map(|i| {
                let at = used.unchecked_add(4 + 8 * i);
                (
                    mem.read_obj(at).unwrap(),
                    mem.read_obj(at.unchecked_add(4)).unwrap(),
                )
            })
            .collect()
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Activates `net` with `features` acked, as the transport does.
fn activate(
    net: &mut Net,
    mem: &GuestMemoryMmap,
    rx: &Driver<'_>,
    tx: &Driver<'_>,
    features: u64,
) -> Arc<Irq> {
    let irq = Arc::new(Irq::default());
    net.set_acked_features(features);
    net.activate(
        mem.clone(),
        vec![
            rx.mock.create_queue().unwrap(),
            tx.mock.create_queue().unwrap(),
        ],
        irq.clone(),
    )
    .unwrap();
    net.sync_offload();
    irq
}

/// An active device on fresh rings, its host side and its interrupt.
fn active(mem: &GuestMemoryMmap, features: u64) -> (Net, Host, Driver<'_>, Driver<'_>, Arc<Irq>) {
    let (mut net, host) = device();
    let (rx, tx) = (Driver::new(mem, RX_RING), Driver::new(mem, TX_RING));
    let irq = activate(&mut net, mem, &rx, &tx, features);
    (net, host, rx, tx, irq)
}

/// A frame: a vnet header (flags and num_buffers zero) and `len` bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

type Loop = EventManager<Arc<Mutex<Net>>>;

/// The device in an event loop of its own.
fn in_loop(net: Net) -> (Arc<Mutex<Net>>, Loop) {
    let net = Arc::new(Mutex::new(net));
    let mut events = Loop::new().unwrap();
    events.add_subscriber(net.clone());
    (net, events)
}

/// Runs the loop until nothing is ready; panics if that never happens (an
/// fd stays ready and nobody serves it).
fn quiet(events: &mut Loop) {
    for _ in 0..20 {
        if events.run_with_timeout(0).unwrap() == 0 {
            return;
        }
    }
    panic!("the event loop keeps waking up");
}

const MERGEABLE: u64 = VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF);

#[test]
fn a_tx_frame_reaches_the_back_end() {
    let mem = mem();
    let (mut net, host, _rx, mut tx, irq) = active(&mem, VIRTIO_F_VERSION_1);
    let f = frame(60, 1);
    mem.write_slice(&f, GuestAddress(DATA)).unwrap();
    // Header and frame in separate descriptors, as Linux sends them.
    tx.chain(&mem, &[(DATA, 12, 0), (DATA + 12, 60, 0)]);
    net.run();
    assert_eq!(host.recv().unwrap(), f);
    assert_eq!(tx.used(&mem), vec![(0, 0)]);
    assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    let stats = net.stats();
    assert_eq!(
        (stats.tx_frames, stats.tx_bytes, stats.tx_dropped),
        (1, 60, 0)
    );
}

#[test]
fn bad_tx_chains_are_dropped_and_returned() {
    let mem = mem();
    let (mut net, host, _rx, mut tx, _irq) = active(&mem, VIRTIO_F_VERSION_1);
    // Longer than a frame may be.
    tx.chain(&mem, &[(DATA, MAX_BUFFER_LEN as u32 + 1, 0)]);
    // Shorter than the headers.
    tx.chain(&mem, &[(DATA, 20, 0)]);
    // A device-writable descriptor in a tx chain.
    tx.chain(&mem, &[(DATA, 12, 0), (DATA + 12, 60, F_WRITE)]);
    // Outside guest memory.
    tx.chain(&mem, &[(MEM_SIZE as u64 - 8, 64, 0)]);
    // A loop: descriptor 7 points at itself.
    tx.write_desc(&mem, 7, DATA, 64, F_NEXT, 7);
    tx.publish(&mem, 7);
    // A head outside the queue.
    tx.publish(&mem, 300);
    // And a good frame after all that.
    let f = frame(100, 2);
    mem.write_slice(&f, GuestAddress(DATA)).unwrap();
    let good = tx.chain(&mem, &[(DATA, f.len() as u32, 0)]);
    net.run();
    assert_eq!(host.recv().unwrap(), f, "only the good frame goes out");
    assert!(host.recv().is_none());
    let used = tx.used(&mem);
    // Every chain but the out-of-range head comes back, empty.
    assert_eq!(used.len(), 6, "{used:?}");
    assert!(used.iter().all(|(_, len)| *len == 0));
    assert_eq!(used.last(), Some(&(u32::from(good), 0)));
    let stats = net.stats();
    assert_eq!((stats.tx_frames, stats.tx_dropped), (1, 6));
}

#[test]
fn a_full_back_end_keeps_the_frame_and_waits_for_epollout() {
    let mem = mem();
    let (mut net, host, _rx, mut tx, _irq) = active(&mem, VIRTIO_F_VERSION_1);
    let (a, b) = (frame(50, 3), frame(70, 4));
    mem.write_slice(&a, GuestAddress(DATA)).unwrap();
    mem.write_slice(&b, GuestAddress(DATA + 0x1000)).unwrap();
    tx.chain(&mem, &[(DATA, a.len() as u32, 0)]);
    tx.chain(&mem, &[(DATA + 0x1000, b.len() as u32, 0)]);
    host.full.store(true, Ordering::SeqCst);
    net.run();
    // The first chain was copied and returned; the second waits.
    assert_eq!(tx.used(&mem).len(), 1);
    assert!(net.path.tx_pending);
    assert!(net.wanted_interest().contains(EventSet::OUT));
    assert!(host.recv().is_none());
    host.full.store(false, Ordering::SeqCst);
    net.run();
    assert_eq!(host.recv().unwrap(), a);
    assert_eq!(host.recv().unwrap(), b);
    assert_eq!(tx.used(&mem).len(), 2);
    assert!(!net.wanted_interest().contains(EventSet::OUT));
    assert_eq!(net.stats().tx_dropped, 0);
}

#[test]
fn a_received_frame_spans_mergeable_buffers() {
    let mem = mem();
    let (mut net, host, mut rx, _tx, irq) = active(&mem, MERGEABLE);
    for i in 0..3 {
        rx.chain(&mem, &[(DATA + 0x1000 * i, 1000, F_WRITE)]);
    }
    let f = frame(2500 - VNET_HDR_LEN, 5);
    host.send(&f);
    net.run();
    let used = rx.used(&mem);
    assert_eq!(used, vec![(0, 1000), (1, 1000), (2, 500)]);
    let mut got = read(&mem, DATA, 1000);
    got.extend(read(&mem, DATA + 0x1000, 1000));
    got.extend(read(&mem, DATA + 0x2000, 500));
    let mut want = f.clone();
    want[10..12].copy_from_slice(&3u16.to_le_bytes());
    assert_eq!(got, want, "the header says num_buffers = 3");
    assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    let stats = net.stats();
    assert_eq!((stats.rx_frames, stats.rx_bytes), (1, 2500 - 12));
}

#[test]
fn without_mergeable_buffers_a_frame_takes_one_chain() {
    let mem = mem();
    let (mut net, host, mut rx, _tx, _irq) = active(&mem, VIRTIO_F_VERSION_1);
    // A chain of two descriptors holding 1526 bytes (what Linux posts).
    rx.chain(&mem, &[(DATA, 12, F_WRITE), (DATA + 0x100, 1514, F_WRITE)]);
    let big = frame(3000, 6);
    let small = frame(1000, 7);
    host.send(&big);
    host.send(&small);
    net.run();
    // The big one cannot fit any chain: dropped, the chain kept for the
    // small one.
    assert_eq!(rx.used(&mem), vec![(0, 1012)]);
    let mut got = read(&mem, DATA, 12);
    got.extend(read(&mem, DATA + 0x100, 1000));
    let mut want = small;
    want[10..12].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(got, want);
    let stats = net.stats();
    assert_eq!((stats.rx_frames, stats.rx_dropped), (1, 1));
}

#[test]
fn malformed_rx_chains_come_back_empty() {
    let mem = mem();
    let (mut net, host, mut rx, _tx, _irq) = active(&mem, MERGEABLE);
    rx.chain(&mem, &[(DATA, 1000, F_WRITE)]);
    rx.chain(&mem, &[(DATA + 0x1000, 1000, 0)]); // device-readable
    rx.chain(&mem, &[(DATA + 0x2000, 8, F_WRITE)]); // shorter than a header
    rx.chain(&mem, &[(DATA + 0x3000, 2000, F_WRITE)]);
    host.send(&frame(1500, 8));
    net.run();
    // The first good chain went back with the bad one, the frame went to
    // the last chain whole.
    assert_eq!(rx.used(&mem), vec![(0, 0), (1, 0), (2, 0), (3, 1512)]);
    let stats = net.stats();
    assert_eq!((stats.rx_frames, stats.rx_bad_chains), (1, 2));
}

#[test]
fn a_frame_larger_than_the_whole_ring_is_dropped() {
    let mem = mem();
    let (mut net, host, mut rx, _tx, _irq) = active(&mem, MERGEABLE);
    for i in 0..u64::from(SIZE) {
        rx.chain(&mem, &[(DATA + 0x100 * i, 64, F_WRITE)]);
    }
    host.send(&frame(4000, 9));
    host.send(&frame(100, 10));
    net.run();
    assert_eq!(rx.used(&mem), vec![(0, 64), (1, 48)]);
    assert_eq!(net.stats().rx_dropped, 1);
}

#[test]
fn no_rx_buffers_means_no_spinning_and_a_notify_resumes() {
    let mem = mem();
    let (net, host) = device();
    let (mut rx, tx) = (Driver::new(&mem, RX_RING), Driver::new(&mem, TX_RING));
    let kick = net.queue_events()[RXQ].try_clone().unwrap();
    let (net, mut events) = in_loop(net);
    activate(&mut net.lock().unwrap(), &mem, &rx, &tx, MERGEABLE);
    quiet(&mut events);
    for seed in 0..3 {
        host.send(&frame(500, seed));
    }
    // One frame is read and kept; the tap is out of the poll set.
    quiet(&mut events);
    assert!(net.lock().unwrap().path.rx_waiting);
    assert_eq!(net.lock().unwrap().path.rx_len, 512);
    assert!(rx.used(&mem).is_empty());
    // The guest posts buffers and notifies: all three frames arrive.
    for i in 0..4 {
        rx.chain(&mem, &[(DATA + 0x1000 * i, 2048, F_WRITE)]);
    }
    kick.write(1).unwrap();
    quiet(&mut events);
    assert_eq!(rx.used(&mem).len(), 3);
    assert_eq!(net.lock().unwrap().stats().rx_frames, 3);
    assert!(!net.lock().unwrap().path.rx_waiting);
}

#[test]
fn the_tap_offloads_follow_the_negotiated_features() {
    assert_eq!(
        offload_flags(OFFERED_FEATURES & !bit(VIRTIO_NET_F_GUEST_CSUM)),
        0
    );
    assert_eq!(
        offload_flags(OFFERED_FEATURES),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
    assert_eq!(
        offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO6)),
        libc::TUN_F_CSUM | libc::TUN_F_TSO6
    );

    let mem = mem();
    let (net, host) = device();
    let (rx, tx) = (Driver::new(&mem, RX_RING), Driver::new(&mem, TX_RING));
    let (net, mut events) = in_loop(net);
    // Registering the device clears the offloads.
    assert_eq!(*host.offloads.lock().unwrap(), vec![0]);
    let acked = VIRTIO_F_VERSION_1
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | (1 << 40); // not offered: masked out
    {
        let mut net = net.lock().unwrap();
        net.set_acked_features(acked);
        assert_eq!(net.acked_features(), acked & !(1 << 40));
        net.activate(
            mem.clone(),
            vec![
                rx.mock.create_queue().unwrap(),
                tx.mock.create_queue().unwrap(),
            ],
            Arc::new(Irq::default()),
        )
        .unwrap();
    }
    quiet(&mut events);
    assert_eq!(
        *host.offloads.lock().unwrap(),
        vec![0, libc::TUN_F_CSUM | libc::TUN_F_TSO4]
    );
    assert!(net.lock().unwrap().reset());
    quiet(&mut events);
    assert_eq!(host.offloads.lock().unwrap().last(), Some(&0));
}

#[test]
fn a_device_without_offloads_offers_none_and_never_sets_them() {
    let mem = mem();
    let (net, host) = device();
    let net = net.without_offloads();
    assert_eq!(net.avail_features(), NO_OFFLOAD_FEATURES);
    for feature in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
    ] {
        assert_eq!(net.avail_features() & bit(feature), 0, "feature {feature}");
    }
    assert_ne!(net.avail_features() & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
    let (rx, tx) = (Driver::new(&mem, RX_RING), Driver::new(&mem, TX_RING));
    let (net, mut events) = in_loop(net);
    // A driver acking what it was not offered gets none of it.
    activate(&mut net.lock().unwrap(), &mem, &rx, &tx, OFFERED_FEATURES);
    assert_eq!(net.lock().unwrap().acked_features(), NO_OFFLOAD_FEATURES);
    quiet(&mut events);
    assert!(
        host.offloads.lock().unwrap().iter().all(|&f| f == 0),
        "{:?}",
        host.offloads.lock().unwrap()
    );
}

#[test]
fn the_config_space_is_the_mac() {
    let (net, _host) = device();
    let mut mac = [0u8; 6];
    net.read_config(0, &mut mac);
    assert_eq!(mac, MAC.0);
    let mut past = [0xffu8; 4];
    net.read_config(6, &mut past);
    assert_eq!(past, [0; 4]);
    assert_eq!(net.device_type(), device_type::NET);
    assert_eq!(
        net.avail_features() & VIRTIO_F_VERSION_1,
        VIRTIO_F_VERSION_1
    );
    assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
}

#[test]
fn a_closed_back_end_is_dropped_from_the_loop_and_tx_keeps_moving() {
    let mem = mem();
    let (net, host) = device();
    let (rx, mut tx) = (Driver::new(&mem, RX_RING), Driver::new(&mem, TX_RING));
    let kick = net.queue_events()[TXQ].try_clone().unwrap();
    let (net, mut events) = in_loop(net);
    activate(&mut net.lock().unwrap(), &mem, &rx, &tx, VIRTIO_F_VERSION_1);
    quiet(&mut events);
    drop(host);
    quiet(&mut events);
    assert!(net.lock().unwrap().path.broken);
    let f = frame(60, 11);
    mem.write_slice(&f, GuestAddress(DATA)).unwrap();
    tx.chain(&mem, &[(DATA, f.len() as u32, 0)]);
    kick.write(1).unwrap();
    quiet(&mut events);
    assert_eq!(tx.used(&mem).len(), 1);
    assert_eq!(net.lock().unwrap().stats().tx_dropped, 1);
}
