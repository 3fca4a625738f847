//! Fuzzing entry points: each takes arbitrary bytes, drives one piece of
//! the VMM that parses guest or host input, and panics only when it finds
//! a bug. The cargo-fuzz targets in `fuzz/` are one-line calls of these;
//! the tests below replay the committed corpora (`fuzz/corpus/<target>/`)
//! on stable Rust, so `make unit-test` catches regressions.
//!
//! Apart from [`vsock_chains`] (which calls the vsock packet parsers
//! directly), only public interfaces are used: the virtio-mmio transport
//! as a bus device, the devices' `VirtioDevice` and event-loop sides, the
//! parsers.
//!
//! - [`vsock_chains`]: the avail ring, descriptor chains and packets of
//!   one queue, from guest memory that is the input, walked and parsed
//!   as tx packets and as rx buffers (written back to).
//! - [`vsock_device`]: a vsock device activated through its MMIO
//!   registers, with tx and rx rings (descriptors, avail ring, buffers)
//!   taken from the input; optionally host sockets on both sides of the
//!   hybrid vsock, a reset and a second activation. Checks the used rings.
//! - [`net_device`]: a virtio-net device activated through its MMIO
//!   registers with features from the input, tx and rx rings from the
//!   input, and frames from the input arriving on its back end (a
//!   seqpacket socket standing in for the tap); optionally a reset and a
//!   second activation, or the back end hanging up. Checks the used rings
//!   and the frames that reach the back end.
//! - [`balloon_device`]: a virtio-balloon device activated through its
//!   MMIO registers, with or without free page reporting, its three rings
//!   from the input (the reporting queue's buffers are ranges the host
//!   then gives back); optionally a reset and a second activation. Checks
//!   the used rings.
//! - [`fs_device`]: the virtio-fs relay (the device's data path without
//!   its vhost-user socket): a request queue whose ring is the input's,
//!   and a back end, also the input's, answering the shadow ring in the
//!   bounce memory with real, bogus or out-of-range used ids and lengths,
//!   or breaking its used index; optionally a reset and a second round.
//!   Checks the guest's used ring and the relay's bounds.
//! - [`mmio_sequence`]: register reads and writes of any size and offset,
//!   queue notifies, on virtio-rng or vsock, guest memory from the input.
//! - [`connect_line`]: the hybrid vsock `CONNECT <port>` line parser.
//! - [`api_request`]: a control API request line.
//!
//! After every step the event loop must go quiet: a readable fd that
//! nobody drains (the spinning loop of a stale queue eventfd) is a panic.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::{parse_request, Request, MAX_REQUEST};
use crate::devices::bus::BusDevice;
use crate::devices::virtio::balloon::{Balloon, F_PAGE_REPORTING};
use crate::devices::virtio::fs::bounce::{QueueSizing, LARGE_SLOT};
use crate::devices::virtio::fs::relay::Relay;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::config::MacAddr;
use crate::devices::virtio::net::frame::{MAX_BUFFER_LEN, MIN_TX_LEN};
use crate::devices::virtio::net::tap::{seqpacket_pair, Backend};
use crate::devices::virtio::net::{Net, OFFERED_FEATURES};
use crate::devices::virtio::queue::{add_used, next_chain, Next};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::packet::{read_tx_packet, Header, RxBuffer};
use crate::devices::virtio::vsock::{parse_connect_line, Vsock};
use crate::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

type Loop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

// virtio-mmio registers and status bits (virtio 1.2, 4.2.2).
const REG_STATUS: u64 = 0x70;
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

const GUEST_CID: u64 = 3;
/// The guest port a host socket listens on when the input asks for one.
const HOST_PORT: u32 = 1024;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
/// A vsock packet header's size.
const HDR_SIZE: u32 = 44;

/// Reads the input front to back; past its end every read gives zeroes.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let src = self.bytes(N);
        if let Some(dst) = out.get_mut(..src.len()) {
            dst.copy_from_slice(src);
        }
        out
    }
    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.0.len())
    }
}

