//! The virtio-vsock packet header and the guest buffers packets travel in.
//!
//! Every packet is a 44-byte little-endian header (`struct
//! virtio_vsock_hdr`, virtio 1.2 section 5.10.6) optionally followed by
//! `len` bytes of payload (only for `VSOCK_OP_RW`).
//!
//! Everything here reads guest-controlled descriptor chains, so it is
//! written to fail, never to panic: descriptor flags are checked
//! (tx buffers must be device-readable, rx buffers device-writable), every
//! address is bounds-checked by `vm-memory`, lengths use checked
//! arithmetic, and a payload is never larger than [`MAX_PKT_PAYLOAD`].

use std::fmt;

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions,
};

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;

/// The largest payload the device accepts from, or sends to, the guest
/// (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// The most descriptors the device looks at in one chain (the queue size,
/// 256, already bounds a chain; indirect tables are refused by the walker).
const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// The only socket type isola supports.
pub const VSOCK_TYPE_STREAM: u16 = 1;

/// Packet operations (`hdr.op`).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `hdr.flags` of a SHUTDOWN: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `hdr.flags` of a SHUTDOWN: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A decoded `struct virtio_vsock_hdr`.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} -> {}:{} op={} type={} len={} flags={:#x} buf_alloc={} fwd_cnt={}",
            self.src_cid,
            self.src_port,
            self.dst_cid,
            self.dst_port,
            op_name(self.op),
            self.type_,
            self.len,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt
        )
    }
}

/// A readable name for `op`, for logs.
pub fn op_name(op: u16) -> &'static str {
    match op {
        op::REQUEST => "REQUEST",
        op::RESPONSE => "RESPONSE",
        op::RST => "RST",
        op::SHUTDOWN => "SHUTDOWN",
        op::RW => "RW",
        op::CREDIT_UPDATE => "CREDIT_UPDATE",
        op::CREDIT_REQUEST => "CREDIT_REQUEST",
        _ => "INVALID",
    }
}

/// Reads fixed-size little-endian fields off a byte slice in order.
struct FieldReader<'a>(&'a [u8]);

impl FieldReader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        match self.0.split_first_chunk::<N>() {
            Some((head, rest)) => {
                self.0 = rest;
                *head
            }
            // Unreachable for the fixed header layout; yields zeroes rather
            // than panicking.
            None => [0; N],
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

impl Header {
    /// Decodes a header from its wire form.
    pub fn from_bytes(bytes: &[u8; HDR_SIZE]) -> Header {
        let mut r = FieldReader(bytes);
        Header {
            src_cid: r.u64(),
            dst_cid: r.u64(),
            src_port: r.u32(),
            dst_port: r.u32(),
            len: r.u32(),
            type_: r.u16(),
            op: r.u16(),
            flags: r.u32(),
            buf_alloc: r.u32(),
            fwd_cnt: r.u32(),
        }
    }

