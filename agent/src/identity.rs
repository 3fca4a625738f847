//! What makes a guest its own when it was restored from a template (see
//! the VMM's `snapshot` module): the template's clones all start with the
//! same RNG state and the clock of the moment the template was saved. The
//! host hands each sandbox fresh randomness and its wall clock in
//! CreateSandbox, and the agent applies them before anything else.
//!
//! Randomness goes in with RNDADDENTROPY (mixed into the input pool and
//! credited) and RNDRESEEDCRNG (the CRNG rekeys from the pool now, not at
//! its next scheduled reseed; every per-CPU CRNG follows at its next use).
//! From then on what the guest draws (getrandom, /dev/urandom, the boot_id
//! generated at its first read, new processes' ASLR and stack canaries)
//! differs between clones. What was drawn before the template was saved
//! (the kernel's KASLR offset, the agent's own canary and hash seeds) is
//! shared by every clone: docs/architecture.md lists it.

use anyhow::{bail, Context, Result};

/// Bounds of the entropy a host hands over.
pub const ENTROPY_MIN: usize = 32;
pub const ENTROPY_MAX: usize = 512;

/// `_IOW('R', 0x03, int[2])` and `_IO('R', 0x07)` (linux/random.h).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Checks the size of the host's entropy (empty is allowed: nothing to add).
pub fn check_entropy(entropy: &[u8]) -> Result<(), String> {
    if entropy.is_empty() || (ENTROPY_MIN..=ENTROPY_MAX).contains(&entropy.len()) {
        Ok(())
    } else {
        Err(format!(
            "entropy: {} bytes; give {ENTROPY_MIN} to {ENTROPY_MAX} (or none)",
            entropy.len()
        ))
    }
}

/// The `struct rand_pool_info` RNDADDENTROPY takes: entropy_count (bits),
/// buf_size (bytes), then the bytes (in 32-bit words).
fn pool_info(entropy: &[u8]) -> Vec<u32> {
    let bits = (entropy.len() * 8) as u32;
    let mut words = Vec::with_capacity(2 + entropy.len().div_ceil(4));
    words.push(bits);
    words.push(entropy.len() as u32);
    for chunk in entropy.chunks(4) {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        words.push(u32::from_ne_bytes(w));
    }
    words
}

/// Mixes `entropy` into the kernel's pool, credited, and reseeds the CRNG.
pub fn reseed(entropy: &[u8]) -> Result<()> {
    if entropy.is_empty() {
        return Ok(());
    }
    if let Err(e) = check_entropy(entropy) {
        bail!(e);
    }
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .context("opening /dev/urandom")?;
    let info = pool_info(entropy);
    use std::os::fd::AsRawFd;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info: two ints then
    // buf_size bytes, all inside `info` (8 + len rounded up to words).
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("RNDADDENTROPY");
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("RNDRESEEDCRNG");
    }
    Ok(())
}

/// Sets the wall clock to `ns` since the epoch (0: left alone).
pub fn set_realtime(ns: u64) -> Result<()> {
    if ns == 0 {
        return Ok(());
    }
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads one timespec, which `ts` is.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("setting the wall clock (CLOCK_REALTIME)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_sizes_are_bounded() {
        assert!(check_entropy(&[]).is_ok());
        assert!(check_entropy(&[1; 32]).is_ok());
        assert!(check_entropy(&[1; 512]).is_ok());
        assert!(check_entropy(&[1; 31]).unwrap_err().contains("31 bytes"));
        assert!(check_entropy(&[1; 513]).is_err());
    }

    #[test]
    fn pool_info_is_bits_bytes_then_the_bytes() {
        let info = pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(info[0], 40);
        assert_eq!(info[1], 5);
        assert_eq!(info[2], u32::from_ne_bytes([1, 2, 3, 4]));
        assert_eq!(info[3], u32::from_ne_bytes([5, 0, 0, 0]));
        assert_eq!(info.len(), 4);
    }
}