/// A fresh path for a vsock device's Unix socket, in a directory of this
/// process (calls may run in parallel, as the tests do).
fn socket_path() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("isola-fuzz-{}", std::process::id()));
        // A failure shows up as Vsock::new failing.
        let _ = std::fs::create_dir_all(&dir);
        dir
    });
    dir.join(format!("v{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)))
}

fn write_reg(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// Where one split queue lives in guest memory.
#[derive(Clone, Copy)]
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl Ring {
    /// A queue of `size` entries at `base` (room for 256 entries: 8 KiB).
    fn at(base: u64, size: u16) -> Ring {
        Ring {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x1400,
        }
    }
}

/// What a Linux driver does: ACKNOWLEDGE, DRIVER, the `features` (which
/// must include VERSION_1), FEATURES_OK, each queue's size, rings and
/// ready bit, DRIVER_OK.
fn driver_init(t: &mut MmioTransport, rings: &[Ring], features: u64) {
    write_reg(t, REG_STATUS, ACKNOWLEDGE);
    write_reg(t, REG_STATUS, ACKNOWLEDGE | DRIVER);
    for sel in 0..2u32 {
        write_reg(t, 0x24, sel);
        write_reg(t, 0x20, (features >> (32 * sel)) as u32);
    }
    write_reg(t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    for (i, ring) in rings.iter().enumerate() {
        write_reg(t, 0x30, i as u32);
        write_reg(t, 0x38, u32::from(ring.size));
        for (reg, addr) in [(0x80, ring.desc), (0x90, ring.avail), (0xa0, ring.used)] {
            write_reg(t, reg, addr as u32);
            write_reg(t, reg + 4, (addr >> 32) as u32);
        }
        write_reg(t, 0x44, 1);
    }
    write_reg(
        t,
        REG_STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
}

/// Runs the event loop until no event is ready. Panics if that never
/// happens: an fd stays readable without being served.
fn run_until_quiet(events: &mut Loop) {
    for _ in 0..1000 {
        match events.run_with_timeout(0) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    panic!("the event loop never goes quiet: an fd stays ready and nobody drains it");
}

/// A device with its transport, its event loop and the driver's side of
/// its queue eventfds.
struct Rig {
    transport: MmioTransport,
    events: Loop,
    kicks: Vec<EventFd>,
}

impl Rig {
    fn new<D>(device: D, mem: &GuestMemoryMmap) -> Option<Rig>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let kicks = device
            .queue_events()
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .ok()?;
        let device = Arc::new(Mutex::new(device));
        let mut events = Loop::new().ok()?;
        events.add_subscriber(device.clone());
        let irqfd = EventFd::new(EFD_NONBLOCK).ok()?;
        let transport = MmioTransport::new(device, mem.clone(), irqfd).ok()?;
        Some(Rig {
            transport,
            events,
            kicks,
        })
    }

    /// QueueNotify for queue `i` (what the ioeventfd does), then the loop.
    fn notify(&mut self, i: usize) {
        if let Some(kick) = self.kicks.get(i) {
            let _ = kick.write(1);
        }
        run_until_quiet(&mut self.events);
    }
}

// ---------------------------------------------------------------------
// vsock: descriptor chains and packets, parsed directly.

/// Guest memory of the fuzzed devices.
const CHAINS_MEM: usize = 64 << 10;
/// Queue layout inside it (16 entries).
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;

/// Guest memory holding `data` from address 0.
fn memory(data: &[u8]) -> Option<GuestMemoryMmap> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), CHAINS_MEM)]).ok()?;
    let n = data.len().min(CHAINS_MEM);
    mem.write_slice(data.get(..n)?, GuestAddress(0)).ok()?;
    Some(mem)
}

/// A ready 16-entry queue whose rings (and so every descriptor, avail
/// index and head) come from the fuzz input.
fn queue() -> Option<Queue> {
    let mut q = Queue::new(QUEUE_SIZE).ok()?;
    q.try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .ok()?;
    q.try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .ok()?;
    q.try_set_used_ring_address(GuestAddress(USED_RING)).ok()?;
    q.set_ready(true);
    Some(q)
}

/// A driver's ring, descriptors and buffers as `data` lays them out: the
/// chains are walked and parsed both as vsock tx packets and as rx
/// buffers.
pub fn vsock_chains(data: &[u8]) {
    let (Some(mem), Some(mut q)) = (memory(data), queue()) else {
        return;
    };
    let mut descs = Vec::new();
    let mut payload = Vec::new();
    // More rounds than the ring holds: the avail index is the input's.
    for _ in 0..64 {
        match next_chain(&mut q, &mem, &mut descs) {
            Ok(Next::Chain { head, result }) => {
                if result.is_ok() {
                    let _ = read_tx_packet(&mem, &descs, &mut payload);
                    if let Ok(buf) = RxBuffer::new(&mem, &descs) {
                        // Write back what was read, as much as fits.
                        let n = payload.len().min(buf.payload_capacity());
                        let hdr = Header::from_bytes(&[0x5a; 44]);
                        if let Ok(len) = buf.write(&mem, &hdr, payload.get(..n).unwrap_or_default())
                        {
                            assert_eq!(
                                len as usize,
                                44 + n,
                                "an rx buffer reported the wrong length"
                            );
                        }
                    }
                }
                let _ = add_used(&mut q, &mem, head, 0);
            }
            Ok(Next::Empty) | Err(_) => break,
        }
    }
}

// ---------------------------------------------------------------------
// vsock: the whole device, driven through its registers, rings and
// sockets.

/// Guest memory of the vsock target: three queues, then the buffers.
const VSOCK_MEM: usize = 0x4_0000;
const VSOCK_DATA: u64 = 0x8000;
const RXQ: usize = 0;
const TXQ: usize = 1;

/// The input's view of one queue: descriptors, the avail index and the
/// heads on the avail ring.
struct RingInput<'a> {
    descs: &'a [u8],
    avail_idx: u16,
    heads: &'a [u8],
}

