//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz) and for the
//! stable replay of their corpora in `cargo test`: each takes arbitrary
//! bytes and drives one guest- or host-facing parser with them. None may
//! panic, whatever the bytes.

use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::queue::{next_chain, Next};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::packet::{read_tx_packet, RxBuffer};
use crate::devices::virtio::VirtioDevice;

/// Guest memory of the fuzzed devices.
const MEM_SIZE: usize = 64 << 10;
/// Queue layout inside it (16 entries).
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;

/// Guest memory holding `data` from address 0.
fn memory(data: &[u8]) -> Option<GuestMemoryMmap> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let n = data.len().min(MEM_SIZE);
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
                        let _ = buf.payload_capacity();
                    }
                }
                let _ = crate::devices::virtio::queue::add_used(&mut q, &mem, head, 0);
            }
            Ok(Next::Empty) | Err(_) => break,
        }
    }
}

/// Register accesses on a virtio-rng's MMIO window, then the device's
/// request processing: the input's first 256 bytes are accesses of 7
/// bytes each (kind, offset, value), the rest is guest memory.
pub fn mmio_sequence(data: &[u8]) {
    let split = data.len().min(7 * 36);
    let (ops, memory_bytes) = data.split_at(split);
    let Some(mem) = memory(memory_bytes) else {
        return;
    };
    let Ok(rng) = Rng::new() else { return };
    let rng = Arc::new(std::sync::Mutex::new(rng));
    let device: Arc<std::sync::Mutex<dyn VirtioDevice>> = rng.clone();
    let Ok(irqfd) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let Ok(mut transport) = MmioTransport::new(device, mem, irqfd) else {
        return;
    };
    for op in ops.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) & 0x1ff;
        let value = [op[3], op[4], op[5], op[6]];
        match op[0] % 4 {
            0 => transport.write(offset & !3, &value),
            1 => {
                let mut out = [0u8; 4];
                transport.read(offset & !3, &mut out);
            }
            2 => transport.write(offset, &value[..usize::from(op[0] >> 6) + 1]),
            _ => {
                let mut out = vec![0u8; usize::from(op[0] >> 6) + 1];
                transport.read(offset, &mut out);
            }
        }
    }
    drop(transport);
    let mut rng = match rng.lock() {
        Ok(rng) => rng,
        Err(poisoned) => poisoned.into_inner(),
    };
    rng.process_queue(Instant::now());
}

/// A host's `CONNECT <port>` line to the hybrid vsock socket.
pub fn connect_line(data: &[u8]) {
    let _ = crate::devices::virtio::vsock::parse_connect_line(data);
}

/// A control API request line.
pub fn api_request(data: &[u8]) {
    let _ = crate::api::parse_request(&String::from_utf8_lossy(data));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Every corpus file of `target` (fuzz/corpus/<target>/).
    fn corpus(target: &str) -> Vec<Vec<u8>> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            out.push(std::fs::read(entry.unwrap().path()).unwrap());
        }
        assert!(!out.is_empty(), "{} is empty", dir.display());
        out
    }

    #[test]
    fn replay_corpora() {
        type Target = (&'static str, fn(&[u8]));
        let targets: [Target; 4] = [
            ("vsock_chains", vsock_chains),
            ("mmio_sequence", mmio_sequence),
            ("connect_line", connect_line),
            ("api_request", api_request),
        ];
        for (name, run) in targets {
            for input in corpus(name) {
                run(&input);
            }
        }
    }
}
