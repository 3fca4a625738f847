//! Pod networking, the host side: Kata Containers' "tc redirect" model.
//!
//! containerd's CRI plugin makes the pod's network namespace and runs CNI
//! in it (a veth `eth0` with the pod's addresses and routes) before the
//! sandbox starts. [`discover_and_plumb`] enters that namespace on a
//! thread of its own, reads every ethernet-like interface (name, MAC, MTU,
//! addresses, routes, static neighbours), and gives each a tap
//! `tap<N>_isola` joined to it by two tc filters: whatever arrives on the
//! veth is redirected out of the tap (to isola-vmm, which reads it), and
//! whatever isola-vmm writes into the tap is redirected out of the veth:
//!
//! ```text
//! pod netns: eth0 (veth) ─ingress─ u32 match all, mirred egress redirect ─> tap0_isola
//!            tap0_isola  ─ingress─ u32 match all, mirred egress redirect ─> eth0
//! isola-vmm: tap0_isola fd <─> virtio-net (MAC of eth0) <─> guest eth0
//! ```
//!
//! The guest's interface gets the veth's MAC, addresses and routes
//! (`Agent.SetupNetwork`); the veth keeps them too, but sees no traffic:
//! its ingress goes to the tap before the pod netns's stack sees it.
//!
//! The taps are not persistent: a tap exists while a descriptor of it is
//! open, so once isola-vmm holds the only one (the sandbox closes the
//! host's copies when the VMM has started, [`PodNetwork::close_taps`]),
//! the tap lives and dies with isola-vmm, and a crash leaves none. The
//! ingress qdiscs added on the veths (their filters go with them) are
//! removed by [`PodNetwork::teardown`], or by its drop; a host process
//! killed before either leaves them, harmlessly redirecting to a tap that
//! is gone, until CNI deletes the veth.
//!
//! The same visit adds what `kubectl port-forward` needs (a listener on
//! the namespace's 127.0.0.1 and a nat redirect onto it, [`crate::portfwd`]);
//! the teardown removes the redirect with the qdiscs.
//!
//! The caller's threads never change namespace: each visit of the pod
//! netns is a thread that `setns()`s into it, runs a current-thread tokio
//! runtime for rtnetlink, and exits. [`PodNetwork`] keeps a descriptor of
//! the namespace, so its teardown reaches the veth even after the netns's
//! bind mount is gone.

use std::fmt;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use isola_protocol::agent as pb;
use isola_protocol::network::{
    interface_message, route_scope, Mac, MAX_ADDRESSES, MAX_INTERFACES, MAX_NEIGHBOURS, MAX_ROUTES,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Most routes, and most static neighbours, of one interface.
pub const MAX_ROUTES_PER_INTERFACE: usize = 64;
pub const MAX_NEIGHBOURS_PER_INTERFACE: usize = 64;
// The per-interface bounds keep a request within its own (the guest
// refuses more).
const _: () = assert!(
    MAX_INTERFACES * MAX_ROUTES_PER_INTERFACE <= MAX_ROUTES
        && MAX_INTERFACES * MAX_NEIGHBOURS_PER_INTERFACE <= MAX_NEIGHBOURS
);
/// The parent of an ingress qdisc's filters (`ffff:`).
const INGRESS_PARENT: u32 = 0xffff_0000;

/// A failure of pod networking: the namespace, the interface if one, the
/// step and why ("netns /var/run/netns/x: eth0: add ingress qdisc: File
/// exists (os error 17)").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkError {
    pub netns: PathBuf,
    pub interface: Option<String>,
    pub step: String,
    pub message: String,
}

impl fmt::Display for NetworkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "netns {}: ", self.netns.display())?;
        if let Some(interface) = &self.interface {
            write!(f, "{interface}: ")?;
        }
        write!(f, "{}: {}", self.step, self.message)
    }
}

impl std::error::Error for NetworkError {}

/// The errors of one namespace, with the interface and step to come.
#[derive(Debug, Clone)]
struct At<'a> {
    netns: &'a Path,
    interface: Option<&'a str>,
}

impl<'a> At<'a> {
    fn netns(netns: &'a Path) -> At<'a> {
        At {
            netns,
            interface: None,
        }
    }

    fn interface(&self, name: &'a str) -> At<'a> {
        At {
            interface: Some(name),
            ..self.clone()
        }
    }

    fn err(&self, step: impl Into<String>, message: impl fmt::Display) -> NetworkError {
        NetworkError {
            netns: self.netns.to_path_buf(),
            interface: self.interface.map(str::to_string),
            step: step.into(),
            message: message.to_string(),
        }
    }

    fn netlink(
        &self,
        step: impl Into<String>,
    ) -> impl FnOnce(rtnetlink::Error) -> NetworkError + '_ {
        let step = step.into();
        move |e| self.err(step, netlink_message(&e))
    }
}

/// A netlink error as the errno's text ("File exists (os error 17)").
fn netlink_message(e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
        other => other.to_string(),
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().raw_os_error(),
        _ => None,
    }
}

