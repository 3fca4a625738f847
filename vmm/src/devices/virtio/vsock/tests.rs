//! Device tests: a mock driver (virtio-queue's `MockSplitQueue` lays the
//! queues out in a `GuestMemoryMmap`) on one side, real Unix sockets in a
//! temporary directory on the other, and the device either driven through
//! a real `EventManager` or called directly.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::connection::{CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
use super::handshake::MAX_LINE;
use super::muxer::{HANDSHAKE_TIMEOUT, LOCAL_PORT_BASE};
use super::packet::{
    op, Header, HDR_SIZE, MAX_PKT_PAYLOAD, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND,
    VSOCK_TYPE_STREAM,
};
use super::*;

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 64 << 20;
/// Guest memory reserved per descriptor index for its buffer.
const SLOT: u64 = 0x11000;
const RX_DATA: u64 = 0x10_0000;
const TX_DATA: u64 = RX_DATA + SLOT * QUEUE_SIZE as u64;
const QUEUE_BASES: [u64; 3] = [0, 0x1_0000, 0x2_0000];
const RX_BUF: u32 = (HDR_SIZE + 4096) as u32;
/// The receive buffer the mock guest advertises.
const GUEST_BUF: u32 = 256 * 1024;
const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;

#[derive(Debug, Default)]
struct TestInterrupt {
    used: AtomicUsize,
}

impl InterruptSignal for TestInterrupt {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        self.used.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The driver's view of one split queue.
struct DriverQueue {
    desc_table: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    data_base: u64,
    next_desc: u16,
    avail_idx: u16,
    used_idx: u16,
    chains: HashMap<u16, Vec<(u64, u32)>>,
}

impl DriverQueue {
    fn new(mock: &MockSplitQueue<'_, GuestMemoryMmap>, data_base: u64) -> Self {
        DriverQueue {
            desc_table: mock.desc_table_addr(),
            avail: mock.avail_addr(),
            used: mock.used_addr(),
            data_base,
            next_desc: 0,
            avail_idx: 0,
            used_idx: 0,
            chains: HashMap::new(),
        }
    }

    fn slot(&self, index: u16) -> u64 {
        self.data_base + u64::from(index) * SLOT
    }

    fn write_desc(&self, mem: &GuestMemoryMmap, index: u16, desc: SplitDescriptor) {
        let addr = self.desc_table.unchecked_add(u64::from(index) * 16);
        mem.write_obj(RawDescriptor::from(desc), addr).unwrap();
    }

    /// Indices for the next `n` descriptors.
    fn alloc(&mut self, n: u16) -> Vec<u16> {
        let out = (0..n).map(|i| (self.next_desc + i) % QUEUE_SIZE).collect();
        self.next_desc = (self.next_desc + n) % QUEUE_SIZE;
        out
    }

    /// Adds a chain of (addr, len, flags) descriptors; NEXT links are
    /// filled in. Returns the head.
    fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u16 {
        let indices = self.alloc(descs.len() as u16);
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = match indices.get(k + 1) {
                Some(&next) => (flags | F_NEXT, next),
                None => (flags, 0),
            };
            self.write_desc(
                mem,
                indices[k],
                SplitDescriptor::new(addr, len, flags, next),
            );
        }
        let head = indices[0];
        self.chains
            .insert(head, descs.iter().map(|&(a, l, _)| (a, l)).collect());
        self.publish(mem, head);
        head
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let entry = self
            .avail
            .unchecked_add(4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE));
        mem.write_obj(head, entry).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, self.avail.unchecked_add(2))
            .unwrap();
    }

    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(self.used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_idx != idx {
            let elem = self
                .used
                .unchecked_add(4 + 8 * u64::from(self.used_idx % QUEUE_SIZE));
            let id: u32 = mem.read_obj(elem).unwrap();
            let len: u32 = mem.read_obj(elem.unchecked_add(4)).unwrap();
            out.push((id as u16, len));
            self.used_idx = self.used_idx.wrapping_add(1);
        }
        out
    }
}

#[derive(Debug)]
struct Pkt {
    hdr: Header,
    data: Vec<u8>,
}

fn gpkt(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: VSOCK_TYPE_STREAM,
        op,
        buf_alloc: GUEST_BUF,
        ..Header::default()
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    mem: GuestMemoryMmap,
    rxq: DriverQueue,
    txq: DriverQueue,
    kicks: Vec<EventFd>,
    irq: Arc<TestInterrupt>,
    dev: Arc<Mutex<Vsock>>,
    em: EventManager<Arc<Mutex<Vsock>>>,
}

/// Fresh queues for the device, and the driver's side of them.
fn make_queues(mem: &GuestMemoryMmap) -> (Vec<Queue>, DriverQueue, DriverQueue) {
    let mocks = QUEUE_BASES.map(|b| MockSplitQueue::create(mem, GuestAddress(b), QUEUE_SIZE));
    let queues = mocks.iter().map(|m| m.create_queue().unwrap()).collect();
    let rxq = DriverQueue::new(&mocks[RXQ], RX_DATA);
    let txq = DriverQueue::new(&mocks[TXQ], TX_DATA);
    (queues, rxq, txq)
}