impl<'a> RingInput<'a> {
    fn read(input: &mut Input<'a>) -> Self {
        let n = usize::from(input.u8());
        let descs = input.bytes(16 * n);
        let avail_idx = input.u16();
        let n = usize::from(input.u8());
        let heads = input.bytes(2 * n);
        RingInput {
            descs,
            avail_idx,
            heads,
        }
    }

    /// Writes the descriptor table and the avail ring (index 0: nothing
    /// published yet).
    fn write(&self, mem: &GuestMemoryMmap, ring: Ring) {
        let size = usize::from(ring.size);
        let descs = self.descs.get(..16 * size).unwrap_or(self.descs);
        let _ = mem.write_slice(descs, GuestAddress(ring.desc));
        let heads = self.heads.get(..2 * size).unwrap_or(self.heads);
        let _ = mem.write_slice(heads, GuestAddress(ring.avail + 4));
        let _ = mem.write_obj(0u16, GuestAddress(ring.avail + 2));
    }

    fn publish(&self, mem: &GuestMemoryMmap, ring: Ring) {
        let _ = mem.write_obj(self.avail_idx, GuestAddress(ring.avail + 2));
    }
}

/// A queue's descriptor table as (addr, len, flags, next), or None when a
/// descriptor could let the device write to the rings (the table may then
/// have changed under the device: nothing to check against).
fn descriptor_table(mem: &GuestMemoryMmap, ring: Ring) -> Option<Vec<(u64, u32, u16, u16)>> {
    let mut table = Vec::with_capacity(usize::from(ring.size));
    for i in 0..u64::from(ring.size) {
        let raw: [u8; 16] = mem.read_obj(GuestAddress(ring.desc + 16 * i)).ok()?;
        let mut input = Input(&raw);
        let addr = u64::from_le_bytes(input.array());
        let desc = (addr, input.u32(), input.u16(), input.u16());
        if desc.1 > 0 && addr < VSOCK_DATA {
            return None;
        }
        table.push(desc);
    }
    Some(table)
}

/// Device-writable bytes of the chain at `head`.
fn rx_capacity(table: &[(u64, u32, u16, u16)], head: u16) -> u64 {
    let (mut index, mut total) = (head, 0u64);
    for _ in 0..table.len() {
        let Some(&(_, len, flags, next)) = table.get(usize::from(index)) else {
            break;
        };
        if flags & VRING_DESC_F_WRITE != 0 {
            total += u64::from(len);
        }
        if flags & VRING_DESC_F_NEXT == 0 {
            break;
        }
        index = next;
    }
    total
}

/// The (id, len) entries of a queue's used ring, as far as its index and
/// the queue's size go.
fn used_entries(mem: &GuestMemoryMmap, ring: Ring) -> Vec<(u32, u32)> {
    let Ok(idx) = mem.read_obj::<u16>(GuestAddress(ring.used + 2)) else {
        return Vec::new();
    };
    (0..idx.min(ring.size))
        .filter_map(|i| {
            let at = ring.used + 4 + 8 * u64::from(i);
            Some((
                mem.read_obj::<u32>(GuestAddress(at)).ok()?,
                mem.read_obj::<u32>(GuestAddress(at + 4)).ok()?,
            ))
        })
        .collect()
}

/// Checks what the device put in the rx and tx used rings: ids inside the
/// queue, nothing written into tx buffers, rx lengths within their chains
/// (and, if not zero, at least `min_rx`).
fn check_used(mem: &GuestMemoryMmap, rx: Ring, tx: Ring, min_rx: u32) {
    let rx_table = descriptor_table(mem, rx);
    for (q, ring) in [(RXQ, rx), (TXQ, tx)] {
        for (id, len) in used_entries(mem, ring) {
            assert!(
                id < u32::from(ring.size),
                "queue {q}: used id {id} outside the queue"
            );
            if q == TXQ {
                assert_eq!(len, 0, "tx buffer {id} returned with {len} bytes written");
                continue;
            }
            assert!(
                len == 0 || len >= min_rx,
                "rx buffer {id}: {len} bytes written, less than a header"
            );
            if let Some(table) = &rx_table {
                let capacity = rx_capacity(table, id as u16);
                assert!(
                    u64::from(len) <= capacity,
                    "rx buffer {id}: {len} bytes written into {capacity} bytes"
                );
            }
        }
    }
}

/// Input flags of [`vsock_device`].
const F_HOST_LISTENS: u8 = 1;
const F_HOST_CONNECTS: u8 = 2;
const F_HOST_TALKS: u8 = 4;
const F_RESET: u8 = 8;
const F_HOST_HANGS_UP: u8 = 16;

