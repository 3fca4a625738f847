//! Pod networking's host side for real (needs root, `ip` and `tc`): a
//! network namespace with a veth as CNI's bridge plugin makes it, then
//! `discover_and_plumb`: the description, the tap, the ingress qdiscs
//! and redirect filters, the port-forward listener and its nat redirect
//! (needs `iptables`); then the teardown (and a drop) leave nothing.
//! Fails, never skips, without root.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use isola_sandbox::network::{discover_and_plumb, open_tap, Address, LateTap, PodNetwork};

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command in the namespace; its output, whether it succeeded.
fn in_ns(ns: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A named netns, deleted on drop (its veth with it).
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("isola-test-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        run(&["ip", "netns", "add", &name]);
        Netns(name)
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// CNI's bridge plugin, roughly: a veth pair whose `eth0` end is in the
/// namespace with an address, MTU, a route and a static neighbour.
fn pod(tag: &str) -> (Netns, String) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "pod networking tests need root (ip netns, /dev/net/tun)"
    );
    let ns = Netns::new(tag);
    let host = add_veth(&ns, tag, "eth0");
    (ns, host)
}

/// That veth pair in `ns` (its end there named `name`, with CNI's
/// address, MTU, routes and neighbour); the host end's name.
fn add_veth(ns: &Netns, tag: &str, name: &str) -> String {
    let host = format!("vh{tag}{}", std::process::id() % 100_000);
    run(&[
        "ip", "link", "add", &host, "type", "veth", "peer", "name", name, "netns", &ns.0,
    ]);
    if name != "eth0" {
        run(&[
            "ip", "netns", "exec", &ns.0, "ip", "link", "set", name, "up",
        ]);
        return host;
    }
    for args in [
        &[
            "ip",
            "link",
            "set",
            "eth0",
            "address",
            "0a:58:0a:f4:01:05",
            "mtu",
            "1450",
        ][..],
        &["ip", "addr", "add", "10.244.1.5/24", "dev", "eth0"],
        &[
            "ip",
            "addr",
            "add",
            "fd00:244::5/64",
            "dev",
            "eth0",
            "nodad",
        ],
        &["ip", "link", "set", "lo", "up"],
        &["ip", "link", "set", "eth0", "up"],
        &[
            "ip",
            "route",
            "add",
            "default",
            "via",
            "10.244.1.1",
            "dev",
            "eth0",
        ],
        &[
            "ip",
            "route",
            "add",
            "10.96.0.0/12",
            "dev",
            "eth0",
            "scope",
            "link",
        ],
        &[
            "ip",
            "neigh",
            "add",
            "10.244.1.1",
            "lladdr",
            "ee:ee:ee:ee:ee:ee",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    ] {
        let (ok, out) = in_ns(&ns.0, args);
        assert!(ok, "{args:?}: {out}");
    }
    host
}

fn check_plumbed(ns: &Netns, net: &PodNetwork) {
    check_joined(ns);
    assert_eq!(net.taps().len(), 1);
    assert!(
        redirect_rules(ns).iter().any(|r| r.contains("-j REDIRECT")),
        "no port-forward redirect: {:?}",
        redirect_rules(ns)
    );
}

/// eth0 and tap0_isola redirect to each other; the tap is up with eth0's
/// MTU, not persistent.
fn check_joined(ns: &Netns) {
    let (_, qdiscs) = in_ns(&ns.0, &["tc", "qdisc", "show"]);
    for dev in ["eth0", "tap0_isola"] {
        assert!(
            qdiscs
                .lines()
                .any(|l| l.contains("qdisc ingress ffff:") && l.contains(&format!("dev {dev} "))),
            "no ingress qdisc on {dev}: {qdiscs}"
        );
        let (ok, filters) = in_ns(
            &ns.0,
            &["tc", "filter", "show", "dev", dev, "parent", "ffff:"],
        );
        assert!(ok, "{filters}");
        let to = if dev == "eth0" { "tap0_isola" } else { "eth0" };
        assert!(
            filters.contains("protocol all")
                && filters.contains("u32")
                && filters.contains(&format!("Egress Redirect to device {to}")),
            "no redirect from {dev} to {to}: {filters}"
        );
    }
    let (ok, tap) = in_ns(&ns.0, &["ip", "-d", "link", "show", "tap0_isola"]);
    assert!(ok, "{tap}");
    assert!(tap.contains("mtu 1450") && tap.contains("UP"), "{tap}");
    assert!(
        tap.contains("tun type tap") && tap.contains("vnet_hdr on"),
        "{tap}"
    );
    assert!(
        !tap.contains("persist on"),
        "the tap must not be persistent: {tap}"
    );
}

/// The nat OUTPUT rules of the namespace that redirect to 127.0.0.1.
fn redirect_rules(ns: &Netns) -> Vec<String> {
    let (ok, rules) = in_ns(
        &ns.0,
        &["iptables", "-w", "10", "-t", "nat", "-S", "OUTPUT"],
    );
    assert!(ok, "{rules}");
    rules
        .lines()
        .filter(|l| l.contains("127.0.0.1/32") && l.contains("REDIRECT"))
        .map(str::to_string)
        .collect()
}

/// A connection made in the namespace to 127.0.0.1:`port` reaches the
/// port-forward listener, which sees `port` as its original destination.
fn check_redirect(ns: &Netns, net: &mut PodNetwork) {
    let listener = net
        .take_forward_listener()
        .expect("a port-forward listener");
    listener.set_nonblocking(false).expect("blocking");
    let path = ns.path();
    let dialer = std::thread::spawn(move || {
        let netns = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        std::net::TcpStream::connect(("127.0.0.1", 4242)).expect("connect to 127.0.0.1:4242")
    });
    // Connected once the kernel queued it: a broken redirect fails here
    // rather than leaving accept waiting.
    let dialed = dialer.join().expect("dialer");
    let (conn, _) = listener.accept().expect("accept");
    let dst = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::OriginalDst)
        .expect("SO_ORIGINAL_DST");
    assert_eq!(u16::from_be(dst.sin_port), 4242);
    drop(dialed);
}