/// The driver's side of the device's queue eventfds (QueueNotify).
fn kicks_of(dev: &Vsock) -> Vec<EventFd> {
    dev.queue_events()
        .iter()
        .map(|e| e.try_clone().unwrap())
        .collect()
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (queues, rxq, txq) = make_queues(&mem);
        let irq = Arc::new(TestInterrupt::default());
        let mut dev = Vsock::new(GUEST_CID, uds.clone()).unwrap();
        let kicks = kicks_of(&dev);
        dev.activate(mem.clone(), queues, irq.clone()).unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let mut h = Harness {
            _dir: dir,
            uds,
            mem,
            rxq,
            txq,
            kicks,
            irq,
            dev,
            em,
        };
        h.pump();
        h
    }

    fn dev(&self) -> MutexGuard<'_, Vsock> {
        self.dev.lock().unwrap()
    }

    /// Runs the event loop until it is idle; fails if it never is (an fd
    /// that stays ready without being served).
    fn pump(&mut self) {
        for _ in 0..10_000 {
            if self.em.run_with_timeout(20).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never goes idle");
    }

    /// Adds `n` rx buffers of `size` bytes and notifies the device.
    fn give_rx_sized(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let index = self.rxq.next_desc;
            let addr = self.rxq.slot(index);
            self.rxq.add_chain(&self.mem, &[(addr, size, F_WRITE)]);
        }
        self.kicks[RXQ].write(1).unwrap();
        self.pump();
    }

    fn give_rx(&mut self, n: usize) {
        self.give_rx_sized(n, RX_BUF);
    }

    /// Puts a guest packet on the tx queue (header and payload in separate
    /// descriptors, as Linux does) without notifying the device.
    fn queue_tx(&mut self, hdr: Header, payload: &[u8]) -> u16 {
        let mut hdr = hdr;
        hdr.len = payload.len() as u32;
        let index = self.txq.next_desc;
        let hdr_addr = self.txq.slot(index);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(hdr_addr))
            .unwrap();
        if payload.is_empty() {
            self.txq
                .add_chain(&self.mem, &[(hdr_addr, HDR_SIZE as u32, 0)])
        } else {
            let data_addr = self.txq.slot((index + 1) % QUEUE_SIZE);
            self.mem
                .write_slice(payload, GuestAddress(data_addr))
                .unwrap();
            self.txq.add_chain(
                &self.mem,
                &[
                    (hdr_addr, HDR_SIZE as u32, 0),
                    (data_addr, payload.len() as u32, 0),
                ],
            )
        }
    }

    /// Sends a guest packet through the tx queue and its eventfd.
    fn send(&mut self, hdr: Header, payload: &[u8]) {
        self.queue_tx(hdr, payload);
        self.kicks[TXQ].write(1).unwrap();
        self.pump();
    }

    /// The packets the device put in rx buffers since the last call.
    fn recv(&mut self) -> Vec<Pkt> {
        let used = self.rxq.take_used(&self.mem);
        used.into_iter()
            .map(|(head, len)| {
                assert!(len as usize >= HDR_SIZE, "short rx packet: {len}");
                let (addr, _) = self.rxq.chains[&head][0];
                let mut bytes = vec![0u8; len as usize];
                self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
                let hdr_bytes: [u8; HDR_SIZE] = bytes[..HDR_SIZE].try_into().unwrap();
                let hdr = Header::from_bytes(&hdr_bytes);
                assert_eq!(hdr.len as usize, len as usize - HDR_SIZE);
                assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID));
                assert_eq!(hdr.type_, VSOCK_TYPE_STREAM);
                Pkt {
                    hdr,
                    data: bytes[HDR_SIZE..].to_vec(),
                }
            })
            .collect()
    }

    fn recv_one(&mut self) -> Pkt {
        let mut pkts = self.recv();
        assert_eq!(pkts.len(), 1, "expected one packet, got {pkts:?}");
        pkts.remove(0)
    }

    fn host_connect(&mut self, line: &[u8]) -> UnixStream {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(line).unwrap();
        self.pump();
        s
    }

    /// A host-initiated stream to `guest_port`, accepted by the guest.
    /// Returns the host socket and the host port.
    fn establish_from_host(&mut self, guest_port: u32, guest_buf: u32) -> (UnixStream, u32) {
        self.give_rx(2);
        let mut host = self.host_connect(format!("CONNECT {guest_port}\n").as_bytes());
        let req = self.recv_one().hdr;
        assert_eq!(req.op, op::REQUEST);
        assert_eq!(req.dst_port, guest_port);
        assert!(req.src_port >= LOCAL_PORT_BASE);
        let mut resp = gpkt(op::RESPONSE, guest_port, req.src_port);
        resp.buf_alloc = guest_buf;
        self.send(resp, &[]);
        assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));
        (host, req.src_port)
    }

    /// A guest-initiated stream from `guest_port` to host port `port`.
    fn establish_from_guest(&mut self, guest_port: u32, port: u32) -> (UnixListener, UnixStream) {
        let listener = UnixListener::bind(self.port_path(port)).unwrap();
        self.give_rx(1);
        self.send(gpkt(op::REQUEST, guest_port, port), &[]);
        let (host, _) = listener.accept().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let resp = self.recv_one().hdr;
        assert_eq!(resp.op, op::RESPONSE);
        assert_eq!((resp.src_port, resp.dst_port), (port, guest_port));
        assert_eq!(resp.buf_alloc, CONN_BUF_ALLOC);
        (listener, host)
    }

    fn port_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }

    /// Wakes the event loop with an event that does nothing by itself
    /// (the event queue's), so that it catches up on work done by direct
    /// calls (closing dead sockets, registrations).
    fn kick_idle(&mut self) {
        self.kicks[2].write(1).unwrap();
        self.pump();
    }

    fn stats(&self) -> VsockStats {
        self.dev().stats()
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "EOF before newline");
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Asserts the peer closed the socket (after any data still queued).
fn assert_closed(s: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) => panic!("expected EOF, got {e}"),
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---- handshake and data ----

#[test]
fn host_connect_handshake_and_data_both_ways() {
    let mut h = Harness::new();
    let (mut host, local) = h.establish_from_host(1024, GUEST_BUF);
    assert!(h.dev().first_response_on(1024).is_some());
    assert_eq!(h.dev().first_response().unwrap().port, 1024);
    assert!(h.dev().first_response_at().is_some());

    host.write_all(b"ping").unwrap();
    h.give_rx(1);
    let pkt = h.recv_one();
    assert_eq!(pkt.hdr.op, op::RW);
    assert_eq!((pkt.hdr.src_port, pkt.hdr.dst_port), (local, 1024));
    assert_eq!(pkt.data, b"ping");

    h.send(gpkt(op::RW, 1024, local), b"pong");
    let mut buf = [0u8; 4];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");

    let stats = h.stats();
    assert_eq!(stats.conns_open, 1);
    assert_eq!(stats.conns_host_initiated, 1);
    assert_eq!(stats.tx_bytes, 4);
    assert_eq!(stats.rx_bytes, 4);
    assert!(h.irq.used.load(Ordering::SeqCst) > 0);
}

