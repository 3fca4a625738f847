//! Frames between the guest's rings and the back end: gathering a tx
//! chain into one buffer, and spreading a received frame over rx chains.
//!
//! Every frame, both ways, starts with the 12-byte `virtio_net_hdr_v1`
//! (virtio 1.2, 5.1.6): flags, gso_type, hdr_len, gso_size, csum_start,
//! csum_offset, num_buffers. The tap uses the same header (its vnet
//! header size is set to [`VNET_HDR_LEN`]), so the device copies frames
//! as they are and only writes `num_buffers` on the way to the guest.
//!
//! All of it reads guest-controlled chains, so it fails rather than
//! panics: chains come from [`queue::next_chain`] (direct, bounded, in
//! guest memory), tx chains must be device-readable and between
//! [`MIN_TX_LEN`] and [`MAX_BUFFER_LEN`] bytes, rx chains device-writable
//! and at least a header long, and one frame uses at most
//! [`MAX_RX_DESCRIPTORS`] rx descriptors. With `VIRTIO_NET_F_MRG_RXBUF` a
//! frame may span several rx chains; their used elements are published
//! with one index update, so the driver never sees part of a frame.

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::devices::virtio::queue::{self, add_used, add_used_batch, ChainError, Next, QueueError};

/// `sizeof(struct virtio_net_hdr_v1)`: the header of every frame.
pub const VNET_HDR_LEN: usize = 12;
/// Where `num_buffers` sits in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Ethernet header.
const ETH_HLEN: usize = 14;
/// The largest frame (without the vnet header): 64 KiB of a TSO frame plus
/// its Ethernet header.
pub const MAX_FRAME_LEN: usize = (64 << 10) + ETH_HLEN;
/// The largest frame with its vnet header: the tx and rx buffers' size.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// The smallest tx chain: a header and an Ethernet header.
pub const MIN_TX_LEN: usize = VNET_HDR_LEN + ETH_HLEN;
/// Most descriptors one received frame may be spread over (Linux posts
/// one descriptor per mergeable buffer: about 44 for the largest frame).
pub const MAX_RX_DESCRIPTORS: usize = 1024;

/// Why a tx chain was dropped.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TxError {
    #[error("the chain is malformed: {0}")]
    Chain(#[from] ChainError),
    #[error("a tx descriptor is device-writable")]
    WriteOnly,
    #[error("the chain holds {0} bytes, less than a vnet and an Ethernet header")]
    TooShort(u64),
    #[error("the chain holds {0} bytes, more than the {MAX_BUFFER_LEN} a frame may have")]
    TooLong(u64),
    #[error("reading guest memory failed")]
    Memory,
}

/// Copies a walked tx chain (vnet header and frame) into the start of
/// `buf` (at least [`MAX_BUFFER_LEN`] bytes, reused from frame to frame:
/// nothing is cleared first) and returns its length.
pub fn gather_tx(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    buf: &mut [u8],
) -> Result<usize, TxError> {
    let mut total: u64 = 0;
    for desc in descs {
        if desc.is_write_only() {
            return Err(TxError::WriteOnly);
        }
        total += u64::from(desc.len());
    }
    if total < MIN_TX_LEN as u64 {
        return Err(TxError::TooShort(total));
    }
    if total > MAX_BUFFER_LEN as u64 {
        return Err(TxError::TooLong(total));
    }
    // total <= MAX_BUFFER_LEN: no truncation.
    let len = total as usize;
    let mut rest = buf.get_mut(..len).ok_or(TxError::TooLong(total))?;
    for desc in descs {
        let (head, tail) = rest.split_at_mut(desc.len() as usize);
        mem.read_slice(head, desc.addr())
            .map_err(|_| TxError::Memory)?;
        rest = tail;
    }
    Ok(len)
}

/// One rx chain set aside for a frame.
#[derive(Debug, Clone, Copy)]
struct RxChain {
    head: u16,
    /// Its descriptors in [`RxScratch::descs`].
    first: usize,
    end: usize,
}

/// Buffers reused from frame to frame (no allocation once warm).
#[derive(Debug, Default)]
pub struct RxScratch {
    walk: Vec<Descriptor>,
    descs: Vec<Descriptor>,
    chains: Vec<RxChain>,
    used: Vec<(u16, u32)>,
}

/// What became of one received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// In the guest's buffers: `buffers` chains used.
    Delivered { buffers: u16 },
    /// Not enough rx buffers now: none was taken; wait for the guest.
    NoBuffers,
    /// It can never fit the buffers the guest posts (they are all too
    /// small, or would take too many descriptors): dropped, none taken.
    Dropped,
}

/// What [`deliver_rx`] did besides the frame's own outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxReport {
    pub outcome: RxOutcome,
    /// Malformed rx chains returned empty on the way (counted by the
    /// caller; each one is a used element too).
    pub bad_chains: u32,
}

