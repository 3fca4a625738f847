//! The virtio-fs front end against a fake vhost-user back end: a thread
//! serving the other end of a socket pair with the `vhost` crate's back
//! end side, recording every request it gets.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vhost::vhost_user::message::*;
use vhost::vhost_user::{
    Backend as BackendChannel, BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult,
    VhostUserBackendReqHandlerMut,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::bounce::QueueSizing;
use super::config::{FsConfig, TAG_LEN};
use super::frontend::{Backend, FrontendError, GUEST_FEATURES, REPLY_DEADLINE};
use super::watchdog::Watchdog;
use super::*;
use crate::devices::virtio::VIRTIO_F_VERSION_1;

const PROTOCOL_FEATURES: u64 = 1 << 30;
const EVENT_IDX: u64 = 1 << 29;
const QUEUE_SIZE: u16 = 16;

/// What the fake back end was asked, in order, and what it holds.
#[derive(Default)]
struct Fake {
    features: u64,
    protocol: u64,
    queues: u64,
    /// Answer this request with an error.
    refuse: Option<&'static str>,
    /// Take this request and answer nothing until the sender goes (a
    /// back end that is alive but stopped).
    stall: Option<(&'static str, Receiver<()>)>,
    log: Vec<String>,
    mem: Vec<VhostUserMemoryRegion>,
    mem_files: Vec<File>,
    kicks: Vec<(u8, File)>,
    calls: Vec<(u8, File)>,
    addrs: Vec<(u32, u64, u64, u64)>,
    /// Per ring: (size, next avail, next used), from SET_VRING_NUM/BASE.
    vrings: std::collections::BTreeMap<u32, (u16, u16, u16)>,
}

impl std::fmt::Debug for Fake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fake")
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl Fake {
    fn new() -> Self {
        Fake {
            features: VIRTIO_F_VERSION_1 | EVENT_IDX | PROTOCOL_FEATURES | (1 << 27),
            protocol: (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::RESET_DEVICE
                | VhostUserProtocolFeatures::CONFIG)
                .bits(),
            queues: 2,
            ..Default::default()
        }
    }

    fn record(&mut self, request: &'static str, detail: String) -> VuResult<()> {
        self.log.push(if detail.is_empty() {
            request.to_string()
        } else {
            format!("{request} {detail}")
        });
        if self.refuse == Some(request) {
            return Err(VuError::InvalidOperation("refused by the test"));
        }
        if let Some((stalled, gate)) = &self.stall {
            if *stalled == request {
                // Blocks until the test drops the sender.
                let _ = gate.recv();
                return Err(VuError::InvalidOperation("released by the test"));
            }
        }
        Ok(())
    }
}

fn unused<T>(what: &'static str) -> VuResult<T> {
    Err(VuError::InvalidOperation(what))
}

impl VhostUserBackendReqHandlerMut for Fake {
    fn set_owner(&mut self) -> VuResult<()> {
        self.record("SET_OWNER", String::new())
    }
    fn reset_owner(&mut self) -> VuResult<()> {
        self.record("RESET_OWNER", String::new())
    }
    fn reset_device(&mut self) -> VuResult<()> {
        self.record("RESET_DEVICE", String::new())
    }
    fn get_features(&mut self) -> VuResult<u64> {
        self.record("GET_FEATURES", String::new())?;
        Ok(self.features)
    }
    fn set_features(&mut self, features: u64) -> VuResult<()> {
        self.record("SET_FEATURES", format!("{features:#x}"))
    }
    fn set_mem_table(&mut self, ctx: &[VhostUserMemoryRegion], files: Vec<File>) -> VuResult<()> {
        self.record("SET_MEM_TABLE", format!("{} regions", ctx.len()))?;
        self.mem = ctx.to_vec();
        self.mem_files = files;
        Ok(())
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        self.record("SET_VRING_NUM", format!("{index} {num}"))?;
        self.vrings.entry(index).or_default().0 = num as u16;
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.record("SET_VRING_ADDR", format!("{index}"))?;
        self.addrs.retain(|a| a.0 != index);
        self.addrs.push((index, descriptor, available, used));
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.record("SET_VRING_BASE", format!("{index} {base}"))?;
        let ring = self.vrings.entry(index).or_default();
        (ring.1, ring.2) = (base as u16, base as u16);
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.record("GET_VRING_BASE", format!("{index}"))?;
        Ok(VhostUserVringState::new(index, 0))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.record("SET_VRING_KICK", format!("{index} fd={}", fd.is_some()))?;
        if let Some(f) = fd {
            self.kicks.retain(|k| k.0 != index);
            self.kicks.push((index, f));
        }
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.record("SET_VRING_CALL", format!("{index} fd={}", fd.is_some()))?;
        if let Some(f) = fd {
            self.calls.retain(|c| c.0 != index);
            self.calls.push((index, f));
        }
        Ok(())
    }
    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.record("SET_VRING_ERR", format!("{index}"))
    }
    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        self.record("GET_PROTOCOL_FEATURES", String::new())?;
        Ok(VhostUserProtocolFeatures::from_bits_truncate(self.protocol))
    }
    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.record("SET_PROTOCOL_FEATURES", format!("{features:#x}"))
    }
    fn get_queue_num(&mut self) -> VuResult<u64> {
        self.record("GET_QUEUE_NUM", String::new())?;
        Ok(self.queues)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.record("SET_VRING_ENABLE", format!("{index} {}", u8::from(enable)))
    }
    fn get_config(&mut self, _: u32, _: u32, _: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        unused("GET_CONFIG")
    }
    fn set_config(&mut self, _: u32, _: &[u8], _: VhostUserConfigFlags) -> VuResult<()> {
        unused("SET_CONFIG")
    }
    fn set_backend_req_fd(&mut self, _backend: BackendChannel) {}
    fn set_gpu_socket(&mut self, _: GpuBackend) -> VuResult<()> {
        unused("SET_GPU_SOCKET")
    }
    fn get_shared_object(&mut self, _: VhostUserSharedMsg) -> VuResult<File> {
        unused("GET_SHARED_OBJECT")
    }
    fn get_inflight_fd(&mut self, _: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        unused("GET_INFLIGHT_FD")
    }
    fn set_inflight_fd(&mut self, _: &VhostUserInflight, _: File) -> VuResult<()> {
        unused("SET_INFLIGHT_FD")
    }
    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        unused("GET_MAX_MEM_SLOTS")
    }
    fn add_mem_region(&mut self, _: &VhostUserSingleMemoryRegion, _: File) -> VuResult<()> {
        unused("ADD_MEM_REG")
    }
    fn remove_mem_region(&mut self, _: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        unused("REM_MEM_REG")
    }
    fn set_device_state_fd(
        &mut self,
        _: VhostTransferStateDirection,
        _: VhostTransferStatePhase,
        _: File,
    ) -> VuResult<Option<File>> {
        unused("SET_DEVICE_STATE_FD")
    }
    fn check_device_state(&mut self) -> VuResult<()> {
        unused("CHECK_DEVICE_STATE")
    }
    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        unused("GET_SHMEM_CONFIG")
    }
    fn set_log_base(&mut self, _: &VhostUserLog, _: File) -> VuResult<()> {
        unused("SET_LOG_BASE")
    }
}