/// Writes `data` to every stream (non-blocking), reads what is there.
fn host_io(streams: &mut [UnixStream], data: &[u8]) {
    let mut buf = [0u8; 4096];
    for s in streams {
        if !data.is_empty() {
            let _ = s.write(data);
        }
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// A vsock device driven like a guest driver would, from the input:
///
/// ```text
/// flags: u8            F_HOST_LISTENS (a socket at <uds>_1024),
///                      F_HOST_CONNECTS (a host process sends a line),
///                      F_HOST_TALKS (host sockets send data),
///                      F_RESET (reset, then a second activation),
///                      F_HOST_HANGS_UP (host sockets close at the end)
/// sizes: u8            log2 of the rx (high nibble) and tx queue sizes
/// tx, rx: ndesc u8, ndesc x 16-byte descriptors, avail_idx u16,
///         nheads u8, nheads x u16
/// host line: len u8, bytes; host data: len u8, bytes
/// rest                 guest memory from 0x8000 on (the buffers)
/// ```
///
/// The device is activated with nothing published; the host connects;
/// the rx ring, then the tx ring are published and notified; host
/// sockets talk and read; the used rings are checked.
pub fn vsock_device(data: &[u8]) {
    let mut input = Input(data);
    let flags = input.u8();
    let sizes = input.u8();
    let size = |log2: u8| 1u16 << log2.min(8);
    let rings = [
        Ring::at(0, size(sizes >> 4)),
        Ring::at(0x2000, size(sizes & 0xf)),
        Ring::at(0x4000, 16),
    ];
    let tx = RingInput::read(&mut input);
    let rx = RingInput::read(&mut input);
    let n = input.u8();
    let host_line = input.bytes(usize::from(n));
    let n = input.u8();
    let host_data = input.bytes(usize::from(n));

    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), VSOCK_MEM)]) else {
        return;
    };
    let _ = mem.write_slice(input.rest(), GuestAddress(VSOCK_DATA));
    tx.write(&mem, rings[TXQ]);
    rx.write(&mem, rings[RXQ]);

    let uds = socket_path();
    let mut port_path = uds.clone().into_os_string();
    port_path.push(format!("_{HOST_PORT}"));
    let guest_listener = if flags & F_HOST_LISTENS != 0 {
        UnixListener::bind(&port_path).ok()
    } else {
        None
    };
    if let Some(l) = &guest_listener {
        let _ = l.set_nonblocking(true);
    }
    let Ok(vsock) = Vsock::new(GUEST_CID, uds.clone()) else {
        return;
    };
    let Some(mut rig) = Rig::new(vsock, &mem) else {
        return;
    };
    driver_init(&mut rig.transport, &rings, VIRTIO_F_VERSION_1);
    run_until_quiet(&mut rig.events);

    let mut streams = Vec::new();
    if flags & F_HOST_CONNECTS != 0 {
        if let Ok(mut s) = UnixStream::connect(&uds) {
            let _ = s.write_all(host_line);
            let _ = s.set_nonblocking(true);
            streams.push(s);
        }
        run_until_quiet(&mut rig.events);
    }
    rx.publish(&mem, rings[RXQ]);
    rig.notify(RXQ);
    tx.publish(&mem, rings[TXQ]);
    rig.notify(TXQ);

    if let Some(l) = &guest_listener {
        while let Ok((s, _)) = l.accept() {
            let _ = s.set_nonblocking(true);
            streams.push(s);
        }
    }
    if flags & F_HOST_TALKS != 0 {
        host_io(&mut streams, host_data);
        run_until_quiet(&mut rig.events);
        host_io(&mut streams, &[]);
        run_until_quiet(&mut rig.events);
    }
    check_used(&mem, rings[RXQ], rings[TXQ], HDR_SIZE);
    if flags & F_HOST_HANGS_UP != 0 {
        streams.clear();
        run_until_quiet(&mut rig.events);
    }
    if flags & F_RESET != 0 {
        // The device sees the same rings again, from position 0.
        write_reg(&mut rig.transport, REG_STATUS, 0);
        run_until_quiet(&mut rig.events);
        let _ = mem.write_obj(0u16, GuestAddress(rings[RXQ].used + 2));
        let _ = mem.write_obj(0u16, GuestAddress(rings[TXQ].used + 2));
        driver_init(&mut rig.transport, &rings, VIRTIO_F_VERSION_1);
        run_until_quiet(&mut rig.events);
        check_used(&mem, rings[RXQ], rings[TXQ], HDR_SIZE);
    }
    drop(rig);
    drop(guest_listener);
    let _ = std::fs::remove_file(&port_path);
}

// ---------------------------------------------------------------------
// virtio-net: the whole device, driven through its registers, rings and
// a socket in the tap's place.

/// The tap's stand-in: one end of a seqpacket pair.
#[derive(Debug)]
struct SocketTap(std::fs::File);

