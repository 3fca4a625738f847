//! `SetupNetwork`: the pod's interfaces in the sandbox network namespace.
//!
//! The host gave the VM one virtio-net device per pod interface, with
//! that interface's MAC (see the sandbox crate's `network` module); they
//! appear in the agent's own namespace as eth0, eth1, ... This moves each
//! (found by MAC) into the sandbox namespace that every container joins,
//! renames it to the pod interface's name, sets its MTU and addresses,
//! brings it up, and adds the routes (those without a gateway first) and
//! the permanent neighbours.
//!
//! Namespaces belong to threads: the work runs on a short-lived thread
//! with a current-thread tokio runtime for rtnetlink, which moves the
//! links from its starting namespace, then `setns()`s into the sandbox's;
//! it is joined before returning, so the agent is single-threaded again
//! afterwards (`service::check_single_threaded`).

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use futures_util::TryStreamExt;
use isola_protocol::network::{Interface, Mac, Plan, Route, TEMP_NAME_PREFIX};
use isola_protocol::status::{error, Code};
use isola_protocol::ttrpc;
use rtnetlink::packet_route::address::AddressHeaderFlags;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

fn internal(message: impl ToString) -> ttrpc::Error {
    error(Code::INTERNAL, message)
}

/// A netlink error as the errno's text ("File exists (os error 17)").
fn netlink(step: String) -> impl FnOnce(rtnetlink::Error) -> ttrpc::Error {
    move |e| {
        let text = match &e {
            rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
            other => other.to_string(),
        };
        internal(format!("{step}: {text}"))
    }
}

/// Applies `plan`: takes its devices from the namespace at `source` (the
/// calling thread's own when `None`) into the one at `target`, and
/// configures them there.
pub fn setup(plan: &Plan, source: Option<&Path>, target: &Path) -> Result<(), ttrpc::Error> {
    let source = source
        .map(|p| File::open(p).map_err(|e| internal(format!("opening {}: {e}", p.display()))))
        .transpose()?;
    let target_ns =
        File::open(target).map_err(|e| internal(format!("opening {}: {e}", target.display())))?;
    let plan = plan.clone();
    let target = target.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("netns-setup".into())
        .spawn(move || -> Result<(), ttrpc::Error> {
            if let Some(source) = &source {
                nix::sched::setns(source.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| internal(format!("entering the devices' namespace: {e}")))?;
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| internal(format!("starting a runtime: {e}")))?;
            runtime.block_on(configure(&plan, &target_ns, &target))
        })
        .map_err(|e| internal(format!("starting the network thread: {e}")))?;
    thread
        .join()
        .map_err(|_| internal("the network thread panicked"))?
}

/// An rtnetlink handle in the thread's current namespace, and the task
/// that runs its connection.
fn connect() -> Result<(Handle, tokio::task::JoinHandle<()>), ttrpc::Error> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| internal(format!("opening rtnetlink: {e}")))?;
    Ok((handle, tokio::spawn(connection)))
}

/// Every link's index, name and MAC.
async fn links(handle: &Handle) -> Result<Vec<(u32, String, Option<Mac>)>, ttrpc::Error> {
    let messages: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing links".into()))?;
    Ok(messages
        .iter()
        .map(|m| {
            let (mut name, mut mac) = (String::new(), None);
            for attr in &m.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = n.clone(),
                    LinkAttribute::Address(bytes) => mac = Mac::from_bytes(bytes),
                    _ => {}
                }
            }
            (m.header.index, name, mac)
        })
        .collect())
}

/// The index of each interface's device (by MAC) among `links`.
fn find_devices(
    plan: &Plan,
    links: &[(u32, String, Option<Mac>)],
) -> Result<Vec<(u32, String)>, ttrpc::Error> {
    plan.interfaces
        .iter()
        .enumerate()
        .map(|(i, interface)| {
            links
                .iter()
                .find(|(_, _, mac)| *mac == Some(interface.mac))
                .map(|(index, name, _)| (*index, name.clone()))
                .ok_or_else(|| {
                    error(
                        Code::NOT_FOUND,
                        format!(
                            "interfaces[{i}].mac: no network device has MAC {} (is the VM's \
                             virtio-net device missing?)",
                            interface.mac
                        ),
                    )
                })
        })
        .collect()
}