/// An address of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub ip: IpAddr,
    pub prefix_len: u8,
}

/// A route of the main table whose output device is the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// `None`: the default route.
    pub destination: Option<Address>,
    pub gateway: Option<IpAddr>,
    /// The preferred source (prefsrc).
    pub source: Option<IpAddr>,
    /// rtm_scope (0 universe, 253 link, ...).
    pub scope: u8,
    pub metric: u32,
    pub onlink: bool,
}

/// A permanent neighbour entry on the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: Mac,
}

/// One interface of the pod netns and the tap that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: Mac,
    pub mtu: u32,
    /// Without IPv6 link-local addresses (the guest's kernel derives the
    /// same ones from the same MAC).
    pub addresses: Vec<Address>,
    /// Without the kernel's own routes (those its addresses make).
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
    /// The tap's name (`tap<N>_isola`) and index in the pod netns.
    pub tap: String,
    pub tap_index: u32,
    /// The MAC of the guest's virtio-net device on the tap: the
    /// interface's own when the VM boots after CNI (a pod), the tap's boot
    /// MAC when the interface came after the VM ([`LateTap`]).
    pub guest_mac: Mac,
}

/// The pod's interfaces, their taps (the host's descriptors until
/// [`PodNetwork::close_taps`]) and the ingress qdiscs added on the veths.
/// [`PodNetwork::teardown`] removes those qdiscs; dropping it without a
/// teardown does the same on a thread of its own (best effort, logged).
#[derive(Debug)]
pub struct PodNetwork {
    netns_path: PathBuf,
    /// Keeps the namespace reachable for the teardown.
    netns: Option<OwnedFd>,
    interfaces: Vec<Interface>,
    /// One per interface, in the same order, until closed.
    taps: Vec<OwnedFd>,
    /// (index, name) of each veth with our ingress qdisc.
    qdiscs: Vec<(u32, String)>,
    /// The port-forward listener in the namespace, until taken.
    forward: Option<std::net::TcpListener>,
    /// The port of the port-forward nat redirect, while it is there.
    redirect: Option<u16>,
}

impl PodNetwork {
    /// The netns path it was made from.
    pub fn netns(&self) -> &Path {
        &self.netns_path
    }

    pub fn interfaces(&self) -> &[Interface] {
        &self.interfaces
    }

