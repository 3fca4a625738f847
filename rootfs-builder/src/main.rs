//! rootfs-builder: writes isola's guest initrd.
//!
//! The initrd is a newc cpio archive whose `/init` is `isola-agent`, with
//! the mount points and the two device nodes the kernel needs before the
//! agent mounts devtmpfs (`/dev/console` for init's stdio, `/dev/null`).
//! The output is byte-for-byte reproducible.

mod initrd;

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

use crate::initrd::{Node, Tree};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Builds isola's guest initrd (newc cpio, /init = isola-agent)"
)]
struct Args {
    /// The isola-agent binary (static) to install as /init.
    #[arg(long)]
    agent: PathBuf,
    /// Where to write the initrd.
    #[arg(long, short)]
    output: PathBuf,
    /// Compression of the archive.
    #[arg(long, value_enum, default_value_t = Compression::None)]
    compress: Compression,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Compression {
    /// Plain cpio: the kernel unpacks it without decompressing (boots faster).
    None,
    /// gzip, level 9: smaller, costs decompression time at every boot.
    Gzip,
}

fn main() {
    let args = Args::parse();
    if let Err(err) = run(&args) {
        eprintln!("rootfs-builder: error: {err:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let agent = fs::read(&args.agent)
        .with_context(|| format!("reading the agent binary {}", args.agent.display()))?;
    if !agent.starts_with(b"\x7fELF") {
        bail!("{} is not an ELF executable", args.agent.display());
    }
    let tree = guest_tree(agent)?;
    write_atomically(&args.output, |out| {
        match args.compress {
            Compression::None => {
                tree.write(out)?;
            }
            Compression::Gzip => {
                // GzBuilder writes mtime 0 and no file name: reproducible.
                let gz = flate2::GzBuilder::new().write(out, flate2::Compression::best());
                tree.write(gz)?.finish()?;
            }
        }
        Ok(())
    })?;
    let size = fs::metadata(&args.output)?.len();
    eprintln!(
        "rootfs-builder: wrote {} ({} bytes, compression {:?})",
        args.output.display(),
        size,
        args.compress
    );
    Ok(())
}

/// The file tree of the guest's initrd.
fn guest_tree(agent: Vec<u8>) -> Result<Tree> {
    let mut t = Tree::new();
    for (dir, mode) in [
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("run", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
    ] {
        t.add(dir, Node::Dir { mode })?;
    }
    t.add(
        "dev/console",
        Node::CharDev {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    )?;
    t.add(
        "dev/null",
        Node::CharDev {
            mode: 0o666,
            major: 1,
            minor: 3,
        },
    )?;
    t.add(
        "init",
        Node::File {
            mode: 0o755,
            data: agent,
        },
    )?;
    Ok(t)
}

/// Writes `path` through a temporary file in the same directory, renamed
/// into place on success and removed on failure.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<fs::File>) -> Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut out = BufWriter::new(file);
        write(&mut out)?;
        out.flush()?;
        out.get_ref().sync_all()?;
        fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
