//! Raw virtqueues: attacks the kernel's drivers would never make.
//!
//! The guest boots with `mem=` below the VM's memory, so the RAM above it
//! is the VMM's guest memory that the guest kernel does not know about:
//! not System RAM to it, so `/dev/mem` (even with `STRICT_DEVMEM`) maps
//! it. The program unbinds the kernel's driver from a virtio device
//! (`/sys/bus/virtio/devices/virtioN/driver/unbind`), drives the device
//! itself with split virtqueues in that memory, and feeds it what no
//! driver would: packets for streams that do not exist, wrong CIDs and
//! types, REQUEST/RST churn while withholding rx buffers, bad avail
//! indexes and heads, descriptor loops, indirect tables of 65,535
//! descriptors (an indirect feature the device never offers), rings kept
//! full as fast as the vCPU can refill them. Then it resets the device and
//! binds the kernel's driver again, so the guest's vsock works after.
//!
//! `raw SECONDS LISTENING-PORT DEAD-PORT` on the control stream answers
//! at once and starts [`run`] on a thread when the host closes that
//! stream (it would die anyway when the vsock driver goes, maybe before
//! the answer left). Every phase prints `hostile: raw <phase>
//! start` and `hostile: raw <phase> done <detail>` on the console;
//! `hostile: raw vsock driver bound again` says the guest's vsock works
//! again, and `hostile: raw finished` ends the run.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use super::{reg, say, Window};

/// virtio-mmio registers the raw driver needs beyond [`reg`].
mod mmio {
    pub const DEVICE_FEATURES: usize = 0x10;
    pub const DEVICE_FEATURES_SEL: usize = 0x14;
    pub const QUEUE_NUM_MAX: usize = 0x34;
    pub const INTERRUPT_ACK: usize = 0x64;
    pub const INTERRUPT_STATUS: usize = 0x60;
}

const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 0x40;
const FAILED: u32 = 0x80;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// `avail.flags`: the driver wants no interrupts (nobody handles them).
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Feature bits a driver may try to sneak in (indirect descriptors, event
/// index): the device offers neither and must mask them.
const F_INDIRECT_DESC: u32 = 1 << 28;
const F_EVENT_IDX: u32 = 1 << 29;

const VSOCK_ID: u32 = 19;
const RNG_ID: u32 = 4;
const BALLOON_ID: u32 = 5;
/// virtio-balloon: free page reporting, the one feature the device offers.
const F_PAGE_REPORTING: u32 = 1 << 5;
/// The balloon's queues: inflate, deflate, reporting.
const BALLOON_QUEUES: u32 = 3;
const BALLOON_REPORTING: usize = 2;
const HOST_CID: u64 = 2;
const HDR: usize = 44;

/// vsock packet operations.
mod op {
    pub const REQUEST: u16 = 1;
    pub const RST: u16 = 3;
    pub const RW: u16 = 5;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// Where things live in the free RAM (offsets from its start).
mod layout {
    /// Queue `q`'s rings at `q * QUEUE_STRIDE`: descriptors, then avail
    /// at +0x1000, used at +0x2000 (a queue of 256 fits each in a page).
    pub const QUEUE_STRIDE: usize = 0x4000;
    /// 256 tx packet headers, 64 bytes apart.
    pub const TX_HDRS: usize = 0x1_0000;
    /// 256 rx buffers of 4 KiB.
    pub const RX_BUFS: usize = 0x2_0000;
    pub const RX_BUF_LEN: usize = 4096;
    /// An indirect table of 65,535 descriptors (1 MiB).
    pub const INDIRECT: usize = 0x20_0000;
    /// A 64 KiB data buffer.
    pub const DATA: usize = 0x30_0000;
    /// Everything above fits in this much.
    pub const SIZE: usize = 0x40_0000;
}

/// The free RAM above `mem=`, mapped through /dev/mem.
struct FreeRam {
    base: *mut u8,
    phys: u64,
    len: usize,
}

impl FreeRam {
    /// Maps `len` bytes at the `mem=` boundary of the kernel command line.
    fn map(len: usize) -> io::Result<FreeRam> {
        let phys = mem_limit()?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/mem")?;
        let offset = libc::off_t::try_from(phys)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mem= out of range"))?;
        // SAFETY: maps `len` bytes of /dev/mem at a page-aligned physical
        // address (mem= is in MiB); the result is checked. The mapping
        // outlives the file descriptor, as mmap allows.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(FreeRam {
            base: base.cast(),
            phys,
            len,
        })
    }

    fn addr(&self, off: usize) -> u64 {
        self.phys + off as u64
    }

    /// Writes `bytes` at `off`; out of range is ignored (never happens
    /// with the fixed layout, and must not corrupt anything if it did).
    fn write(&self, off: usize, bytes: &[u8]) {
        if off
            .checked_add(bytes.len())
            .map_or(true, |end| end > self.len)
        {
            return;
        }
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: `off + i < self.len`, inside the mapping; volatile
            // because the VMM reads this memory behind our back.
            unsafe { std::ptr::write_volatile(self.base.add(off + i), *b) }
        }
    }

    fn w16(&self, off: usize, v: u16) {
        self.write(off, &v.to_le_bytes());
    }

    fn r16(&self, off: usize) -> u16 {
        if off.checked_add(2).map_or(true, |end| end > self.len) {
            return 0;
        }
        // SAFETY: inside the mapping (checked above); the VMM writes it.
        unsafe { std::ptr::read_volatile(self.base.add(off).cast::<u16>()) }
    }

    fn zero(&self, off: usize, len: usize) {
        if off.checked_add(len).map_or(true, |end| end > self.len) {
            return;
        }
        // SAFETY: `off..off + len` is inside the mapping (checked above).
        unsafe { std::ptr::write_bytes(self.base.add(off), 0, len) }
    }

    /// Writes descriptor `i` of the table at `table`.
    fn desc(&self, table: usize, i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.write(table + i * 16, &d);
    }
}

