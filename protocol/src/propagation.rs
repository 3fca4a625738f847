//! Mount propagation in runc's names, as OCI specs write it: a mount's
//! options (`rshared`, `rslave`, `rprivate`, ...) and
//! `linux.rootfsPropagation`. One reading for the host (which of the
//! share's binds keep receiving the host's mounts) and the agent (what it
//! applies in the guest).

/// A propagation type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    Shared,
    Slave,
    Private,
    Unbindable,
}

impl Propagation {
    /// Its plain name (`shared`, `slave`, `private`, `unbindable`).
    pub fn name(self) -> &'static str {
        match self {
            Propagation::Shared => "shared",
            Propagation::Slave => "slave",
            Propagation::Private => "private",
            Propagation::Unbindable => "unbindable",
        }
    }
}

/// The propagation `option` names and whether recursively (its `r`
/// form), or None for any other option.
pub fn parse(option: &str) -> Option<(Propagation, bool)> {
    let (plain, recursive) = match option.strip_prefix('r') {
        Some(rest) => (rest, true),
        None => (option, false),
    };
    let p = match plain {
        "shared" => Propagation::Shared,
        "slave" => Propagation::Slave,
        "private" => Propagation::Private,
        "unbindable" => Propagation::Unbindable,
        _ => return None,
    };
    Some((p, recursive))
}

/// The last propagation `options` name: runc applies them in order, so
/// that one holds.
pub fn last<S: AsRef<str>>(options: &[S]) -> Option<Propagation> {
    options
        .iter()
        .rev()
        .find_map(|o| parse(o.as_ref()))
        .map(|(p, _)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runcs_names_plain_and_recursive() {
        assert_eq!(parse("rshared"), Some((Propagation::Shared, true)));
        assert_eq!(parse("slave"), Some((Propagation::Slave, false)));
        assert_eq!(parse("runbindable"), Some((Propagation::Unbindable, true)));
        assert_eq!(parse("rprivate").map(|(p, _)| p.name()), Some("private"));
        for other in ["rbind", "ro", "rw", "r", "", "rsharedd"] {
            assert_eq!(parse(other), None, "{other}");
        }
        assert_eq!(
            last(&["rbind", "rprivate", "rslave", "rw"]),
            Some(Propagation::Slave)
        );
        assert_eq!(last(&["rbind", "ro"]), None);
    }
}