    /// Encodes the header in its wire form.
    pub fn to_bytes(self) -> [u8; HDR_SIZE] {
        let mut out = [0u8; HDR_SIZE];
        let fields: [&[u8]; 10] = [
            &self.src_cid.to_le_bytes(),
            &self.dst_cid.to_le_bytes(),
            &self.src_port.to_le_bytes(),
            &self.dst_port.to_le_bytes(),
            &self.len.to_le_bytes(),
            &self.type_.to_le_bytes(),
            &self.op.to_le_bytes(),
            &self.flags.to_le_bytes(),
            &self.buf_alloc.to_le_bytes(),
            &self.fwd_cnt.to_le_bytes(),
        ];
        let mut rest: &mut [u8] = &mut out;
        for field in fields {
            let (head, tail) = rest.split_at_mut(field.len());
            head.copy_from_slice(field);
            rest = tail;
        }
        out
    }
}

/// Why a descriptor chain was refused.
#[derive(Debug, Error)]
pub enum PacketError {
    #[error("a tx descriptor is device-writable")]
    WriteOnlyDescriptor,
    #[error("an rx descriptor is not device-writable")]
    ReadOnlyDescriptor,
    #[error("the chain holds {0} bytes, less than a {HDR_SIZE}-byte header")]
    HeaderTooShort(usize),
    #[error("payload length {0} exceeds the maximum of {MAX_PKT_PAYLOAD}")]
    PayloadTooLarge(u32),
    #[error("payload length {len} exceeds the {available} bytes left in the chain")]
    PayloadExceedsChain { len: u32, available: usize },
    #[error("the chain has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("a descriptor points outside guest memory")]
    BadAddress,
    #[error("the rx buffer is too small for the packet")]
    BufferTooSmall,
    #[error("guest memory access failed: {0}")]
    Memory(#[from] GuestMemoryError),
}

/// Reads a guest→device (tx) packet: the header into the returned
/// [`Header`] and, for `VSOCK_OP_RW`, `hdr.len` payload bytes into
/// `payload` (cleared first). Every descriptor of a tx chain must be
/// device-readable; the chain must hold the whole header and payload.
/// Payloads of other operations are ignored.
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: &[Descriptor],
    payload: &mut Vec<u8>,
) -> Result<Header, PacketError> {
    payload.clear();
    let mut hdr_bytes = [0u8; HDR_SIZE];
    let mut hdr_filled = 0usize;
    let mut header: Option<(Header, usize)> = None;
    let mut seen = 0usize;

    for (count, desc) in chain.iter().enumerate() {
        if count >= MAX_CHAIN_DESCRIPTORS {
            return Err(PacketError::TooManyDescriptors);
        }
        if desc.is_write_only() {
            return Err(PacketError::WriteOnlyDescriptor);
        }
        let mut addr = desc.addr();
        let mut remaining = desc.len() as usize;
        seen = seen.saturating_add(remaining);

        if header.is_none() {
            let n = remaining.min(HDR_SIZE - hdr_filled);
            let dst = hdr_bytes
                .get_mut(hdr_filled..hdr_filled + n)
                .ok_or(PacketError::BadAddress)?;
            mem.read_slice(dst, addr)?;
            hdr_filled += n;
            remaining -= n;
            addr = addr.checked_add(n as u64).ok_or(PacketError::BadAddress)?;
            if hdr_filled == HDR_SIZE {
                let hdr = Header::from_bytes(&hdr_bytes);
                let want = if hdr.op == op::RW {
                    if hdr.len as usize > MAX_PKT_PAYLOAD {
                        return Err(PacketError::PayloadTooLarge(hdr.len));
                    }
                    hdr.len as usize
                } else {
                    0
                };
                payload.reserve_exact(want);
                header = Some((hdr, want));
            }
        }

        if let Some((hdr, want)) = header {
            let missing = want - payload.len();
            let n = remaining.min(missing);
            if n > 0 {
                let start = payload.len();
                payload.resize(start + n, 0);
                let dst = payload.get_mut(start..).ok_or(PacketError::BadAddress)?;
                mem.read_slice(dst, addr)?;
            }
            if payload.len() == want {
                return Ok(hdr);
            }
        }
    }

    match header {
        None => Err(PacketError::HeaderTooShort(hdr_filled)),
        Some((hdr, _)) => Err(PacketError::PayloadExceedsChain {
            len: hdr.len,
            available: seen.saturating_sub(HDR_SIZE),
        }),
    }
}

/// A validated device→guest (rx) buffer: the device-writable regions of a
/// descriptor chain, all inside guest memory, holding at least a header.
#[derive(Debug)]
pub struct RxBuffer {
    regions: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

impl RxBuffer {
    /// Validates an rx chain. Every descriptor must be device-writable and
    /// inside guest memory (only the first `HDR_SIZE + MAX_PKT_PAYLOAD`
    /// bytes are looked at).
    pub fn new(mem: &GuestMemoryMmap, chain: &[Descriptor]) -> Result<Self, PacketError> {
        const LIMIT: usize = HDR_SIZE + MAX_PKT_PAYLOAD;
        let mut regions = Vec::new();
        let mut capacity = 0usize;
        for (count, desc) in chain.iter().enumerate() {
            if count >= MAX_CHAIN_DESCRIPTORS {
                return Err(PacketError::TooManyDescriptors);
            }
            if !desc.is_write_only() {
                return Err(PacketError::ReadOnlyDescriptor);
            }
            let take = (desc.len() as usize).min(LIMIT - capacity);
            if take == 0 {
                continue;
            }
            if !GuestMemory::check_range(mem, desc.addr(), take, Permissions::Write) {
                return Err(PacketError::BadAddress);
            }
            regions.push((desc.addr(), take));
            capacity += take;
            if capacity >= LIMIT {
                break;
            }
        }
        if capacity < HDR_SIZE {
            return Err(PacketError::HeaderTooShort(capacity));
        }
        Ok(RxBuffer { regions, capacity })
    }

    /// How many payload bytes fit after the header.
    pub fn payload_capacity(&self) -> usize {
        self.capacity - HDR_SIZE
    }

    /// Writes `hdr` (its `len` set to the payload's) and `payload` into the
    /// buffer; returns the number of bytes written, for the used ring.
    pub fn write(
        &self,
        mem: &GuestMemoryMmap,
        hdr: &Header,
        payload: &[u8],
    ) -> Result<u32, PacketError> {
        if payload.len() > self.payload_capacity() || payload.len() > MAX_PKT_PAYLOAD {
            return Err(PacketError::BufferTooSmall);
        }
        let mut hdr = *hdr;
        hdr.len = u32::try_from(payload.len()).map_err(|_| PacketError::BufferTooSmall)?;
        let hdr_bytes = hdr.to_bytes();

        let mut regions = self.regions.iter();
        let mut current: Option<(GuestAddress, usize)> = None;
        for chunk in [&hdr_bytes[..], payload] {
            let mut data = chunk;
            while !data.is_empty() {
                let (addr, space) = match current {
                    Some((addr, space)) if space > 0 => (addr, space),
                    _ => *regions.next().ok_or(PacketError::BufferTooSmall)?,
                };
                let n = space.min(data.len());
                let (head, tail) = data.split_at(n);
                mem.write_slice(head, addr)?;
                let next = addr.checked_add(n as u64).ok_or(PacketError::BadAddress)?;
                current = Some((next, space - n));
                data = tail;
            }
        }
        u32::try_from(HDR_SIZE + payload.len()).map_err(|_| PacketError::BufferTooSmall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let hdr = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 1024,
            len: 17,
            type_: VSOCK_TYPE_STREAM,
            op: op::RW,
            flags: 3,
            buf_alloc: 65536,
            fwd_cnt: 99,
        };
        let bytes = hdr.to_bytes();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[24..28], &17u32.to_le_bytes());
        assert_eq!(&bytes[30..32], &op::RW.to_le_bytes());
        assert_eq!(&bytes[40..44], &99u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&bytes), hdr);
    }
}