impl Drop for FreeRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped; nothing points into
        // it any more.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// The `mem=` limit of the kernel command line, in bytes.
fn mem_limit() -> io::Result<u64> {
    let cmdline = fs::read_to_string("/proc/cmdline")?;
    let value = super::cmdline_value(&cmdline, "mem").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no mem= on the kernel command line: no free RAM",
        )
    })?;
    let (num, unit) = value.split_at(
        value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len()),
    );
    let n: u64 = num
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("mem={value}")))?;
    let shift = match unit {
        "G" | "g" => 30,
        "M" | "m" => 20,
        "K" | "k" => 10,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("mem={value}"),
            ))
        }
    };
    Ok(n << shift)
}

/// A split virtqueue the program drives.
struct Ring {
    index: u32,
    size: u16,
    desc: usize,
    avail: usize,
    used: usize,
    next_avail: u16,
}

impl Ring {
    fn new(index: u32, size: u16) -> Ring {
        let base = index as usize * layout::QUEUE_STRIDE;
        Ring {
            index,
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_avail: 0,
        }
    }

    fn used_idx(&self, ram: &FreeRam) -> u16 {
        ram.r16(self.used + 2)
    }

    /// Buffers the device has not returned yet.
    fn in_flight(&self, ram: &FreeRam) -> u16 {
        self.next_avail.wrapping_sub(self.used_idx(ram))
    }

    /// Puts `head` in the next avail slot (published by [`Ring::publish`]).
    fn put(&mut self, ram: &FreeRam, head: u16) {
        let slot = usize::from(self.next_avail % self.size);
        ram.w16(self.avail + 4 + slot * 2, head);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    fn publish(&self, ram: &FreeRam, window: &Window) {
        fence(Ordering::SeqCst);
        ram.w16(self.avail + 2, self.next_avail);
        fence(Ordering::SeqCst);
        window.write(reg::QUEUE_NOTIFY, self.index);
    }

    /// Fills every free slot with heads from `heads` (cycling) and
    /// notifies; returns how many it put.
    fn refill(&mut self, ram: &FreeRam, window: &Window, heads: &[u16], cursor: &mut usize) -> u32 {
        let free = self.size.saturating_sub(self.in_flight(ram));
        for _ in 0..free {
            if let Some(h) = heads.get(*cursor % heads.len().max(1)) {
                self.put(ram, *h);
            }
            *cursor += 1;
        }
        self.publish(ram, window);
        u32::from(free)
    }
}

/// A virtio device taken from its kernel driver.
struct RawDevice {
    name: String,
    window: Window,
    driver: Option<PathBuf>,
    /// Features (of the first 32 bits) acked besides the ones never
    /// offered: those the device needs to start.
    features: u32,
}

impl RawDevice {
    /// Finds the device with virtio id `id`, unbinds its kernel driver.
    fn take(id: u32) -> io::Result<RawDevice> {
        let window = super::find_device(id)?;
        let (name, driver) = super::unbind_driver(id)?;
        Ok(RawDevice {
            name,
            window,
            driver,
            features: 0,
        })
    }

