//! The guest kernel's log (`/dev/kmsg`) in the agent's log.
//!
//! What the kernel says after the agent started (an OOM kill, a segfault,
//! a hung task, a driver's warning) goes into the agent's log, and so to
//! the host's log stream, where the sandbox's log gate bounds it like any
//! agent line. Records written from user space (`/dev/kmsg` is writable by
//! a guest's root) arrive with the `user` facility (the kernel never lets
//! user space claim the kernel's) and are marked so. Levels map as
//! emerg..err → ERROR, warning → WARN, notice → INFO, info and debug →
//! DEBUG (a kernel's routine chatter stays below the default level).
//! Messages are cut to [`MAX_MESSAGE`] bytes; records overwritten before
//! they were read are skipped (the kernel says `EPIPE`). It is read on the
//! agent's runtime, never a thread of its own: the agent forks containers
//! and must stay single-threaded.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;

/// The target of the kernel's records the agent forwards: the kernel
/// printed them on the console itself (at its own `loglevel`), so the
/// agent's log writer keeps them off it. This module's own messages (the
/// log not followed, a read failing) have the module's target and do go.
pub const TARGET: &str = "isola_agent::kmsg::kernel";

/// The most bytes of one record's message logged.
pub const MAX_MESSAGE: usize = 512;

/// One `/dev/kmsg` record.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// syslog level, 0 (emerg) to 7 (debug).
    pub level: u8,
    /// Written from user space (facility other than the kernel's).
    pub from_user: bool,
    pub message: &'a str,
}

/// Parses one record (`PRI,SEQ,TIMESTAMP,FLAGS[,...];MESSAGE\n` followed by
/// ` KEY=VALUE` continuation lines, which are ignored). `None` for
/// anything else.
pub fn parse(record: &str) -> Option<Record<'_>> {
    let (prefix, rest) = record.split_once(';')?;
    let pri: u32 = prefix.split(',').next()?.parse().ok()?;
    let message = rest.split('\n').next().unwrap_or("");
    Some(Record {
        level: (pri & 7) as u8,
        from_user: pri >> 3 != 0,
        message: truncate(message, MAX_MESSAGE),
    })
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Logs one record at the level it maps to.
fn log(record: &Record<'_>) {
    let source = if record.from_user {
        "kmsg (user)"
    } else {
        "kernel"
    };
    let message = record.message;
    match record.level {
        0..=3 => tracing::error!(target: TARGET, "{source}: {message}"),
        4 => tracing::warn!(target: TARGET, "{source}: {message}"),
        5 => tracing::info!(target: TARGET, "{source}: {message}"),
        _ => tracing::debug!(target: TARGET, "{source}: {message}"),
    }
}

/// Opens `/dev/kmsg` (non-blocking) at its end: only records made from
/// now on are read.
pub fn open() -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/kmsg")?;
    // SAFETY: lseek on a descriptor `kmsg` owns; SEEK_END on /dev/kmsg
    // moves to the record after the last one.
    if unsafe { libc::lseek(kmsg.as_raw_fd(), 0, libc::SEEK_END) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(kmsg)
}

/// Logs each new record of `kmsg` ([`open`]) for the agent's life, on the
/// agent's runtime (the agent stays single-threaded: it forks containers).
pub async fn follow(kmsg: File) {
    // SAFETY: a File is open until dropped, which only the AsyncFd does,
    // and always answers the same descriptor.
    let kmsg = match unsafe { tokio::io::unix::AsyncFd::register(kmsg) } {
        Ok(fd) => fd,
        Err(err) => {
            tracing::warn!("the kernel's log (/dev/kmsg) is not followed: {err}");
            return;
        }
    };
    // A record is at most 8 KiB (the kernel's LOG_LINE_MAX and its
    // dictionary); a larger one would be refused with EINVAL.
    let mut buf = vec![0u8; 8192];
    loop {
        let mut ready = match kmsg.readable().await {
            Ok(ready) => ready,
            Err(err) => {
                tracing::warn!(
                    "waiting on /dev/kmsg: {err}; the kernel's log is no longer followed"
                );
                return;
            }
        };
        match ready.try_io(|fd| fd.get_ref().read(&mut buf)) {
            Ok(Ok(0)) => return,
            Ok(Ok(n)) => {
                if let Some(record) = parse(&String::from_utf8_lossy(&buf[..n])) {
                    log(&record);
                }
            }
            // Overwritten before it was read: go on with the next.
            Ok(Err(err)) if err.raw_os_error() == Some(libc::EPIPE) => {}
            Ok(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(err)) => {
                tracing::warn!("reading /dev/kmsg: {err}; the kernel's log is no longer followed");
                return;
            }
            // Not readable after all: `try_io` cleared the readiness.
            Err(_would_block) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_parsed_with_level_and_origin() {
        assert_eq!(
            parse("3,1234,5678901,-;Memory cgroup out of memory: Killed process 42 (tail)\n"),
            Some(Record {
                level: 3,
                from_user: false,
                message: "Memory cgroup out of memory: Killed process 42 (tail)",
            })
        );
        // `<3>x` written to /dev/kmsg: user facility (1 << 3 | 3).
        let r = parse("11,99,1,-;x\n SUBSYSTEM=foo\n DEVICE=+bar\n").unwrap();
        assert_eq!((r.level, r.from_user, r.message), (3, true, "x"));
        // Extra prefix fields (continuation flag, caller id) are fine.
        let r = parse("4,5,6,c,caller=T1;warn\n").unwrap();
        assert_eq!((r.level, r.message), (4, "warn"));
    }

    #[test]
    fn garbage_is_not_a_record_and_long_messages_are_cut() {
        for bad in ["", "no separator", "x,1,2,-;m", ";m"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        let long = format!("6,1,1,-;{}\n", "é".repeat(MAX_MESSAGE));
        let r = parse(&long).unwrap();
        assert!(r.message.len() <= MAX_MESSAGE && r.message.len() >= MAX_MESSAGE - 1);
    }
}