#[test]
fn first_response_hook_runs_once_per_port() {
    let mut h = Harness::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    h.dev()
        .set_first_response_hook(move |r| record.lock().unwrap().push(r.port));
    let _a = h.establish_from_host(1024, GUEST_BUF);
    let _b = h.establish_from_host(1024, GUEST_BUF);
    let _c = h.establish_from_host(2000, GUEST_BUF);
    assert_eq!(*seen.lock().unwrap(), [1024, 2000]);
    let dev = h.dev();
    assert_eq!(dev.first_response().unwrap().port, 1024);
    assert!(dev.first_response_on(2000).unwrap() >= dev.first_response_at().unwrap());
    assert!(dev.first_response_on(3000).is_none());
}

#[test]
fn host_data_sent_right_after_connect_line_is_kept() {
    let mut h = Harness::new();
    h.give_rx(2);
    let mut host = h.host_connect(b"CONNECT 52\nearly");
    let req = h.recv_one().hdr;
    assert_eq!(req.op, op::REQUEST);
    h.send(gpkt(op::RESPONSE, 52, req.src_port), &[]);
    assert_eq!(read_line(&mut host), format!("OK {}\n", req.src_port));
    h.give_rx(1);
    let pkt = h.recv_one();
    assert_eq!(pkt.data, b"early");
}

#[test]
fn guest_refusal_closes_host_socket() {
    let mut h = Harness::new();
    h.give_rx(1);
    let mut host = h.host_connect(b"CONNECT 9999\n");
    let req = h.recv_one().hdr;
    h.send(gpkt(op::RST, 9999, req.src_port), &[]);
    assert_closed(&mut host);
    let stats = h.stats();
    assert_eq!(stats.conns_open, 0);
    assert_eq!(stats.conns_rejected, 1);
    assert!(h.dev().first_response_at().is_none());
    // No RST is answered to an RST.
    h.give_rx(1);
    assert!(h.recv().is_empty());
}

#[test]
fn bad_connect_lines_are_closed() {
    let mut h = Harness::new();
    h.give_rx(4);
    let long = vec![b'C'; MAX_LINE];
    let lines: [&[u8]; 5] = [
        &long,
        b"CONNECT abc\n",
        b"CONNECT 99999999999\n",
        b"CONNECT 4294967296\n",
        b"HELLO 1\n",
    ];
    for line in lines {
        let mut host = h.host_connect(line);
        assert_closed(&mut host);
    }
    // A host that closes halfway.
    let host = h.host_connect(b"CONNE");
    drop(host);
    h.pump();

    assert!(h.recv().is_empty(), "no REQUEST reaches the guest");
    let stats = h.stats();
    assert_eq!(stats.handshake_errors, 6);
    assert_eq!(stats.conns_open, 0);
}

#[test]
fn connect_line_timeout_and_request_timeout() {
    let mut h = Harness::new();
    h.give_rx(2);
    let mut silent = h.host_connect(b"CONN");
    let mut unanswered = h.host_connect(b"CONNECT 77\n");
    let req = h.recv_one().hdr;
    assert_eq!(req.op, op::REQUEST);
    // The timer is armed for the earliest of the two deadlines.
    assert!(h.dev().timer_deadline.is_some());

    let later = Instant::now() + HANDSHAKE_TIMEOUT + Duration::from_secs(1);
    h.dev().run(later, false, true); // as the timer would
    h.kick_idle();
    assert_closed(&mut silent);
    assert_closed(&mut unanswered);
    // The guest heard of the request, so it hears of its end.
    let rst = h.recv_one().hdr;
    assert_eq!(rst.op, op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 77));
    assert_eq!(h.stats().conns_open, 0);
}

#[test]
fn guest_connect_to_host_socket() {
    let mut h = Harness::new();
    let (_listener, mut host) = h.establish_from_guest(5000, 8000);
    h.send(gpkt(op::RW, 5000, 8000), b"hello host");
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");

    host.write_all(b"hello guest").unwrap();
    h.give_rx(1);
    let pkt = h.recv_one();
    assert_eq!(pkt.hdr.op, op::RW);
    assert_eq!((pkt.hdr.src_port, pkt.hdr.dst_port), (8000, 5000));
    assert_eq!(pkt.data, b"hello guest");
    assert_eq!(pkt.hdr.fwd_cnt, 10);
    assert_eq!(h.stats().conns_guest_initiated, 1);
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mut h = Harness::new();
    h.give_rx(1);
    h.send(gpkt(op::REQUEST, 5001, 8001), &[]);
    let pkt = h.recv_one().hdr;
    assert_eq!(pkt.op, op::RST);
    assert_eq!((pkt.src_port, pkt.dst_port), (8001, 5001));
    assert_eq!(h.stats().conns_open, 0);
    assert_eq!(h.stats().conns_rejected, 1);
}

#[test]
fn a_jailed_device_refuses_guest_connections_even_to_a_listener() {
    let mut h = Harness::new();
    h.dev.lock().unwrap().refuse_guest_connections();
    let listener = UnixListener::bind(h.port_path(8002)).unwrap();
    listener.set_nonblocking(true).unwrap();
    h.give_rx(1);
    h.send(gpkt(op::REQUEST, 5002, 8002), &[]);
    let pkt = h.recv_one().hdr;
    assert_eq!(pkt.op, op::RST);
    assert_eq!((pkt.src_port, pkt.dst_port), (8002, 5002));
    assert_eq!(h.stats().conns_rejected, 1);
    assert!(listener.accept().is_err(), "the listener was connected to");
}