/// A fake back end serving one end of a socket pair on a thread until
/// the connection ends (or it fails a request without REPLY_ACK).
#[derive(Debug)]
struct FakeEnd {
    fake: Arc<Mutex<Fake>>,
    /// The back end's end, to close it under the front end.
    stream: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl FakeEnd {
    fn serve(fake: Fake, stream: UnixStream) -> FakeEnd {
        let fake = Arc::new(Mutex::new(fake));
        let ours = stream.try_clone().unwrap();
        let mut handler = BackendReqHandler::from_stream(stream, fake.clone());
        let thread = std::thread::spawn(move || while handler.handle_request().is_ok() {});
        FakeEnd {
            fake,
            stream: ours,
            thread: Some(thread),
        }
    }

    fn log(&self) -> Vec<String> {
        self.fake.lock().unwrap().log.clone()
    }

    /// The log once it has `n` entries: without REPLY_ACK the front end
    /// does not wait for the back end to handle what it sent.
    fn wait_log(&self, n: usize) -> Vec<String> {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if log.len() >= n || std::time::Instant::now() >= until {
                return log;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The back end dies: its socket closes.
    fn die(mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// A chain the fake back end took off a shadow ring.
#[derive(Debug)]
struct Taken {
    head: u16,
    readable: Vec<u8>,
    /// (bounce address, length) of each writable descriptor.
    writable: Vec<(u64, u32)>,
}

impl Fake {
    /// The bounce memory as the back end maps it: its own mapping of the
    /// file it was given, at the table's addresses.
    fn mapped(&self) -> GuestMemoryMmap {
        let r = self.mem[0];
        let (gpa, size, offset) = (r.guest_phys_addr, r.memory_size, r.mmap_offset);
        let file = self.mem_files[0].try_clone().unwrap();
        GuestMemoryMmap::from_ranges_with_files(vec![(
            GuestAddress(gpa),
            size as usize,
            Some(FileOffset::new(file, offset)),
        )])
        .unwrap()
    }

    /// The (desc, avail, used) addresses of ring `q` in the table's terms.
    fn ring(&self, q: u32) -> (u64, u64, u64) {
        let r = self.mem[0];
        let (gpa, user) = (r.guest_phys_addr, r.user_addr);
        let a = self.addrs.iter().find(|a| a.0 == q).unwrap();
        let at = |va: u64| va - user + gpa;
        (at(a.1), at(a.2), at(a.3))
    }
}

impl FakeEnd {
    /// Takes every chain the front end made available on ring `q`.
    fn take(&self, q: u32) -> Vec<Taken> {
        let mut fake = self.fake.lock().unwrap();
        let mem = fake.mapped();
        let (desc, avail, _) = fake.ring(q);
        let (size, mut next, _) = fake.vrings[&q];
        let idx: u16 = mem
            .load(GuestAddress(avail + 2), Ordering::Acquire)
            .unwrap();
        let mut out = Vec::new();
        while next != idx {
            let at = avail + 4 + 2 * u64::from(next % size);
            let head: u16 = mem.read_obj(GuestAddress(at)).unwrap();
            next = next.wrapping_add(1);
            let mut taken = Taken {
                head,
                readable: Vec::new(),
                writable: Vec::new(),
            };
            let mut i = head;
            for _ in 0..size {
                let raw: RawDescriptor = mem
                    .read_obj(GuestAddress(desc + 16 * u64::from(i)))
                    .unwrap();
                let d = SplitDescriptor::from(raw);
                if d.flags() & 2 != 0 {
                    taken.writable.push((d.addr().0, d.len()));
                } else {
                    let mut b = vec![0; d.len() as usize];
                    mem.read_slice(&mut b, d.addr()).unwrap();
                    taken.readable.extend(b);
                }
                if d.flags() & 1 == 0 {
                    break;
                }
                i = d.next();
            }
            out.push(taken);
        }
        fake.vrings.get_mut(&q).unwrap().1 = next;
        out
    }

    /// Answers on ring `q`: `data` into the writable buffers of `writable`,
    /// then the used element (`id`, `len`), then the call.
    fn answer(&self, q: u32, id: u32, writable: &[(u64, u32)], data: &[u8], len: u32) {
        let mut fake = self.fake.lock().unwrap();
        let mem = fake.mapped();
        let (_, _, used) = fake.ring(q);
        let (size, _, next_used) = fake.vrings[&q];
        let mut rest = data;
        for &(addr, cap) in writable {
            let n = rest.len().min(cap as usize);
            mem.write_slice(&rest[..n], GuestAddress(addr)).unwrap();
            rest = &rest[n..];
        }
        let at = used + 4 + 8 * u64::from(next_used % size);
        mem.write_obj(id, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 4)).unwrap();
        let next_used = next_used.wrapping_add(1);
        mem.store(next_used, GuestAddress(used + 2), Ordering::Release)
            .unwrap();
        fake.vrings.get_mut(&q).unwrap().2 = next_used;
        fake.call(q);
    }

    /// Moves ring `q`'s used index to `idx` (a broken back end).
    fn set_used_idx(&self, q: u32, idx: u16) {
        let fake = self.fake.lock().unwrap();
        let mem = fake.mapped();
        let (_, _, used) = fake.ring(q);
        mem.store(idx, GuestAddress(used + 2), Ordering::Release)
            .unwrap();
        fake.call(q);
    }

    /// How many kicks ring `q` got since the last look.
    fn kicks(&self, q: u32) -> u64 {
        let fake = self.fake.lock().unwrap();
        let (_, kick) = fake.kicks.iter().find(|k| u32::from(k.0) == q).unwrap();
        let mut count = [0u8; 8];
        let mut k = kick;
        match std::io::Read::read(&mut k, &mut count) {
            Ok(8) => u64::from_ne_bytes(count),
            _ => 0,
        }
    }
}

impl Fake {
    fn call(&self, q: u32) {
        if let Some((_, call)) = self.calls.iter().find(|c| u32::from(c.0) == q) {
            let mut c = call;
            std::io::Write::write_all(&mut c, &1u64.to_ne_bytes()).unwrap();
        }
    }
}

fn share(queues: u16) -> FsConfig {
    format!("tag=myshare,socket=/run/test/fs.sock,queues={queues},queue_size={QUEUE_SIZE}")
        .parse()
        .unwrap()
}

/// A device connected to a fake back end.
fn device(fake: Fake, config: FsConfig) -> Result<(Fs, FakeEnd), FrontendError> {
    device_with_deadline(fake, config, REPLY_DEADLINE, false)
}

/// A device whose requests may take `deadline`, its watchdog thread under
/// its seccomp filter if `seccomp` (the filter binds that thread only).
fn device_with_deadline(
    fake: Fake,
    config: FsConfig,
    deadline: Duration,
    seccomp: bool,
) -> Result<(Fs, FakeEnd), FrontendError> {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let end = FakeEnd::serve(fake, theirs);
    let backend = Backend::handshake(ours, &config.socket, config.num_queues(), deadline, seccomp)?;
    let fs = Fs::with_backend(config, backend).map_err(|e| e.error)?;
    Ok((fs, end))
}

/// Guest RAM in a memfd, like the VMM's.
fn memfd_memory(size: usize) -> GuestMemoryMmap {
    let fd =
        nix::sys::memfd::memfd_create(c"fs-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let file = File::from(fd);
    file.set_len(size as u64).unwrap();
    GuestMemoryMmap::from_ranges_with_files(vec![(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

#[derive(Debug, Default)]
struct Irq(AtomicUsize);
impl InterruptSignal for Irq {
    fn signal_used_queue(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config_change(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Rings for `n` queues, 64 KiB apart from 0x10000.
fn rings(mem: &GuestMemoryMmap, n: usize) -> Vec<MockSplitQueue<'_, GuestMemoryMmap>> {
    (0..n)
        .map(|i| MockSplitQueue::create(mem, GuestAddress(0x10000 * (i as u64 + 1)), QUEUE_SIZE))
        .collect()
}

fn activate(
    fs: &mut Fs,
    mem: &GuestMemoryMmap,
    mocks: &[MockSplitQueue<'_, GuestMemoryMmap>],
) -> Arc<Irq> {
    let irq = Arc::new(Irq::default());
    fs.set_acked_features(VIRTIO_F_VERSION_1 | EVENT_IDX);
    let queues = mocks.iter().map(|m| m.create_queue().unwrap()).collect();
    fs.activate(mem.clone(), queues, irq.clone()).unwrap();
    // What the event loop does on the lifecycle's state event.
    fs.sync_state(None);
    irq
}

fn handshake_log() -> Vec<String> {
    let protocol = (VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::REPLY_ACK)
        .bits();
    vec![
        "SET_OWNER".to_string(),
        "GET_FEATURES".to_string(),
        "GET_PROTOCOL_FEATURES".to_string(),
        format!("SET_PROTOCOL_FEATURES {protocol:#x}"),
        "GET_QUEUE_NUM".to_string(),
    ]
}

/// Shadow ring sizes of the default slots: 2 descriptors a slot.
fn ring_size(queue: usize) -> u16 {
    if queue == 0 {
        32
    } else {
        512
    }
}

fn start_log(queues: usize) -> Vec<String> {
    let features = VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES;
    let mut log = vec![
        format!("SET_FEATURES {features:#x}"),
        "SET_MEM_TABLE 1 regions".to_string(),
    ];
    for i in 0..queues {
        log.extend([
            format!("SET_VRING_NUM {i} {}", ring_size(i)),
            format!("SET_VRING_BASE {i} 0"),
            format!("SET_VRING_ADDR {i}"),
            format!("SET_VRING_KICK {i} fd=true"),
            format!("SET_VRING_CALL {i} fd=true"),
            format!("SET_VRING_ENABLE {i} 1"),
        ]);
    }
    log
}

#[test]
fn the_handshake_negotiates_features_and_checks_queues() {
    let (fs, end) = device(Fake::new(), share(1)).unwrap();
    assert_eq!(end.log(), handshake_log());
    assert_eq!(fs.state(), State::Connected);
    // The guest gets VERSION_1 only: not the back end's EVENT_IDX (the
    // VMM reads the guest's rings), bit 27, nor the protocol bit.
    assert_eq!(fs.avail_features(), VIRTIO_F_VERSION_1);
    assert_eq!(fs.avail_features() & !GUEST_FEATURES, 0);
    assert_eq!(fs.device_type(), 26);
    assert_eq!(fs.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
}

#[test]
fn activation_hands_memory_and_queues_to_the_back_end() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let (mut fs, end) = device(Fake::new(), share(1)).unwrap();
    let irq = activate(&mut fs, &mem, &mocks);
    assert_eq!(fs.state(), State::Started { activation: 1 });
    let mut want = handshake_log();
    want.extend(start_log(2));
    assert_eq!(end.log(), want);

    let fake = end.fake.lock().unwrap();
    // The memory table is the bounce memory, not guest RAM: its own
    // memfd, at 0, of the bounce memory's size.
    assert_eq!(fake.mem.len(), 1);
    let region = fake.mem[0];
    let (gpa, size, user_addr) = (region.guest_phys_addr, region.memory_size, region.user_addr);
    let bounce = fs.relay.bounce();
    assert_eq!((gpa, size), (0, bounce.size()));
    let host = bounce.memory().get_host_address(GuestAddress(0)).unwrap() as u64;
    assert_eq!(user_addr, host);
    mem.write_slice(b"guest secret", GuestAddress(0x8000))
        .unwrap();
    let mut seen = vec![0u8; size as usize];
    fake.mem_files[0].read_exact_at(&mut seen, 0).unwrap();
    assert!(!seen.windows(12).any(|w| w == b"guest secret"));
    // Ring addresses are this process's addresses of the shadow rings.
    for (i, ring) in bounce.rings().iter().enumerate() {
        let (index, desc, avail, used) = fake.addrs[i];
        assert_eq!(index as usize, i);
        assert_eq!(desc - host, ring.desc);
        assert_eq!(avail - host, ring.avail);
        assert_eq!(used - host, ring.used);
    }
    drop(fake);
    // Nothing was posted: no kick, no interrupt.
    assert_eq!(end.kicks(1), 0);
    fs.on_queue(1, None);
    assert_eq!(irq.0.load(Ordering::SeqCst), 0);
}

/// Guest buffers: 4 KiB apart from here.
const BUF: u64 = 0x80000;

fn buf(i: u64) -> u64 {
    BUF + 0x1000 * i
}

/// Makes a chain of `parts` (addr, len, device-writable) available on
/// `mock`, its descriptors from index `at`.
fn offer(
    mem: &GuestMemoryMmap,
    mock: &MockSplitQueue<'_, GuestMemoryMmap>,
    at: u16,
    parts: &[(u64, u32, bool)],
) {
    for (k, &(addr, len, writable)) in parts.iter().enumerate() {
        let index = at + k as u16;
        let more = k + 1 < parts.len();
        let flags = if writable { 2 } else { 0 } | u16::from(more);
        let d = SplitDescriptor::new(addr, len, flags, index + 1);
        mem.write_obj(
            RawDescriptor::from(d),
            mock.desc_table_addr().unchecked_add(16 * u64::from(index)),
        )
        .unwrap();
    }
    let idx: u16 = mem.read_obj(mock.avail_addr().unchecked_add(2)).unwrap();
    let slot = mock
        .avail_addr()
        .unchecked_add(4 + 2 * u64::from(idx % QUEUE_SIZE));
    mem.write_obj(at, slot).unwrap();
    mem.write_obj(idx.wrapping_add(1), mock.avail_addr().unchecked_add(2))
        .unwrap();
}

/// The guest's used ring so far: (id, len) elements.
fn used(mem: &GuestMemoryMmap, mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let idx: u16 = mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
    (0..u64::from(idx))
        .map(|i| {
            let at = mock
                .used_addr()
                .unchecked_add(4 + 8 * (i % u64::from(QUEUE_SIZE)));
            (
                mem.read_obj(at).unwrap(),
                mem.read_obj(at.unchecked_add(4)).unwrap(),
            )
        })
        .collect()
}

/// A FUSE request: a 40-byte in-header (READ, `unique`) then `args`.
fn fuse_request(unique: u64, args: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8; 40];
    r[..4].copy_from_slice(&(40 + args.len() as u32).to_le_bytes());
    r[4..8].copy_from_slice(&15u32.to_le_bytes());
    r[8..16].copy_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(args);
    r
}

/// Writes a request of `unique` at `buf(2 * i)` and offers it with
/// `writable` bytes at `buf(2 * i + 1)`, descriptors from `2 * i`.
fn offer_request(
    mem: &GuestMemoryMmap,
    mock: &MockSplitQueue<'_, GuestMemoryMmap>,
    i: u16,
    unique: u64,
    writable: u32,
) {
    let req = fuse_request(unique, &[i as u8; 8]);
    let (r, w) = (buf(2 * u64::from(i)), buf(2 * u64::from(i) + 1));
    mem.write_slice(&req, GuestAddress(r)).unwrap();
    offer(
        mem,
        mock,
        2 * i,
        &[(r, req.len() as u32, false), (w, writable, true)],
    );
}

#[test]
fn a_request_goes_round_trip_through_the_bounce_memory() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let (mut fs, end) = device(Fake::new(), share(1)).unwrap();
    let irq = activate(&mut fs, &mem, &mocks);
    // The in-header and the arguments in two guest buffers; the answer
    // goes to two more (16 and 4096 bytes).
    let header = fuse_request(0xabcd, &[]);
    let args: Vec<u8> = (0..24u8).collect();
    mem.write_slice(&header, GuestAddress(buf(0))).unwrap();
    mem.write_slice(&args, GuestAddress(buf(1))).unwrap();
    offer(
        &mem,
        &mocks[1],
        3,
        &[
            (buf(0), 40, false),
            (buf(1), 24, false),
            (buf(2), 16, true),
            (buf(3), 4096, true),
        ],
    );
    fs.on_queue(1, None);
    assert_eq!(end.kicks(1), 1);
    let taken = end.take(1);
    assert_eq!(taken.len(), 1);
    let t = &taken[0];
    assert_eq!(t.readable, [header.clone(), args.clone()].concat());
    assert_eq!(t.writable.iter().map(|w| w.1).sum::<u32>(), 16 + 4096);
    assert_eq!(t.head % 2, 0);
    assert_eq!(fs.relay.in_flight(1), 1);
    assert!(used(&mem, &mocks[1]).is_empty());
    // The answer: a 16-byte out-header and 100 bytes of data.
    let reply: Vec<u8> = (0..116u32).map(|b| (b * 7) as u8).collect();
    end.answer(1, u32::from(t.head), &t.writable, &reply, 116);
    fs.on_queue(1, None);
    assert_eq!(used(&mem, &mocks[1]), [(3, 116)]);
    let mut got = vec![0u8; 16];
    mem.read_slice(&mut got, GuestAddress(buf(2))).unwrap();
    assert_eq!(got, reply[..16]);
    let mut got = vec![0u8; 101];
    mem.read_slice(&mut got, GuestAddress(buf(3))).unwrap();
    assert_eq!(got[..100], reply[16..]);
    assert_eq!(got[100], 0, "nothing past the length the back end gave");
    assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    assert_eq!(fs.relay.in_flight(1), 0);
    assert_eq!(fs.relay.stats.completed, 1);
    // The high-priority queue works the same way; a FORGET has no
    // writable part and is returned with 0 bytes.
    mem.write_slice(&fuse_request(9, &[0; 8]), GuestAddress(buf(8)))
        .unwrap();
    offer(&mem, &mocks[0], 0, &[(buf(8), 48, false)]);
    fs.on_queue(0, None);
    let taken = end.take(0);
    assert_eq!(taken.len(), 1);
    assert!(taken[0].writable.is_empty());
    end.answer(0, u32::from(taken[0].head), &[], &[], 0);
    fs.on_queue(0, None);
    assert_eq!(used(&mem, &mocks[0]), [(0, 0)]);
    assert!(fs.failure().is_none());
}

/// A device whose request queue has two small slots.
fn tight_device() -> (Fs, FakeEnd) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let end = FakeEnd::serve(Fake::new(), theirs);
    let config = share(1);
    let backend = Backend::handshake(ours, &config.socket, 2, REPLY_DEADLINE, false).unwrap();
    let sizing = [
        QueueSizing { small: 1, large: 0 },
        QueueSizing { small: 2, large: 0 },
    ];
    let fs = Fs::with_sizing(config, backend, &sizing).unwrap();
    (fs, end)
}

#[test]
fn more_requests_than_slots_wait_on_the_guest_ring() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let (mut fs, end) = tight_device();
    let irq = activate(&mut fs, &mem, &mocks);
    for i in 0..5 {
        offer_request(&mem, &mocks[1], i, 100 + u64::from(i), 64);
    }
    fs.on_queue(1, None);
    let first = end.take(1);
    assert_eq!(first.len(), 2);
    assert!(fs.relay.waiting(1));
    assert_eq!(fs.relay.in_flight(1), 2);
    // Notifying again changes nothing while no slot is free.
    fs.on_queue(1, None);
    assert!(end.take(1).is_empty());
    assert!(used(&mem, &mocks[1]).is_empty());
    // Each answer frees a slot and the next request goes out, in order.
    let mut pending: Vec<Taken> = first;
    let mut answered = Vec::new();
    while let Some(t) = (!pending.is_empty()).then(|| pending.remove(0)) {
        let unique = u64::from_le_bytes(t.readable[8..16].try_into().unwrap());
        let mut reply = vec![0u8; 16];
        reply[8..].copy_from_slice(&unique.to_le_bytes());
        end.answer(1, u32::from(t.head), &t.writable, &reply, 16);
        fs.on_queue(1, None);
        answered.push(unique);
        pending.extend(end.take(1));
        assert!(fs.relay.in_flight(1) <= 2);
    }
    assert_eq!(answered, [100, 101, 102, 103, 104]);
    let used = used(&mem, &mocks[1]);
    assert_eq!(used, [(0, 16), (2, 16), (4, 16), (6, 16), (8, 16)]);
    for (k, (id, _)) in used.iter().enumerate() {
        let mut out = [0u8; 16];
        mem.read_slice(&mut out, GuestAddress(buf(u64::from(*id) + 1)))
            .unwrap();
        assert_eq!(
            u64::from_le_bytes(out[8..].try_into().unwrap()),
            100 + k as u64
        );
    }
    assert!(!fs.relay.waiting(1));
    assert_eq!(irq.0.load(Ordering::SeqCst), 5);
}

#[test]
fn an_oversized_request_gets_an_error_reply_and_others_go_on() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    // Small slots only: 8 KiB is the most a request may carry.
    let (mut fs, end) = tight_device();
    activate(&mut fs, &mem, &mocks);
    // 40 + 8 readable, 16 + 16 KiB writable: too large.
    mem.write_slice(&fuse_request(0x77, &[0; 8]), GuestAddress(buf(0)))
        .unwrap();
    offer(
        &mem,
        &mocks[1],
        0,
        &[
            (buf(0), 48, false),
            (buf(1), 16, true),
            (buf(2), 16 << 10, true),
        ],
    );
    // Too large, and no room for an answer: 0 bytes.
    offer(&mem, &mocks[1], 4, &[(buf(8), 16 << 10, false)]);
    // A normal one behind them.
    offer_request(&mem, &mocks[1], 5, 0x78, 32);
    fs.on_queue(1, None);
    let used_now = used(&mem, &mocks[1]);
    assert_eq!(used_now, [(0, 16), (4, 0)]);
    let mut out = [0u8; 16];
    mem.read_slice(&mut out, GuestAddress(buf(1))).unwrap();
    assert_eq!(u32::from_le_bytes(out[..4].try_into().unwrap()), 16);
    assert_eq!(
        i32::from_le_bytes(out[4..8].try_into().unwrap()),
        -libc::EIO
    );
    assert_eq!(u64::from_le_bytes(out[8..].try_into().unwrap()), 0x77);
    assert_eq!(fs.relay.stats.oversized, 2);
    let taken = end.take(1);
    assert_eq!(taken.len(), 1);
    assert_eq!(&taken[0].readable[8..16], &0x78u64.to_le_bytes());
    end.answer(
        1,
        u32::from(taken[0].head),
        &taken[0].writable,
        &[1; 16],
        16,
    );
    fs.on_queue(1, None);
    assert_eq!(used(&mem, &mocks[1])[2], (10, 16));
    assert!(fs.failure().is_none());
}

#[test]
fn bad_chains_from_the_guest_are_returned_empty_and_never_posted() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let (mut fs, end) = device(Fake::new(), share(1)).unwrap();
    activate(&mut fs, &mem, &mocks);
    // Outside guest memory; writable before readable; all empty.
    offer(&mem, &mocks[1], 0, &[(0xffff_0000, 64, false)]);
    offer(
        &mem,
        &mocks[1],
        1,
        &[(buf(0), 16, true), (buf(1), 16, false)],
    );
    offer(&mem, &mocks[1], 3, &[(buf(0), 0, false), (buf(1), 0, true)]);
    fs.on_queue(1, None);
    assert_eq!(used(&mem, &mocks[1]), [(0, 0), (1, 0), (3, 0)]);
    assert!(end.take(1).is_empty());
    assert_eq!(end.kicks(1), 0);
    assert_eq!(fs.relay.stats.refused, 3);
}

#[test]
fn bogus_used_ids_and_lengths_from_the_back_end_are_refused() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let (mut fs, end) = device(Fake::new(), share(1)).unwrap();
    let fatal = FatalSignal::new().unwrap();
    fs.set_fatal_signal(fatal.clone());
    activate(&mut fs, &mem, &mocks);
    offer_request(&mem, &mocks[1], 0, 1, 48);
    fs.on_queue(1, None);
    let t = end.take(1).remove(0);
    // An odd id, an id outside the ring, a slot not in flight.
    for id in [u32::from(t.head) + 1, 0xffff_ffff, u32::from(t.head) + 2] {
        end.answer(1, id, &[], &[], 8);
        fs.on_queue(1, None);
    }
    assert_eq!(fs.relay.stats.bogus_ids, 3);
    assert!(used(&mem, &mocks[1]).is_empty());
    assert_eq!(fs.relay.in_flight(1), 1);
    // The real one, with a length far past what was reserved: bounded.
    end.answer(1, u32::from(t.head), &t.writable, &[0x5a; 48], 1 << 30);
    fs.on_queue(1, None);
    assert_eq!(used(&mem, &mocks[1]), [(0, 48)]);
    assert_eq!(fs.relay.stats.long_lens, 1);
    // The same id again: no longer in flight.
    end.answer(1, u32::from(t.head), &[], &[], 4);
    fs.on_queue(1, None);
    assert_eq!(fs.relay.stats.bogus_ids, 4);
    assert_eq!(used(&mem, &mocks[1]).len(), 1);
    assert!(!fatal.is_raised());
    // A used index that jumps past the ring: the back end is broken.
    end.set_used_idx(1, 1000);
    fs.on_queue(1, None);
    assert_eq!(fs.state(), State::Failed);
    let why = fatal.take().unwrap();
    assert!(why.contains("tag=myshare"), "{why}");
    assert!(why.contains("used index of queue 1"), "{why}");
}

#[test]
fn reset_forgets_requests_in_flight_and_reactivation_serves_again() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let (mut fs, end) = device(Fake::new(), share(1)).unwrap();
    activate(&mut fs, &mem, &mocks);
    offer_request(&mem, &mocks[1], 0, 1, 48);
    fs.on_queue(1, None);
    let stale = end.take(1).remove(0);
    assert!(fs.reset());
    fs.sync_state(None);
    assert_eq!(fs.state(), State::Connected);
    assert_eq!(fs.relay.in_flight(1), 0);
    // A new driver: fresh rings elsewhere.
    let fresh: Vec<_> = (0..2)
        .map(|i| MockSplitQueue::create(&mem, GuestAddress(0x40000 + 0x10000 * i), QUEUE_SIZE))
        .collect();
    activate(&mut fs, &mem, &fresh);
    assert_eq!(fs.state(), State::Started { activation: 2 });
    // The back end finishing the old request late: not in flight any more.
    end.answer(1, u32::from(stale.head), &[], &[], 16);
    fs.on_queue(1, None);
    assert!(used(&mem, &fresh[1]).is_empty());
    assert!(used(&mem, &mocks[1]).is_empty());
    assert_eq!(fs.relay.stats.bogus_ids, 1);
    // The new activation's requests are served.
    offer_request(&mem, &fresh[1], 0, 2, 48);
    fs.on_queue(1, None);
    let t = end.take(1).remove(0);
    assert_eq!(&t.readable[8..16], &2u64.to_le_bytes());
    end.answer(1, u32::from(t.head), &t.writable, &[3; 20], 20);
    fs.on_queue(1, None);
    assert_eq!(used(&mem, &fresh[1]), [(0, 20)]);
    assert!(fs.failure().is_none());
}

#[test]
fn a_back_end_dying_with_requests_in_flight_is_fatal() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let (fs, end) = device(Fake::new(), share(1)).unwrap();
    let fatal = FatalSignal::new().unwrap();
    let fs = Arc::new(Mutex::new(fs));
    fs.lock().unwrap().set_fatal_signal(fatal.clone());
    let mut events: EventManager<Arc<Mutex<Fs>>> = EventManager::new().unwrap();
    events.add_subscriber(fs.clone());
    {
        let mut dev = fs.lock().unwrap();
        dev.set_acked_features(VIRTIO_F_VERSION_1);
        let queues = mocks.iter().map(|m| m.create_queue().unwrap()).collect();
        dev.activate(mem.clone(), queues, Arc::new(Irq::default()))
            .unwrap();
    }
    events.run_with_timeout(1000).unwrap();
    offer_request(&mem, &mocks[1], 0, 1, 48);
    fs.lock().unwrap().queue_events()[1].write(1).unwrap();
    events.run_with_timeout(1000).unwrap();
    assert_eq!(end.take(1).len(), 1);
    end.die();
    events.run_with_timeout(1000).unwrap();
    assert_eq!(fs.lock().unwrap().state(), State::Failed);
    let why = fatal.take().unwrap();
    assert!(why.contains("closed the connection"), "{why}");
    assert!(used(&mem, &mocks[1]).is_empty());
    // Guest notifies after the failure are drained, not served: quiet.
    fs.lock().unwrap().queue_events()[1].write(1).unwrap();
    events.run_with_timeout(0).unwrap();
    assert_eq!(events.run_with_timeout(0).unwrap(), 0);
}

#[test]
fn requests_go_round_trip_through_the_event_loop() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let (fs, end) = device(Fake::new(), share(1)).unwrap();
    let fs = Arc::new(Mutex::new(fs));
    let mut events: EventManager<Arc<Mutex<Fs>>> = EventManager::new().unwrap();
    events.add_subscriber(fs.clone());
    let irq = Arc::new(Irq::default());
    {
        let mut dev = fs.lock().unwrap();
        dev.set_acked_features(VIRTIO_F_VERSION_1);
        let queues = mocks.iter().map(|m| m.create_queue().unwrap()).collect();
        dev.activate(mem.clone(), queues, irq.clone()).unwrap();
    }
    // The state event starts the rings.
    events.run_with_timeout(1000).unwrap();
    assert_eq!(fs.lock().unwrap().state(), State::Started { activation: 1 });
    // The guest's notify (the ioeventfd) wakes the loop, which posts.
    offer_request(&mem, &mocks[1], 0, 5, 64);
    fs.lock().unwrap().queue_events()[1].write(1).unwrap();
    events.run_with_timeout(1000).unwrap();
    assert_eq!(end.kicks(1), 1);
    let t = end.take(1).remove(0);
    // The back end's call wakes it again, which completes.
    end.answer(1, u32::from(t.head), &t.writable, &[7; 64], 64);
    events.run_with_timeout(1000).unwrap();
    assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    assert_eq!(used(&mem, &mocks[1]), [(0, 64)]);
    // Nothing left ready: the loop is quiet.
    assert_eq!(events.run_with_timeout(0).unwrap(), 0);
}

#[test]
fn idle_large_slots_are_trimmed_after_the_last_large_request() {
    let mem = memfd_memory(4 << 20);
    let mocks = rings(&mem, 2);
    let (mut fs, end) = device(Fake::new(), share(1)).unwrap();
    activate(&mut fs, &mem, &mocks);
    // A 64 KiB read: a large slot.
    offer_request(&mem, &mocks[1], 0, 1, 16);
    offer(
        &mem,
        &mocks[1],
        4,
        &[(buf(0), 48, false), (0x100000, 64 << 10, true)],
    );
    fs.on_queue(1, None);
    let taken = end.take(1);
    assert_eq!(taken.len(), 2);
    assert!(!fs.relay.trim_due());
    for t in &taken {
        let len = t.writable[0].1;
        end.answer(
            1,
            u32::from(t.head),
            &t.writable,
            &vec![9; len as usize],
            len,
        );
    }
    fs.on_queue(1, None);
    assert!(fs.relay.trim_due());
    assert!(fs.trim_armed);
    let large = t_large_addr(&taken);
    let mut probe = [0u8; 4];
    fs.relay
        .bounce()
        .memory()
        .read_slice(&mut probe, GuestAddress(large))
        .unwrap();
    assert_eq!(probe, [9; 4]);
    // What the timer does.
    fs.relay.trim();
    assert!(!fs.relay.trim_due());
    fs.relay
        .bounce()
        .memory()
        .read_slice(&mut probe, GuestAddress(large))
        .unwrap();
    assert_eq!(probe, [0; 4]);
}

fn t_large_addr(taken: &[Taken]) -> u64 {
    taken
        .iter()
        .find(|t| t.writable[0].1 == 64 << 10)
        .unwrap()
        .writable[0]
        .0
}

#[test]
fn reset_stops_the_rings_and_reactivation_starts_them_again() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let (mut fs, end) = device(Fake::new(), share(1)).unwrap();
    activate(&mut fs, &mem, &mocks);
    assert!(fs.reset());
    fs.sync_state(None);
    assert_eq!(fs.state(), State::Connected);
    let log = end.log();
    let after_start = handshake_log().len() + start_log(2).len();
    assert_eq!(
        &log[after_start..],
        &["GET_VRING_BASE 0", "GET_VRING_BASE 1", "RESET_DEVICE"]
    );
    // A second reset changes nothing more.
    assert!(fs.reset());
    fs.sync_state(None);
    assert_eq!(end.log().len(), log.len());
    activate(&mut fs, &mem, &mocks);
    assert_eq!(fs.state(), State::Started { activation: 2 });
    assert_eq!(&end.log()[log.len()..], &start_log(2)[..]);
    // Reset and re-activation before the loop looked: stop, then start.
    assert!(fs.reset());
    let n = end.log().len();
    activate(&mut fs, &mem, &mocks);
    assert_eq!(fs.state(), State::Started { activation: 3 });
    let log = end.log();
    assert_eq!(log[n], "GET_VRING_BASE 0");
    assert_eq!(&log[n + 3..], &start_log(2)[..]);
    assert!(fs.failure().is_none());
}

#[test]
fn a_back_end_that_dies_fails_the_device_and_raises_the_fatal_signal() {
    let (mut fs, end) = device(Fake::new(), share(1)).unwrap();
    let fatal = FatalSignal::new().unwrap();
    fs.set_fatal_signal(fatal.clone());
    let fs = Arc::new(Mutex::new(fs));
    let mut events: EventManager<Arc<Mutex<Fs>>> = EventManager::new().unwrap();
    events.add_subscriber(fs.clone());
    // Alive and quiet: nothing happens.
    assert_eq!(events.run_with_timeout(0).unwrap(), 0);
    assert!(!fatal.is_raised());
    end.die();
    events.run_with_timeout(1000).unwrap();
    assert_eq!(fs.lock().unwrap().state(), State::Failed);
    let why = fatal.take().unwrap();
    assert!(why.contains("tag=myshare"), "{why}");
    assert!(why.contains("socket=/run/test/fs.sock"), "{why}");
    assert!(why.contains("closed the connection"), "{why}");
    // The dead socket left the loop: it does not spin.
    assert_eq!(events.run_with_timeout(0).unwrap(), 0);
}

#[test]
fn a_back_end_that_dies_before_activation_fails_it_cleanly() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let (mut fs, end) = device(Fake::new(), share(1)).unwrap();
    let fatal = FatalSignal::new().unwrap();
    fs.set_fatal_signal(fatal.clone());
    end.die();
    // The guest activates; the event loop's start finds the socket dead.
    activate(&mut fs, &mem, &mocks);
    assert_eq!(fs.state(), State::Failed);
    let why = fatal.take().unwrap();
    assert!(why.contains("SET_FEATURES"), "{why}");
    // Later resets and activations are harmless.
    assert!(fs.reset());
    fs.sync_state(None);
    assert_eq!(fs.state(), State::Failed);
}