    /// A descriptor of the pod's namespace (isola-vmm runs in it), while
    /// the network has not been torn down.
    pub fn netns_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.netns.as_ref().map(|fd| fd.as_fd())
    }

    /// Each tap's descriptor in the host process with its interface's MAC,
    /// in the order of [`PodNetwork::interfaces`]; empty once closed.
    pub fn taps(&self) -> Vec<(RawFd, Mac)> {
        self.taps
            .iter()
            .zip(&self.interfaces)
            .map(|(fd, i)| (fd.as_raw_fd(), i.mac))
            .collect()
    }

    /// The listener on the namespace's 127.0.0.1 that its nat redirect
    /// sends every TCP connection to (for [`crate::portfwd::spawn`]);
    /// `None` once taken, or if it could not be set up.
    pub fn take_forward_listener(&mut self) -> Option<std::net::TcpListener> {
        self.forward.take()
    }

    /// The guest's devices have other MACs than the pod's interfaces (a VM
    /// cloned from a template keeps the template's, `mac(i)` for device
    /// `i`): the guest finds them by those and gives them the pod's.
    pub fn set_guest_macs(&mut self, mac: impl Fn(usize) -> Mac) {
        for (i, interface) in self.interfaces.iter_mut().enumerate() {
            interface.guest_mac = mac(i);
        }
    }

    /// The guest's devices have the pod's MACs (a VM that booted).
    pub fn set_guest_macs_own(&mut self) {
        for interface in &mut self.interfaces {
            interface.guest_mac = interface.mac;
        }
    }

    /// Closes the host's tap descriptors: once isola-vmm has inherited
    /// them, the taps live exactly as long as it does.
    pub fn close_taps(&mut self) {
        self.taps.clear();
    }

    /// The `SetupNetwork` request that gives the guest these interfaces,
    /// addresses, routes and neighbours (the guest's interfaces keep the
    /// pod's names).
    pub fn setup_request(&self) -> pb::SetupNetworkRequest {
        let mut req = pb::SetupNetworkRequest::new();
        for i in &self.interfaces {
            let mut message = interface_message(
                &i.name,
                i.guest_mac,
                i.mtu,
                i.addresses.iter().map(|a| (a.ip, a.prefix_len)),
            );
            // A late network's device takes the interface's MAC, which
            // its neighbours (Docker's bridge) know.
            if i.guest_mac != i.mac {
                message.new_mac = i.mac.to_string();
            }
            req.interfaces.push(message);
            for r in &i.routes {
                req.routes.push(pb::NetworkRoute {
                    destination: r
                        .destination
                        .map(|d| format!("{}/{}", d.ip, d.prefix_len))
                        .unwrap_or_default(),
                    gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    device: i.name.clone(),
                    source: r.source.map(|s| s.to_string()).unwrap_or_default(),
                    scope: route_scope(r.scope).into(),
                    metric: r.metric,
                    onlink: r.onlink,
                    ..Default::default()
                });
            }
            for n in &i.neighbours {
                req.neighbours.push(pb::NetworkNeighbour {
                    ip: n.ip.to_string(),
                    mac: n.mac.to_string(),
                    device: i.name.clone(),
                    ..Default::default()
                });
            }
        }
        req
    }

    /// Removes the ingress qdiscs added on the veths (and so their
    /// filters) and the port-forward redirect, and closes the taps and the
    /// listener. A veth that is gone (CNI deleted it, or its namespace) is
    /// not an error.
    pub fn teardown(mut self) -> Result<(), NetworkError> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Result<(), NetworkError> {
        self.taps.clear();
        self.forward = None;
        let qdiscs = std::mem::take(&mut self.qdiscs);
        let redirect = self.redirect.take();
        let Some(netns) = self.netns.take() else {
            return Ok(());
        };
        if qdiscs.is_empty() && redirect.is_none() {
            return Ok(());
        }
        let path = self.netns_path.clone();
        let owned = path.clone();
        in_netns(&path, netns, move |handle| async move {
            let at = At::netns(&owned);
            let mut errors = remove_qdiscs(&at, &handle, &qdiscs).await;
            if let Some(port) = redirect {
                if let Err(e) = crate::portfwd::remove_redirect(port) {
                    errors.push(at.err("removing the port-forward redirect", e));
                }
            }
            match errors.into_iter().next() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        })
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if let Err(err) = self.teardown_inner() {
            tracing::error!(%err, "pod network clean-up on drop incomplete");
        }
    }
}

/// A new network namespace with nothing in it (its loopback down), for an
/// isola-vmm whose sandbox has no pod network: made by a thread of its own
/// that `unshare()`s and exits, so no thread of the caller changes
/// namespace. The descriptor keeps it until isola-vmm, started in it,
/// holds it.
pub fn private_netns() -> std::io::Result<OwnedFd> {
    std::thread::Builder::new()
        .name("isola-netns".into())
        .spawn(|| -> std::io::Result<OwnedFd> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(OwnedFd::from(File::open("/proc/thread-self/ns/net")?))
        })?
        .join()
        .map_err(|_| std::io::Error::other("the netns thread panicked"))?
}

/// Opens new taps `names` ([`open_tap`]: down, not persistent) in the
/// namespace `netns` (named `what` in errors), as [`LateTap::open`] does
/// its one: a template VM's, whose jailed isola-vmm takes them as
/// descriptors.
pub fn open_taps_in(
    what: &Path,
    netns: &OwnedFd,
    names: Vec<String>,
) -> Result<Vec<OwnedFd>, NetworkError> {
    let owned = what.to_path_buf();
    let netns = netns
        .try_clone()
        .map_err(|e| At::netns(what).err("duplicating the descriptor", e))?;
    in_netns(what, netns, move |_handle| async move {
        let at = At::netns(&owned);
        names
            .iter()
            .map(|name| open_tap(name).map_err(|e| at.err(format!("create tap {name}"), e)))
            .collect()
    })
}

/// The name of the tap a [`LateTap`] opens in isola-vmm's namespace.
pub const LATE_TAP: &str = "tap0_isola";

