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

/// Mounts container c1 into the share as the sandbox does: its writable
/// rootfs `rootfs`, then the volumes (source, read-only) in order.
fn mount_container(layout: &Layout, rootfs: &Path, volumes: &[(&Path, bool)]) {
    let mut ops = share::plan_bind(
        rootfs,
        &layout.rootfs("c1"),
        share::BindMode {
            readonly: false,
            private: true,
        },
        &layout.staging_for("c1", "rootfs"),
    );
    for (n, (source, readonly)) in volumes.iter().enumerate() {
        ops.extend(share::plan_bind(
            source,
            &layout.volume("c1", n),
            share::BindMode {
                readonly: *readonly,
                private: false,
            },
            &layout.staging_for("c1", &n.to_string()),
        ));
    }
    for op in &ops {
        share::apply(op).expect("container mounts");
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

    // It serves without CAP_MKNOD and CAP_SETFCAP (--modcaps), but with
    // what file serving needs (CAP_CHOWN, CAP_FOWNER).
    // The serving process is the child the sandboxed virtiofsd forks (the
    // parent only waits for it).
    let caps = |pid: u32| -> Option<u64> {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        let child: u32 = children.split_whitespace().next()?.parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{child}/status")).ok()?;
        let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
        u64::from_str_radix(hex.trim(), 16).ok()
    };
    let (mknod, setfcap, chown, fowner) = (1 << 27, 1 << 31, 1 << 0, 1 << 3);
    loop {
        let eff = caps(pid).unwrap_or(u64::MAX);
        if eff & (mknod | setfcap) == 0 {
            assert_eq!(eff & (chown | fowner), chown | fowner, "CapEff {eff:x}");
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "virtiofsd kept CAP_MKNOD or CAP_SETFCAP: CapEff {eff:x}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Mounted after virtiofsd started: a writable rootfs, a read-only volume.
    mount_container(&layout, &src, &[(&vol, true)]);
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

/// The per-mount options of every mount at or below `under` in this
/// mount namespace.
fn options_under(under: &Path) -> Vec<(PathBuf, Vec<String>)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    share::parse_mountinfo(&text)
        .into_iter()
        .filter(|e| e.mount_point.starts_with(under))
        .map(|e| {
            let line = text
                .lines()
                .find(|l| l.split(' ').next() == Some(&e.id.to_string()))
                .unwrap_or_default();
            let opts = line.split(' ').nth(5).unwrap_or_default();
            (e.mount_point, opts.split(',').map(str::to_string).collect())
        })
        .collect()
}

/// Whether uid/gid 65534 (no supplementary groups) can run `cmd` on `path`.
fn nobody_can(cmd: &str, path: &Path) -> bool {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(cmd)
        .arg(path)
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Issue 18, findings 1 and 2: the run root and the sandbox directory are
/// closed to other host users, every mount of the share is nosuid,nodev
/// (its submounts too), and a read-only bind keeps its source's noexec.
#[test]
fn the_share_is_closed_to_other_users_and_nosuid_nodev() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting needs root");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // An open parent, as /run is: closedness must come from isola's dirs.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let run_root = tmp.path().join("run");
    share::prepare_run_root(&run_root).expect("run root");
    let layout = Layout::new(run_root.join("sb"));
    share::create_private_dir(layout.dir()).expect("sandbox dir");
    let _guard = Guard(layout.dir().to_path_buf());
    share::create_dirs(&layout).expect("share dirs");
    for op in share::plan_share(&layout) {
        share::apply(&op).expect("share set-up");
    }

    // A rootfs on a tmpfs that allows setuid and devices, a readable
    // secret in a volume whose source directory is closed, a read-only
    // volume on a noexec mount, a submount inside a volume.
    let tmpfs = |dir: &Path, opts: &str, flags: nix::mount::MsFlags| {
        std::fs::create_dir_all(dir).expect("mkdir");
        nix::mount::mount(Some("tmpfs"), dir, Some("tmpfs"), flags, Some(opts)).expect("tmpfs");
        Guard(dir.to_path_buf())
    };
    let src = tmp.path().join("rootfs-src");
    let _g1 = tmpfs(&src, "size=1m,mode=0755", nix::mount::MsFlags::empty());
    std::fs::copy("/bin/true", src.join("suid")).expect("copy");
    std::fs::set_permissions(src.join("suid"), std::fs::Permissions::from_mode(0o4755))
        .expect("setuid");
    let secret_dir = tmp.path().join("secret-src");
    std::fs::create_dir_all(&secret_dir).expect("mkdir");
    std::fs::write(secret_dir.join("key"), b"secret").expect("write");
    std::fs::set_permissions(
        secret_dir.join("key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    std::fs::set_permissions(&secret_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let _g2 = tmpfs(
        &secret_dir.join("sub"),
        "size=1m",
        nix::mount::MsFlags::empty(),
    );
    let noexec = tmp.path().join("noexec-src");
    let _g3 = tmpfs(&noexec, "size=1m", nix::mount::MsFlags::MS_NOEXEC);

    mount_container(&layout, &src, &[(&secret_dir, false), (&noexec, true)]);

    // Another host user reaches nothing: not the run root's list, not the
    // container's files, not the secret, not the setuid binary.
    assert!(
        nobody_can("/bin/ls", tmp.path()),
        "the test's parent should be open"
    );
    for path in [
        run_root.clone(),
        layout.dir().to_path_buf(),
        layout.rw().join("containers/c1"),
        layout.ro().join("containers/c1/rootfs"),
    ] {
        assert!(
            !nobody_can("/bin/ls", &path),
            "uid 65534 listed {}",
            path.display()
        );
    }
    assert!(
        !nobody_can("/bin/cat", &layout.volume("c1", 0).join("key")),
        "uid 65534 read the secret"
    );
    assert!(!nobody_can(
        "/bin/cat",
        &layout.ro().join("containers/c1/volumes/0/key")
    ));
    assert!(!nobody_can(
        &layout.rootfs("c1").join("suid").to_string_lossy(),
        Path::new("/")
    ));

    // Every mount under the sandbox dir, its skeleton and each bind with
    // its submounts, in rw and in ro, is nosuid and nodev.
    let mounts = options_under(layout.dir());
    assert!(mounts.len() >= 9, "{mounts:?}");
    for (point, opts) in &mounts {
        assert!(
            opts.iter().any(|o| o == "nosuid") && opts.iter().any(|o| o == "nodev"),
            "{} is {opts:?}",
            point.display()
        );
    }
    let opts_of = |point: PathBuf| {
        mounts
            .iter()
            .rev()
            .find(|(p, _)| *p == point)
            .map(|(_, o)| o.clone())
            .unwrap_or_default()
    };
    for view in [layout.rw(), layout.ro()] {
        let ro_vol = opts_of(view.join("containers/c1/volumes/1"));
        assert!(ro_vol.iter().any(|o| o == "ro"), "{ro_vol:?}");
        assert!(
            ro_vol.iter().any(|o| o == "noexec"),
            "the source's noexec was dropped: {ro_vol:?}"
        );
        let sub = opts_of(view.join("containers/c1/volumes/0/sub"));
        assert!(sub.iter().any(|o| o == "nosuid"), "submount: {sub:?}");
        assert!(sub.iter().any(|o| o == "rw"), "submount: {sub:?}");
    }
    // The sources keep their own flags.
    let src_opts = opts_of(src.clone());
    assert!(src_opts.iter().all(|o| o != "nosuid"), "{src_opts:?}");

    assert!(share::unmount_all(layout.dir()).is_empty());
    share::remove_dir_safely(layout.dir()).expect("removed");
}

/// The remount path of kernels before 5.12 (no mount_setattr): each mount
/// keeps its flags and gets the new ones, submounts too.
#[test]
fn flags_set_by_remount_keep_what_each_mount_had() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting needs root");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let top = tmp.path().join("top");
    std::fs::create_dir_all(&top).expect("mkdir");
    let none: Option<&str> = None;
    nix::mount::mount(
        Some("tmpfs"),
        &top,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOEXEC,
        Some("size=1m"),
    )
    .expect("tmpfs");
    let _guard = Guard(top.clone());
    std::fs::create_dir_all(top.join("sub")).expect("mkdir");
    nix::mount::mount(
        Some("tmpfs"),
        &top.join("sub"),
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOATIME,
        none,
    )
    .expect("tmpfs");
    share::set_flags_by_remount(&top, libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV, true)
        .expect("remount");
    share::set_flags_by_remount(&top, libc::MOUNT_ATTR_RDONLY, false).expect("remount ro");
    let mounts = options_under(&top);
    let has = |point: &Path, opt: &str| {
        mounts
            .iter()
            .any(|(p, o)| p == point && o.iter().any(|x| x == opt))
    };
    for opt in ["nosuid", "nodev", "noexec", "ro"] {
        assert!(has(&top, opt), "top lacks {opt}: {mounts:?}");
    }
    for opt in ["nosuid", "nodev", "noatime", "rw"] {
        assert!(has(&top.join("sub"), opt), "sub lacks {opt}: {mounts:?}");
    }
}

/// A volume keeps receiving what the host mounts under its (shared) source
/// after the container's creation, as runc's slave mounts do, unless its
/// spec made it private (`rprivate`, CRI's and Docker's default).
#[test]
fn private_binds_stop_receiving_the_hosts_later_mounts() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting needs root");
        return;
    }
    let none: Option<&str> = None;
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = Layout::new(tmp.path().join("sb"));
    let src = tmp.path().join("src");
    for dir in [
        layout.rw().join("containers"),
        layout.ro(),
        layout.staging(),
        src.join("later"),
    ] {
        std::fs::create_dir_all(&dir).expect("mkdir");
    }
    // The source on a shared mount, as / is on a systemd node.
    nix::mount::mount(Some(&src), &src, none, nix::mount::MsFlags::MS_BIND, none)
        .expect("bind the source on itself");
    let _src_guard = Guard(src.clone());
    nix::mount::mount(none, &src, none, nix::mount::MsFlags::MS_SHARED, none)
        .expect("make the source shared");
    let _guard = Guard(layout.dir().to_path_buf());
    for op in share::plan_share(&layout) {
        share::apply(&op).expect("share set-up");
    }
    for (n, private) in [(0, false), (1, true)] {
        let mode = share::BindMode {
            readonly: false,
            private,
        };
        for op in share::plan_bind(
            &src,
            &layout.volume("c1", n),
            mode,
            &layout.staging_for("c1", &n.to_string()),
        ) {
            share::apply(&op).expect("volume bind");
        }
    }
    let later = src.join("later");
    nix::mount::mount(
        Some("tmpfs"),
        &later,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("the host's later mount");
    let _later_guard = Guard(later.clone());
    std::fs::write(later.join("file"), b"later").expect("write");
    let served = |n: usize| {
        layout
            .ro()
            .join(format!("containers/c1/volumes/{n}/later/file"))
    };
    assert!(served(0).exists(), "the receiving volume missed the mount");
    assert!(!served(1).exists(), "the private volume received the mount");
    let _ = nix::mount::umount2(&later, nix::mount::MntFlags::MNT_DETACH);
}