impl std::os::fd::AsRawFd for SocketTap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl Backend for SocketTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.0.write(frame)
    }
    fn set_offload(&mut self, _flags: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// Input flags of [`net_device`].
const F_NET_HANGS_UP: u8 = 4;

/// A virtio-net device driven like a guest driver would, from the input:
///
/// ```text
/// flags: u8            bits 0-1 and 4-7: the offered features the
///                      driver takes (see below), F_RESET (8): reset,
///                      then a second activation, F_NET_HANGS_UP (4):
///                      the back end closes at the end
/// sizes: u8            log2 of the rx (high nibble) and tx queue sizes
/// tx, rx: ndesc u8, ndesc x 16-byte descriptors, avail_idx u16,
///         nheads u8, nheads x u16
/// frames: n u8, n x (len u16, len bytes) sent by the host
/// rest                 guest memory from 0x8000 on (the buffers)
/// ```
///
/// Features: bit 0 of flags takes every offered feature, bit 1
/// MRG_RXBUF alone, both bits a device without offloads whose driver
/// acks every feature the default device offers; the rest pick them bit
/// by bit from the flags byte.
pub fn net_device(data: &[u8]) {
    let mut input = Input(data);
    let flags = input.u8();
    let sizes = input.u8();
    let size = |log2: u8| 1u16 << log2.min(8);
    let rx_ring = Ring::at(0, size(sizes >> 4));
    let tx_ring = Ring::at(0x2000, size(sizes & 0xf));
    let tx = RingInput::read(&mut input);
    let rx = RingInput::read(&mut input);
    let nframes = input.u8();
    let frames: Vec<&[u8]> = (0..nframes)
        .map(|_| {
            let len = usize::from(input.u16());
            input.bytes(len)
        })
        .collect();
    let features = VIRTIO_F_VERSION_1
        | match flags & 3 {
            1 | 3 => OFFERED_FEATURES,
            2 => 1 << 15, // VIRTIO_NET_F_MRG_RXBUF
            _ => OFFERED_FEATURES & u64::from(flags & 0xf0) << 8,
        };

    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), VSOCK_MEM)]) else {
        return;
    };
    let _ = mem.write_slice(input.rest(), GuestAddress(VSOCK_DATA));
    tx.write(&mem, tx_ring);
    rx.write(&mem, rx_ring);
    let Ok((ours, host)) = seqpacket_pair() else {
        return;
    };
    let mac = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
    let Ok(mut net) = Net::with_backend("fuzz".into(), mac, Box::new(SocketTap(ours))) else {
        return;
    };
    if flags & 3 == 3 {
        net = net.without_offloads();
    }
    let Some(mut rig) = Rig::new(net, &mem) else {
        return;
    };
    let mut host = Some(host);
    let round = |rig: &mut Rig, host: &mut Option<std::fs::File>| {
        driver_init(&mut rig.transport, &[rx_ring, tx_ring], features);
        run_until_quiet(&mut rig.events);
        if let Some(h) = host {
            for frame in &frames {
                let _ = h.write(frame);
            }
        }
        rx.publish(&mem, rx_ring);
        rig.notify(RXQ);
        tx.publish(&mem, tx_ring);
        rig.notify(TXQ);
        check_used(&mem, rx_ring, tx_ring, 0);
        let mut buf = vec![0u8; MAX_BUFFER_LEN + 1];
        while let Some(Ok(n)) = host.as_mut().map(|h| h.read(&mut buf)) {
            if n == 0 {
                break;
            }
            assert!(
                (MIN_TX_LEN..=MAX_BUFFER_LEN).contains(&n),
                "a {n}-byte frame reached the back end"
            );
        }
    };
    round(&mut rig, &mut host);
    if flags & F_NET_HANGS_UP != 0 {
        host = None;
        run_until_quiet(&mut rig.events);
    }
    if flags & F_RESET != 0 {
        write_reg(&mut rig.transport, REG_STATUS, 0);
        run_until_quiet(&mut rig.events);
        let _ = mem.write_obj(0u16, GuestAddress(rx_ring.used + 2));
        let _ = mem.write_obj(0u16, GuestAddress(tx_ring.used + 2));
        round(&mut rig, &mut host);
    }
}

