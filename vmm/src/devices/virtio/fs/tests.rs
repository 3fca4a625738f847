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
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
        self.record("SET_VRING_NUM", format!("{index} {num}"))
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
        self.addrs.push((index, descriptor, available, used));
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.record("SET_VRING_BASE", format!("{index} {base}"))
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.record("GET_VRING_BASE", format!("{index}"))?;
        Ok(VhostUserVringState::new(index, 0))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.record("SET_VRING_KICK", format!("{index} fd={}", fd.is_some()))?;
        if let Some(f) = fd {
            self.kicks.push((index, f));
        }
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.record("SET_VRING_CALL", format!("{index} fd={}", fd.is_some()))?;
        if let Some(f) = fd {
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

fn start_log(queues: usize) -> Vec<String> {
    let features = VIRTIO_F_VERSION_1 | EVENT_IDX | PROTOCOL_FEATURES;
    let mut log = vec![
        format!("SET_FEATURES {features:#x}"),
        "SET_MEM_TABLE 1 regions".to_string(),
    ];
    for i in 0..queues {
        log.extend([
            format!("SET_VRING_NUM {i} {QUEUE_SIZE}"),
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
    // The guest gets VERSION_1 and EVENT_IDX; not bit 27 nor the
    // vhost-user protocol bit.
    assert_eq!(fs.avail_features(), VIRTIO_F_VERSION_1 | EVENT_IDX);
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
    // The memory table is the guest RAM, with the memfd behind it: what
    // the guest wrote, the back end reads through the file it got.
    assert_eq!(fake.mem.len(), 1);
    let region = fake.mem[0];
    let (gpa, size, user_addr, offset) = (
        region.guest_phys_addr,
        region.memory_size,
        region.user_addr,
        region.mmap_offset,
    );
    assert_eq!((gpa, size), (0, 1 << 20));
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    assert_eq!(user_addr, host);
    mem.write_slice(b"shared page", GuestAddress(0x8000))
        .unwrap();
    let mut seen = [0u8; 11];
    fake.mem_files[0]
        .read_exact_at(&mut seen, offset + 0x8000)
        .unwrap();
    assert_eq!(&seen, b"shared page");
    // Ring addresses are this process's addresses of the guest's rings.
    for (i, mock) in mocks.iter().enumerate() {
        let (index, desc, avail, used) = fake.addrs[i];
        assert_eq!(index as usize, i);
        assert_eq!(desc - host, mock.desc_table_addr().0);
        assert_eq!(avail - host, mock.avail_addr().0);
        assert_eq!(used - host, mock.used_addr().0);
    }
    // A guest notify (the ioeventfd) reaches the back end's kick fd.
    for (index, kick) in &fake.kicks {
        fs.queue_events()[usize::from(*index)].write(5).unwrap();
        let mut count = [0u8; 8];
        let mut k = kick;
        std::io::Read::read_exact(&mut k, &mut count).unwrap();
        assert_eq!(u64::from_ne_bytes(count), 5, "queue {index}");
    }
    // The back end's call is relayed to the guest's interrupt.
    let index = usize::from(fake.calls[1].0);
    let mut c = &fake.calls[1].1;
    std::io::Write::write_all(&mut c, &1u64.to_ne_bytes()).unwrap();
    drop(fake);
    fs.relay_call(index);
    assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    // Drained: a second look relays nothing new from the eventfd.
    assert!(fs.calls[1].read().is_err());
}

#[test]
fn calls_reach_the_guest_through_the_event_loop() {
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
    let call = end.fake.lock().unwrap().calls[0].1.try_clone().unwrap();
    let mut c = &call;
    std::io::Write::write_all(&mut c, &1u64.to_ne_bytes()).unwrap();
    events.run_with_timeout(1000).unwrap();
    assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    // Guest notifies are not the VMM's to read: nothing wakes the loop.
    fs.lock().unwrap().queue_events()[1].write(1).unwrap();
    assert_eq!(events.run_with_timeout(0).unwrap(), 0);
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