#[test]
fn a_refused_request_fails_the_device_naming_it() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let mut fake = Fake::new();
    fake.refuse = Some("SET_VRING_ADDR");
    let (mut fs, _end) = device(fake, share(1)).unwrap();
    let fatal = FatalSignal::new().unwrap();
    fs.set_fatal_signal(fatal.clone());
    activate(&mut fs, &mem, &mocks);
    assert_eq!(fs.state(), State::Failed);
    let why = fatal.take().unwrap();
    assert!(why.contains("SET_VRING_ADDR failed"), "{why}");
    assert_eq!(fs.failure(), Some(why.as_str()));
}

#[test]
fn too_few_back_end_queues_is_an_error_at_connect() {
    // queues=2 needs 3 vrings; the fake serves 2 (like virtiofsd).
    let err = device(Fake::new(), share(2)).unwrap_err();
    assert!(
        matches!(err, FrontendError::TooFewQueues { have: 2, need: 3 }),
        "{err}"
    );
    assert!(err.to_string().contains("serves 2 queues"), "{err}");
}

#[test]
fn a_back_end_without_version_1_is_refused() {
    let mut fake = Fake::new();
    fake.features = PROTOCOL_FEATURES;
    let err = device(fake, share(1)).unwrap_err();
    assert!(matches!(err, FrontendError::NoVersion1(_)), "{err}");
}

