//! `--fs tag=TAG,socket=PATH[,queues=N,queue_size=N]`: one virtio-fs
//! share, validated, and the device configuration space it gives the guest
//! (virtio 1.2, 5.11.4: the tag, then `num_request_queues`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

/// Bytes of the tag field in the configuration space.
pub const TAG_LEN: usize = 36;
/// Request queues at most per share (each is one vring in the back end;
/// virtiofsd 1.14 serves one).
pub const MAX_REQUEST_QUEUES: u16 = 16;
/// Largest queue size offered (the virtio-mmio transport's bound too).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Request queues when `queues=` is not given.
pub const DEFAULT_REQUEST_QUEUES: u16 = 1;
/// Queue size when `queue_size=` is not given.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
/// Size of the configuration space: tag and `num_request_queues` (le32).
pub const CONFIG_SPACE_LEN: usize = TAG_LEN + 4;

/// What is wrong with an `--fs` value; each names the field.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FsConfigError {
    #[error("--fs {0:?}: expected tag=TAG,socket=PATH[,queues=N][,queue_size=N]")]
    Syntax(String),
    #[error("--fs: unknown field {0:?} (fields: tag, socket, queues, queue_size)")]
    UnknownField(String),
    #[error("--fs: field {0} given twice")]
    Duplicate(&'static str),
    #[error("--fs: field {0} is missing")]
    Missing(&'static str),
    #[error("--fs tag={0:?}: the tag must be 1 to {TAG_LEN} bytes")]
    TagLength(String),
    #[error("--fs tag={0:?}: the tag must not contain control characters")]
    TagCharacters(String),
    #[error("--fs socket: the path is empty")]
    SocketEmpty,
    #[error("--fs queues={0}: must be a number from 1 to {MAX_REQUEST_QUEUES}")]
    Queues(String),
    #[error("--fs queue_size={0}: must be a power of two from 1 to {MAX_QUEUE_SIZE}")]
    QueueSize(String),
    #[error("--fs tag={0:?} is given more than once; every share needs its own tag")]
    DuplicateTag(String),
}

/// One virtio-fs share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// What the guest mounts (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
    /// The vhost-user back end's (virtiofsd's) listening socket.
    pub socket: PathBuf,
    /// Request queues (the device also has one high-priority queue).
    pub request_queues: u16,
    /// Maximum size of every queue.
    pub queue_size: u16,
}

impl FsConfig {
    /// Queues of the device: the high-priority queue and the request queues.
    pub fn num_queues(&self) -> usize {
        1 + usize::from(self.request_queues)
    }

    /// The configuration space: the tag padded with NULs, then
    /// `num_request_queues` (little endian).
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut space = [0u8; CONFIG_SPACE_LEN];
        let tag = self.tag.as_bytes();
        let n = tag.len().min(TAG_LEN);
        space[..n].copy_from_slice(&tag[..n]);
        space[TAG_LEN..].copy_from_slice(&u32::from(self.request_queues).to_le_bytes());
        space
    }
}

impl fmt::Display for FsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tag={} socket={}", self.tag, self.socket.display())
    }
}

fn parse_tag(value: &str) -> Result<String, FsConfigError> {
    if value.is_empty() || value.len() > TAG_LEN {
        return Err(FsConfigError::TagLength(value.to_string()));
    }
    if value.chars().any(char::is_control) {
        return Err(FsConfigError::TagCharacters(value.to_string()));
    }
    Ok(value.to_string())
}

fn parse_queues(value: &str) -> Result<u16, FsConfigError> {
    value
        .parse::<u16>()
        .ok()
        .filter(|n| (1..=MAX_REQUEST_QUEUES).contains(n))
        .ok_or_else(|| FsConfigError::Queues(value.to_string()))
}

fn parse_queue_size(value: &str) -> Result<u16, FsConfigError> {
    value
        .parse::<u16>()
        .ok()
        .filter(|n| n.is_power_of_two() && *n <= MAX_QUEUE_SIZE)
        .ok_or_else(|| FsConfigError::QueueSize(value.to_string()))
}

impl FromStr for FsConfig {
    type Err = FsConfigError;

    fn from_str(s: &str) -> Result<Self, FsConfigError> {
        let mut tag = None;
        let mut socket = None;
        let mut queues = None;
        let mut queue_size = None;
        for field in s.split(',') {
            let Some((key, value)) = field.split_once('=') else {
                return Err(FsConfigError::Syntax(s.to_string()));
            };
            let (slot_name, dup) = match key {
                "tag" => ("tag", tag.replace(parse_tag(value)?).is_some()),
                "socket" => {
                    if value.is_empty() {
                        return Err(FsConfigError::SocketEmpty);
                    }
                    ("socket", socket.replace(PathBuf::from(value)).is_some())
                }
                "queues" => ("queues", queues.replace(parse_queues(value)?).is_some()),
                "queue_size" => (
                    "queue_size",
                    queue_size.replace(parse_queue_size(value)?).is_some(),
                ),
                other => return Err(FsConfigError::UnknownField(other.to_string())),
            };
            if dup {
                return Err(FsConfigError::Duplicate(slot_name));
            }
        }
        Ok(FsConfig {
            tag: tag.ok_or(FsConfigError::Missing("tag"))?,
            socket: socket.ok_or(FsConfigError::Missing("socket"))?,
            request_queues: queues.unwrap_or(DEFAULT_REQUEST_QUEUES),
            queue_size: queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
        })
    }
}