/// A network that arrives after the VM boots: Docker (26 and later) makes
/// a container's network after Create, in `/proc/<task pid>/ns/net`, that
/// is isola-vmm's own namespace ([`private_netns`]), and starts the task
/// only then. The VM's devices are fixed at boot, so it boots with one
/// virtio-net device on a tap opened in that namespace beforehand, with a
/// MAC of its own (random, locally administered); when the container
/// starts, [`LateTap::attach`] joins the interface found there then
/// (Docker's `eth0`) to that tap as [`discover_and_plumb`] joins a pod's,
/// and the guest device takes the interface's MAC (which Docker's bridge
/// and its neighbours know: `NetworkInterface.new_mac`), addresses and
/// routes. A namespace in which nothing arrived (`docker run --network
/// none`, `ctr run`) leaves the device unconfigured, outside the
/// containers' netns.
#[derive(Debug)]
pub struct LateTap {
    netns: OwnedFd,
    /// The host's descriptor of the tap, until isola-vmm has it.
    fd: Option<OwnedFd>,
    mac: Mac,
}

/// How [`LateTap`]'s errors name isola-vmm's namespace.
const VMM_NETNS: &str = "isola-vmm's netns";

impl LateTap {
    /// Opens the tap (up, not persistent) in the namespace `netns`.
    pub fn open(netns: &OwnedFd) -> Result<LateTap, NetworkError> {
        let path = Path::new(VMM_NETNS);
        let dup = |what: &str| {
            netns
                .try_clone()
                .map_err(|e| At::netns(path).err(what.to_string(), e))
        };
        let keep = dup("duplicating the descriptor")?;
        let fd = in_netns(
            path,
            dup("duplicating the descriptor")?,
            move |handle| async move {
                let at = At::netns(path);
                let fd =
                    open_tap(LATE_TAP).map_err(|e| at.err(format!("create tap {LATE_TAP}"), e))?;
                let index = link_index(&handle, LATE_TAP)
                    .await
                    .map_err(at.netlink(format!("find tap {LATE_TAP}")))?;
                handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).up().build())
                    .execute()
                    .await
                    .map_err(at.netlink(format!("set {LATE_TAP} up")))?;
                Ok(fd)
            },
        )?;
        let mac = random_mac().map_err(|e| At::netns(path).err("choosing a MAC", e))?;
        Ok(LateTap {
            netns: keep,
            fd: Some(fd),
            mac,
        })
    }

    /// The tap's descriptor in the host process and the guest device's
    /// MAC (isola-vmm's `--net`), until closed.
    pub fn tap(&self) -> Option<(RawFd, Mac)> {
        self.fd.as_ref().map(|fd| (fd.as_raw_fd(), self.mac))
    }

    /// The guest's device has `mac` (a VM cloned from a template keeps the
    /// template's): the interface that arrives is joined to it by that.
    pub fn set_guest_mac(&mut self, mac: Mac) {
        self.mac = mac;
    }

    /// Closes the host's descriptor: once isola-vmm has inherited it, the
    /// tap lives exactly as long as isola-vmm.
    pub fn close_tap(&mut self) {
        self.fd = None;
    }

    /// Joins the interface now in the namespace (not the tap, not
    /// loopback) to the tap, both ways. `None`: no interface arrived. More
    /// than one is an error naming them: the VM has one device for them.
    /// The [`PodNetwork`] returned removes the redirects at its teardown;
    /// its `setup_request` gives the guest device the interface's
    /// addresses, routes and neighbours.
    pub fn attach(&self) -> Result<Option<PodNetwork>, NetworkError> {
        let path = Path::new(VMM_NETNS);
        let at = At::netns(path);
        let netns = self
            .netns
            .try_clone()
            .map_err(|e| at.err("duplicating the descriptor", e))?;
        let keep = self
            .netns
            .try_clone()
            .map_err(|e| at.err("duplicating the descriptor", e))?;
        let mac = self.mac;
        let found = in_netns(path, netns, move |handle| async move {
            let at = At::netns(path);
            let mut interfaces = discover(&at, &handle).await?;
            if interfaces.is_empty() {
                return Ok(None);
            }
            if interfaces.len() > 1 {
                let names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
                return Err(at.err(
                    "joining the interfaces made after create",
                    format!(
                        "{} interfaces ({}); a VM has one device for a network made \
                         after its boot: give the container one network",
                        interfaces.len(),
                        names.join(", ")
                    ),
                ));
            }
            let mut interface = interfaces.remove(0);
            interface.tap = LATE_TAP.to_string();
            interface.guest_mac = mac;
            let iat = at.interface(&interface.name);
            interface.tap_index = link_index(&handle, LATE_TAP)
                .await
                .map_err(iat.netlink(format!("find tap {LATE_TAP}")))?;
            let mut qdiscs = Vec::new();
            if let Err(e) = join_tap(&iat, &handle, &interface, &mut qdiscs).await {
                for undo in remove_qdiscs(&at, &handle, &qdiscs).await {
                    tracing::error!(err = %undo, "undoing the late network");
                }
                return Err(e);
            }
            Ok(Some((interface, qdiscs)))
        })?;
        Ok(found.map(|(interface, qdiscs)| PodNetwork {
            netns_path: path.to_path_buf(),
            netns: Some(keep),
            interfaces: vec![interface],
            taps: Vec::new(),
            qdiscs,
            forward: None,
            redirect: None,
        }))
    }
}

