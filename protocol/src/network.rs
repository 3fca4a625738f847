//! Pod networking (`Agent.SetupNetwork`): the rules of its fields, checked
//! once here for both sides. The agent turns a request into a [`Plan`]
//! (or an `INVALID_ARGUMENT` naming the field) before it changes anything;
//! the host checks what it found in the pod's network namespace against
//! the same bounds before it starts a VM for it.

use std::fmt;
use std::net::IpAddr;

use crate::agent::{RouteScope, SetupNetworkRequest};
use crate::status::{error, Code};

/// Most interfaces of a sandbox (virtio-net devices of its VM).
pub const MAX_INTERFACES: usize = 8;
/// Most addresses of one interface.
pub const MAX_ADDRESSES: usize = 64;
/// Most routes, and most neighbours, of a request.
pub const MAX_ROUTES: usize = 512;
pub const MAX_NEIGHBOURS: usize = 512;
/// Longest interface name (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;
/// The prefix of the agent's temporary interface names while it renames;
/// a requested name may not start with it.
pub const TEMP_NAME_PREFIX: &str = "isolatmp";

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Parses "aa:bb:cc:dd:ee:ff" (six pairs of hex digits, either case).
    pub fn parse(text: &str) -> Option<Mac> {
        let mut mac = [0u8; 6];
        let mut parts = text.split(':');
        for byte in mac.iter_mut() {
            let part = parts.next()?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            *byte = u8::from_str_radix(part, 16).ok()?;
        }
        parts.next().is_none().then_some(Mac(mac))
    }

    /// From a netlink attribute's bytes (exactly six).
    pub fn from_bytes(bytes: &[u8]) -> Option<Mac> {
        bytes.try_into().ok().map(Mac)
    }

    /// A unicast address that is not all zero: what a NIC may have.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Whether `name` is a name Linux gives an interface (dev_valid_name):
/// 1 to 15 bytes, not "." or "..", no '/', ':', whitespace or NUL.
pub fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// A request's interface (what the host sends for one pod interface).
pub fn interface_message(
    name: &str,
    mac: Mac,
    mtu: u32,
    addresses: impl IntoIterator<Item = (IpAddr, u8)>,
) -> crate::agent::NetworkInterface {
    crate::agent::NetworkInterface {
        name: name.to_string(),
        mac: mac.to_string(),
        mtu,
        addresses: addresses
            .into_iter()
            .map(|(ip, prefix_len)| crate::agent::IpAddress {
                ip: ip.to_string(),
                prefix_len: u32::from(prefix_len),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// The kernel's rtm_scope of `scope`.
pub fn rtm_scope(scope: RouteScope) -> u8 {
    match scope {
        RouteScope::SCOPE_UNIVERSE => 0,
        RouteScope::SCOPE_SITE => 200,
        RouteScope::SCOPE_LINK => 253,
        RouteScope::SCOPE_HOST => 254,
    }
}

/// The `RouteScope` of the kernel's rtm_scope; any other (nowhere) is
/// `SCOPE_UNIVERSE`.
pub fn route_scope(rtm_scope: u8) -> RouteScope {
    match rtm_scope {
        200 => RouteScope::SCOPE_SITE,
        253 => RouteScope::SCOPE_LINK,
        254 => RouteScope::SCOPE_HOST,
        _ => RouteScope::SCOPE_UNIVERSE,
    }
}

/// One interface of a checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: Mac,
    /// `None`: keep the device's.
    pub mtu: Option<u32>,
    pub addresses: Vec<(IpAddr, u8)>,
    /// The MAC the device gets once found; `None`: keep `mac`.
    pub new_mac: Option<Mac>,
}

/// One route of a checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `None`: the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub ipv6: bool,
    pub gateway: Option<IpAddr>,
    /// Index into [`Plan::interfaces`].
    pub device: usize,
    pub source: Option<IpAddr>,
    /// The kernel's rtm_scope.
    pub scope: u8,
    pub metric: u32,
    pub onlink: bool,
}

/// One permanent neighbour of a checked request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: Mac,
    /// Index into [`Plan::interfaces`].
    pub device: usize,
}

/// A checked `SetupNetworkRequest`; routes are in the order they must be
/// added (without a gateway first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
}