async fn configure(plan: &Plan, target_ns: &File, target: &Path) -> Result<(), ttrpc::Error> {
    // In the devices' namespace: find them and move them.
    let (handle, task) = connect()?;
    let devices = find_devices(plan, &links(&handle).await?)?;
    for ((index, name), interface) in devices.iter().zip(&plan.interfaces) {
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(*index)
                    .setns_by_fd(target_ns.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!(
                "{}: moving {name} into {}",
                interface.name,
                target.display()
            )))?;
    }
    task.abort();

    // In the sandbox's namespace.
    nix::sched::setns(target_ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| internal(format!("entering {}: {e}", target.display())))?;
    let (handle, task) = connect()?;
    let result = configure_moved(&handle, plan).await;
    task.abort();
    result
}

fn set_link(handle: &Handle, message: LinkMessage) -> rtnetlink::LinkSetRequest {
    handle.link().set(message)
}

async fn configure_moved(handle: &Handle, plan: &Plan) -> Result<(), ttrpc::Error> {
    set_link(handle, LinkUnspec::new_with_name("lo").up().build())
        .execute()
        .await
        .map_err(netlink("bringing lo up".into()))?;
    let devices = find_devices(plan, &links(handle).await?)?;
    // Renamed through temporary names, so that two devices may swap theirs
    // (requested names never start with TEMP_NAME_PREFIX).
    let mut current = Vec::with_capacity(devices.len());
    for (i, ((index, name), interface)) in devices.iter().zip(&plan.interfaces).enumerate() {
        if *name == interface.name {
            current.push(name.clone());
            continue;
        }
        let temp = format!("{TEMP_NAME_PREFIX}{i}");
        set_link(
            handle,
            LinkUnspec::new_with_index(*index)
                .name(temp.clone())
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(format!("{}: renaming {name}", interface.name)))?;
        current.push(temp);
    }
    for (((index, _), interface), name) in devices.iter().zip(&plan.interfaces).zip(&current) {
        configure_interface(handle, *index, name, interface).await?;
    }
    // Devices are indices into the plan's interfaces (check_request).
    let index_of = |device: usize| devices.get(device).map(|(index, _)| *index).unwrap_or(0);
    let name_of = |device: usize| {
        plan.interfaces
            .get(device)
            .map(|i| i.name.as_str())
            .unwrap_or("?")
    };
    for route in &plan.routes {
        let device = name_of(route.device);
        add_route(handle, route, index_of(route.device))
            .await
            .map_err(netlink(format!(
                "{device}: adding the route {}",
                describe(route)
            )))?;
    }
    for n in &plan.neighbours {
        let device = name_of(n.device);
        handle
            .neighbours()
            .add(index_of(n.device), n.ip)
            .link_layer_address(&n.mac.0)
            .state(NeighbourState::Permanent)
            .execute()
            .await
            .map_err(netlink(format!(
                "{device}: adding the neighbour {} lladdr {}",
                n.ip, n.mac
            )))?;
    }
    Ok(())
}