/// A random, locally administered unicast MAC (`x2:…`, `x6:…`, `xa:…` or
/// `xe:…`).
fn random_mac() -> std::io::Result<Mac> {
    use std::io::Read;
    let mut bytes = [0u8; 6];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    bytes[0] = (bytes[0] & 0xfe) | 0x02;
    Ok(Mac(bytes))
}

/// Runs `work` with an rtnetlink handle inside the namespace `netns` (a
/// descriptor of `path`), on a thread of its own that exits afterwards.
fn in_netns<T, F, Fut>(path: &Path, netns: OwnedFd, work: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetworkError>>,
{
    let owned = path.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("isola-netns".into())
        .spawn(move || -> Result<T, NetworkError> {
            let at = At::netns(&owned);
            nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| at.err("entering the namespace (setns)", e))?;
            drop(netns);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| at.err("starting a runtime", e))?;
            runtime.block_on(async {
                let (connection, handle, _) =
                    rtnetlink::new_connection().map_err(|e| at.err("opening rtnetlink", e))?;
                let task = tokio::spawn(connection);
                let result = work(handle).await;
                task.abort();
                result
            })
        })
        .map_err(|e| At::netns(path).err("starting the netns thread", e))?;
    thread
        .join()
        .map_err(|_| At::netns(path).err("the netns thread", "panicked"))?
}

/// Enters the pod's network namespace `netns` (for example
/// `/var/run/netns/cni-…`), describes its interfaces and gives each a tap
/// redirected to and from it (see the module). On failure whatever it
/// added is removed.
pub fn discover_and_plumb(netns: &Path) -> Result<PodNetwork, NetworkError> {
    let file = File::open(netns).map_err(|e| At::netns(netns).err("opening", e))?;
    let fd = OwnedFd::from(file);
    let keep = fd
        .try_clone()
        .map_err(|e| At::netns(netns).err("duplicating the descriptor", e))?;
    let path = netns.to_path_buf();
    let ((interfaces, taps, qdiscs), forward) = in_netns(netns, fd, move |handle| async move {
        let plumbed = plumb(&path, &handle).await?;
        // Without it the pod still runs, only `kubectl port-forward`
        // does not reach it.
        let forward = crate::portfwd::listen_and_redirect()
            .map_err(|e| {
                tracing::warn!(netns = %path.display(), error = %e,
                    "no port forwarding into this pod (kubectl port-forward)");
            })
            .ok();
        Ok((plumbed, forward))
    })?;
    let (forward, redirect) = forward.unzip();
    Ok(PodNetwork {
        netns_path: netns.to_path_buf(),
        netns: Some(keep),
        interfaces,
        taps,
        qdiscs,
        forward,
        redirect,
    })
}

type Plumbed = (Vec<Interface>, Vec<OwnedFd>, Vec<(u32, String)>);

async fn plumb(netns: &Path, handle: &Handle) -> Result<Plumbed, NetworkError> {
    let at = At::netns(netns);
    let mut interfaces = discover(&at, handle).await?;
    let mut taps = Vec::new();
    let mut qdiscs = Vec::new();
    let result = add_taps(&at, handle, &mut interfaces, &mut taps, &mut qdiscs).await;
    match result {
        Ok(()) => Ok((interfaces, taps, qdiscs)),
        Err(e) => {
            for undo in remove_qdiscs(&at, handle, &qdiscs).await {
                tracing::error!(err = %undo, "undoing the pod network");
            }
            Err(e)
        }
    }
}