#[test]
fn a_back_end_without_protocol_features_gets_no_enable_messages() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let mut fake = Fake::new();
    fake.features = VIRTIO_F_VERSION_1;
    let (mut fs, end) = device(fake, share(1)).unwrap();
    assert_eq!(end.log(), &["SET_OWNER", "GET_FEATURES"]);
    activate(&mut fs, &mem, &mocks);
    assert_eq!(fs.state(), State::Started { activation: 1 });
    // SET_FEATURES, SET_MEM_TABLE, then five requests per queue.
    let log = end.wait_log(2 + 2 + 2 * 5);
    assert_eq!(log.len(), 2 + 2 + 2 * 5, "{log:?}");
    assert_eq!(log[2], format!("SET_FEATURES {VIRTIO_F_VERSION_1:#x}"));
    assert!(
        !log.iter().any(|l| l.starts_with("SET_VRING_ENABLE")),
        "{log:?}"
    );
    // The guest's EVENT_IDX was not offered, so it is not passed on.
    assert_eq!(fs.avail_features(), VIRTIO_F_VERSION_1);
}

#[test]
fn config_space_reads_give_the_tag_and_the_request_queues() {
    let (fs, _end) = device(Fake::new(), share(1)).unwrap();
    let mut tag = [0xffu8; TAG_LEN];
    fs.read_config(0, &mut tag);
    assert_eq!(&tag[..7], b"myshare");
    assert!(tag[7..].iter().all(|b| *b == 0));
    let mut queues = [0u8; 4];
    fs.read_config(TAG_LEN as u64, &mut queues);
    assert_eq!(u32::from_le_bytes(queues), 1);
    // Byte reads, reads across the end, reads far out: zeros, no panic.
    let mut one = [0u8; 1];
    fs.read_config(2, &mut one);
    assert_eq!(one[0], b's');
    let mut across = [0xffu8; 8];
    fs.read_config(TAG_LEN as u64 + 2, &mut across);
    assert_eq!(across, [0; 8]);
    fs.read_config(u64::MAX, &mut across);
    assert_eq!(across, [0; 8]);
    // Writes are ignored.
    let mut fs = fs;
    fs.write_config(0, b"other");
    fs.read_config(0, &mut tag);
    assert_eq!(&tag[..7], b"myshare");
}