    fn status(&self) -> u32 {
        self.window.read(reg::STATUS)
    }

    /// Resets the device and sets up `queues` rings of at most `size` in
    /// the free RAM, trying to ack features the device never offered;
    /// returns the rings and the status the device ended in.
    fn setup(&self, ram: &FreeRam, queues: u32, size: u16) -> (Vec<Ring>, u32) {
        let w = &self.window;
        w.write(reg::STATUS, 0);
        w.write(reg::STATUS, ACKNOWLEDGE);
        w.write(reg::STATUS, ACKNOWLEDGE | DRIVER);
        w.write(mmio::DEVICE_FEATURES_SEL, 0);
        let _offered = w.read(mmio::DEVICE_FEATURES);
        w.write(reg::DRIVER_FEATURES_SEL, 0);
        w.write(
            reg::DRIVER_FEATURES,
            F_INDIRECT_DESC | F_EVENT_IDX | self.features,
        );
        w.write(reg::DRIVER_FEATURES_SEL, 1);
        w.write(reg::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
        w.write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        let mut rings = Vec::new();
        for q in 0..queues {
            w.write(reg::QUEUE_SEL, q);
            let max = w.read(mmio::QUEUE_NUM_MAX);
            let size = size.min(u16::try_from(max).unwrap_or(u16::MAX)).max(1);
            let ring = Ring::new(q, size);
            ram.zero(ring.desc, layout::QUEUE_STRIDE);
            ram.w16(ring.avail, AVAIL_F_NO_INTERRUPT);
            w.write(reg::QUEUE_NUM, u32::from(size));
            for (low, addr) in [
                (reg::QUEUE_DESC_LOW, ram.addr(ring.desc)),
                (reg::QUEUE_AVAIL_LOW, ram.addr(ring.avail)),
                (reg::QUEUE_USED_LOW, ram.addr(ring.used)),
            ] {
                w.write(low, addr as u32);
                w.write(low + 4, (addr >> 32) as u32);
            }
            w.write(reg::QUEUE_READY, 1);
            rings.push(ring);
        }
        w.write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        (rings, w.read(reg::STATUS))
    }

    /// Acknowledges whatever interrupts are pending.
    fn ack_interrupts(&self) {
        let pending = self.window.read(mmio::INTERRUPT_STATUS);
        if pending != 0 {
            self.window.write(mmio::INTERRUPT_ACK, pending);
        }
    }

    /// Resets the device and binds its kernel driver again.
    fn give_back(self) -> io::Result<()> {
        self.window.write(reg::STATUS, 0);
        // What the virtio core leaves after a driver's removal.
        self.window.write(reg::STATUS, ACKNOWLEDGE);
        if let Some(d) = &self.driver {
            fs::write(d.join("bind"), &self.name)?;
        }
        Ok(())
    }
}

/// A vsock packet header.
fn vsock_hdr(
    src_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    buf_alloc: u32,
) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0..8].copy_from_slice(&src_cid.to_le_bytes());
    h[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
    h[16..20].copy_from_slice(&src_port.to_le_bytes());
    h[20..24].copy_from_slice(&dst_port.to_le_bytes());
    h[24..28].copy_from_slice(&len.to_le_bytes());
    h[28..30].copy_from_slice(&type_.to_le_bytes());
    h[30..32].copy_from_slice(&op.to_le_bytes());
    // flags (32..36) stay 0
    h[36..40].copy_from_slice(&buf_alloc.to_le_bytes());
    // fwd_cnt (40..44) stays 0
    h
}

fn tx_hdr_off(i: usize) -> usize {
    layout::TX_HDRS + i * 64
}

/// How a phase ended, for its `done` line.
#[derive(Debug, Default)]
struct Tally {
    put: u64,
    rounds: u64,
    consumed: u64,
}

impl Tally {
    fn line(&self, ring: &Ring, ram: &FreeRam, status: u32) -> String {
        format!(
            "put={} rounds={} consumed={} in_flight={} status={status:#x}",
            self.put,
            self.rounds,
            self.consumed,
            ring.in_flight(ram)
        )
    }
}

/// Keeps `ring` full of `heads` for `secs`, as fast as the vCPU goes.
fn keep_full(dev: &RawDevice, ram: &FreeRam, ring: &mut Ring, heads: &[u16], secs: u64) -> Tally {
    let mut t = Tally::default();
    let mut cursor = 0;
    let start_used = ring.used_idx(ram);
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        t.put += u64::from(ring.refill(ram, &dev.window, heads, &mut cursor));
        t.rounds += 1;
        if t.rounds % 64 == 0 {
            dev.ack_interrupts();
        }
    }
    t.consumed = u64::from(ring.used_idx(ram).wrapping_sub(start_used));
    t
}