#[test]
fn unknown_connection_gets_rst_but_rst_does_not() {
    let mut h = Harness::new();
    h.give_rx(4);
    h.send(gpkt(op::RW, 6000, 7000), b"data");
    h.send(gpkt(op::CREDIT_REQUEST, 6001, 7000), &[]);
    h.send(gpkt(op::RST, 6002, 7000), &[]);
    let pkts = h.recv();
    assert_eq!(pkts.len(), 2);
    assert!(pkts.iter().all(|p| p.hdr.op == op::RST));
    assert_eq!(pkts[0].hdr.dst_port, 6000);
    assert_eq!(pkts[1].hdr.dst_port, 6001);
}

#[test]
fn wrong_cid_or_type_is_dropped() {
    let mut h = Harness::new();
    h.give_rx(4);
    let mut bad_src = gpkt(op::REQUEST, 1, 2);
    bad_src.src_cid = 99;
    let mut bad_type = gpkt(op::REQUEST, 1, 2);
    bad_type.type_ = 2;
    h.send(bad_src, &[]);
    h.send(bad_type, &[]);
    assert!(h.recv().is_empty());
    assert_eq!(h.stats().tx_dropped, 2);

    // To another CID: refused with an RST from that CID.
    let mut other = gpkt(op::REQUEST, 1, 2);
    other.dst_cid = 7;
    h.queue_tx(other, &[]);
    h.kicks[TXQ].write(1).unwrap();
    h.pump();
    let used = h.rxq.take_used(&h.mem);
    assert_eq!(used.len(), 1);
    let (addr, _) = h.rxq.chains[&used[0].0][0];
    let mut bytes = [0u8; HDR_SIZE];
    h.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    let rst = Header::from_bytes(&bytes);
    assert_eq!((rst.op, rst.src_cid, rst.dst_cid), (op::RST, 7, GUEST_CID));
}

// ---- flow control ----

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut h = Harness::new();
    let (mut host, local) = h.establish_from_host(1024, 1000);
    let data = pattern(3000, 1);
    host.write_all(&data).unwrap();
    h.give_rx(8);

    let mut got = Vec::new();
    for round in 0..3 {
        let pkts = h.recv();
        let rw: Vec<&Pkt> = pkts.iter().filter(|p| p.hdr.op == op::RW).collect();
        let bytes: usize = rw.iter().map(|p| p.data.len()).sum();
        assert_eq!(bytes, 1000, "round {round}: only the credit is sent");
        rw.iter().for_each(|p| got.extend_from_slice(&p.data));
        assert_eq!(pkts.last().unwrap().hdr.op, op::CREDIT_REQUEST);
        // Nothing more without credit, however long the loop runs.
        h.pump();
        assert!(h.recv().is_empty());
        let mut update = gpkt(op::CREDIT_UPDATE, 1024, local);
        update.buf_alloc = 1000;
        update.fwd_cnt = 1000 * (round + 1);
        h.send(update, &[]);
        h.give_rx(2);
    }
    assert_eq!(got, data);
}

/// An rx buffer that arrives after the host socket was drained finds it
/// empty (the read would block): the socket must then be polled again, or
/// later host data never reaches the guest.
#[test]
fn host_data_after_a_drained_socket_still_reaches_the_guest() {
    let mut h = Harness::new();
    let (mut host, _local) = h.establish_from_host(1024, 1 << 20);
    for (round, chunk) in [b"first".as_slice(), b"second", b"third"]
        .iter()
        .enumerate()
    {
        host.write_all(chunk).unwrap();
        h.pump();
        // One buffer: the data, and the device still thinks the socket
        // readable.
        h.give_rx(1);
        let pkt = h.recv_one();
        assert_eq!(
            (pkt.hdr.op, pkt.data.as_slice()),
            (op::RW, *chunk),
            "round {round}"
        );
        // Another: the read would block, nothing to send, buffer kept.
        h.give_rx(1);
        assert!(h.recv().is_empty(), "round {round}");
    }
}

#[test]
fn guest_to_host_buffering_is_bounded_by_credit() {
    let mut h = Harness::new();
    let (_listener, mut host) = h.establish_from_guest(5000, 8000);
    h.give_rx(16);
    let chunk = MAX_PKT_PAYLOAD;
    let mut sent: Vec<u8> = Vec::new();
    let mut fwd_seen = 0u32;
    // Send as much as the advertised credit allows; the host reads nothing.
    for i in 0..64 {
        for p in h.recv() {
            assert_eq!(p.hdr.op, op::CREDIT_UPDATE);
            assert_eq!(p.hdr.buf_alloc, CONN_BUF_ALLOC);
            fwd_seen = p.hdr.fwd_cnt;
        }
        let in_flight = sent.len() as u32 - fwd_seen;
        if in_flight + chunk as u32 > CONN_BUF_ALLOC {
            break;
        }
        let data = pattern(chunk, i);
        h.send(gpkt(op::RW, 5000, 8000), &data);
        sent.extend_from_slice(&data);
        h.give_rx(1);
    }
    {
        let dev = h.dev();
        let conn = dev.muxer.table.conns.values().next().unwrap();
        assert!(conn.host_pending() > 0, "the host socket filled up");
        assert!(conn.host_pending() <= CONN_BUF_ALLOC as usize);
    }

    // The host drains it all; the device flushes and grants credit again.
    host.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < sent.len() {
        assert!(
            Instant::now() < deadline,
            "host got {} of {}",
            got.len(),
            sent.len()
        );
        match host.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => h.pump(),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, sent);
    h.pump();
    h.give_rx(4);
    let last = h.recv().into_iter().last().unwrap().hdr;
    assert_eq!(last.op, op::CREDIT_UPDATE);
    assert!(last.fwd_cnt + CREDIT_UPDATE_THRESHOLD > sent.len() as u32);
    // Asked, the device reports its exact count.
    h.send(gpkt(op::CREDIT_REQUEST, 5000, 8000), &[]);
    let update = h.recv_one().hdr;
    assert_eq!(update.op, op::CREDIT_UPDATE);
    assert_eq!(update.fwd_cnt, sent.len() as u32);
}

