//! `--net fd=N,mac=MAC` and `--net tap=NAME,mac=MAC` (and
//! `,offload=on|off`, on by default): one virtio-net device, validated (the back end is opened later, by [`super::tap`]).

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Most `--net` devices per VM (each takes a virtio-mmio window and an IRQ,
/// and 128 KiB of frame buffers).
pub const MAX_NET_DEVICES: usize = 8;
/// Longest interface name Linux takes (`IFNAMSIZ` - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Where a device's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackendSpec {
    /// A tap the caller opened (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR) and left
    /// open in this process under that number.
    Fd(i32),
    /// A tap the VMM attaches to (or creates) by name, in its own network
    /// namespace.
    Tap(String),
}

impl fmt::Display for NetBackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetBackendSpec::Fd(fd) => write!(f, "fd={fd}"),
            NetBackendSpec::Tap(name) => write!(f, "tap={name}"),
        }
    }
}

/// What is wrong with a `--net` value; each names the field.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NetConfigError {
    #[error("--net {0:?}: expected fd=N,mac=MAC or tap=NAME,mac=MAC")]
    Syntax(String),
    #[error("--net: unknown field {0:?} (fields: fd, tap, mac, offload)")]
    UnknownField(String),
    #[error("--net: field {0} given twice")]
    Duplicate(&'static str),
    #[error("--net: field {0} is missing")]
    Missing(&'static str),
    #[error("--net offload={0:?}: expected on or off")]
    Offload(String),
    #[error("--net: give fd= or tap=, not both")]
    FdAndTap,
    #[error("--net fd={0}: must be a file descriptor number of 3 or more (0-2 are stdio)")]
    Fd(String),
    #[error("--net tap={0:?}: an interface name is 1 to {MAX_IFNAME_LEN} bytes, without '/', ':', whitespace or control characters, and not . or ..")]
    TapName(String),
    #[error("--net mac={0:?}: expected six hex bytes like 52:54:00:12:34:56")]
    MacSyntax(String),
    #[error("--net mac={0}: a multicast address (lowest bit of the first byte set) cannot be a device's")]
    MacMulticast(String),
    #[error("--net mac={0}: the all-zero address cannot be a device's")]
    MacZero(String),
    #[error("--net: at most {MAX_NET_DEVICES} devices, {0} were given")]
    TooMany(usize),
    #[error("--net {0} is given more than once")]
    DuplicateBackend(String),
    #[error("--net mac={0} is given more than once; every device needs its own address")]
    DuplicateMac(String),
}

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = NetConfigError;

    /// Six colon-separated hex bytes; a unicast, non-zero address.
    fn from_str(s: &str) -> Result<Self, NetConfigError> {
        let syntax = || NetConfigError::MacSyntax(s.to_string());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(syntax)?;
            if part.len() != 2 {
                return Err(syntax());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        let mac = MacAddr(mac);
        if mac.0[0] & 1 != 0 {
            return Err(NetConfigError::MacMulticast(mac.to_string()));
        }
        if mac.0 == [0; 6] {
            return Err(NetConfigError::MacZero(mac.to_string()));
        }
        Ok(mac)
    }
}

/// One virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub backend: NetBackendSpec,
    pub mac: MacAddr,
    /// Checksum and TSO offloads offered to the guest (`offload=on`, the
    /// default) or not (`offload=off`).
    pub offload: bool,
}

impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},mac={}", self.backend, self.mac)?;
        if !self.offload {
            write!(f, ",offload=off")?;
        }
        Ok(())
    }
}

fn parse_offload(value: &str) -> Result<bool, NetConfigError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(NetConfigError::Offload(value.to_string())),
    }
}

fn parse_fd(value: &str) -> Result<i32, NetConfigError> {
    value
        .parse::<i32>()
        .ok()
        .filter(|fd| *fd >= 3)
        .ok_or_else(|| NetConfigError::Fd(value.to_string()))
}

fn parse_tap_name(value: &str) -> Result<String, NetConfigError> {
    let bad = value.is_empty()
        || value.len() > MAX_IFNAME_LEN
        || value == "."
        || value == ".."
        || value
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if bad {
        return Err(NetConfigError::TapName(value.to_string()));
    }
    Ok(value.to_string())
}

impl FromStr for NetConfig {
    type Err = NetConfigError;