/// A virtio-balloon device driven like a guest driver would, from the
/// input:
///
/// ```text
/// flags: u8            bit 0: the driver takes PAGE_REPORTING,
///                      F_RESET (8): reset, then a second activation
/// sizes: u8            log2 of the queues' sizes
/// inflate, deflate, reporting: ndesc u8, ndesc x 16-byte descriptors,
///         avail_idx u16, nheads u8, nheads x u16
/// rest                 guest memory from 0x8000 on
/// ```
///
/// Reported ranges are given back (guest memory zeroed): the rings may
/// be among them, which is the guest's own loss. Every used entry must
/// name a descriptor of its queue and say 0 bytes written.
pub fn balloon_device(data: &[u8]) {
    let mut input = Input(data);
    let flags = input.u8();
    let size = 1u16 << (input.u8() & 0xf).min(7);
    let rings = [
        Ring::at(0, size),
        Ring::at(0x2000, size),
        Ring::at(0x4000, size),
    ];
    let queues = [
        RingInput::read(&mut input),
        RingInput::read(&mut input),
        RingInput::read(&mut input),
    ];
    let features = VIRTIO_F_VERSION_1 | if flags & 1 != 0 { F_PAGE_REPORTING } else { 0 };
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), VSOCK_MEM)]) else {
        return;
    };
    let _ = mem.write_slice(input.rest(), GuestAddress(VSOCK_DATA));
    for (queue, ring) in queues.iter().zip(rings) {
        queue.write(&mem, ring);
    }
    let Ok(balloon) = Balloon::new() else {
        return;
    };
    let Some(mut rig) = Rig::new(balloon, &mem) else {
        return;
    };
    let round = |rig: &mut Rig| {
        driver_init(&mut rig.transport, &rings, features);
        run_until_quiet(&mut rig.events);
        for (i, (queue, ring)) in queues.iter().zip(rings).enumerate() {
            queue.publish(&mem, ring);
            rig.notify(i);
        }
        for (q, ring) in rings.iter().enumerate() {
            // A reported range over the used ring zeroes it: 0 is a valid
            // id with 0 bytes.
            for (id, len) in used_entries(&mem, *ring) {
                assert!(
                    id < u32::from(ring.size),
                    "queue {q}: used id {id} outside the queue"
                );
                assert_eq!(len, 0, "queue {q}: buffer {id} returned with {len} bytes");
            }
        }
    };
    round(&mut rig);
    if flags & F_RESET != 0 {
        write_reg(&mut rig.transport, REG_STATUS, 0);
        run_until_quiet(&mut rig.events);
        for ring in rings {
            let _ = mem.write_obj(0u16, GuestAddress(ring.used + 2));
        }
        round(&mut rig);
    }
}

// ---------------------------------------------------------------------
// virtio-fs: the relay between the guest's ring and the back end's.

/// The virtio-fs relay's request queue driven from the input:
///
/// ```text
/// sizes: u8            log2 of the guest queue's size (at most 128)
/// slots: u8            small slots (low nibble, 1-8), large (bit 4-5)
/// flags: u8            F_RESET (8): reset, then a second round
/// ring: ndesc u8, ndesc x 16-byte descriptors, avail_idx u16,
///       nheads u8, nheads x u16
/// nanswers: u8, then nanswers x (kind u8, id u16, len u32), what the
///       back end does, one after the other:
///   kind % 4 == 0   answers the oldest chain it took, with len
///   kind % 4 == 1   a used element (id, len) of its own making
///   kind % 4 == 2   takes what the relay posted, answers nothing
///   kind % 4 == 3   moves its used index by id
///   kind bit 2      the relay runs after it (guest and completions)
/// rest                 guest memory from 0x8000 on
/// ```
///
/// Every used entry the guest sees must name a descriptor of its queue
/// and be no longer than a slot; the requests in flight never exceed the
/// slots; the event never panics.
pub fn fs_device(data: &[u8]) {
    let mut input = Input(data);
    let size = 1u16 << (input.u8() & 0xf).min(7);
    let slots = input.u8();
    let sizing = QueueSizing {
        small: u16::from(slots & 0x7) + 1,
        large: u16::from((slots >> 4) & 0x3),
    };
    let flags = input.u8();
    let ring = Ring::at(0, size);
    let guest = RingInput::read(&mut input);
    let n = usize::from(input.u8());
    let answers: Vec<(u8, u16, u32)> = (0..n)
        .map(|_| (input.u8(), input.u16(), input.u32()))
        .collect();
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), VSOCK_MEM)]) else {
        return;
    };
    let _ = mem.write_slice(input.rest(), GuestAddress(VSOCK_DATA));
    guest.write(&mem, ring);
    let hiprio = QueueSizing { small: 1, large: 0 };
    let Ok(mut relay) = Relay::new(&[hiprio, sizing]) else {
        return;
    };
    let queue = || -> Option<Queue> {
        let mut q = Queue::new(size).ok()?;
        q.try_set_desc_table_address(GuestAddress(ring.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(ring.avail))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(ring.used)).ok()?;
        q.set_ready(true);
        Some(q)
    };
    let rounds = if flags & F_RESET != 0 { 2 } else { 1 };
    for _ in 0..rounds {
        let Some(mut q) = queue() else {
            return;
        };
        let _ = mem.write_obj(0u16, GuestAddress(ring.used + 2));
        relay.reset();
        guest.publish(&mem, ring);
        let mut back = FakeBackEnd::default();
        let mut broken = false;
        let _ = relay.serve_guest(1, &mut q, &mem);
        for &(kind, id, len) in &answers {
            match kind % 4 {
                0 => back.answer_oldest(&relay, len),
                1 => back.push_used(&relay, u32::from(id), len),
                2 => back.take(&relay),
                _ => back.bump_used(&relay, id),
            }
            if kind & 4 != 0 && !broken {
                broken = relay.complete(1, &mut q, &mem).is_err();
                let _ = relay.serve_guest(1, &mut q, &mem);
            }
            assert!(
                relay.in_flight(1) <= usize::from(sizing.slots()),
                "more requests in flight than slots"
            );
        }
        if !broken {
            // Whatever is left, answered properly: it all completes.
            back.take(&relay);
            while !back.taken.is_empty() {
                back.answer_oldest(&relay, 0);
            }
            if relay.complete(1, &mut q, &mem).is_ok() {
                let _ = relay.serve_guest(1, &mut q, &mem);
            }
        }
        // Writable buffers over the rings: the guest's own loss, nothing
        // to check against.
        if descriptor_table(&mem, ring).is_none() {
            continue;
        }
        for (id, len) in used_entries(&mem, ring) {
            assert!(id < u32::from(size), "used id {id} outside the queue");
            assert!(
                u64::from(len) <= LARGE_SLOT,
                "buffer {id} returned with {len} bytes"
            );
        }
    }
}