#[test]
fn nobody_listening_is_a_clear_error_at_connect() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("fs.sock");
    // A socket file nobody listens on any more.
    drop(UnixListener::bind(&path).unwrap());
    let config: FsConfig = format!("tag=data,socket={}", path.display())
        .parse()
        .unwrap();
    let err = Fs::connect(config, false).unwrap_err().to_string();
    assert!(err.contains("tag=data"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("connecting to the vhost-user socket"), "{err}");
    let missing: FsConfig = "tag=x,socket=/nonexistent/fs.sock".parse().unwrap();
    let err = Fs::connect(missing, false).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/fs.sock"), "{err}");
}

#[test]
fn connect_through_a_listener_works() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fs.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        FakeEnd::serve(Fake::new(), stream)
    });
    let config: FsConfig = format!("tag=data,socket={}", path.display())
        .parse()
        .unwrap();
    let fs = Fs::connect(config, false).unwrap();
    let end = server.join().unwrap();
    assert_eq!(end.log(), handshake_log());
    assert_eq!(fs.config().socket, Path::new(&path));
    assert!(fs.backend.socket_fd().as_raw_fd() >= 0);
}

#[test]
fn a_guest_cycling_reset_and_activation_stays_served() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let (mut fs, end) = device(Fake::new(), share(1)).unwrap();
    for _ in 0..100 {
        activate(&mut fs, &mem, &mocks);
        assert!(fs.reset());
        fs.sync_state(None);
    }
    activate(&mut fs, &mem, &mocks);
    assert_eq!(fs.state(), State::Started { activation: 101 });
    // Every cycle: one start and one stop (2 GET_VRING_BASE, RESET_DEVICE).
    let want = handshake_log().len() + 101 * start_log(2).len() + 100 * 3;
    assert_eq!(end.log().len(), want);
    assert!(fs.failure().is_none());
}

