//! The Share's mounts for real (needs root): the layout, what the guest
//! can write, and that mounts made after virtiofsd started reach its
//! namespace sandbox (read-only ones read-only there too), and go away
//! again. Uses the Rust virtiofsd `make` installs (or $ISOLA_VIRTIOFSD).

use std::path::{Path, PathBuf};
use std::time::Duration;

use isola_sandbox::child::Supervised;
use isola_sandbox::share::{self, Layout};

fn virtiofsd() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ISOLA_VIRTIOFSD") {
        return Some(PathBuf::from(path));
    }
    let cache = std::env::var_os("ISOLA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/isola")))?;
    let path = cache.join("tools/bin/virtiofsd");
    path.exists().then_some(path)
}

/// Mount points (relative to the namespace's root) and their per-mount
/// options, from a mountinfo.
fn mounts_of(pid: u32) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some((f.get(4)?.to_string(), f.get(5)?.to_string()))
        })
        .collect()
}

/// Unmounts everything under the sandbox dir even when an assertion
/// fails, before the temporary directory is removed (a recursive removal
/// through a bind mount would delete its source).
struct Guard(PathBuf);

struct KillOnDrop<'a>(&'a Supervised);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        self.0.kill();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = share::unmount_all(&self.0);
    }
}

fn writable(dir: &Path) -> bool {
    std::fs::write(dir.join(".probe"), b"x").is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_layout_propagates_into_virtiofsd_namespace() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting needs root");
        return;
    }
    let Some(virtiofsd) = virtiofsd() else {
        eprintln!("skipped: no virtiofsd (run `make`)");
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = Layout::new(tmp.path().join("sb"));
    let src = tmp.path().join("rootfs-src");
    let vol = tmp.path().join("vol-src");
    for dir in [
        layout.rw().join("containers"),
        layout.ro(),
        layout.staging(),
        src.clone(),
        vol.clone(),
    ] {
        std::fs::create_dir_all(&dir).expect("mkdir");
    }
    std::fs::write(vol.join("data"), b"volume").expect("write");
    // A tmpfs inside the read-only volume (issue 17, item 8): runc's
    // read-only is the volume's own mount, not its submounts'.
    let sub = vol.join("tmp-sub");
    std::fs::create_dir_all(&sub).expect("mkdir");
    nix::mount::mount(
        Some("tmpfs"),
        &sub,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("tmpfs in the volume");
    let _sub_guard = Guard(sub.clone());
    std::fs::write(sub.join("inside"), b"tmpfs").expect("write");
    let _guard = Guard(layout.dir().to_path_buf());
    for op in share::plan_share(&layout) {
        share::apply(&op).expect("share set-up");
    }

    let mut cmd = tokio::process::Command::new(&virtiofsd);
    cmd.args(isola_sandbox::virtiofsd_args(&layout, "info", "auto"))
        .stdout(std::process::Stdio::null());
    let fs = Supervised::spawn("virtiofsd", "test", cmd).expect("virtiofsd");
    let pid = fs.pid();
    let _killer = KillOnDrop(&fs);
    // Wait until it listens and has entered its namespace sandbox (the
    // socket comes first): its root is then the read-only share.
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(fs.death().is_none(), "virtiofsd died: {:?}", fs.death());
        let own_ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
            != std::fs::read_link("/proc/self/ns/mnt").ok();
        let root_ro = mounts_of(pid)
            .iter()
            .any(|(p, o)| p == "/" && o.split(',').next() == Some("ro"));
        if layout.fs_socket().exists() && own_ns && root_ro {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "virtiofsd not sandboxed within 30 s: {:?}",
            mounts_of(pid)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Mounted after virtiofsd started: a writable rootfs, a read-only volume.
    let mut ops = share::plan_bind(
        &src,
        &layout.rootfs("c1"),
        false,
        &layout.staging_for("c1", "rootfs"),
    );
    ops.extend(share::plan_bind(
        &vol,
        &layout.volume("c1", 0),
        true,
        &layout.staging_for("c1", "0"),
    ));
    for op in &ops {
        share::apply(op).expect("container mounts");
    }
    let seen = mounts_of(pid);
    let opts = |point: &str| {
        seen.iter()
            .find(|(p, _)| p == point)
            .map(|(_, o)| o.split(',').next().unwrap_or("").to_string())
    };
    assert_eq!(opts("/"), Some("ro".into()), "share root: {seen:?}");
    assert_eq!(opts("/containers/c1/rootfs"), Some("rw".into()), "{seen:?}");
    assert_eq!(
        opts("/containers/c1/volumes/0"),
        Some("ro".into()),
        "{seen:?}"
    );

    // The same, seen through the host's `ro` view.
    assert!(!writable(&layout.ro()), "the share's root is writable");
    assert!(
        !writable(&layout.ro().join("containers")),
        "containers/ is writable"
    );
    assert!(
        writable(&layout.ro().join("containers/c1/rootfs")),
        "rootfs not writable"
    );
    assert!(
        !writable(&layout.ro().join("containers/c1/volumes/0")),
        ":ro volume writable"
    );
    assert_eq!(
        std::fs::read(layout.ro().join("containers/c1/volumes/0/data")).ok(),
        Some(b"volume".to_vec())
    );
    // Its tmpfs came along, with its content, writable as with runc.
    let sub_seen = layout.ro().join("containers/c1/volumes/0/tmp-sub");
    assert_eq!(
        std::fs::read(sub_seen.join("inside")).ok(),
        Some(b"tmpfs".to_vec()),
        "the volume's submount is not in the share"
    );
    assert!(writable(&sub_seen), "the volume's tmpfs is read-only");
    // What the guest is told to mount before the container binds it.
    assert_eq!(
        share::submounts(&layout, &[layout.volume("c1", 0), layout.rootfs("c1")])
            .expect("mountinfo"),
        vec!["containers/c1/volumes/0/tmp-sub".to_string()]
    );
    assert!(share::submounts(&layout, &[layout.rootfs("c1")])
        .expect("mountinfo")
        .is_empty());
    assert_eq!(
        opts("/containers/c1/volumes/0/tmp-sub"),
        Some("rw".into()),
        "{seen:?}"
    );
    assert!(!vol.join(".probe").exists());
    assert!(src.join(".probe").exists());

    // Unmounting under rw takes the copies away, in virtiofsd's view too.
    let errors = share::unmount_all(&layout.container("c1"));
    assert!(errors.is_empty(), "unmount: {errors:?}");
    let seen = mounts_of(pid);
    assert!(
        !seen.iter().any(|(p, _)| p.starts_with("/containers/c1")),
        "{seen:?}"
    );
    assert!(share::mounts_under(&layout.ro().join("containers/c1"))
        .expect("mountinfo")
        .is_empty());

    fs.kill();
    fs.ended().await;
    assert!(share::unmount_all(layout.dir()).is_empty());
    share::remove_dir_safely(layout.dir()).expect("removed");
    assert!(!layout.dir().exists());
    // The sources are untouched.
    assert!(vol.join("data").exists());
}