fn invalid(field: &str, message: impl fmt::Display) -> ttrpc::Error {
    error(Code::INVALID_ARGUMENT, format!("{field}: {message}"))
}

/// An IP address of a host or gateway: parsed, not unspecified, multicast
/// or loopback.
fn host_ip(field: &str, text: &str) -> Result<IpAddr, ttrpc::Error> {
    let ip: IpAddr = text
        .parse()
        .map_err(|_| invalid(field, format!("{text:?} is not an IP address")))?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(invalid(
            field,
            format!("{ip} is unspecified, multicast or loopback"),
        ));
    }
    Ok(ip)
}

fn max_prefix(ip: &IpAddr) -> u32 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

fn check_prefix(field: &str, ip: &IpAddr, prefix_len: u32) -> Result<u8, ttrpc::Error> {
    let max = max_prefix(ip);
    if prefix_len > max {
        let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
        return Err(invalid(
            field,
            format!("{prefix_len} is more than {max} for an {family} address"),
        ));
    }
    Ok(prefix_len as u8)
}

/// "10.0.0.0/8": the address and prefix length; the host bits must be
/// zero.
pub fn parse_cidr(field: &str, text: &str) -> Result<(IpAddr, u8), ttrpc::Error> {
    let (ip, len) = text
        .split_once('/')
        .ok_or_else(|| invalid(field, format!("{text:?} is not ADDRESS/PREFIX")))?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| invalid(field, format!("{ip:?} is not an IP address")))?;
    let len: u32 = len
        .parse()
        .map_err(|_| invalid(field, format!("{len:?} is not a prefix length")))?;
    let len = check_prefix(field, &ip, len)?;
    let host_bits = match ip {
        IpAddr::V4(v4) => u32::from(v4).checked_shl(u32::from(len)).unwrap_or(0) != 0,
        IpAddr::V6(v6) => u128::from(v6).checked_shl(u32::from(len)).unwrap_or(0) != 0,
    };
    if host_bits {
        return Err(invalid(
            field,
            format!("{text:?} has host bits set after the prefix"),
        ));
    }
    Ok((ip, len))
}

fn device_index(field: &str, name: &str, interfaces: &[Interface]) -> Result<usize, ttrpc::Error> {
    interfaces
        .iter()
        .position(|i| i.name == name)
        .ok_or_else(|| invalid(field, format!("{name:?} is none of the interfaces")))
}

fn check_interface(
    field: &str,
    req: &crate::agent::NetworkInterface,
) -> Result<Interface, ttrpc::Error> {
    let name = &req.name;
    if !is_interface_name(name) {
        return Err(invalid(
            &format!("{field}.name"),
            format!(
                "{name:?} is not an interface name (1 to {MAX_IFNAME} bytes, \
                 no '/', ':', whitespace or NUL, not . or ..)"
            ),
        ));
    }
    if name == "lo" || name.starts_with(TEMP_NAME_PREFIX) {
        return Err(invalid(
            &format!("{field}.name"),
            format!("{name:?} is reserved (lo, {TEMP_NAME_PREFIX}*)"),
        ));
    }
    let mac = Mac::parse(&req.mac)
        .filter(Mac::is_unicast)
        .ok_or_else(|| {
            invalid(
                &format!("{field}.mac"),
                format!("{:?} is not a unicast MAC (aa:bb:cc:dd:ee:ff)", req.mac),
            )
        })?;
    let new_mac = match req.new_mac.as_str() {
        "" => None,
        text => Some(Mac::parse(text).filter(Mac::is_unicast).ok_or_else(|| {
            invalid(
                &format!("{field}.new_mac"),
                format!("{text:?} is not empty or a unicast MAC (aa:bb:cc:dd:ee:ff)"),
            )
        })?),
    };
    let mtu = match req.mtu {
        0 => None,
        68..=65535 => Some(req.mtu),
        other => {
            return Err(invalid(
                &format!("{field}.mtu"),
                format!("{other} is not 0 or 68 to 65535"),
            ))
        }
    };
    if req.addresses.len() > MAX_ADDRESSES {
        return Err(invalid(
            &format!("{field}.addresses"),
            format!("more than {MAX_ADDRESSES}"),
        ));
    }
    let mut addresses = Vec::with_capacity(req.addresses.len());
    for (j, a) in req.addresses.iter().enumerate() {
        let field = format!("{field}.addresses[{j}]");
        let ip = host_ip(&format!("{field}.ip"), &a.ip)?;
        let len = check_prefix(&format!("{field}.prefix_len"), &ip, a.prefix_len)?;
        if addresses.iter().any(|(seen, _)| *seen == ip) {
            return Err(invalid(&format!("{field}.ip"), format!("{ip} is twice")));
        }
        addresses.push((ip, len));
    }
    Ok(Interface {
        name: name.clone(),
        mac,
        mtu,
        addresses,
        new_mac,
    })
}