/// A fake back end that takes `request` and then answers nothing; the
/// sender releases it.
fn stalling(request: &'static str) -> (Fake, Sender<()>) {
    let (release, gate) = mpsc::channel();
    let mut fake = Fake::new();
    fake.stall = Some((request, gate));
    (fake, release)
}

/// A device (with its fatal signal) whose back end goes silent at
/// `request`; the sender releases the back end.
fn stalled_device(
    request: &'static str,
    deadline: Duration,
    seccomp: bool,
) -> (Fs, FatalSignal, Sender<()>, FakeEnd) {
    let (fake, release) = stalling(request);
    let (mut fs, end) = device_with_deadline(fake, share(1), deadline, seccomp).unwrap();
    let fatal = FatalSignal::new().unwrap();
    fs.set_fatal_signal(fatal.clone());
    (fs, fatal, release, end)
}

/// Generous: the deadline plus scheduling on a loaded machine.
const SLACK: Duration = Duration::from_secs(10);

#[test]
fn a_back_end_that_stops_answering_fails_the_device_at_the_deadline() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let deadline = Duration::from_millis(300);
    // The watchdog thread under its seccomp filter: a system call the
    // filter lacks would kill this test process.
    let (mut fs, fatal, release, _end) = stalled_device("SET_MEM_TABLE", deadline, true);
    let started = Instant::now();
    // The event loop's start blocks on SET_MEM_TABLE until the watchdog
    // shuts the socket down.
    activate(&mut fs, &mem, &mocks);
    let took = started.elapsed();
    assert_eq!(fs.state(), State::Failed);
    assert!(
        took >= deadline,
        "failed after {took:?}, before the deadline"
    );
    assert!(took < deadline + SLACK, "took {took:?}");
    let why = fatal.take().unwrap();
    assert!(why.contains("tag=myshare"), "{why}");
    assert!(
        why.contains("did not answer vhost-user SET_MEM_TABLE within 0.3 s"),
        "{why}"
    );
    assert_eq!(fs.failure(), Some(why.as_str()));
    // Failed for good: a reset sends nothing (no second wait).
    let again = Instant::now();
    assert!(fs.reset());
    fs.sync_state(None);
    assert!(again.elapsed() < deadline, "{:?}", again.elapsed());
    drop(release);
}