/// Prints a phase's start line, runs it, prints its done line.
fn phase(name: &str, f: impl FnOnce() -> io::Result<String>) {
    say(&format!("raw {name} start"));
    match f() {
        Ok(detail) => say(&format!("raw {name} done {detail}")),
        Err(err) => say(&format!("raw {name} failed {err}")),
    }
}

/// vsock tx packets that cause no reply (or only an RST): RST for streams
/// that do not exist, REQUESTs from a wrong CID or of a wrong type, RW and
/// CREDIT_REQUEST for unknown streams; rx buffers posted once, never again.
fn vsock_junk(dev: &RawDevice, ram: &FreeRam, guest_cid: u64, secs: u64) -> io::Result<String> {
    let (mut rings, status) = dev.setup(ram, 3, 256);
    check_ok(status)?;
    let mut heads = Vec::new();
    let size = rings[1].size as usize;
    for i in 0..size {
        let port = 40_000 + i as u32;
        let h = match i % 6 {
            0 => vsock_hdr(guest_cid, port, 9_999, 0, 1, op::RST, 0),
            1 => vsock_hdr(guest_cid + 77, port, 9_999, 0, 1, op::REQUEST, 65536),
            2 => vsock_hdr(guest_cid, port, 9_999, 0, 2, op::REQUEST, 65536),
            3 => vsock_hdr(guest_cid, port, 9_999, 0, 1, op::RW, 0),
            4 => vsock_hdr(guest_cid, port, 9_999, 0, 1, op::CREDIT_REQUEST, 0),
            _ => vsock_hdr(guest_cid, port, 9_999, 0, 1, 99, 0),
        };
        ram.write(tx_hdr_off(i), &h);
        let tx = rings[1].desc;
        ram.desc(tx, i, ram.addr(tx_hdr_off(i)), HDR as u32, 0, 0);
        heads.push(i as u16);
    }
    post_rx(ram, &mut rings[0], &dev.window);
    let t = keep_full(dev, ram, &mut rings[1], &heads, secs);
    Ok(t.line(&rings[1], ram, dev.status()))
}

/// Posts one round of 4 KiB rx buffers.
fn post_rx(ram: &FreeRam, rx: &mut Ring, window: &Window) {
    for i in 0..rx.size as usize {
        let off = layout::RX_BUFS + i * layout::RX_BUF_LEN;
        ram.desc(
            rx.desc,
            i,
            ram.addr(off),
            layout::RX_BUF_LEN as u32,
            DESC_F_WRITE,
            0,
        );
        rx.put(ram, i as u16);
    }
    rx.publish(ram, window);
}

/// REQUEST then RST, from ever new guest ports, to a host port with a
/// listener that never accepts and to one nobody serves, while no rx
/// buffer is ever posted: every REQUEST owes the guest a RESPONSE or an
/// RST it cannot take.
fn vsock_churn(
    dev: &RawDevice,
    ram: &FreeRam,
    guest_cid: u64,
    ports: (u32, u32),
    secs: u64,
) -> io::Result<String> {
    let (mut rings, status) = dev.setup(ram, 3, 256);
    check_ok(status)?;
    let tx = &mut rings[1];
    let size = tx.size as usize;
    let heads: Vec<u16> = (0..size as u16).collect();
    let mut t = Tally::default();
    let start_used = tx.used_idx(ram);
    let mut src = 50_000u32;
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        // Rewrite the headers with fresh source ports, then refill.
        let free = tx.size.saturating_sub(tx.in_flight(ram)) as usize;
        for k in 0..free {
            let i = (tx.next_avail as usize + k) % size;
            let pair = i / 2;
            let dst = if pair % 2 == 0 { ports.0 } else { ports.1 };
            let sport = src.wrapping_add(pair as u32);
            let h = if i % 2 == 0 {
                vsock_hdr(guest_cid, sport, dst, 0, 1, op::REQUEST, 65536)
            } else {
                vsock_hdr(guest_cid, sport, dst, 0, 1, op::RST, 0)
            };
            ram.write(tx_hdr_off(i), &h);
            ram.desc(tx.desc, i, ram.addr(tx_hdr_off(i)), HDR as u32, 0, 0);
        }
        src = src.wrapping_add(size as u32 / 2);
        if src < 50_000 {
            src = 50_000;
        }
        let mut cursor = tx.next_avail as usize % size;
        t.put += u64::from(tx.refill(ram, &dev.window, &heads, &mut cursor));
        t.rounds += 1;
    }
    t.consumed = u64::from(tx.used_idx(ram).wrapping_sub(start_used));
    Ok(t.line(tx, ram, dev.status()))
}