#[test]
fn guest_exceeding_credit_is_reset() {
    let mut h = Harness::new();
    let (_listener, mut host) = h.establish_from_guest(5000, 8000);
    h.give_rx(32);
    // The host never reads: the socket fills, then our buffer, then the
    // guest goes beyond its credit.
    for i in 0..64 {
        h.send(gpkt(op::RW, 5000, 8000), &pattern(MAX_PKT_PAYLOAD, i));
        if h.stats().conns_open == 0 {
            break;
        }
    }
    let stats = h.stats();
    assert_eq!(stats.conns_open, 0);
    assert_eq!(stats.conns_reset, 1);
    let last = h.recv().into_iter().last().unwrap().hdr;
    assert_eq!(last.op, op::RST);
    assert_closed(&mut host);
}

#[test]
fn credit_request_is_answered() {
    let mut h = Harness::new();
    let (_listener, _host) = h.establish_from_guest(5000, 8000);
    h.give_rx(1);
    h.send(gpkt(op::RW, 5000, 8000), b"12345");
    h.send(gpkt(op::CREDIT_REQUEST, 5000, 8000), &[]);
    let pkt = h.recv_one().hdr;
    assert_eq!(pkt.op, op::CREDIT_UPDATE);
    assert_eq!((pkt.buf_alloc, pkt.fwd_cnt), (CONN_BUF_ALLOC, 5));
}

// ---- shutdown and reset ----

#[test]
fn guest_half_close_then_host_close() {
    let mut h = Harness::new();
    let (_listener, mut host) = h.establish_from_guest(5000, 8000);
    h.send(gpkt(op::RW, 5000, 8000), b"last words");
    let mut shut = gpkt(op::SHUTDOWN, 5000, 8000);
    shut.flags = SHUTDOWN_SEND;
    h.send(shut, &[]);
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words", "the host reads the data, then EOF");

    // The other direction still works.
    host.write_all(b"reply").unwrap();
    h.give_rx(1);
    assert_eq!(h.recv_one().data, b"reply");

    drop(host);
    h.give_rx(4);
    let pkts = h.recv();
    let ops: Vec<u16> = pkts.iter().map(|p| p.hdr.op).collect();
    assert_eq!(ops, [op::SHUTDOWN, op::RST]);
    assert_eq!(pkts[0].hdr.flags, SHUTDOWN_BOTH);
    assert_eq!(h.stats().conns_open, 0);
}

#[test]
fn guest_full_close() {
    let mut h = Harness::new();
    let (mut host, local) = h.establish_from_host(1024, GUEST_BUF);
    h.give_rx(1);
    h.send(gpkt(op::RW, 1024, local), b"bye");
    let mut shut = gpkt(op::SHUTDOWN, 1024, local);
    shut.flags = SHUTDOWN_BOTH;
    h.send(shut, &[]);
    let rst = h.recv_one().hdr;
    assert_eq!(rst.op, op::RST);
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye");
    assert_eq!(h.stats().conns_open, 0);
}

#[test]
fn host_half_close_then_guest_close() {
    let mut h = Harness::new();
    let (_listener, mut host) = h.establish_from_guest(5000, 8000);
    host.write_all(b"request").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    h.pump();
    h.give_rx(4);
    let pkts = h.recv();
    assert_eq!(pkts[0].hdr.op, op::RW);
    assert_eq!(pkts[0].data, b"request");
    assert_eq!(pkts[1].hdr.op, op::SHUTDOWN);
    assert_eq!(pkts[1].hdr.flags, SHUTDOWN_SEND, "the host still receives");
    assert_eq!(pkts.len(), 2);

    h.send(gpkt(op::RW, 5000, 8000), b"response");
    let mut buf = [0u8; 8];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"response");

    let mut shut = gpkt(op::SHUTDOWN, 5000, 8000);
    shut.flags = SHUTDOWN_SEND;
    h.send(shut, &[]);
    assert_eq!(h.recv_one().hdr.op, op::RST);
    assert_closed(&mut host);
    assert_eq!(h.stats().conns_open, 0);
}

#[test]
fn guest_shutdown_receive_only_keeps_host_to_guest_closed() {
    let mut h = Harness::new();
    let (_listener, mut host) = h.establish_from_guest(5000, 8000);
    let mut shut = gpkt(op::SHUTDOWN, 5000, 8000);
    shut.flags = SHUTDOWN_RCV;
    h.send(shut, &[]);
    host.write_all(b"ignored").unwrap();
    h.give_rx(2);
    assert!(
        h.recv().is_empty(),
        "nothing is read for a guest that stopped receiving"
    );
    h.send(gpkt(op::RW, 5000, 8000), b"ok");
    let mut buf = [0u8; 2];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ok");
}

#[test]
fn rst_from_guest_closes_host_socket() {
    let mut h = Harness::new();
    let (mut host, local) = h.establish_from_host(1024, GUEST_BUF);
    h.send(gpkt(op::RST, 1024, local), &[]);
    assert_closed(&mut host);
    let stats = h.stats();
    assert_eq!((stats.conns_open, stats.conns_reset), (0, 1));
    h.give_rx(1);
    assert!(h.recv().is_empty());
}

#[test]
fn host_close_sends_shutdown_and_rst() {
    let mut h = Harness::new();
    let (host, _local) = h.establish_from_host(1024, GUEST_BUF);
    drop(host);
    h.give_rx(2);
    let pkts = h.recv();
    let ops: Vec<u16> = pkts.iter().map(|p| p.hdr.op).collect();
    assert_eq!(ops, [op::SHUTDOWN, op::RST]);
    assert_eq!(pkts[0].hdr.flags, SHUTDOWN_BOTH);
    assert_eq!(h.stats().conns_open, 0);
}

