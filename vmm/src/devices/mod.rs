//! Emulated devices: a port-I/O and an MMIO bus, the 8250 serial console,
//! the i8042 (reset and Ctrl-Alt-Del), the boot timer, and virtio devices.

pub mod boot_timer;
pub mod bus;
pub mod console;
pub mod i8042;
pub mod serial;
pub mod virtio;
