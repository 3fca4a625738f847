//! Address buses that route vCPU port-I/O and MMIO exits to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device on a bus. `offset` is relative to the device's base.
pub trait BusDevice: Send + std::fmt::Debug {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("empty or overflowing range {base:#x}+{len:#x}")]
    BadRange { base: u64, len: u64 },
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// Devices keyed by base address, each covering `[base, base + len)`.
#[derive(Debug, Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let overlaps = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Reads from the device at `addr`; false if none (data is then all ones,
    /// as reads of an empty ISA bus return).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; false if none.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fb, &mut b));
        assert_eq!(b, [3]);
        assert!(bus.write(0x3f8, &[7]));
        assert!(!bus.write(0x400, &[7]));
        assert!(!bus.read(0x3f7, &mut b));
        assert_eq!(b, [0xff]);
        assert_eq!(dev.lock().unwrap().writes, vec![(0, vec![7])]);
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x60, 1).unwrap();
        bus.insert(dev.clone(), 0x64, 1).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x5f, 2),
            Err(BusError::Overlap { base: 0x5f, len: 2 })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0x10, 0),
            Err(BusError::BadRange { base: 0x10, len: 0 })
        );
        assert_eq!(
            bus.insert(dev, u64::MAX, 2),
            Err(BusError::BadRange {
                base: u64::MAX,
                len: 2
            })
        );
    }
}