/// The back end of [`fs_device`]: reads the shadow ring of queue 1 in the
/// bounce memory and writes its used ring, as virtiofsd would (or not).
#[derive(Default)]
struct FakeBackEnd {
    next_avail: u16,
    next_used: u16,
    /// Heads taken, and their writable space.
    taken: Vec<(u16, u32)>,
}

impl FakeBackEnd {
    fn take(&mut self, relay: &Relay) {
        let Some(ring) = relay.bounce().rings().get(1).copied() else {
            return;
        };
        let mem = relay.bounce().memory();
        let idx: u16 = mem
            .load(GuestAddress(ring.avail + 2), Ordering::Acquire)
            .unwrap_or(0);
        let mut budget = ring.size;
        while self.next_avail != idx && budget > 0 {
            budget -= 1;
            let at = ring.avail + 4 + 2 * u64::from(self.next_avail % ring.size);
            self.next_avail = self.next_avail.wrapping_add(1);
            let head: u16 = mem.read_obj(GuestAddress(at)).unwrap_or(0);
            // The chain's writable space: its last descriptor's, if it is.
            let mut room = 0;
            for i in [head, head.wrapping_add(1)] {
                let at = ring.desc + 16 * u64::from(i % ring.size);
                let len: u32 = mem.read_obj(GuestAddress(at + 8)).unwrap_or(0);
                let flags: u16 = mem.read_obj(GuestAddress(at + 12)).unwrap_or(0);
                if flags & VRING_DESC_F_WRITE != 0 {
                    room = len;
                }
                if flags & VRING_DESC_F_NEXT == 0 {
                    break;
                }
            }
            self.taken.push((head, room));
        }
    }

    fn answer_oldest(&mut self, relay: &Relay, len: u32) {
        self.take(relay);
        if self.taken.is_empty() {
            return;
        }
        let (head, room) = self.taken.remove(0);
        self.push_used(relay, u32::from(head), if len == 0 { room } else { len });
    }

    fn push_used(&mut self, relay: &Relay, id: u32, len: u32) {
        let Some(ring) = relay.bounce().rings().get(1).copied() else {
            return;
        };
        let mem = relay.bounce().memory();
        let at = ring.used + 4 + 8 * u64::from(self.next_used % ring.size);
        let _ = mem.write_obj(id, GuestAddress(at));
        let _ = mem.write_obj(len, GuestAddress(at + 4));
        self.next_used = self.next_used.wrapping_add(1);
        let _ = mem.store(
            self.next_used,
            GuestAddress(ring.used + 2),
            Ordering::Release,
        );
    }

    fn bump_used(&mut self, relay: &Relay, by: u16) {
        let Some(ring) = relay.bounce().rings().get(1).copied() else {
            return;
        };
        self.next_used = self.next_used.wrapping_add(by);
        let mem = relay.bounce().memory();
        let _ = mem.store(
            self.next_used,
            GuestAddress(ring.used + 2),
            Ordering::Release,
        );
    }
}

// ---------------------------------------------------------------------
// virtio-mmio register sequences.

const MMIO_MEM: usize = 0x1_0000;