/// Descriptor chains no driver makes, on queue `q` of a freshly set-up
/// device, `rounds` times: an avail index far ahead of the ring, heads
/// beyond the table, a descriptor loop, an indirect table of 65,535
/// descriptors, buffers outside guest memory, a header cut short, a
/// payload length of 4 GiB, buffers in the wrong direction.
fn malformed(
    dev: &RawDevice,
    ram: &FreeRam,
    queues: u32,
    q: usize,
    rounds: u32,
    write: bool,
) -> io::Result<String> {
    let dir = if write { DESC_F_WRITE } else { 0 };
    let wrong_dir = if write { 0 } else { DESC_F_WRITE };
    let big_hdr = vsock_hdr(3, 1, 2, u32::MAX, 1, op::RW, 0);
    ram.write(tx_hdr_off(0), &big_hdr);
    indirect_table(ram, dir, 4096);
    let mut statuses = 0u32;
    for round in 0..rounds {
        let (mut rings, status) = dev.setup(ram, queues, 256);
        statuses |= status;
        let Some(ring) = rings.get_mut(q) else {
            return Err(io::Error::other("no such queue"));
        };
        let t = ring.desc;
        let hdr = ram.addr(tx_hdr_off(0));
        match round % 8 {
            0 => {
                // avail index 1000 ahead of a 256-entry ring
                ram.desc(t, 0, hdr, HDR as u32, dir, 0);
                ring.put(ram, 0);
                ring.next_avail = ring.next_avail.wrapping_add(1000);
            }
            1 => {
                // heads beyond the descriptor table
                for h in [ring.size, 0xffff, 300] {
                    ring.put(ram, h);
                }
            }
            2 => {
                // a loop: 0 -> 1 -> 0
                ram.desc(t, 0, hdr, HDR as u32, dir | DESC_F_NEXT, 1);
                ram.desc(t, 1, hdr, HDR as u32, dir | DESC_F_NEXT, 0);
                ring.put(ram, 0);
            }
            3 => {
                // indirect, never offered: 65,535 descriptors
                ram.desc(
                    t,
                    0,
                    ram.addr(layout::INDIRECT),
                    65_535 * 16,
                    DESC_F_INDIRECT,
                    0,
                );
                ring.put(ram, 0);
            }
            4 => {
                // outside guest memory, and straddling its end
                ram.desc(t, 0, 0xffff_ffff_f000, 4096, dir, 0);
                ram.desc(t, 1, (1 << 40) - 8, 64, dir, 0);
                ring.put(ram, 0);
                ring.put(ram, 1);
            }
            5 => {
                // a header cut short, and a 4 GiB payload length
                ram.desc(t, 0, hdr, 10, dir, 0);
                ram.desc(t, 1, hdr, HDR as u32, dir, 0);
                ring.put(ram, 0);
                ring.put(ram, 1);
            }
            6 => {
                // the wrong direction
                ram.desc(t, 0, hdr, HDR as u32, wrong_dir, 0);
                ring.put(ram, 0);
            }
            _ => {
                // a chain through every descriptor, then a next beyond it
                let n = ring.size as usize;
                for i in 0..n {
                    let next = if i + 1 == n { 0xfff0 } else { (i + 1) as u16 };
                    ram.desc(t, i, hdr, HDR as u32, dir | DESC_F_NEXT, next);
                }
                ring.put(ram, 0);
            }
        }
        ring.publish(ram, &dev.window);
        // Notify twice more: a broken ring re-examined.
        dev.window.write(reg::QUEUE_NOTIFY, q as u32);
        dev.window.write(reg::QUEUE_NOTIFY, q as u32);
    }
    Ok(format!(
        "rounds={rounds} status_bits_seen={statuses:#x} status={:#x}",
        dev.status()
    ))
}