    fn from_str(s: &str) -> Result<Self, NetConfigError> {
        let mut fd = None;
        let mut tap = None;
        let mut mac = None;
        let mut offload = None;
        for field in s.split(',') {
            let Some((key, value)) = field.split_once('=') else {
                return Err(NetConfigError::Syntax(s.to_string()));
            };
            let (name, dup) = match key {
                "fd" => ("fd", fd.replace(parse_fd(value)?).is_some()),
                "tap" => ("tap", tap.replace(parse_tap_name(value)?).is_some()),
                "mac" => ("mac", mac.replace(value.parse::<MacAddr>()?).is_some()),
                "offload" => ("offload", offload.replace(parse_offload(value)?).is_some()),
                other => return Err(NetConfigError::UnknownField(other.to_string())),
            };
            if dup {
                return Err(NetConfigError::Duplicate(name));
            }
        }
        let backend = match (fd, tap) {
            (Some(_), Some(_)) => return Err(NetConfigError::FdAndTap),
            (Some(fd), None) => NetBackendSpec::Fd(fd),
            (None, Some(name)) => NetBackendSpec::Tap(name),
            (None, None) => return Err(NetConfigError::Missing("fd or tap")),
        };
        Ok(NetConfig {
            backend,
            mac: mac.ok_or(NetConfigError::Missing("mac"))?,
            offload: offload.unwrap_or(true),
        })
    }
}