#[test]
fn a_stalled_request_in_the_event_loop_returns_to_the_loop() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let deadline = Duration::from_millis(200);
    let (fs, fatal, release, _end) = stalled_device("SET_FEATURES", deadline, false);
    let fs = Arc::new(Mutex::new(fs));
    let mut events: EventManager<Arc<Mutex<Fs>>> = EventManager::new().unwrap();
    events.add_subscriber(fs.clone());
    {
        let mut dev = fs.lock().unwrap();
        dev.set_acked_features(VIRTIO_F_VERSION_1);
        let queues = mocks.iter().map(|m| m.create_queue().unwrap()).collect();
        dev.activate(mem.clone(), queues, Arc::new(Irq::default()))
            .unwrap();
    }
    let started = Instant::now();
    events.run_with_timeout(1000).unwrap();
    let took = started.elapsed();
    assert!(took < deadline + SLACK, "took {took:?}");
    assert_eq!(fs.lock().unwrap().state(), State::Failed);
    assert!(fatal.is_raised());
    let why = fatal.take().unwrap();
    assert!(why.contains("SET_FEATURES within 0.2 s"), "{why}");
    // The shut-down socket left the loop: it does not spin.
    assert_eq!(events.run_with_timeout(0).unwrap(), 0);
    drop(release);
}