/// The interfaces to serve: ethernet-like, with a MAC, not loopback and
/// not a tun/tap (ours included), with their addresses, routes and
/// neighbours.
async fn discover(at: &At<'_>, handle: &Handle) -> Result<Vec<Interface>, NetworkError> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(at.netlink("listing links"))?;
    let mut interfaces = Vec::new();
    for link in &links {
        let Some(mut interface) = ethernet_interface(link) else {
            continue;
        };
        if interfaces.len() == MAX_INTERFACES {
            return Err(at.err(
                "listing links",
                format!("more than {MAX_INTERFACES} interfaces"),
            ));
        }
        interface.tap = format!("tap{}_isola", interfaces.len());
        interfaces.push(interface);
    }
    let addresses: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(at.netlink("listing addresses"))?;
    for message in &addresses {
        let Some(interface) = interfaces
            .iter_mut()
            .find(|i| i.index == message.header.index)
        else {
            continue;
        };
        // IPv6 link-local addresses come back by themselves in the guest.
        if message.header.scope == AddressScope::Link {
            continue;
        }
        let (mut local, mut address) = (None, None);
        for attr in &message.attributes {
            match attr {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        let Some(ip) = local.or(address) else {
            continue;
        };
        if interface.addresses.len() == MAX_ADDRESSES {
            return Err(at.interface(&interface.name).err(
                "listing addresses",
                format!("more than {MAX_ADDRESSES} addresses"),
            ));
        }
        interface.addresses.push(Address {
            ip,
            prefix_len: message.header.prefix_len,
        });
    }
    for ipv6 in [false, true] {
        let request = if ipv6 {
            RouteMessageBuilder::<Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        };
        let routes: Vec<RouteMessage> = handle
            .route()
            .get(request)
            .execute()
            .try_collect()
            .await
            .map_err(at.netlink("listing routes"))?;
        for message in &routes {
            let Some((oif, route)) = route_of(message) else {
                continue;
            };
            let Some(interface) = interfaces.iter_mut().find(|i| i.index == oif) else {
                continue;
            };
            if interface.routes.len() == MAX_ROUTES_PER_INTERFACE {
                return Err(at.interface(&interface.name).err(
                    "listing routes",
                    format!("more than {MAX_ROUTES_PER_INTERFACE} routes"),
                ));
            }
            interface.routes.push(route);
        }
    }
    let neighbours: Vec<_> = handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(at.netlink("listing neighbours"))?;
    for message in &neighbours {
        if message.header.state != NeighbourState::Permanent {
            continue;
        }
        let Some(interface) = interfaces
            .iter_mut()
            .find(|i| i.index == message.header.ifindex)
        else {
            continue;
        };
        let (mut ip, mut mac) = (None, None);
        for attr in &message.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    ip = Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    ip = Some(IpAddr::V6(*v6))
                }
                NeighbourAttribute::LinkLayerAddress(bytes) => mac = Mac::from_bytes(bytes),
                _ => {}
            }
        }
        let (Some(ip), Some(mac)) = (ip, mac) else {
            continue;
        };
        if interface.neighbours.len() == MAX_NEIGHBOURS_PER_INTERFACE {
            return Err(at.interface(&interface.name).err(
                "listing neighbours",
                format!("more than {MAX_NEIGHBOURS_PER_INTERFACE} static neighbours"),
            ));
        }
        interface.neighbours.push(Neighbour { ip, mac });
    }
    Ok(interfaces)
}

/// The interface a link is, if it is one to serve.
fn ethernet_interface(link: &LinkMessage) -> Option<Interface> {
    if link.header.link_layer_type != LinkLayerType::Ether
        || link.header.flags.contains(LinkFlags::Loopback)
    {
        return None;
    }
    let (mut name, mut mac, mut mtu) = (None, None, 1500);
    for attr in &link.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(bytes) => mac = Mac::from_bytes(bytes),
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::LinkInfo(infos)
                if infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Tun))) =>
            {
                return None
            }
            _ => {}
        }
    }
    let name = name.filter(|n| n != "lo")?;
    let mac = mac.filter(Mac::is_unicast)?;
    Some(Interface {
        name,
        index: link.header.index,
        mac,
        mtu,
        addresses: Vec::new(),
        routes: Vec::new(),
        neighbours: Vec::new(),
        tap: String::new(),
        tap_index: 0,
        guest_mac: mac,
    })
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A route of the main table to copy: unicast, not the kernel's own (the
/// guest's kernel makes those from the addresses), through one device.
/// Returns that device's index with the route.
fn route_of(message: &RouteMessage) -> Option<(u32, Route)> {
    let header = &message.header;
    if header.kind != RouteType::Unicast || header.protocol == RouteProtocol::Kernel {
        return None;
    }
    let mut table = u32::from(header.table);
    let (mut oif, mut destination, mut gateway, mut source, mut metric) =
        (None, None, None, None, 0);
    for attr in &message.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(a) => destination = route_ip(a),
            RouteAttribute::Gateway(a) => gateway = route_ip(a),
            RouteAttribute::PrefSource(a) => source = route_ip(a),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    // A multipath route has no single device: not copied.
    let oif = oif?;
    let destination = match destination {
        Some(ip) => Some(Address {
            ip,
            prefix_len: header.destination_prefix_length,
        }),
        None if header.destination_prefix_length == 0 => None,
        None => return None,
    };
    Some((
        oif,
        Route {
            destination,
            gateway,
            source,
            scope: u8::from(header.scope),
            metric,
            onlink: header.flags.contains(RouteFlags::Onlink),
        },
    ))
}