/// An indirect table of 65,535 chained descriptors, each `len` bytes of
/// the data buffer in direction `dir`.
fn indirect_table(ram: &FreeRam, dir: u16, len: u32) {
    for i in 0..65_535usize {
        let next = if i + 1 < 65_535 { DESC_F_NEXT } else { 0 };
        ram.desc(
            layout::INDIRECT,
            i,
            ram.addr(layout::DATA),
            len,
            dir | next,
            (i + 1) as u16,
        );
    }
}

/// The rng with its ring kept full of indirect chains of 65,535 4 KiB
/// buffers (256 MiB of entropy asked per chain).
fn rng_indirect(dev: &RawDevice, ram: &FreeRam, secs: u64) -> io::Result<String> {
    indirect_table(ram, DESC_F_WRITE, 4096);
    let (ring, t) = rng_keep_full(
        dev,
        ram,
        secs,
        ram.addr(layout::INDIRECT),
        65_535 * 16,
        DESC_F_INDIRECT,
    )?;
    Ok(t.line(&ring, ram, dev.status()))
}

/// The rng with its ring kept full of 64 KiB buffers.
fn rng_drain(dev: &RawDevice, ram: &FreeRam, secs: u64) -> io::Result<String> {
    let (ring, t) = rng_keep_full(dev, ram, secs, ram.addr(layout::DATA), 65_536, DESC_F_WRITE)?;
    Ok(format!(
        "{} bytes_asked={}",
        t.line(&ring, ram, dev.status()),
        t.consumed * 65_536
    ))
}

/// Sets the rng up with one ring of 256 whose every slot is the single
/// descriptor (addr, len, flags), and keeps it full for `secs`.
fn rng_keep_full(
    dev: &RawDevice,
    ram: &FreeRam,
    secs: u64,
    addr: u64,
    len: u32,
    flags: u16,
) -> io::Result<(Ring, Tally)> {
    let (mut rings, status) = dev.setup(ram, 1, 256);
    check_ok(status)?;
    let mut ring = rings.swap_remove(0);
    let heads: Vec<u16> = (0..ring.size).collect();
    for i in 0..ring.size as usize {
        ram.desc(ring.desc, i, addr, len, flags, 0);
    }
    let t = keep_full(dev, ram, &mut ring, &heads, secs);
    Ok((ring, t))
}

fn check_ok(status: u32) -> io::Result<()> {
    if status & (FAILED | NEEDS_RESET) != 0 || status & DRIVER_OK == 0 {
        return Err(io::Error::other(format!(
            "the device refused a valid set-up: status {status:#x}"
        )));
    }
    Ok(())
}