fn check_route(
    field: &str,
    req: &crate::agent::NetworkRoute,
    interfaces: &[Interface],
) -> Result<Route, ttrpc::Error> {
    let destination = if req.destination.is_empty() {
        None
    } else {
        Some(parse_cidr(
            &format!("{field}.destination"),
            &req.destination,
        )?)
    };
    let gateway = if req.gateway.is_empty() {
        None
    } else {
        Some(host_ip(&format!("{field}.gateway"), &req.gateway)?)
    };
    let ipv6 = match (destination, gateway) {
        (Some((d, _)), Some(g)) if d.is_ipv6() != g.is_ipv6() => {
            return Err(invalid(
                &format!("{field}.gateway"),
                format!("{g} is not of the destination's family"),
            ))
        }
        (Some((d, _)), _) => d.is_ipv6(),
        (None, Some(g)) => g.is_ipv6(),
        (None, None) => {
            return Err(invalid(
                &format!("{field}.gateway"),
                "a default route needs a gateway",
            ))
        }
    };
    let source = if req.source.is_empty() {
        None
    } else {
        let ip = host_ip(&format!("{field}.source"), &req.source)?;
        if ip.is_ipv6() != ipv6 {
            return Err(invalid(
                &format!("{field}.source"),
                format!("{ip} is not of the destination's family"),
            ));
        }
        Some(ip)
    };
    let scope = match req.scope.enum_value() {
        Ok(scope) => rtm_scope(scope),
        Err(other) => {
            return Err(invalid(
                &format!("{field}.scope"),
                format!("{other} is not a RouteScope"),
            ))
        }
    };
    if req.onlink && gateway.is_none() {
        return Err(invalid(
            &format!("{field}.onlink"),
            "onlink needs a gateway",
        ));
    }
    let device = device_index(&format!("{field}.device"), &req.device, interfaces)?;
    Ok(Route {
        destination,
        ipv6,
        gateway,
        device,
        source,
        scope,
        metric: req.metric,
        onlink: req.onlink,
    })
}