/// Opens a new, non-persistent tap `name` (IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR) in the calling thread's network namespace.
pub fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    // std opens with O_CLOEXEC: children inherit a tap only when told to.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and may write) the ifreq, which lives
    // across the call; the descriptor is open.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

async fn link_index(handle: &Handle, name: &str) -> Result<u32, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await? {
        Some(link) => Ok(link.header.index),
        None => Err(rtnetlink::Error::RequestFailed),
    }
}

/// A u32 match-all filter on `from`'s ingress: mirred egress redirect to
/// `to` (`tc filter add dev FROM parent ffff: protocol all u32 match u8 0
/// 0 action mirred egress redirect dev TO`).
async fn add_redirect(handle: &Handle, from: u32, to: u32) -> Result<(), rtnetlink::Error> {
    handle
        .traffic_filter(from as i32)
        .add()
        .parent(INGRESS_PARENT)
        .protocol((libc::ETH_P_ALL as u16).to_be())
        .redirect(to)?
        .execute()
        .await
}

async fn add_taps(
    at: &At<'_>,
    handle: &Handle,
    interfaces: &mut [Interface],
    taps: &mut Vec<OwnedFd>,
    qdiscs: &mut Vec<(u32, String)>,
) -> Result<(), NetworkError> {
    for interface in interfaces.iter_mut() {
        let at = at.interface(&interface.name);
        let tap = interface.tap.clone();
        let fd = open_tap(&tap).map_err(|e| at.err(format!("create tap {tap}"), e))?;
        taps.push(fd);
        let tap_index = link_index(handle, &tap)
            .await
            .map_err(at.netlink(format!("find tap {tap}")))?;
        interface.tap_index = tap_index;
        join_tap(&at, handle, interface, qdiscs).await?;
        tracing::debug!(interface = %interface.name, %tap, "pod interface plumbed");
    }
    Ok(())
}