async fn configure_interface(
    handle: &Handle,
    index: u32,
    old_name: &str,
    interface: &Interface,
) -> Result<(), ttrpc::Error> {
    let name = &interface.name;
    if old_name != name {
        set_link(
            handle,
            LinkUnspec::new_with_index(index).name(name.clone()).build(),
        )
        .execute()
        .await
        .map_err(netlink(format!("{name}: renaming {old_name}")))?;
    }
    if let Some(mac) = interface.new_mac {
        set_link(
            handle,
            LinkUnspec::new_with_index(index)
                .address(mac.0.to_vec())
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(format!("{name}: setting MAC {mac}")))?;
    }
    if let Some(mtu) = interface.mtu {
        set_link(handle, LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(netlink(format!("{name}: setting MTU {mtu}")))?;
    }
    for (ip, prefix_len) in &interface.addresses {
        let mut request = handle.address().add(index, *ip, *prefix_len);
        if ip.is_ipv6() {
            // The pod netns ran DAD for this address already; the guest's
            // traffic is the only one on the veth.
            request.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        }
        request
            .execute()
            .await
            .map_err(netlink(format!("{name}: adding {ip}/{prefix_len}")))?;
    }
    set_link(handle, LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(netlink(format!("{name}: bringing it up")))
}

/// A route the builder refused (a family mismatch check_request rules out).
fn invalid(e: impl std::fmt::Display) -> rtnetlink::Error {
    rtnetlink::Error::InvalidNla(e.to_string())
}

fn describe(route: &Route) -> String {
    let mut text = match route.destination {
        Some((ip, len)) => format!("{ip}/{len}"),
        None => "default".to_string(),
    };
    if let Some(gateway) = route.gateway {
        text.push_str(&format!(" via {gateway}"));
    }
    text
}

async fn add_route(handle: &Handle, route: &Route, index: u32) -> Result<(), rtnetlink::Error> {
    let (destination, len) = route.destination.unwrap_or(if route.ipv6 {
        (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
    } else {
        (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    });
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(destination, len)
        .map_err(invalid)?
        .output_interface(index)
        .scope(RouteScope::from(route.scope));
    if let Some(gateway) = route.gateway {
        builder = builder.gateway(gateway).map_err(invalid)?;
    }
    if let Some(source) = route.source {
        builder = builder.pref_source(source).map_err(invalid)?;
    }
    if route.metric != 0 {
        builder = builder.priority(route.metric);
    }
    if route.onlink {
        builder = builder.onlink();
    }
    handle.route().add(builder.build()).execute().await
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;

    use isola_protocol::agent::{
        NetworkInterface, NetworkNeighbour, NetworkRoute, RouteScope, SetupNetworkRequest,
    };
    use isola_protocol::network::{check_request, interface_message};
    use isola_protocol::status::{code, message};

    use super::*;

    fn ip(args: &[&str]) -> (bool, String) {
        let out = Command::new("ip").args(args).output().expect("ip");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    fn must(args: &[&str]) -> String {
        let (ok, out) = ip(args);
        assert!(ok, "ip {args:?}: {out}");
        out
    }

    /// Named namespaces, deleted on drop.
    struct Namespaces(Vec<String>);

    impl Drop for Namespaces {
        fn drop(&mut self) {
            for ns in &self.0 {
                let _ = ip(&["netns", "del", ns]);
            }
        }
    }

    fn request() -> SetupNetworkRequest {
        let iface = |name: &str, mac: &str, addrs: &[(&str, u8)]| {
            let mac = Mac::parse(mac).expect("mac");
            let addrs = addrs
                .iter()
                .map(|(ip, len)| (ip.parse().expect("ip"), *len));
            interface_message(name, mac, 1450, addrs)
        };
        let route = |dest: &str, gw: &str, dev: &str, scope: RouteScope| NetworkRoute {
            destination: dest.into(),
            gateway: gw.into(),
            device: dev.into(),
            scope: scope.into(),
            ..Default::default()
        };
        SetupNetworkRequest {
            // The devices swap their names: eth0 becomes net1, eth1 eth0.
            interfaces: vec![
                // This one takes another MAC once found (a late network).
                NetworkInterface {
                    new_mac: "02:42:c6:13:00:02".into(),
                    ..iface("net1", "0a:58:0a:f4:02:05", &[("10.245.0.5", 24)])
                },
                iface(
                    "eth0",
                    "0a:58:0a:f4:01:05",
                    &[("10.244.1.5", 24), ("fd00:244::5", 64)],
                ),
            ],
            routes: vec![
                // Calico's shape: a gateway off every subnet, reachable by
                // a device route listed after it.
                route("", "169.254.1.1", "eth0", RouteScope::SCOPE_UNIVERSE),
                route("169.254.1.1/32", "", "eth0", RouteScope::SCOPE_LINK),
                route(
                    "10.96.0.0/12",
                    "10.244.1.1",
                    "eth0",
                    RouteScope::SCOPE_UNIVERSE,
                ),
                route("", "fd00:244::1", "eth0", RouteScope::SCOPE_UNIVERSE),
            ],
            neighbours: vec![NetworkNeighbour {
                ip: "169.254.1.1".into(),
                mac: "ee:ee:ee:ee:ee:ee".into(),
                device: "eth0".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// The whole of SetupNetwork's netlink work, on the host: "devices"
    /// (veths with the pod's MACs, named eth0 and eth1 as the guest's
    /// virtio-net devices are) in one namespace, moved into a fresh one
    /// and configured there. Needs root; fails without it.
    #[test]
    fn moves_renames_and_configures_the_devices() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "SetupNetwork's test needs root (ip netns)"
        );
        let pid = std::process::id();
        let (guest, sandbox) = (format!("isola-agent-g{pid}"), format!("isola-agent-s{pid}"));
        for ns in [&guest, &sandbox] {
            let _ = ip(&["netns", "del", ns]);
            must(&["netns", "add", ns]);
        }
        let _namespaces = Namespaces(vec![guest.clone(), sandbox.clone()]);
        for (dev, mac) in [("eth0", "0a:58:0a:f4:02:05"), ("eth1", "0a:58:0a:f4:01:05")] {
            must(&[
                "-n",
                &guest,
                "link",
                "add",
                dev,
                "address",
                mac,
                "type",
                "veth",
                "peer",
                "name",
                &format!("p{dev}"),
            ]);
        }
        let plan = check_request(&request()).expect("valid");
        let path = |ns: &str| PathBuf::from("/var/run/netns").join(ns);
        setup(&plan, Some(&path(&guest)), &path(&sandbox))
            .unwrap_or_else(|e| panic!("{}", message(&e)));

        let links = must(&["-n", &sandbox, "-o", "link", "show"]);
        assert!(links.contains("lo: <LOOPBACK,UP"), "{links}");
        let eth0 = must(&["-n", &sandbox, "addr", "show", "dev", "eth0"]);
        assert!(eth0.contains("link/ether 0a:58:0a:f4:01:05"), "{eth0}");
        assert!(eth0.contains("mtu 1450"), "{eth0}");
        assert!(eth0.contains("inet 10.244.1.5/24"), "{eth0}");
        assert!(eth0.contains("inet6 fd00:244::5/64"), "{eth0}");
        assert!(eth0.contains(",UP"), "{eth0}");
        let net1 = must(&["-n", &sandbox, "addr", "show", "dev", "net1"]);
        assert!(net1.contains("link/ether 02:42:c6:13:00:02"), "{net1}");
        assert!(net1.contains("inet 10.245.0.5/24"), "{net1}");
        assert!(!ip(&["-n", &guest, "link", "show", "eth0"]).0, "moved away");

        let routes = must(&["-n", &sandbox, "route", "show"]);
        for want in [
            "default via 169.254.1.1 dev eth0",
            "169.254.1.1 dev eth0 proto static scope link",
            "10.96.0.0/12 via 10.244.1.1 dev eth0",
        ] {
            assert!(routes.contains(want), "{want:?} not in {routes}");
        }
        let routes6 = must(&["-n", &sandbox, "-6", "route", "show"]);
        assert!(
            routes6.contains("default via fd00:244::1 dev eth0"),
            "{routes6}"
        );
        let neigh = must(&["-n", &sandbox, "neigh", "show", "dev", "eth0"]);
        assert!(
            neigh.contains("169.254.1.1 lladdr ee:ee:ee:ee:ee:ee PERMANENT"),
            "{neigh}"
        );

        // Devices that are not there (moved already): NOT_FOUND, naming
        // the field.
        let err = setup(&plan, Some(&path(&guest)), &path(&sandbox)).expect_err("moved");
        assert_eq!(code(&err), Some(Code::NOT_FOUND));
        assert!(
            message(&err).starts_with("interfaces[0].mac: "),
            "{}",
            message(&err)
        );
    }
}