/// Checks every field of `req` (an `INVALID_ARGUMENT` naming the first
/// bad one) and gives the plan to apply.
pub fn check_request(req: &SetupNetworkRequest) -> Result<Plan, ttrpc::Error> {
    if req.interfaces.len() > MAX_INTERFACES {
        return Err(invalid("interfaces", format!("more than {MAX_INTERFACES}")));
    }
    if req.routes.len() > MAX_ROUTES {
        return Err(invalid("routes", format!("more than {MAX_ROUTES}")));
    }
    if req.neighbours.len() > MAX_NEIGHBOURS {
        return Err(invalid("neighbours", format!("more than {MAX_NEIGHBOURS}")));
    }
    let mut plan = Plan::default();
    for (i, iface) in req.interfaces.iter().enumerate() {
        let field = format!("interfaces[{i}]");
        let checked = check_interface(&field, iface)?;
        if plan.interfaces.iter().any(|s| s.name == checked.name) {
            return Err(invalid(
                &format!("{field}.name"),
                format!("{:?} is twice", checked.name),
            ));
        }
        if plan.interfaces.iter().any(|s| s.mac == checked.mac) {
            return Err(invalid(
                &format!("{field}.mac"),
                format!("{} is twice", checked.mac),
            ));
        }
        plan.interfaces.push(checked);
    }
    let mut with_gateway = Vec::new();
    for (i, route) in req.routes.iter().enumerate() {
        let checked = check_route(&format!("routes[{i}]"), route, &plan.interfaces)?;
        if checked.gateway.is_some() {
            with_gateway.push(checked);
        } else {
            plan.routes.push(checked);
        }
    }
    plan.routes.extend(with_gateway);
    for (i, n) in req.neighbours.iter().enumerate() {
        let field = format!("neighbours[{i}]");
        let ip: IpAddr = n.ip.parse().map_err(|_| {
            invalid(
                &format!("{field}.ip"),
                format!("{:?} is not an IP address", n.ip),
            )
        })?;
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(invalid(
                &format!("{field}.ip"),
                format!("{ip} is unspecified or multicast"),
            ));
        }
        let mac = Mac::parse(&n.mac).ok_or_else(|| {
            invalid(
                &format!("{field}.mac"),
                format!("{:?} is not a MAC (aa:bb:cc:dd:ee:ff)", n.mac),
            )
        })?;
        let device = device_index(&format!("{field}.device"), &n.device, &plan.interfaces)?;
        plan.neighbours.push(Neighbour { ip, mac, device });
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{IpAddress, NetworkInterface, NetworkNeighbour, NetworkRoute};
    use crate::status::{code, message};

    fn iface(name: &str, mac: &str, addrs: &[(&str, u8)]) -> NetworkInterface {
        let mac = Mac::parse(mac).expect("mac");
        let addrs = addrs
            .iter()
            .map(|(ip, len)| (ip.parse().expect("ip"), *len));
        interface_message(name, mac, 1450, addrs)
    }

    fn route(dest: &str, gw: &str, dev: &str, scope: RouteScope) -> NetworkRoute {
        NetworkRoute {
            destination: dest.into(),
            gateway: gw.into(),
            device: dev.into(),
            scope: scope.into(),
            ..Default::default()
        }
    }

    fn good() -> SetupNetworkRequest {
        SetupNetworkRequest {
            interfaces: vec![
                iface(
                    "eth0",
                    "0a:58:0a:f4:01:05",
                    &[("10.244.1.5", 24), ("fd00::5", 64)],
                ),
                iface("net1", "0A:58:0A:F4:02:05", &[]),
            ],
            routes: vec![
                route("", "10.244.1.1", "eth0", RouteScope::SCOPE_UNIVERSE),
                route("10.96.0.0/12", "", "eth0", RouteScope::SCOPE_LINK),
                route("", "fd00::1", "eth0", RouteScope::SCOPE_UNIVERSE),
            ],
            neighbours: vec![NetworkNeighbour {
                ip: "10.244.1.1".into(),
                mac: "ee:ee:ee:ee:ee:ee".into(),
                device: "eth0".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn rejects(req: &SetupNetworkRequest, prefix: &str) {
        let err = check_request(req).expect_err(prefix);
        assert_eq!(code(&err), Some(Code::INVALID_ARGUMENT));
        assert!(
            message(&err).starts_with(prefix),
            "{:?} does not start with {prefix:?}",
            message(&err)
        );
    }

    #[test]
    fn macs_parse_and_print() {
        let mac = Mac::parse("0A:58:0a:f4:01:05").expect("mac");
        assert_eq!(mac.0, [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x05]);
        assert_eq!(mac.to_string(), "0a:58:0a:f4:01:05");
        assert!(mac.is_unicast());
        for bad in [
            "",
            "0a:58:0a:f4:01",
            "0a:58:0a:f4:01:05:06",
            "0a-58-0a-f4-01-05",
            "+a:58:0a:f4:01:05",
            "0a:58:0a:f4:01:5",
        ] {
            assert_eq!(Mac::parse(bad), None, "{bad}");
        }
        assert!(!Mac([1, 0, 0, 0, 0, 0]).is_unicast());
        assert!(!Mac([0; 6]).is_unicast());
        assert_eq!(Mac::from_bytes(&[1, 2, 3]), None);
    }

    #[test]
    fn interface_names() {
        for good in ["eth0", "net1", "a", "x.y-z_1", &"e".repeat(15)] {
            assert!(is_interface_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:1",
            "a b",
            "a\0",
            &"e".repeat(16),
            "a\tb",
        ] {
            assert!(!is_interface_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_good_request_gives_routes_without_gateway_first() {
        let plan = check_request(&good()).expect("valid");
        assert_eq!(plan.interfaces.len(), 2);
        assert_eq!(plan.interfaces[0].mtu, Some(1450));
        assert_eq!(plan.interfaces[1].mac.to_string(), "0a:58:0a:f4:02:05");
        assert_eq!(
            plan.interfaces[0].addresses,
            vec![
                ("10.244.1.5".parse().expect("ip"), 24),
                ("fd00::5".parse().expect("ip"), 64)
            ]
        );
        let order: Vec<_> = plan
            .routes
            .iter()
            .map(|r| (r.gateway.is_some(), r.ipv6))
            .collect();
        assert_eq!(order, vec![(false, false), (true, false), (true, true)]);
        assert_eq!(plan.routes[0].scope, 253);
        assert_eq!(
            plan.routes[0].destination,
            Some(("10.96.0.0".parse().expect("ip"), 12))
        );
        assert_eq!(plan.routes[1].destination, None);
        assert_eq!(plan.neighbours[0].device, 0);
        assert_eq!(plan.interfaces[0].new_mac, None);
        let mut late = good();
        late.interfaces[0].new_mac = "02:42:C6:13:00:02".into();
        let plan = check_request(&late).expect("valid");
        assert_eq!(
            plan.interfaces[0].new_mac.map(|m| m.to_string()).as_deref(),
            Some("02:42:c6:13:00:02")
        );
        assert_eq!(
            check_request(&SetupNetworkRequest::default()).expect("empty"),
            Plan::default()
        );
    }

    #[test]
    fn every_field_is_checked_and_named() {
        let with = |f: &dyn Fn(&mut SetupNetworkRequest)| {
            let mut r = good();
            f(&mut r);
            r
        };
        rejects(
            &with(&|r| r.interfaces[0].name = "eth 0".into()),
            "interfaces[0].name: ",
        );
        rejects(
            &with(&|r| r.interfaces[1].name = "lo".into()),
            "interfaces[1].name: ",
        );
        rejects(
            &with(&|r| r.interfaces[1].name = "isolatmp3".into()),
            "interfaces[1].name: ",
        );
        rejects(
            &with(&|r| r.interfaces[0].new_mac = "01:00:5e:00:00:01".into()),
            "interfaces[0].new_mac: ",
        );
        rejects(
            &with(&|r| r.interfaces[1].new_mac = "02:42".into()),
            "interfaces[1].new_mac: ",
        );
        rejects(
            &with(&|r| r.interfaces[1].name = "eth0".into()),
            "interfaces[1].name: \"eth0\" is twice",
        );
        rejects(
            &with(&|r| r.interfaces[1].mac = "0a:58:0a:f4:01:05".into()),
            "interfaces[1].mac: ",
        );
        rejects(
            &with(&|r| r.interfaces[0].mac = "01:00:5e:00:00:01".into()),
            "interfaces[0].mac: ",
        );
        rejects(&with(&|r| r.interfaces[0].mtu = 67), "interfaces[0].mtu: ");
        rejects(
            &with(&|r| r.interfaces[0].mtu = 65536),
            "interfaces[0].mtu: ",
        );
        rejects(
            &with(&|r| r.interfaces[0].addresses[0].ip = "10.244.1".into()),
            "interfaces[0].addresses[0].ip: ",
        );
        rejects(
            &with(&|r| r.interfaces[0].addresses[0].ip = "0.0.0.0".into()),
            "interfaces[0].addresses[0].ip: ",
        );
        rejects(
            &with(&|r| r.interfaces[0].addresses[0].prefix_len = 33),
            "interfaces[0].addresses[0].prefix_len: 33 is more than 32",
        );
        rejects(
            &with(&|r| r.interfaces[0].addresses[1].prefix_len = 129),
            "interfaces[0].addresses[1].prefix_len: ",
        );
        rejects(
            &with(&|r| r.interfaces[0].addresses[1] = r.interfaces[0].addresses[0].clone()),
            "interfaces[0].addresses[1].ip: 10.244.1.5 is twice",
        );
        rejects(
            &with(&|r| r.interfaces[0].addresses = vec![IpAddress::default(); 65]),
            "interfaces[0].addresses: more than 64",
        );
        rejects(
            &with(&|r| r.interfaces = vec![NetworkInterface::default(); 9]),
            "interfaces: more than 8",
        );
        rejects(
            &with(&|r| r.routes[0].gateway = String::new()),
            "routes[0].gateway: a default route needs a gateway",
        );
        rejects(
            &with(&|r| r.routes[0].device = String::new()),
            "routes[0].device: ",
        );
        rejects(
            &with(&|r| r.routes[1].destination = "10.96.0.1/12".into()),
            "routes[1].destination: ",
        );
        rejects(
            &with(&|r| r.routes[1].destination = "10.96.0.0".into()),
            "routes[1].destination: ",
        );
        rejects(
            &with(&|r| r.routes[1].destination = "10.96.0.0/40".into()),
            "routes[1].destination: ",
        );
        rejects(
            &with(&|r| {
                r.routes[1].gateway = "fd00::1".into();
            }),
            "routes[1].gateway: fd00::1 is not of the destination's family",
        );
        rejects(
            &with(&|r| r.routes[1].device = "eth9".into()),
            "routes[1].device: ",
        );
        rejects(
            &with(&|r| r.routes[1].source = "fd00::5".into()),
            "routes[1].source: ",
        );
        rejects(&with(&|r| r.routes[1].onlink = true), "routes[1].onlink: ");
        rejects(
            &with(&|r| r.routes[1].scope = protobuf::EnumOrUnknown::from_i32(7)),
            "routes[1].scope: 7 ",
        );
        rejects(
            &with(&|r| r.routes = vec![NetworkRoute::default(); 513]),
            "routes: more than 512",
        );
        rejects(
            &with(&|r| r.neighbours[0].ip = "ff02::1".into()),
            "neighbours[0].ip: ",
        );
        rejects(
            &with(&|r| r.neighbours[0].mac = "ee:ee".into()),
            "neighbours[0].mac: ",
        );
        rejects(
            &with(&|r| r.neighbours[0].device = "net2".into()),
            "neighbours[0].device: ",
        );
    }

    #[test]
    fn scopes_go_both_ways() {
        for scope in [
            RouteScope::SCOPE_UNIVERSE,
            RouteScope::SCOPE_SITE,
            RouteScope::SCOPE_LINK,
            RouteScope::SCOPE_HOST,
        ] {
            assert_eq!(route_scope(rtm_scope(scope)), scope);
        }
        assert_eq!(rtm_scope(RouteScope::SCOPE_LINK), 253);
        assert_eq!(route_scope(255), RouteScope::SCOPE_UNIVERSE);
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("d", "0.0.0.0/0").expect("any"),
            ("0.0.0.0".parse().expect("ip"), 0)
        );
        assert_eq!(
            parse_cidr("d", "fd00::/8").expect("v6"),
            ("fd00::".parse().expect("ip"), 8)
        );
        parse_cidr("d", "10.0.0.1/32").expect("host route");
        parse_cidr("d", "fd00::1/128").expect("host route");
        for bad in [
            "10.0.0.1/31",
            "fd00::1/64",
            "10.0.0.0/",
            "/8",
            "10.0.0.0/-1",
            "x/8",
        ] {
            assert!(parse_cidr("d", bad).is_err(), "{bad}");
        }
    }
}