/// Joins `interface` and its tap (`interface.tap`, `interface.tap_index`,
/// both in the handle's namespace) both ways: the tap gets the
/// interface's MTU and is up, each gets an ingress qdisc (the interface's
/// recorded in `qdiscs` for the teardown; the tap's goes with the tap)
/// with a match-all redirect out of the other.
async fn join_tap(
    at: &At<'_>,
    handle: &Handle,
    interface: &Interface,
    qdiscs: &mut Vec<(u32, String)>,
) -> Result<(), NetworkError> {
    let (tap, tap_index) = (&interface.tap, interface.tap_index);
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(tap_index)
                .mtu(interface.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(at.netlink(format!("set MTU {} and up on {tap}", interface.mtu)))?;
    handle
        .qdisc()
        .add(interface.index as i32)
        .ingress()
        .execute()
        .await
        .map_err(at.netlink("add ingress qdisc"))?;
    qdiscs.push((interface.index, interface.name.clone()));
    handle
        .qdisc()
        .add(tap_index as i32)
        .ingress()
        .execute()
        .await
        .map_err(at.netlink(format!("add ingress qdisc on {tap}")))?;
    add_redirect(handle, interface.index, tap_index)
        .await
        .map_err(at.netlink(format!("add ingress redirect to {tap}")))?;
    add_redirect(handle, tap_index, interface.index)
        .await
        .map_err(at.netlink(format!("add ingress redirect from {tap}")))?;
    Ok(())
}

/// Deletes the ingress qdisc of each (index, name) that is still that
/// link; the failures.
async fn remove_qdiscs(
    at: &At<'_>,
    handle: &Handle,
    qdiscs: &[(u32, String)],
) -> Vec<NetworkError> {
    let mut errors = Vec::new();
    for (index, name) in qdiscs {
        // The veth may be gone (its index even reused): only ours.
        match link_index(handle, name).await {
            Ok(i) if i == *index => {}
            _ => continue,
        }
        let mut request = handle.qdisc().del(*index as i32);
        request.message_mut().header.parent = TcHandle::INGRESS;
        match request.execute().await {
            Ok(()) => {}
            Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) => {}
            Err(e) => errors.push(at.interface(name).netlink("delete ingress qdisc")(e)),
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dest: Option<(&str, u8)>, gateway: Option<&str>, scope: u8) -> Route {
        Route {
            destination: dest.map(|(ip, prefix_len)| Address {
                ip: ip.parse().expect("ip"),
                prefix_len,
            }),
            gateway: gateway.map(|g| g.parse().expect("ip")),
            source: None,
            scope,
            metric: 0,
            onlink: false,
        }
    }

    #[test]
    fn a_late_taps_mac_is_random_unicast_and_locally_administered() {
        let (a, b) = (random_mac().expect("mac"), random_mac().expect("mac"));
        for mac in [a, b] {
            assert!(mac.is_unicast(), "{mac}");
            assert_eq!(mac.0[0] & 0x02, 0x02, "{mac} is not locally administered");
        }
        assert_ne!(a, b);
    }

    #[test]
    fn errors_name_the_netns_the_interface_and_the_step() {
        let at = At::netns(Path::new("/var/run/netns/x"));
        assert_eq!(
            at.interface("eth0")
                .err("add ingress qdisc", "File exists (os error 17)")
                .to_string(),
            "netns /var/run/netns/x: eth0: add ingress qdisc: File exists (os error 17)"
        );
        assert_eq!(
            at.err("opening", "No such file or directory").to_string(),
            "netns /var/run/netns/x: opening: No such file or directory"
        );
        let err = discover_and_plumb(Path::new("/nonexistent/netns")).expect_err("no netns");
        assert_eq!(err.step, "opening");
        // Not a network namespace: setns refuses it.
        let file = tempfile::NamedTempFile::new().expect("tempfile");
        let err = discover_and_plumb(file.path()).expect_err("not a netns");
        assert_eq!(err.step, "entering the namespace (setns)", "{err}");
    }

    #[test]
    fn the_request_carries_every_interface_route_and_neighbour() {
        let interface = Interface {
            name: "eth0".into(),
            index: 2,
            mac: Mac([0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x05]),
            mtu: 1450,
            addresses: vec![Address {
                ip: "10.244.1.5".parse().expect("ip"),
                prefix_len: 24,
            }],
            routes: vec![
                route(None, Some("10.244.1.1"), 0),
                route(Some(("10.96.0.0", 12)), None, 253),
            ],
            neighbours: vec![Neighbour {
                ip: "10.244.1.1".parse().expect("ip"),
                mac: Mac([0xee; 6]),
            }],
            tap: "tap0_isola".into(),
            tap_index: 9,
            guest_mac: Mac([0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x05]),
        };
        // A late network's guest device has the tap's boot MAC: the
        // request finds it by that one.
        let mut late = interface.clone();
        late.guest_mac = Mac([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
        let late = PodNetwork {
            netns_path: PathBuf::from(VMM_NETNS),
            netns: None,
            interfaces: vec![late],
            taps: Vec::new(),
            qdiscs: Vec::new(),
            forward: None,
            redirect: None,
        };
        let req = late.setup_request();
        assert_eq!(req.interfaces[0].mac, "02:11:22:33:44:55");
        assert_eq!(req.interfaces[0].new_mac, "0a:58:0a:f4:01:05");
        assert_eq!(req.interfaces[0].name, "eth0");
        assert_eq!(req.routes[0].device, "eth0");
        let network = PodNetwork {
            netns_path: PathBuf::from("/var/run/netns/x"),
            netns: None,
            interfaces: vec![interface],
            taps: Vec::new(),
            qdiscs: Vec::new(),
            forward: None,
            redirect: None,
        };
        let req = network.setup_request();
        assert_eq!(req.interfaces[0].new_mac, "", "a pod's device has its MAC");
        let plan = isola_protocol::network::check_request(&req).expect("the guest accepts it");
        assert_eq!(plan.interfaces[0].name, "eth0");
        assert_eq!(plan.interfaces[0].mac.to_string(), "0a:58:0a:f4:01:05");
        assert_eq!(plan.interfaces[0].mtu, Some(1450));
        assert_eq!(req.routes[0].destination, "");
        assert_eq!(req.routes[0].gateway, "10.244.1.1");
        assert_eq!(req.routes[1].destination, "10.96.0.0/12");
        assert_eq!(
            req.routes[1].scope.enum_value(),
            Ok(pb::RouteScope::SCOPE_LINK)
        );
        // Device routes are added first.
        assert_eq!(plan.routes[0].gateway, None);
        assert_eq!(req.neighbours[0].mac, "ee:ee:ee:ee:ee:ee");
        assert_eq!(req.neighbours[0].device, "eth0");
        network.teardown().expect("nothing to undo");
    }

    #[test]
    fn taps_need_a_name() {
        assert!(open_tap("").is_err());
        assert!(open_tap("sixteen-bytes-xx").is_err());
    }
}
