//! A minimal i8042 keyboard controller: enough for a guest reboot
//! (`reboot=k`: the CPU reset command 0xFE) to reach the VMM, and for the
//! VMM to send Ctrl-Alt-Del, the guest's power-off request.
//!
//! Ports 0x60 (data) and 0x64 (status/command). The guest kernel runs with
//! `i8042.dumbkbd` (it never sends keyboard commands) and `i8042.noaux`;
//! keyboard output is scan code set 2, untranslated.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

pub const I8042_BASE: u64 = 0x60;
/// Covers 0x60..=0x64; 0x61-0x63 read as 0.
pub const I8042_LEN: u64 = 5;

const OFS_DATA: u64 = 0;
const OFS_STATUS: u64 = 4;

const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM: u8 = 0x04;
const SB_CMD: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

const CB_KBD_INT: u8 = 0x01;
const CB_SYSTEM: u8 = 0x04;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET_OK: u8 = 0xaa;

/// Output bytes kept at most; more is dropped (the guest is not reading).
const BUFFER_MAX: usize = 16;

/// Scan code set 2: Ctrl, Alt, Delete pressed, then released.
const CTRL_ALT_DEL: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, // make: Ctrl, Alt, E0 Delete
    0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, // break: Delete, Alt, Ctrl
];

/// The controller's state machine.
#[derive(Debug)]
pub struct I8042 {
    status: u8,
    control: u8,
    outp: u8,
    /// Controller command waiting for its data byte.
    pending: Option<u8>,
    buffer: VecDeque<u8>,
    kbd_irq: EventFd,
    reset: EventFd,
}

impl I8042 {
    /// `kbd_irq` raises IRQ 1; `reset` is written when the guest asks for a
    /// CPU reset.
    pub fn new(kbd_irq: EventFd, reset: EventFd) -> Self {
        I8042 {
            status: SB_SYSTEM | SB_KBD_ENABLED,
            control: CB_KBD_INT | CB_SYSTEM,
            outp: 0x01,
            pending: None,
            buffer: VecDeque::new(),
            kbd_irq,
            reset,
        }
    }

    /// The controller's registers, for a snapshot.
    pub fn save(&self) -> crate::snapshot::I8042State {
        crate::snapshot::I8042State {
            status: self.status,
            control: self.control,
            outp: self.outp,
            pending: self.pending,
            buffer: self.buffer.iter().copied().collect(),
        }
    }

    /// Takes the registers of a snapshot (the buffer bounded as ever).
    pub fn restore(&mut self, state: &crate::snapshot::I8042State) {
        self.status = state.status;
        self.control = state.control;
        self.outp = state.outp;
        self.pending = state.pending;
        self.buffer = state.buffer.iter().copied().take(BUFFER_MAX).collect();
    }

    /// Queues Ctrl-Alt-Del key presses for the guest.
    pub fn trigger_ctrl_alt_del(&mut self) {
        for b in CTRL_ALT_DEL {
            self.push(b);
        }
    }

    fn push(&mut self, byte: u8) {
        if self.buffer.len() >= BUFFER_MAX {
            return;
        }
        self.buffer.push_back(byte);
        self.status |= SB_OUT_FULL;
        self.raise();
    }

    fn raise(&self) {
        if self.control & CB_KBD_INT != 0 {
            let _ = self.kbd_irq.write(1);
        }
    }

    fn pop(&mut self) -> u8 {
        let byte = self.buffer.pop_front().unwrap_or(0);
        if self.buffer.is_empty() {
            self.status &= !SB_OUT_FULL;
        } else {
            self.raise();
        }
        byte
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_CMD;
        match cmd {
            CMD_READ_CTR => {
                let c = self.control;
                self.push(c)
            }
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending = Some(cmd),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST => self.push(0x00),
            CMD_KBD_DISABLE => self.status &= !SB_KBD_ENABLED,
            CMD_KBD_ENABLE => self.status |= SB_KBD_ENABLED,
            CMD_READ_OUTP => {
                let o = self.outp;
                self.push(o)
            }
            CMD_RESET_CPU => self.request_reset(),
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !SB_CMD;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.control = byte,
            Some(CMD_WRITE_OUTP) => {
                self.outp = byte;
                // Output port bit 0 low holds the CPU in reset.
                if byte & 1 == 0 {
                    self.request_reset();
                }
            }
            _ => {
                // A keyboard command: acknowledge (reset also reports BAT).
                self.push(KBD_ACK);
                if byte == 0xff {
                    self.push(KBD_RESET_OK);
                }
            }
        }
    }

    fn request_reset(&self) {
        tracing::debug!("i8042: guest requested a CPU reset");
        let _ = self.reset.write(1);
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            OFS_DATA => self.pop(),
            OFS_STATUS => self.status,
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            OFS_DATA => self.data(data[0]),
            OFS_STATUS => self.command(data[0]),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn dev() -> I8042 {
        I8042::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
    }

    fn rd(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_the_vmm() {
        let mut d = dev();
        assert!(d.reset.read().is_err(), "no reset yet");
        d.write(OFS_STATUS, &[CMD_RESET_CPU]);
        assert_eq!(d.reset.read().unwrap(), 1);
    }

    #[test]
    fn output_port_reset_bit() {
        let mut d = dev();
        d.write(OFS_STATUS, &[CMD_WRITE_OUTP]);
        d.write(OFS_DATA, &[0x00]);
        assert_eq!(d.reset.read().unwrap(), 1);
    }

    #[test]
    fn ctrl_alt_del_is_delivered_byte_by_byte_with_interrupts() {
        let mut d = dev();
        d.trigger_ctrl_alt_del();
        assert!(d.kbd_irq.read().unwrap() >= 1);
        let mut got = Vec::new();
        while rd(&mut d, OFS_STATUS) & SB_OUT_FULL != 0 {
            got.push(rd(&mut d, OFS_DATA));
        }
        assert_eq!(got, CTRL_ALT_DEL);
    }

    #[test]
    fn control_byte_round_trip_and_self_test() {
        let mut d = dev();
        d.write(OFS_STATUS, &[CMD_WRITE_CTR]);
        d.write(OFS_DATA, &[0x45]);
        d.write(OFS_STATUS, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut d, OFS_DATA), 0x45);
        d.write(OFS_STATUS, &[CMD_SELF_TEST]);
        assert_eq!(rd(&mut d, OFS_DATA), 0x55);
        // Keyboard command gets an ACK; reset also BAT OK.
        d.write(OFS_DATA, &[0xff]);
        assert_eq!(rd(&mut d, OFS_DATA), KBD_ACK);
        assert_eq!(rd(&mut d, OFS_DATA), KBD_RESET_OK);
        assert_eq!(rd(&mut d, OFS_STATUS) & SB_OUT_FULL, 0);
    }

    #[test]
    fn buffer_is_bounded() {
        let mut d = dev();
        for _ in 0..100 {
            d.write(OFS_STATUS, &[CMD_SELF_TEST]);
        }
        assert_eq!(d.buffer.len(), BUFFER_MAX);
    }
}