#[test]
fn a_back_end_silent_during_the_handshake_is_an_error_at_connect() {
    let (fake, release) = stalling("GET_FEATURES");
    let deadline = Duration::from_millis(200);
    let started = Instant::now();
    let err = device_with_deadline(fake, share(1), deadline, false).unwrap_err();
    assert!(started.elapsed() < deadline + SLACK);
    assert!(
        matches!(
            err,
            FrontendError::NoAnswer {
                request: "GET_FEATURES",
                ..
            }
        ),
        "{err}"
    );
    drop(release);
}

#[test]
fn the_deadline_is_per_request_not_per_connection() {
    // Requests that each take a fraction of the deadline, together many
    // times it: the watchdog never fires.
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let deadline = Duration::from_millis(500);
    let watchdog = Watchdog::start(ours.try_clone().unwrap(), deadline, true).unwrap();
    let started = Instant::now();
    for _ in 0..40 {
        watchdog.arm();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!watchdog.disarm(), "fired after {:?}", started.elapsed());
    }
    assert!(started.elapsed() > deadline);
    // Idle (disarmed) for longer than the deadline: nothing fires either.
    std::thread::sleep(deadline + Duration::from_millis(100));
    assert!(!watchdog.disarm());
    let mut byte = [0u8; 1];
    ours.set_nonblocking(true).unwrap();
    let peek = std::io::Read::read(&mut &ours, &mut byte);
    assert!(
        matches!(&peek, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the socket is still open: {peek:?}"
    );
    // One request left unanswered: the socket is shut down, a reader sees
    // end of file.
    watchdog.arm();
    let until = Instant::now() + SLACK;
    ours.set_nonblocking(false).unwrap();
    ours.set_read_timeout(Some(SLACK)).unwrap();
    let n = std::io::Read::read(&mut &ours, &mut byte).unwrap();
    assert_eq!(n, 0);
    assert!(Instant::now() < until);
    assert!(watchdog.disarm());
}

#[test]
fn a_full_guest_ring_is_taken_in_budgeted_rounds() {
    use crate::devices::virtio::queue::QUEUE_BUDGET;
    let mem = memfd_memory(1 << 20);
    let config: FsConfig = "tag=myshare,socket=/run/test/fs.sock,queue_size=128"
        .parse()
        .unwrap();
    let (mut fs, end) = device(Fake::new(), config).unwrap();
    let mocks: Vec<_> = (0..2u64)
        .map(|i| MockSplitQueue::create(&mem, GuestAddress(0x10000 * (i + 1)), 128))
        .collect();
    activate(&mut fs, &mem, &mocks);
    // 100 FORGET-like requests (readable only), all made available.
    mem.write_slice(&fuse_request(1, &[0; 8]), GuestAddress(buf(0)))
        .unwrap();
    let ring = &mocks[1];
    for i in 0..100u16 {
        let d = SplitDescriptor::new(buf(0), 48, 0, 0);
        let at = ring.desc_table_addr().unchecked_add(16 * u64::from(i));
        mem.write_obj(RawDescriptor::from(d), at).unwrap();
        let slot = ring.avail_addr().unchecked_add(4 + 2 * u64::from(i));
        mem.write_obj(i, slot).unwrap();
    }
    mem.write_obj(100u16, ring.avail_addr().unchecked_add(2))
        .unwrap();
    fs.on_queue(1, None);
    assert_eq!(end.take(1).len(), QUEUE_BUDGET);
    // Work is left: the queue's eventfd was made readable again, so the
    // event loop comes back after serving the other ready events.
    assert_eq!(fs.queue_events()[1].read().unwrap(), 1);
    fs.on_queue(1, None);
    assert_eq!(end.take(1).len(), 100 - QUEUE_BUDGET);
    assert!(fs.queue_events()[1].read().is_err());
    assert_eq!(fs.relay.in_flight(1), 100);
}

#[test]
fn a_large_write_reaches_the_back_end_byte_for_byte() {
    let mem = memfd_memory(4 << 20);
    // A WRITE of 256 KiB: header and write_in, then the data in 64 pages.
    let header = fuse_request(0x99, &[0; 40]);
    let data: Vec<u8> = (0..256u32 << 10).map(|i| (i % 251) as u8).collect();
    mem.write_slice(&header, GuestAddress(buf(0))).unwrap();
    mem.write_slice(&data, GuestAddress(0x100000)).unwrap();
    let mut parts = vec![(buf(0), header.len() as u32, false)];
    // Pages in reverse order in guest memory: the chain's order counts.
    for page in (0..64u64).rev() {
        parts.push((0x100000 + page * 4096, 4096, false));
    }
    parts.push((buf(1), 24, true));
    // A ring of 16 cannot hold 66 descriptors: a bigger one.
    let config: FsConfig = "tag=myshare,socket=/run/test/fs.sock,queue_size=128"
        .parse()
        .unwrap();
    let (mut fs2, end2) = device(Fake::new(), config).unwrap();
    let big: Vec<_> = (0..2u64)
        .map(|i| MockSplitQueue::create(&mem, GuestAddress(0x10000 * (i + 1)), 128))
        .collect();
    activate(&mut fs2, &mem, &big);
    for (k, &(addr, len, writable)) in parts.iter().enumerate() {
        let index = k as u16;
        let more = k + 1 < parts.len();
        let flags = if writable { 2 } else { 0 } | u16::from(more);
        let d = SplitDescriptor::new(addr, len, flags, index + 1);
        let at = big[1]
            .desc_table_addr()
            .unchecked_add(16 * u64::from(index));
        mem.write_obj(RawDescriptor::from(d), at).unwrap();
    }
    mem.write_obj(0u16, big[1].avail_addr().unchecked_add(4))
        .unwrap();
    mem.write_obj(1u16, big[1].avail_addr().unchecked_add(2))
        .unwrap();
    fs2.on_queue(1, None);
    let t = end2.take(1).remove(0);
    let mut want = header.clone();
    for page in (0..64usize).rev() {
        want.extend_from_slice(&data[page * 4096..(page + 1) * 4096]);
    }
    assert_eq!(t.readable.len(), want.len());
    assert!(t.readable == want, "the bytes differ");
    assert_eq!(t.writable.iter().map(|w| w.1).sum::<u32>(), 24);
    end2.answer(1, u32::from(t.head), &t.writable, &[4; 24], 24);
    fs2.on_queue(1, None);
    let idx: u16 = mem.read_obj(big[1].used_addr().unchecked_add(2)).unwrap();
    assert_eq!(idx, 1);
    let len: u32 = mem.read_obj(big[1].used_addr().unchecked_add(8)).unwrap();
    assert_eq!(len, 24);
}

#[test]
fn a_device_with_requests_in_flight_cannot_be_saved() {
    let mem = memfd_memory(1 << 20);
    let mocks = rings(&mem, 2);
    let (mut fs, end) = device(Fake::new(), share(1)).unwrap();
    assert!(fs.queue_states().is_none(), "inactive: nothing to save");
    activate(&mut fs, &mem, &mocks);
    assert_eq!(fs.queue_states().map(|q| q.len()), Some(2));
    offer_request(&mem, &mocks[1], 0, 1, 48);
    fs.on_queue(1, None);
    let t = end.take(1).remove(0);
    // The back end holds the request: its state is not ours to save.
    assert!(fs.queue_states().is_none());
    end.answer(1, u32::from(t.head), &t.writable, &[3; 20], 20);
    fs.on_queue(1, None);
    let states = fs.queue_states().unwrap();
    assert_eq!((states[1].next_avail, states[1].next_used), (1, 1));
}