/// Register accesses on a virtio-mmio window, from the input:
///
/// ```text
/// device: u8     bit 0: vsock, else virtio-rng
/// nops: u8, then nops x 6 bytes (kind, offset, value u32):
///   kind % 4 == 0   write 4 bytes at offset * 4
///   kind % 4 == 1   read 4 bytes at offset * 4
///   kind % 4 == 2   an access of 1, 2, 4 or 8 bytes ((kind >> 2) & 3) at
///                   offset + (kind >> 4) * 256, a read if value is odd
///   kind % 4 == 3   QueueNotify of queue value % queues
/// rest           guest memory from 0 on (rings and buffers)
/// ```
///
/// The event loop runs after every access.
pub fn mmio_sequence(data: &[u8]) {
    let mut input = Input(data);
    let device = input.u8();
    let nops = usize::from(input.u8());
    let ops = input.bytes(6 * nops);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MMIO_MEM)]) else {
        return;
    };
    let _ = mem.write_slice(input.rest(), GuestAddress(0));
    let rig = if device & 1 == 0 {
        Rng::new().ok().and_then(|rng| Rig::new(rng, &mem))
    } else {
        Vsock::new(GUEST_CID, socket_path())
            .ok()
            .and_then(|vsock| Rig::new(vsock, &mem))
    };
    let Some(mut rig) = rig else {
        return;
    };
    for op in ops.chunks_exact(6) {
        let mut op = Input(op);
        let (kind, offset, value) = (op.u8(), op.u8(), op.u32());
        let t = &mut rig.transport;
        match kind % 4 {
            0 => write_reg(t, u64::from(offset) * 4, value),
            1 => t.read(u64::from(offset) * 4, &mut [0u8; 4]),
            2 => {
                let len = 1usize << ((kind >> 2) & 3);
                let at = u64::from(offset) + u64::from(kind >> 4) * 256;
                let mut buf = [0u8; 8];
                buf[..4].copy_from_slice(&value.to_le_bytes());
                buf[4..].copy_from_slice(&value.to_be_bytes());
                let access = buf.get_mut(..len).unwrap_or_default();
                if value & 1 == 1 {
                    t.read(at, access);
                } else {
                    t.write(at, access);
                }
            }
            _ => {
                let queues = rig.kicks.len().max(1);
                rig.notify(value as usize % queues);
            }
        }
        // A status write may have activated or reset the device.
        run_until_quiet(&mut rig.events);
    }
}

// ---------------------------------------------------------------------
// Parsers of host input.

/// What a host process sends on the hybrid vsock socket: the `CONNECT
/// <port>` line is what comes before the first newline (or the input), if
/// it fits the 32 bytes the device reads. What is accepted must be a
/// `CONNECT` line whose port reads back the same.
pub fn connect_line(data: &[u8]) {
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    if line.len() + 1 > 32 {
        return;
    }
    let Ok(port) = parse_connect_line(line) else {
        return;
    };
    assert_ne!(port, u32::MAX, "VMADDR_PORT_ANY accepted");
    assert!(
        line.starts_with(b"CONNECT"),
        "{:?} accepted",
        line.escape_ascii().to_string()
    );
    let canonical = format!("CONNECT {port}");
    assert_eq!(parse_connect_line(canonical.as_bytes()), Ok(port));
}

/// A control API request, read the way the API thread reads it (one line
/// of at most [`MAX_REQUEST`] bytes); an accepted request must survive a
/// round trip through its JSON form, an error must make a one-line reply.
pub fn api_request(data: &[u8]) {
    let max = MAX_REQUEST as usize;
    let limited = data.get(..max).unwrap_or(data);
    let line = match limited.iter().position(|&b| b == b'\n') {
        Some(newline) => limited.get(..=newline).unwrap_or(limited),
        None => limited,
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    if !line.ends_with('\n') && line.len() >= max {
        return;
    }
    match parse_request(line) {
        Ok(request) => {
            let json = serde_json::to_string(&request).unwrap_or_default();
            let again: Result<Request, _> = parse_request(&json);
            assert_eq!(again.as_ref(), Ok(&request), "{json}");
        }
        Err(error) => {
            let reply = serde_json::json!({"ok": false, "error": error}).to_string();
            assert!(!reply.contains('\n'), "a reply spans lines: {reply}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls `f` on every file of `fuzz/corpus/<target>/`.
    fn replay(target: &str, f: fn(&[u8])) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let entries = std::fs::read_dir(&dir)
            .and_then(|d| d.collect::<std::io::Result<Vec<_>>>())
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(!entries.is_empty(), "{} is empty", dir.display());
        for entry in entries {
            let data = std::fs::read(entry.path())
                .unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
            f(&data);
        }
    }

    #[test]
    fn corpus_vsock_chains() {
        replay("vsock_chains", vsock_chains);
    }

    #[test]
    fn corpus_vsock_device() {
        replay("vsock_device", vsock_device);
    }

    #[test]
    fn corpus_net_device() {
        replay("net_device", net_device);
    }

    #[test]
    fn corpus_balloon_device() {
        replay("balloon_device", balloon_device);
    }

    #[test]
    fn corpus_fs_device() {
        replay("fs_device", fs_device);
    }

    #[test]
    fn corpus_mmio_sequence() {
        replay("mmio_sequence", mmio_sequence);
    }

    #[test]
    fn corpus_connect_line() {
        replay("connect_line", connect_line);
    }

    #[test]
    fn corpus_api_request() {
        replay("api_request", api_request);
    }

    #[test]
    fn short_and_empty_inputs_are_fine() {
        for f in [
            vsock_chains,
            vsock_device,
            net_device,
            balloon_device,
            fs_device,
            mmio_sequence,
            connect_line,
            api_request,
        ] {
            f(&[]);
            f(&[0xff]);
            f(&[0x1f; 64]);
        }
    }
}