/// Checks the devices together: at most [`MAX_NET_DEVICES`], no fd, tap
/// name or MAC address given twice.
pub fn check_net_configs(nets: &[NetConfig]) -> Result<(), NetConfigError> {
    if nets.len() > MAX_NET_DEVICES {
        return Err(NetConfigError::TooMany(nets.len()));
    }
    for (i, net) in nets.iter().enumerate() {
        let earlier = &nets[..i];
        if earlier.iter().any(|other| other.backend == net.backend) {
            return Err(NetConfigError::DuplicateBackend(net.backend.to_string()));
        }
        if earlier.iter().any(|other| other.mac == net.mac) {
            return Err(NetConfigError::DuplicateMac(net.mac.to_string()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConfig, NetConfigError> {
        s.parse()
    }

    #[test]
    fn accepts_the_documented_forms() {
        let c = parse("fd=3,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(c.backend, NetBackendSpec::Fd(3));
        assert_eq!(c.mac, MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        let c = parse("mac=AA:bb:cc:dd:ee:0F,tap=isola-tap0").unwrap();
        assert_eq!(c.backend, NetBackendSpec::Tap("isola-tap0".into()));
        assert_eq!(c.mac.to_string(), "aa:bb:cc:dd:ee:0f");
        assert_eq!(c.to_string(), "tap=isola-tap0,mac=aa:bb:cc:dd:ee:0f");
        let name15 = "t".repeat(MAX_IFNAME_LEN);
        let c = parse(&format!("tap={name15},mac=02:00:00:00:00:01")).unwrap();
        assert_eq!(c.backend, NetBackendSpec::Tap(name15));
        assert!(c.offload, "offloads are on by default");
        let c = parse("fd=3,mac=52:54:00:12:34:56,offload=off").unwrap();
        assert!(!c.offload);
        assert_eq!(c.to_string(), "fd=3,mac=52:54:00:12:34:56,offload=off");
        assert_eq!(c, parse(&c.to_string()).unwrap(), "Display parses back");
        let c = parse("offload=on,fd=3,mac=52:54:00:12:34:56").unwrap();
        assert!(c.offload);
        assert_eq!(c.to_string(), "fd=3,mac=52:54:00:12:34:56");
    }

    #[test]
    fn names_the_bad_field() {
        let long = "t".repeat(MAX_IFNAME_LEN + 1);
        let cases: Vec<(String, NetConfigError, &str)> = vec![
            (
                "fd=2,mac=02:00:00:00:00:01".into(),
                NetConfigError::Fd("2".into()),
                "fd=2",
            ),
            (
                "fd=-1,mac=02:00:00:00:00:01".into(),
                NetConfigError::Fd("-1".into()),
                "3 or more",
            ),
            (
                "fd=x,mac=02:00:00:00:00:01".into(),
                NetConfigError::Fd("x".into()),
                "fd=x",
            ),
            (
                format!("tap={long},mac=02:00:00:00:00:01"),
                NetConfigError::TapName(long.clone()),
                "1 to 15 bytes",
            ),
            (
                "tap=a/b,mac=02:00:00:00:00:01".into(),
                NetConfigError::TapName("a/b".into()),
                "tap=",
            ),
            (
                "tap=..,mac=02:00:00:00:00:01".into(),
                NetConfigError::TapName("..".into()),
                "tap=",
            ),
            (
                "tap=,mac=02:00:00:00:00:01".into(),
                NetConfigError::TapName(String::new()),
                "tap=",
            ),
            (
                "fd=3,mac=01:00:5e:00:00:01".into(),
                NetConfigError::MacMulticast("01:00:5e:00:00:01".into()),
                "multicast",
            ),
            (
                "fd=3,mac=ff:ff:ff:ff:ff:ff".into(),
                NetConfigError::MacMulticast("ff:ff:ff:ff:ff:ff".into()),
                "multicast",
            ),
            (
                "fd=3,mac=00:00:00:00:00:00".into(),
                NetConfigError::MacZero("00:00:00:00:00:00".into()),
                "all-zero",
            ),
            (
                "fd=3,mac=02:00:00:00:00".into(),
                NetConfigError::MacSyntax("02:00:00:00:00".into()),
                "six hex bytes",
            ),
            (
                "fd=3,mac=02:00:00:00:00:01:02".into(),
                NetConfigError::MacSyntax("02:00:00:00:00:01:02".into()),
                "six hex bytes",
            ),
            (
                "fd=3,mac=02:00:00:00:00:g1".into(),
                NetConfigError::MacSyntax("02:00:00:00:00:g1".into()),
                "mac=",
            ),
            (
                "fd=3,mac=2:0:0:0:0:1".into(),
                NetConfigError::MacSyntax("2:0:0:0:0:1".into()),
                "mac=",
            ),
            (
                "fd=3".into(),
                NetConfigError::Missing("mac"),
                "mac is missing",
            ),
            (
                "mac=02:00:00:00:00:01".into(),
                NetConfigError::Missing("fd or tap"),
                "fd or tap is missing",
            ),
            (
                "fd=3,tap=t,mac=02:00:00:00:00:01".into(),
                NetConfigError::FdAndTap,
                "not both",
            ),
            (
                "fd=3,fd=4,mac=02:00:00:00:00:01".into(),
                NetConfigError::Duplicate("fd"),
                "fd given twice",
            ),
            (
                "fd=3,mac=02:00:00:00:00:01,mtu=9000".into(),
                NetConfigError::UnknownField("mtu".into()),
                "mtu",
            ),
            (
                "fd=3,mac=02:00:00:00:00:01,offload=no".into(),
                NetConfigError::Offload("no".into()),
                "on or off",
            ),
            (
                "fd=3,offload=off,offload=on,mac=02:00:00:00:00:01".into(),
                NetConfigError::Duplicate("offload"),
                "offload given twice",
            ),
            (
                "fd=3,mac".into(),
                NetConfigError::Syntax("fd=3,mac".into()),
                "expected fd=N",
            ),
            ("".into(), NetConfigError::Syntax(String::new()), "expected"),
        ];
        for (input, want, text) in cases {
            let err = parse(&input).unwrap_err();
            assert_eq!(err, want, "{input:?}");
            assert!(err.to_string().contains(text), "{input:?}: {err}");
        }
    }

    #[test]
    fn devices_are_checked_together() {
        let net = |s: &str| parse(s).unwrap();
        let a = net("fd=3,mac=02:00:00:00:00:01");
        let b = net("tap=t0,mac=02:00:00:00:00:02");
        assert_eq!(check_net_configs(&[a.clone(), b.clone()]), Ok(()));
        let err = check_net_configs(&[a.clone(), net("fd=3,mac=02:00:00:00:00:03")]).unwrap_err();
        assert_eq!(err, NetConfigError::DuplicateBackend("fd=3".into()));
        assert!(err.to_string().contains("more than once"));
        let err = check_net_configs(&[b.clone(), net("tap=t0,mac=02:00:00:00:00:03")]).unwrap_err();
        assert_eq!(err, NetConfigError::DuplicateBackend("tap=t0".into()));
        let err = check_net_configs(&[a, net("fd=4,mac=02:00:00:00:00:01")]).unwrap_err();
        assert_eq!(
            err,
            NetConfigError::DuplicateMac("02:00:00:00:00:01".into())
        );
        let many: Vec<NetConfig> = (0..=MAX_NET_DEVICES)
            .map(|i| net(&format!("fd={},mac=02:00:00:00:00:{i:02x}", i + 3)))
            .collect();
        assert_eq!(
            check_net_configs(&many[..MAX_NET_DEVICES]),
            Ok(()),
            "eight are fine"
        );
        assert_eq!(
            check_net_configs(&many),
            Err(NetConfigError::TooMany(MAX_NET_DEVICES + 1))
        );
    }
}
