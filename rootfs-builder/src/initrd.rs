//! A reproducible newc cpio archive: the guest's initrd.
//!
//! The same entries always give the same bytes: entries are sorted by path,
//! inode numbers are assigned in that order, every owner is 0:0 and every
//! mtime is [`MTIME`].

use std::collections::BTreeMap;
#[cfg(test)]
use std::io;
use std::io::Write;

use anyhow::{bail, Result};

/// Fixed modification time of every entry (the Unix epoch).
pub const MTIME: u32 = 0;

/// What an entry of the archive is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    CharDev { mode: u32, major: u32, minor: u32 },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// The file tree of an initrd, keyed by path without a leading slash.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `node` at `path` (`/init`, `dev/console`, ...). Parent
    /// directories must be added too; [`Tree::write`] checks.
    pub fn add(&mut self, path: &str, node: Node) -> Result<()> {
        let path = path.trim_start_matches('/').trim_end_matches('/');
        if path.is_empty()
            || path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            bail!("invalid initrd path {path:?}");
        }
        if self.nodes.insert(path.to_string(), node).is_some() {
            bail!("initrd path {path:?} added twice");
        }
        Ok(())
    }

    /// Writes the archive, trailer included.
    pub fn write<W: Write>(&self, mut out: W) -> Result<W> {
        for path in self.nodes.keys() {
            if let Some((parent, _)) = path.rsplit_once('/') {
                if !matches!(self.nodes.get(parent), Some(Node::Dir { .. })) {
                    bail!("initrd path {path:?} has no parent directory {parent:?}");
                }
            }
        }
        for (index, (path, node)) in self.nodes.iter().enumerate() {
            let ino = u32::try_from(index + 1)?;
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match node {
                Node::Dir { mode } => (S_IFDIR | (mode & 0o7777), 2, &[], (0, 0)),
                Node::File { mode, data } => (S_IFREG | (mode & 0o7777), 1, data, (0, 0)),
                Node::CharDev { mode, major, minor } => {
                    (S_IFCHR | (mode & 0o7777), 1, &[], (*major, *minor))
                }
            };
            let size = u32::try_from(data.len())
                .map_err(|_| anyhow::anyhow!("{path:?} is over 4 GiB, too large for newc"))?;
            let mut writer = cpio::newc::Builder::new(path)
                .ino(ino)
                .mode(mode)
                .uid(0)
                .gid(0)
                .nlink(nlink)
                .mtime(MTIME)
                .rdev_major(rdev.0)
                .rdev_minor(rdev.1)
                .write(out, size);
            writer.write_all(data)?;
            out = writer.finish()?;
        }
        Ok(cpio::newc::trailer(out)?)
    }
}

/// Reads back an archive's entries (name, mode, size).
#[cfg(test)]
pub fn list<R: io::Read>(mut input: R) -> io::Result<Vec<(String, u32, u32)>> {
    let mut entries = Vec::new();
    loop {
        let reader = cpio::newc::Reader::new(input)?;
        if reader.entry().is_trailer() {
            return Ok(entries);
        }
        let e = reader.entry();
        entries.push((e.name().to_string(), e.mode(), e.file_size()));
        input = reader.finish()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Tree {
        let mut t = Tree::new();
        t.add(
            "/init",
            Node::File {
                mode: 0o755,
                data: b"#!agent".to_vec(),
            },
        )
        .unwrap();
        t.add("dev", Node::Dir { mode: 0o755 }).unwrap();
        t.add(
            "dev/console",
            Node::CharDev {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        )
        .unwrap();
        t.add("proc", Node::Dir { mode: 0o555 }).unwrap();
        t
    }

    #[test]
    fn same_input_same_bytes() {
        let a = sample().write(Vec::new()).unwrap();
        let b = sample().write(Vec::new()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn entries_are_sorted_and_typed() {
        let bytes = sample().write(Vec::new()).unwrap();
        let entries = list(&bytes[..]).unwrap();
        assert_eq!(
            entries,
            vec![
                ("dev".to_string(), S_IFDIR | 0o755, 0),
                ("dev/console".to_string(), S_IFCHR | 0o600, 0),
                ("init".to_string(), S_IFREG | 0o755, 7),
                ("proc".to_string(), S_IFDIR | 0o555, 0),
            ]
        );
        // newc: header magic, and the archive ends with the trailer.
        assert!(bytes.starts_with(b"070701"));
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn missing_parent_is_an_error() {
        let mut t = Tree::new();
        t.add(
            "dev/null",
            Node::CharDev {
                mode: 0o666,
                major: 1,
                minor: 3,
            },
        )
        .unwrap();
        let err = t.write(Vec::new()).unwrap_err().to_string();
        assert!(err.contains("no parent directory \"dev\""), "{err}");
    }

    #[test]
    fn bad_and_duplicate_paths_are_rejected() {
        let mut t = Tree::new();
        assert!(t.add("../etc", Node::Dir { mode: 0o755 }).is_err());
        assert!(t.add("/", Node::Dir { mode: 0o755 }).is_err());
        t.add("etc", Node::Dir { mode: 0o755 }).unwrap();
        assert!(t.add("/etc/", Node::Dir { mode: 0o755 }).is_err());
    }
}