#[test]
fn host_close_before_guest_answers() {
    let mut h = Harness::new();
    h.give_rx(3);
    let host = h.host_connect(b"CONNECT 1024\n");
    let req = h.recv_one().hdr;
    drop(host);
    h.pump();
    let rst = h.recv_one().hdr;
    assert_eq!((rst.op, rst.src_port), (op::RST, req.src_port));
    // The guest's late answer is refused.
    h.send(gpkt(op::RESPONSE, 1024, req.src_port), &[]);
    assert_eq!(h.recv_one().hdr.op, op::RST);
    assert_eq!(h.stats().conns_open, 0);
}

#[test]
fn device_reset_drops_connections_and_reactivates() {
    let mut h = Harness::new();
    let (mut from_host, _) = h.establish_from_host(1024, GUEST_BUF);
    let (_listener, mut from_guest) = h.establish_from_guest(5000, 8000);
    assert_eq!(h.stats().conns_open, 2);
    assert!(h.dev().reset());
    h.pump();
    assert_closed(&mut from_host);
    assert_closed(&mut from_guest);
    assert_eq!(h.stats().conns_open, 0);

    // Host connections wait while the device is down.
    let mut waiting = UnixStream::connect(&h.uds).unwrap();
    waiting.write_all(b"CONNECT 1024\n").unwrap();
    h.pump();

    let (queues, rxq, txq) = make_queues(&h.mem);
    h.rxq = rxq;
    h.txq = txq;
    let irq = h.irq.clone();
    let mem = h.mem.clone();
    h.dev().activate(mem, queues, irq).unwrap();
    h.pump();
    h.give_rx(1);
    let req = h.recv_one().hdr;
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 1024));
}

#[test]
fn activate_checks_its_arguments() {
    let mut h = Harness::new();
    let (queues, _, _) = make_queues(&h.mem);
    let irq = h.irq.clone();
    let mem = h.mem.clone();
    assert!(matches!(
        h.dev().activate(mem.clone(), queues, irq.clone()),
        Err(ActivateError::AlreadyActive)
    ));
    h.dev().reset();
    h.pump();
    let (mut queues, _, _) = make_queues(&h.mem);
    queues.pop();
    assert!(matches!(
        h.dev().activate(mem, queues, irq),
        Err(ActivateError::QueueCount {
            expected: 3,
            got: 2
        })
    ));
}

// ---- malformed guest buffers ----

/// Runs the tx queue directly (no event loop) and returns the used ring.
fn run_tx(h: &mut Harness) -> Vec<(u16, u32)> {
    h.dev().process_tx(Instant::now());
    h.txq.take_used(&h.mem)
}

#[test]
fn malformed_tx_chains_are_dropped() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let slot = |q: &DriverQueue| q.slot(q.next_desc);
    let rw_hdr = |len: u32| {
        let mut hdr = gpkt(op::RW, 1, 2);
        hdr.len = len;
        hdr.to_bytes()
    };
    let outside = MEM_SIZE as u64 + 0x1000;
    let mut expected_drops = 0;

    // A header shorter than 44 bytes.
    let a = slot(&h.txq);
    h.txq.add_chain(&mem, &[(a, 20, 0)]);
    // A payload length beyond the chain.
    let a = slot(&h.txq);
    mem.write_slice(&rw_hdr(100), GuestAddress(a)).unwrap();
    h.txq
        .add_chain(&mem, &[(a, HDR_SIZE as u32, 0), (a + 0x1000, 50, 0)]);
    // A payload length beyond the maximum packet size.
    let a = slot(&h.txq);
    mem.write_slice(&rw_hdr(MAX_PKT_PAYLOAD as u32 + 1), GuestAddress(a))
        .unwrap();
    h.txq.add_chain(&mem, &[(a, HDR_SIZE as u32 + 70_000, 0)]);
    // A device-writable header.
    let a = slot(&h.txq);
    mem.write_slice(&gpkt(op::REQUEST, 1, 2).to_bytes(), GuestAddress(a))
        .unwrap();
    h.txq.add_chain(&mem, &[(a, HDR_SIZE as u32, F_WRITE)]);
    // Outside guest memory, and an address that overflows.
    h.txq.add_chain(&mem, &[(outside, HDR_SIZE as u32, 0)]);
    h.txq
        .add_chain(&mem, &[(u64::MAX - 10, HDR_SIZE as u32, 0)]);
    // A payload outside guest memory.
    let a = slot(&h.txq);
    mem.write_slice(&rw_hdr(10), GuestAddress(a)).unwrap();
    h.txq
        .add_chain(&mem, &[(a, HDR_SIZE as u32, 0), (outside, 10, 0)]);
    expected_drops += 7;

    let used = run_tx(&mut h);
    assert_eq!(used.len(), 7, "every buffer is returned");
    assert!(used.iter().all(|&(_, len)| len == 0));

    // A chain that loops on itself: the header asks for more payload
    // than any walk of the loop yields.
    let head = h.txq.next_desc;
    let a = h.txq.slot(head);
    mem.write_slice(&rw_hdr(MAX_PKT_PAYLOAD as u32), GuestAddress(a))
        .unwrap();
    h.txq.alloc(1);
    h.txq.write_desc(
        &mem,
        head,
        SplitDescriptor::new(a, HDR_SIZE as u32, F_NEXT, head),
    );
    h.txq.publish(&mem, head);
    // Two descriptors pointing at each other.
    let pair = h.txq.alloc(2);
    let a = h.txq.slot(pair[0]);
    mem.write_slice(&rw_hdr(MAX_PKT_PAYLOAD as u32), GuestAddress(a))
        .unwrap();
    h.txq.write_desc(
        &mem,
        pair[0],
        SplitDescriptor::new(a, HDR_SIZE as u32, F_NEXT, pair[1]),
    );
    h.txq
        .write_desc(&mem, pair[1], SplitDescriptor::new(a, 100, F_NEXT, pair[0]));
    h.txq.publish(&mem, pair[0]);
    // A bogus indirect table, and a next index beyond the queue.
    let idx = h.txq.alloc(2);
    h.txq.write_desc(
        &mem,
        idx[0],
        SplitDescriptor::new(outside, 17, VRING_DESC_F_INDIRECT as u16, 0),
    );
    h.txq.publish(&mem, idx[0]);
    let a = h.txq.slot(idx[1]);
    h.txq
        .write_desc(&mem, idx[1], SplitDescriptor::new(a, 20, F_NEXT, 999));
    h.txq.publish(&mem, idx[1]);
    expected_drops += 4;
    // A head index beyond the queue: dropped, and cannot be returned.
    h.txq.publish(&mem, 300);
    expected_drops += 1;

    let used = run_tx(&mut h);
    assert_eq!(used.len(), 4);
    assert_eq!(h.stats().tx_dropped, expected_drops);

    // The device still works.
    let (_listener, _host) = h.establish_from_guest(5000, 8000);
}