/// The balloon's reporting queue kept full of "free" ranges, 16 to a
/// chain, as fast as the vCPU refills it: chains of whole 2 MiB blocks of
/// the RAM above `mem=` (past the rings: the host gives them back, again
/// and again), chains of ranges in guest memory no kernel reports (not
/// page-aligned, of an odd length, empty), and chains the device must
/// refuse whole (outside guest memory, straddling its end, 4 GiB long).
/// The deflate and inflate queues get junk the whole time too.
fn balloon_reports(dev: &RawDevice, ram: &FreeRam, secs: u64) -> io::Result<String> {
    let (mut rings, status) = dev.setup(ram, BALLOON_QUEUES, 256);
    check_ok(status)?;
    const CHAIN: usize = 16;
    let block = 2u64 << 20;
    // The free RAM past the 4 MiB of rings, up to the end of guest memory
    // (the VM's memory is at least 64 MiB above mem=).
    let first = ram.phys + layout::SIZE as u64;
    let blocks = (60u64 << 20) / block;
    let mut heads = Vec::new();
    let Some(ring) = rings.get_mut(BALLOON_REPORTING) else {
        return Err(io::Error::other("no reporting queue"));
    };
    for chain in 0..usize::from(ring.size) / CHAIN {
        for k in 0..CHAIN {
            let i = chain * CHAIN + k;
            let (addr, len) = match (chain % 3, k % 3) {
                (0, _) => (first + (i as u64 % blocks) * block, block as u32),
                (1, 0) => (first + 1, 4096),
                (1, 1) => (first, 4095),
                (1, _) => (first, 0),
                (_, 0) => (0xffff_ffff_f000, 4096),
                (_, 1) => (ram.phys + (62 << 20), 4 << 20),
                (_, _) => (first, u32::MAX),
            };
            let next = if k + 1 < CHAIN { DESC_F_NEXT } else { 0 };
            ram.desc(ring.desc, i, addr, len, DESC_F_WRITE | next, (i + 1) as u16);
        }
        heads.push((chain * CHAIN) as u16);
    }
    let mut t = Tally::default();
    let mut cursor = 0;
    let junk: Vec<u16> = (0..64).collect();
    let mut junk_cursor = 0;
    for ring in rings.iter().take(BALLOON_REPORTING) {
        for i in 0..64 {
            ram.desc(ring.desc, i, ram.addr(layout::DATA), 4096, 0, 0);
        }
    }
    let start_used = rings[BALLOON_REPORTING].used_idx(ram);
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        let ring = &mut rings[BALLOON_REPORTING];
        t.put += u64::from(ring.refill(ram, &dev.window, &heads, &mut cursor));
        t.rounds += 1;
        if t.rounds % 64 == 0 {
            for ring in rings.iter_mut().take(BALLOON_REPORTING) {
                ring.refill(ram, &dev.window, &junk, &mut junk_cursor);
            }
            dev.ack_interrupts();
        }
    }
    let ring = &rings[BALLOON_REPORTING];
    t.consumed = u64::from(ring.used_idx(ram).wrapping_sub(start_used));
    Ok(format!(
        "{} ranges_reported={}",
        t.line(ring, ram, dev.status()),
        t.consumed * CHAIN as u64
    ))
}

/// The guest's vsock CID, from the device's config space.
fn guest_cid(dev: &RawDevice) -> u64 {
    u64::from(dev.window.read(0x100)) | (u64::from(dev.window.read(0x104)) << 32)
}

/// Every raw phase in order; `secs` is each flood's length. `ports` are
/// the host ports for the churn: one with a listener that never accepts,
/// one nobody serves.
pub fn run(secs: u64, ports: (u32, u32)) {
    let ram = match FreeRam::map(layout::SIZE) {
        Ok(r) => r,
        Err(err) => {
            say(&format!("raw failed: free RAM above mem=: {err}"));
            say("raw finished");
            return;
        }
    };
    match RawDevice::take(VSOCK_ID) {
        Ok(dev) => {
            let cid = guest_cid(&dev);
            say(&format!("raw took {} (vsock, cid {cid})", dev.name));
            phase("vsock-junk", || vsock_junk(&dev, &ram, cid, secs));
            phase("vsock-churn", || vsock_churn(&dev, &ram, cid, ports, secs));
            phase("vsock-malformed", || {
                malformed(&dev, &ram, 3, 1, 400, false)
            });
            match dev.give_back() {
                Ok(()) => say("raw vsock driver bound again"),
                Err(err) => say(&format!("raw failed to bind the vsock driver again: {err}")),
            }
        }
        Err(err) => say(&format!("raw failed: taking the vsock device: {err}")),
    }
    match RawDevice::take(RNG_ID) {
        Ok(dev) => {
            say(&format!("raw took {} (rng)", dev.name));
            phase("rng-malformed", || malformed(&dev, &ram, 1, 0, 400, true));
            phase("rng-drain", || rng_drain(&dev, &ram, secs));
            phase("rng-indirect", || rng_indirect(&dev, &ram, secs));
            if let Err(err) = dev.give_back() {
                say(&format!("raw failed to bind the rng driver again: {err}"));
            }
        }
        Err(err) => say(&format!("raw failed: taking the rng device: {err}")),
    }
    match RawDevice::take(BALLOON_ID) {
        Ok(mut dev) => {
            dev.features = F_PAGE_REPORTING;
            say(&format!("raw took {} (balloon)", dev.name));
            phase("balloon-malformed", || {
                malformed(&dev, &ram, BALLOON_QUEUES, BALLOON_REPORTING, 400, true)
            });
            phase("balloon-reports", || balloon_reports(&dev, &ram, secs));
            if let Err(err) = dev.give_back() {
                say(&format!(
                    "raw failed to bind the balloon driver again: {err}"
                ));
            }
        }
        Err(err) => say(&format!("raw failed: taking the balloon device: {err}")),
    }
    say("raw finished");
}