/// Checks that no two shares have the same tag.
pub fn check_unique_tags(shares: &[FsConfig]) -> Result<(), FsConfigError> {
    for (i, share) in shares.iter().enumerate() {
        if shares[..i].iter().any(|other| other.tag == share.tag) {
            return Err(FsConfigError::DuplicateTag(share.tag.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<FsConfig, FsConfigError> {
        s.parse()
    }

    #[test]
    fn accepts_the_documented_forms() {
        let c = parse("tag=share,socket=/run/fs.sock").unwrap();
        assert_eq!(c.tag, "share");
        assert_eq!(c.socket, PathBuf::from("/run/fs.sock"));
        assert_eq!((c.request_queues, c.queue_size), (1, 1024));
        assert_eq!(c.num_queues(), 2);
        let c = parse("socket=/s,queue_size=256,queues=2,tag=x").unwrap();
        assert_eq!((c.request_queues, c.queue_size), (2, 256));
        assert_eq!(c.num_queues(), 3);
        let tag36 = "t".repeat(TAG_LEN);
        assert_eq!(parse(&format!("tag={tag36},socket=/s")).unwrap().tag, tag36);
    }

    #[test]
    fn names_the_bad_field() {
        let long = "t".repeat(TAG_LEN + 1);
        let cases: Vec<(String, FsConfigError, &str)> = vec![
            (
                "tag=,socket=/s".into(),
                FsConfigError::TagLength(String::new()),
                "tag",
            ),
            (
                format!("tag={long},socket=/s"),
                FsConfigError::TagLength(long.clone()),
                "1 to 36 bytes",
            ),
            (
                "tag=a\tb,socket=/s".into(),
                FsConfigError::TagCharacters("a\tb".into()),
                "control",
            ),
            (
                "socket=/s".into(),
                FsConfigError::Missing("tag"),
                "tag is missing",
            ),
            (
                "tag=a".into(),
                FsConfigError::Missing("socket"),
                "socket is missing",
            ),
            ("tag=a,socket=".into(), FsConfigError::SocketEmpty, "socket"),
            (
                "tag=a,socket=/s,queues=0".into(),
                FsConfigError::Queues("0".into()),
                "queues=0",
            ),
            (
                "tag=a,socket=/s,queues=17".into(),
                FsConfigError::Queues("17".into()),
                "queues=17",
            ),
            (
                "tag=a,socket=/s,queues=two".into(),
                FsConfigError::Queues("two".into()),
                "queues=two",
            ),
            (
                "tag=a,socket=/s,queue_size=1000".into(),
                FsConfigError::QueueSize("1000".into()),
                "queue_size=1000",
            ),
            (
                "tag=a,socket=/s,queue_size=2048".into(),
                FsConfigError::QueueSize("2048".into()),
                "queue_size=2048",
            ),
            (
                "tag=a,socket=/s,queue_size=0".into(),
                FsConfigError::QueueSize("0".into()),
                "queue_size=0",
            ),
            (
                "tag=a,socket=/s,cache=always".into(),
                FsConfigError::UnknownField("cache".into()),
                "cache",
            ),
            (
                "tag=a,tag=b,socket=/s".into(),
                FsConfigError::Duplicate("tag"),
                "tag given twice",
            ),
            (
                "tag=a,socket".into(),
                FsConfigError::Syntax("tag=a,socket".into()),
                "expected tag=",
            ),
            ("".into(), FsConfigError::Syntax(String::new()), "expected"),
        ];
        for (input, want, text) in cases {
            let err = parse(&input).unwrap_err();
            assert_eq!(err, want, "{input:?}");
            assert!(err.to_string().contains(text), "{input:?}: {err}");
        }
    }

    #[test]
    fn tags_must_be_unique() {
        let a = parse("tag=a,socket=/1").unwrap();
        let b = parse("tag=b,socket=/2").unwrap();
        let a2 = parse("tag=a,socket=/3").unwrap();
        assert_eq!(check_unique_tags(&[a.clone(), b.clone()]), Ok(()));
        let err = check_unique_tags(&[a, b, a2]).unwrap_err();
        assert_eq!(err, FsConfigError::DuplicateTag("a".into()));
        assert!(err.to_string().contains("more than once"));
    }

    #[test]
    fn config_space_has_the_tag_and_the_request_queues() {
        let c = parse("tag=myfs,socket=/s,queues=3").unwrap();
        let space = c.config_space();
        assert_eq!(&space[..4], b"myfs");
        assert!(space[4..TAG_LEN].iter().all(|b| *b == 0));
        assert_eq!(&space[TAG_LEN..], &3u32.to_le_bytes());
        // A tag of exactly 36 bytes fills the field (no NUL).
        let full = "x".repeat(TAG_LEN);
        let c = parse(&format!("tag={full},socket=/s")).unwrap();
        assert_eq!(&c.config_space()[..TAG_LEN], full.as_bytes());
    }
}