#[test]
fn header_split_across_descriptors_is_accepted() {
    let mut h = Harness::new();
    let _listener = UnixListener::bind(h.port_path(8000)).unwrap();
    let mem = h.mem.clone();
    let a = h.txq.slot(h.txq.next_desc);
    mem.write_slice(&gpkt(op::REQUEST, 5000, 8000).to_bytes(), GuestAddress(a))
        .unwrap();
    h.txq
        .add_chain(&mem, &[(a, 10, 0), (a + 10, 30, 0), (a + 40, 4, 0)]);
    h.give_rx(1);
    assert_eq!(run_tx(&mut h).len(), 1);
    h.dev().process_rx(Instant::now());
    assert_eq!(h.recv_one().hdr.op, op::RESPONSE);
}

#[test]
fn malformed_rx_buffers_are_skipped() {
    let mut h = Harness::new();
    // Something for the guest: an RST for an unknown connection.
    h.send(gpkt(op::RW, 6000, 7000), b"x");
    let mem = h.mem.clone();
    let a = h.rxq.slot(h.rxq.next_desc);
    h.rxq.add_chain(&mem, &[(a, RX_BUF, 0)]); // device-readable
    let a = h.rxq.slot(h.rxq.next_desc);
    h.rxq.add_chain(&mem, &[(a, 10, F_WRITE)]); // too small
    h.rxq
        .add_chain(&mem, &[(MEM_SIZE as u64 - 8, 100, F_WRITE)]); // past the end
    let a = h.rxq.slot(h.rxq.next_desc);
    h.rxq
        .add_chain(&mem, &[(a, 10, F_WRITE), (a + 10, 50, F_WRITE)]); // good, split

    assert!(h.dev().process_rx(Instant::now()));
    let used = h.rxq.take_used(&mem);
    let lens: Vec<u32> = used.iter().map(|&(_, len)| len).collect();
    assert_eq!(lens, [0, 0, 0, HDR_SIZE as u32]);
    assert_eq!(h.stats().rx_bad_buffers, 3);
    let mut bytes = [0u8; HDR_SIZE];
    mem.read_slice(&mut bytes, GuestAddress(a)).unwrap();
    let rst = Header::from_bytes(&bytes);
    assert_eq!((rst.op, rst.dst_port), (op::RST, 6000));
}

#[test]
fn no_interrupt_without_used_buffers() {
    let mut h = Harness::new();
    let before = h.irq.used.load(Ordering::SeqCst);
    // Rx buffers alone produce nothing.
    h.give_rx(4);
    h.pump();
    assert_eq!(h.irq.used.load(Ordering::SeqCst), before);
    h.send(gpkt(op::RST, 1, 2), &[]);
    assert_eq!(h.irq.used.load(Ordering::SeqCst), before + 1);
}

#[test]
fn connection_limit() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft: usize = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if soft < 3 * MAX_CONNECTIONS {
        eprintln!("skipped: needs {} open files", 3 * MAX_CONNECTIONS);
        return;
    }
    let mut h = Harness::new();
    let mut hosts = Vec::new();
    for i in 0..MAX_CONNECTIONS {
        hosts.push(UnixStream::connect(&h.uds).unwrap());
        if i % 32 == 0 {
            h.pump();
        }
    }
    h.pump();
    assert_eq!(h.stats().conns_open, MAX_CONNECTIONS as u64);
    let mut extra = h.host_connect(b"CONNECT 1\n");
    assert_closed(&mut extra);
    // The guest cannot connect either.
    h.give_rx(1);
    h.send(gpkt(op::REQUEST, 1, 2), &[]);
    assert_eq!(h.recv_one().hdr.op, op::RST);
    assert_eq!(h.stats().conns_rejected, 2);
}

// ---- construction and configuration ----

#[test]
fn device_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Vsock>();
    fn assert_sync<T: Send + Sync>() {}
    assert_sync::<Arc<Mutex<Vsock>>>();
}

#[test]
fn config_space_is_the_cid() {
    let h = Harness::new();
    let dev = h.dev();
    let mut data = [0xffu8; 8];
    dev.read_config(0, &mut data);
    assert_eq!(data, GUEST_CID.to_le_bytes());
    let mut data = [0xffu8; 8];
    dev.read_config(4, &mut data);
    assert_eq!(data, [0; 8]);
    let mut data = [0xffu8; 2];
    dev.read_config(0, &mut data);
    assert_eq!(data, [3, 0]);
    let mut data = [0xffu8; 4];
    dev.read_config(u64::MAX, &mut data);
    assert_eq!(data, [0; 4]);
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
}

#[test]
fn new_checks_cid_and_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::new(cid, path.clone()),
            Err(VsockError::InvalidCid(_))
        ));
    }

    let first = Vsock::new(3, path.clone()).unwrap();
    let err = Vsock::new(4, path.clone()).unwrap_err();
    assert!(matches!(err, VsockError::SocketInUse(_)));
    assert!(err.to_string().contains("v.sock"), "{err}");
    drop(first);
    assert!(!path.exists(), "drop removes the socket");

    // A stale socket file is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let dev = Vsock::new(3, path.clone()).unwrap();
    // Another socket at the path by then is not ours to remove.
    std::fs::remove_file(&path).unwrap();
    let other = UnixListener::bind(&path).unwrap();
    drop(dev);
    assert!(path.exists());
    drop(other);

    let file = dir.path().join("file");
    std::fs::write(&file, b"not a socket").unwrap();
    assert!(matches!(
        Vsock::new(3, file),
        Err(VsockError::NotASocket(_))
    ));
    assert!(matches!(
        Vsock::new(3, dir.path().join("missing/dir/v.sock")),
        Err(VsockError::Bind { .. })
    ));
}