/// Whether `check` holds within a few seconds: a tap closed here lives on
/// while a child another test thread forked holds a copy of its
/// descriptor (until it execs).
fn eventually(check: impl Fn() -> bool) -> bool {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !check() {
        if std::time::Instant::now() > until {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

fn tap_gone(ns: &Netns) -> bool {
    eventually(|| !in_ns(&ns.0, &["ip", "link", "show", "tap0_isola"]).0)
}

fn check_clean(ns: &Netns) {
    assert!(tap_gone(ns), "the tap is still there");
    let (_, qdiscs) = in_ns(&ns.0, &["tc", "qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "ingress qdisc left: {qdiscs}");
    let (_, filters) = in_ns(&ns.0, &["tc", "filter", "show", "dev", "eth0", "ingress"]);
    assert!(!filters.contains("mirred"), "filter left: {filters}");
    assert!(
        redirect_rules(ns).is_empty(),
        "port-forward redirect left: {:?}",
        redirect_rules(ns)
    );
}

#[test]
fn plumbs_describes_and_tears_down() {
    let (ns, _host) = pod("a");
    let mut net = discover_and_plumb(&ns.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(net.interfaces().len(), 1, "{:?}", net.interfaces());
    let eth0 = &net.interfaces()[0];
    assert_eq!(eth0.name, "eth0");
    assert_eq!(eth0.mac.to_string(), "0a:58:0a:f4:01:05");
    assert_eq!(eth0.mtu, 1450);
    assert_eq!(eth0.tap, "tap0_isola");
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    assert_eq!(
        eth0.addresses,
        vec![
            Address {
                ip: ip("10.244.1.5"),
                prefix_len: 24
            },
            Address {
                ip: ip("fd00:244::5"),
                prefix_len: 64
            }
        ],
        "link-local addresses are left out"
    );
    // Not the kernel's own subnet routes; the default and the device route.
    let routes: Vec<_> = eth0
        .routes
        .iter()
        .map(|r| (r.destination, r.gateway, r.scope))
        .collect();
    assert!(
        routes.contains(&(None, Some(ip("10.244.1.1")), 0)),
        "{routes:?}"
    );
    assert!(
        routes.contains(&(
            Some(Address {
                ip: ip("10.96.0.0"),
                prefix_len: 12
            }),
            None,
            253
        )),
        "{routes:?}"
    );
    assert_eq!(routes.len(), 2, "{routes:?}");
    assert_eq!(eth0.neighbours.len(), 1);
    assert_eq!(eth0.neighbours[0].ip, ip("10.244.1.1"));
    assert_eq!(eth0.neighbours[0].mac.to_string(), "ee:ee:ee:ee:ee:ee");
    check_plumbed(&ns, &net);
    check_redirect(&ns, &mut net);

    // What the guest is asked for passes the guest's checks.
    let plan = isola_protocol::network::check_request(&net.setup_request()).expect("valid");
    assert_eq!(plan.interfaces.len(), 1);
    assert_eq!(plan.routes.len(), 2);

    // A second plumbing of the same pod fails on its own tap name, and
    // leaves the first one as it was (its redirect included).
    let err = discover_and_plumb(&ns.path()).expect_err("tap0_isola is taken");
    assert!(
        err.to_string()
            .starts_with(&format!("netns {}: eth0: ", ns.path().display())),
        "{err}"
    );
    check_plumbed(&ns, &net);

    net.teardown().unwrap_or_else(|e| panic!("{e}"));
    check_clean(&ns);
}

#[test]
fn a_dropped_network_leaves_nothing_and_taps_die_with_their_last_descriptor() {
    let (ns, _host) = pod("b");
    let mut net = discover_and_plumb(&ns.path()).unwrap_or_else(|e| panic!("{e}"));
    check_plumbed(&ns, &net);
    // A descriptor passed on (as to isola-vmm) keeps the tap after the
    // host closes its own; closing that one too removes it.
    let (fd, _) = net.taps()[0];
    // SAFETY: `fd` is open (owned by `net`) for the duration of the call.
    let passed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .expect("dup");
    net.close_taps();
    assert!(net.taps().is_empty());
    assert!(in_ns(&ns.0, &["ip", "link", "show", "tap0_isola"]).0);
    drop(passed);
    assert!(tap_gone(&ns), "the tap outlived its last descriptor");
    drop(net);
    check_clean(&ns);
}

#[test]
fn the_teardown_reaches_a_netns_whose_mount_is_gone() {
    let (ns, _host) = pod("c");
    let net = discover_and_plumb(&ns.path()).unwrap_or_else(|e| panic!("{e}"));
    // Keep the namespace (as a process in it would) and remove its name.
    let keep = std::fs::File::open(ns.path()).expect("open netns");
    run(&["ip", "netns", "del", &ns.0]);
    net.teardown().unwrap_or_else(|e| panic!("{e}"));
    // Back under a name to look inside.
    let back = Netns(ns.0.clone());
    std::fs::write(back.path(), b"").expect("mount point");
    nix::mount::mount(
        Some(Path::new(&format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            keep.as_raw_fd()
        }))),
        &back.path(),
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind the netns back");
    check_clean(&back);
    std::mem::forget(ns);
}

#[test]
fn a_netns_without_interfaces_plumbs_nothing_and_taps_open_in_it() {
    let ns = Netns::new("d");
    let net = discover_and_plumb(&ns.path()).unwrap_or_else(|e| panic!("{e}"));
    assert!(net.interfaces().is_empty());
    assert!(net.taps().is_empty());
    assert!(net.setup_request().interfaces.is_empty());
    net.teardown().expect("teardown");
    // open_tap works in the caller's namespace too (the test's thread).
    let name = format!("t{}_isola", std::process::id() % 100_000);
    let tap = open_tap(&name).expect("tap");
    assert!(Command::new("ip")
        .args(["link", "show", &name])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("ip")
        .success());
    drop(tap);
    assert!(eventually(|| !Command::new("ip")
        .args(["link", "show", &name])
        .stderr(std::process::Stdio::null())
        .status()
        .expect("ip")
        .success()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sandbox_start_leaves_no_tap_and_no_qdisc() {
    let (ns, _host) = pod("e");
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut config = isola_sandbox::SandboxConfig::new(
        "net",
        "/bin/true",
        "/bin/true",
        "/bin/true",
        "/bin/true",
    );
    config.run_root = tmp.path().join("root");
    config.start_timeout = std::time::Duration::from_secs(20);

    // Not a network namespace: refused, naming the step, nothing made.
    config.netns = Some(tmp.path().to_path_buf());
    let err = isola_sandbox::Sandbox::start(config.clone())
        .await
        .expect_err("not a netns");
    assert_eq!(err.step(), "plumbing the pod network", "{err}");
    assert!(
        err.message()
            .starts_with(&format!("netns {}: ", tmp.path().display())),
        "{err}"
    );
    assert!(!config.run_root.join("net").exists(), "run dir left behind");

    // Plumbed, then "virtiofsd" (/bin/true) fails: the qdiscs are removed
    // and the tap is gone with the host's descriptor.
    config.netns = Some(ns.path());
    let err = isola_sandbox::Sandbox::start(config.clone())
        .await
        .expect_err("no virtiofsd");
    assert_eq!(err.step(), "starting virtiofsd", "{err}");
    check_clean(&ns);
    assert!(!config.run_root.join("net").exists(), "run dir left behind");
}

/// An empty namespace and a late tap opened in it (as isola-vmm's before
/// its boot).
fn late_tap(tag: &str) -> (Netns, LateTap) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "pod networking tests need root (ip netns, /dev/net/tun)"
    );
    let ns = Netns::new(tag);
    let netns = std::os::fd::OwnedFd::from(std::fs::File::open(ns.path()).expect("netns"));
    let late = LateTap::open(&netns).unwrap_or_else(|e| panic!("{e}"));
    (ns, late)
}

/// Docker's network, made after the VM booted: the late tap is there from
/// the start, up and not persistent; nothing arrived yet, nothing is
/// joined; once a veth arrived it is joined to the tap both ways and the
/// guest is asked to give the device with the tap's MAC its addresses;
/// the teardown and the tap's last descriptor leave nothing.
#[test]
fn a_late_tap_joins_the_interface_that_arrived_after_it() {
    let (ns, mut late) = late_tap("late");
    let (fd, mac) = late.tap().expect("the tap's descriptor");
    assert!(mac.is_unicast() && mac.0[0] & 2 == 2, "{mac}");
    let (ok, tap) = in_ns(&ns.0, &["ip", "-d", "link", "show", "tap0_isola"]);
    assert!(
        ok && tap.contains("UP") && !tap.contains("persist on"),
        "{tap}"
    );
    assert!(
        late.attach().expect("attach").is_none(),
        "nothing arrived yet"
    );
    // As isola-vmm holds it: a copy passed on, the host's closed.
    // SAFETY: `fd` is open (owned by `late`) for the duration of the call.
    let passed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .expect("dup");
    late.close_tap();
    assert!(late.tap().is_none());

    let _host = add_veth(&ns, "late", "eth0");
    let net = late
        .attach()
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("eth0 arrived");
    let eth0 = &net.interfaces()[0];
    assert_eq!(
        (eth0.name.as_str(), eth0.tap.as_str(), eth0.guest_mac),
        ("eth0", "tap0_isola", mac)
    );
    assert_eq!(eth0.mac.to_string(), "0a:58:0a:f4:01:05");
    check_joined(&ns);
    let plan = isola_protocol::network::check_request(&net.setup_request()).expect("valid");
    assert_eq!(plan.interfaces[0].mac, mac, "the guest device is the tap's");
    assert_eq!(plan.routes.len(), 2);
    net.teardown().unwrap_or_else(|e| panic!("{e}"));
    drop(passed);
    check_clean(&ns);
}

#[test]
fn a_late_tap_refuses_two_interfaces_naming_them() {
    let (ns, late) = late_tap("late2");
    let _a = add_veth(&ns, "la", "eth0");
    let _b = add_veth(&ns, "lb", "eth1");
    let err = late.attach().expect_err("two interfaces");
    let text = err.to_string();
    assert!(
        text.contains("2 interfaces (eth0, eth1)") && text.starts_with("netns isola-vmm's netns: "),
        "{text}"
    );
    let (_, qdiscs) = in_ns(&ns.0, &["tc", "qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
}