impl RxReport {
    /// Whether the used ring changed.
    pub fn used(&self) -> bool {
        self.bad_chains > 0 || matches!(self.outcome, RxOutcome::Delivered { .. })
    }
}

/// How one popped rx chain fits.
fn rx_capacity(descs: &[Descriptor]) -> Option<usize> {
    let mut capacity = 0usize;
    for desc in descs {
        if !desc.is_write_only() {
            return None;
        }
        capacity = capacity.saturating_add(desc.len() as usize);
    }
    (capacity >= VNET_HDR_LEN).then_some(capacity)
}

/// Puts `frame` (vnet header included, at least [`VNET_HDR_LEN`] bytes)
/// into the rx queue's available chains: one chain without `mergeable`
/// (`VIRTIO_NET_F_MRG_RXBUF`), as many as it takes with it. Writes
/// `num_buffers` into the frame's header. Chains are only taken when the
/// whole frame fits; otherwise the ring is left where it was (minus any
/// malformed chains, which are returned empty).
pub fn deliver_rx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    mergeable: bool,
    scratch: &mut RxScratch,
) -> Result<RxReport, QueueError> {
    let size = usize::from(queue.size());
    let mut start = queue.next_avail();
    let mut bad_chains = 0u32;
    scratch.descs.clear();
    scratch.chains.clear();
    let mut capacity = 0usize;
    let mut fits = false;
    // Each pop takes one avail entry; a guest that keeps publishing while
    // we look is cut off after a ring's worth.
    for _ in 0..size {
        let next = queue::next_chain(queue, mem, &mut scratch.walk);
        let (head, result) = match next {
            Ok(Next::Chain { head, result }) => (head, result),
            Ok(Next::Empty) => break,
            Err(err) => {
                queue.set_next_avail(start);
                return Err(err);
            }
        };
        let chain_capacity = result.ok().and_then(|()| rx_capacity(&scratch.walk));
        let too_many = scratch.descs.len() + scratch.walk.len() > MAX_RX_DESCRIPTORS;
        let Some(chain_capacity) = chain_capacity else {
            // Malformed: give it and what was set aside back, empty, and
            // start over after it.
            bad_chains += 1;
            for chain in scratch.chains.drain(..) {
                let _ = add_used(queue, mem, chain.head, 0);
            }
            let _ = add_used(queue, mem, head, 0);
            scratch.descs.clear();
            capacity = 0;
            start = queue.next_avail();
            continue;
        };
        if too_many || (!mergeable && chain_capacity < frame.len()) {
            queue.set_next_avail(start);
            return Ok(RxReport {
                outcome: RxOutcome::Dropped,
                bad_chains,
            });
        }
        let first = scratch.descs.len();
        scratch.descs.extend_from_slice(&scratch.walk);
        scratch.chains.push(RxChain {
            head,
            first,
            end: scratch.descs.len(),
        });
        capacity = capacity.saturating_add(chain_capacity);
        if capacity >= frame.len() {
            fits = true;
            break;
        }
    }
    if !fits {
        // Every chain the ring can hold was set aside and the frame still
        // does not fit: it never will.
        let outcome = if scratch.chains.len() >= size {
            RxOutcome::Dropped
        } else {
            RxOutcome::NoBuffers
        };
        queue.set_next_avail(start);
        return Ok(RxReport {
            outcome,
            bad_chains,
        });
    }
    let buffers = u16::try_from(scratch.chains.len()).unwrap_or(u16::MAX);
    if let Some(num) = frame.get_mut(NUM_BUFFERS_OFFSET..VNET_HDR_LEN) {
        num.copy_from_slice(&buffers.to_le_bytes());
    }
    scratch.used.clear();
    let mut rest: &[u8] = frame;
    for chain in &scratch.chains {
        let mut written = 0usize;
        let descs = scratch
            .descs
            .get(chain.first..chain.end)
            .unwrap_or_default();
        for desc in descs {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(desc.len() as usize);
            let (part, tail) = rest.split_at(n);
            if mem.write_slice(part, desc.addr()).is_err() {
                // Checked by the walk; if memory still fails, the frame
                // is lost and the chains go back empty.
                for chain in &scratch.chains {
                    let _ = add_used(queue, mem, chain.head, 0);
                }
                return Ok(RxReport {
                    outcome: RxOutcome::Dropped,
                    bad_chains,
                });
            }
            rest = tail;
            written += n;
        }
        scratch.used.push((chain.head, written as u32));
    }
    add_used_batch(queue, mem, &scratch.used).map_err(|e| QueueError::UsedRing(e.to_string()))?;
    Ok(RxReport {
        outcome: RxOutcome::Delivered { buffers },
        bad_chains,
    })
}