// ---- bounds a hostile guest runs into ----

#[test]
fn a_full_tx_queue_is_served_in_budgeted_rounds() {
    let mut h = Harness::new();
    let before = crate::metrics::METRICS
        .queue_budget_exhausted
        .load(Ordering::Relaxed);
    // RSTs for streams that do not exist: no reply, no backlog, nothing
    // that would stop the device early but the budget.
    for i in 0..200 {
        h.queue_tx(gpkt(op::RST, 7000 + i, 9), &[]);
    }
    let used = run_tx(&mut h);
    assert_eq!(used.len(), QUEUE_BUDGET);
    assert!(
        h.kicks[TXQ].read().is_ok(),
        "the tx queue is re-armed while work is left"
    );
    assert!(
        crate::metrics::METRICS
            .queue_budget_exhausted
            .load(Ordering::Relaxed)
            > before
    );
    // The event loop finishes the rest a budget at a time.
    h.kicks[TXQ].write(1).unwrap();
    h.pump();
    assert_eq!(h.txq.take_used(&h.mem).len(), 200 - QUEUE_BUDGET);
    assert_eq!(h.stats().tx_packets, 200);
}

#[test]
fn request_rst_churn_without_rx_buffers_stays_bounded() {
    let mut h = Harness::new();
    let _listener = UnixListener::bind(h.port_path(8000)).unwrap();
    // The guest never gives rx buffers: every RESPONSE waits, and each
    // connection is reset right away.
    for i in 0..3000u32 {
        let port = 10_000 + (i % 700);
        h.queue_tx(gpkt(op::REQUEST, port, 8000), &[]);
        h.queue_tx(gpkt(op::RST, port, 8000), &[]);
        if i % 100 == 99 {
            h.kicks[TXQ].write(1).unwrap();
            h.pump();
        }
    }
    h.kicks[TXQ].write(1).unwrap();
    h.pump();
    h.kick_idle();
    let dev = h.dev();
    assert_eq!(dev.muxer.buried(), 0, "dead sockets were closed");
    assert!(
        dev.muxer.deadline_heap_len() <= 4 * dev.muxer.table.conns.len() + 64,
        "{} timeout entries",
        dev.muxer.deadline_heap_len()
    );
    // (The guest's packets stall once it owes itself 1024 RSTs it does not
    // take: a few connections may be left open then.)
    assert!(dev.muxer.table.conns.len() <= 700);
    assert!(
        dev.rx_waiting() <= dev.muxer.table.conns.len(),
        "{} rx entries for {} connections: dead ones stayed in the list",
        dev.rx_waiting(),
        dev.muxer.table.conns.len()
    );
}

#[test]
fn host_side_buffering_is_bounded_per_vm() {
    let mut h = Harness::new();
    h.dev().muxer.set_host_buffer_limit(300 * 1024);
    // Four guest streams whose host sockets never read.
    let mut hosts = Vec::new();
    for i in 0..4u32 {
        hosts.push(h.establish_from_guest(5000 + i, 8000 + i));
    }
    h.give_rx(64);
    let data = pattern(MAX_PKT_PAYLOAD, 1);
    let mut resets = 0;
    for round in 0..8 {
        for i in 0..4u32 {
            h.send(gpkt(op::RW, 5000 + i, 8000 + i), &data);
        }
        for p in h.recv() {
            if p.hdr.op == op::RST {
                resets += 1;
            }
        }
        h.give_rx(8);
        let buffered = h.dev().host_buffered();
        assert!(
            buffered <= 300 * 1024,
            "round {round}: {buffered} bytes buffered"
        );
    }
    assert!(
        resets > 0,
        "a stream that would overflow the VM's buffers is reset"
    );
    // Killed connections give their bytes back.
    drop(hosts);
    h.pump();
    h.kick_idle();
}

#[test]
fn a_restored_device_resets_the_guests_streams_and_waits_for_the_driver() {
    let mut h = Harness::new();
    assert!(h.dev().listener_registered);
    const EV_DATA: u64 = 0x200_0000;
    let mock = MockSplitQueue::create(&h.mem, GuestAddress(QUEUE_BASES[EVQ]), QUEUE_SIZE);
    let mut evq = DriverQueue::new(&mock, EV_DATA);
    let head = evq.add_chain(&h.mem, &[(EV_DATA, 8, F_WRITE)]);
    h.mem
        .write_obj(0xffff_ffff_u32, GuestAddress(EV_DATA))
        .unwrap();
    h.dev().restored();
    // One event: VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (0), 4 bytes.
    assert_eq!(evq.take_used(&h.mem), vec![(head, 4)]);
    let id: u32 = h.mem.read_obj(GuestAddress(EV_DATA)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    // Until the driver has handled it, host connections wait.
    h.kicks[EVQ].write(1).unwrap();
    h.pump();
    assert!(!h.dev().listener_registered);
    // It posts its event buffer again: they are taken again.
    evq.add_chain(&h.mem, &[(EV_DATA + SLOT, 8, F_WRITE)]);
    h.kicks[EVQ].write(1).unwrap();
    h.pump();
    assert!(h.dev().listener_registered);
    // A driver without an event buffer gets no reset (and no hang).
    let mut bare = Harness::new();
    let _ = MockSplitQueue::create(&bare.mem, GuestAddress(QUEUE_BASES[EVQ]), QUEUE_SIZE);
    bare.dev().restored();
    bare.pump();
    assert!(bare.dev().listener_registered);
}
