//! From the caller's OCI spec to the one the agent gets: host paths of bind
//! mounts replaced by their place in the share, volumes added as bind
//! mounts.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Mount, Spec};

use crate::share::guest_volume;

/// A host directory (or file) shown to a container: `HOST:GUEST[:ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub host: PathBuf,
    pub guest: String,
    pub readonly: bool,
}

impl Volume {
    /// Parses `HOST:GUEST[:ro|:rw]`. `HOST` is taken as written (the
    /// caller makes it absolute); `GUEST` must be absolute. Errors name the
    /// bad part.
    pub fn parse(text: &str) -> Result<Volume, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let (host, guest, mode) = match parts.as_slice() {
            [host, guest] => (*host, *guest, None),
            [host, guest, mode] => (*host, *guest, Some(*mode)),
            _ => {
                return Err(format!(
                    "volume {text:?}: expected HOST:GUEST or HOST:GUEST:ro, not {} parts",
                    parts.len()
                ))
            }
        };
        if host.is_empty() {
            return Err(format!("volume {text:?}: the host path is empty"));
        }
        if !guest.starts_with('/') {
            return Err(format!(
                "volume {text:?}: the container path {guest:?} is not absolute"
            ));
        }
        if Path::new(guest)
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(format!(
                "volume {text:?}: the container path {guest:?} contains \"..\""
            ));
        }
        let readonly = match mode {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(other) => {
                return Err(format!(
                    "volume {text:?}: the mode {other:?} is not \"ro\" or \"rw\""
                ))
            }
        };
        Ok(Volume {
            host: PathBuf::from(host),
            guest: guest.to_string(),
            readonly,
        })
    }

    /// The bind mount this volume adds to a spec.
    pub fn mount(&self) -> Mount {
        let mut mount = Mount::default();
        mount
            .set_destination(PathBuf::from(&self.guest))
            .set_typ(Some("bind".to_string()))
            .set_source(Some(self.host.clone()))
            .set_options(Some(vec![
                "rbind".to_string(),
                if self.readonly { "ro" } else { "rw" }.to_string(),
            ]));
        mount
    }
}

/// A host path the share must carry for a container: bound at the
/// container's volume `index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    pub index: usize,
    pub source: PathBuf,
    pub readonly: bool,
}

/// Why a spec cannot be sent to the guest; names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SpecError {
    pub field: String,
    pub problem: String,
}

pub(crate) fn is_bind(mount: &Mount) -> bool {
    mount.typ().as_deref() == Some("bind")
        || mount
            .options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

fn is_readonly(mount: &Mount) -> bool {
    mount
        .options()
        .as_ref()
        .is_some_and(|o| o.iter().any(|o| o == "ro"))
}

/// Rewrites `spec` for container `cid`: every bind mount's host source
/// becomes the guest path of a volume of the share, in order; `root.path`
/// becomes `rootfs` (the agent ignores it). Returns the host paths to bind
/// into the share.
pub fn rewrite(spec: &mut Spec, cid: &str) -> Result<Vec<HostBind>, SpecError> {
    let mut binds = Vec::new();
    if let Some(mounts) = spec.mounts_mut() {
        for (i, mount) in mounts.iter_mut().enumerate() {
            if !is_bind(mount) {
                continue;
            }
            let field = format!("mounts[{i}].source");
            let source = mount.source().clone().ok_or_else(|| SpecError {
                field: field.clone(),
                problem: format!(
                    "a bind mount (to {}) needs a source",
                    mount.destination().display()
                ),
            })?;
            if !source.is_absolute() {
                return Err(SpecError {
                    field,
                    problem: format!("{} is not an absolute host path", source.display()),
                });
            }
            let index = binds.len();
            binds.push(HostBind {
                index,
                source,
                readonly: is_readonly(mount),
            });
            mount.set_source(Some(PathBuf::from(guest_volume(cid, index))));
        }
    }
    if let Some(root) = spec.root_mut() {
        root.set_path(PathBuf::from("rootfs"));
    }
    Ok(binds)
}

/// Whether the spec wants a read-only root file system.
pub fn root_readonly(spec: &Spec) -> bool {
    spec.root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_parse() {
        assert_eq!(
            Volume::parse("/srv/data:/data"),
            Ok(Volume {
                host: "/srv/data".into(),
                guest: "/data".into(),
                readonly: false
            })
        );
        assert_eq!(Volume::parse("rel:/data:ro").map(|v| v.readonly), Ok(true));
        assert_eq!(Volume::parse("/a:/b:rw").map(|v| v.readonly), Ok(false));
    }

    #[test]
    fn bad_volumes_name_the_bad_part() {
        let cases = [
            ("/a", "not 1 parts"),
            ("/a:/b:ro:x", "not 4 parts"),
            (":/b", "host path is empty"),
            ("/a:b", "container path \"b\" is not absolute"),
            ("/a:", "container path \"\" is not absolute"),
            ("/a:/b/../../etc", "contains \"..\""),
            ("/a:/b:rx", "mode \"rx\" is not"),
        ];
        for (text, want) in cases {
            let err = Volume::parse(text).err().unwrap_or_default();
            assert!(err.contains(want), "{text}: {err}");
            assert!(err.starts_with(&format!("volume {text:?}")), "{err}");
        }
    }

    fn spec_with(mounts: serde_json::Value) -> Spec {
        let json = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "/host/bundle/rootfs", "readonly": true},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "mounts": mounts,
        });
        serde_json::from_value(json).expect("spec")
    }

    #[test]
    fn bind_sources_become_share_paths_and_others_stay() {
        let mut spec = spec_with(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]},
            {"destination": "/etc/hosts", "source": "/var/lib/x/hosts", "options": ["bind", "ro"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"},
        ]));
        let volume = Volume::parse("/home/u/cfg:/cfg:ro").expect("volume");
        spec.mounts_mut()
            .get_or_insert_with(Vec::new)
            .push(volume.mount());
        let binds = rewrite(&mut spec, "web").expect("rewrite");
        assert_eq!(
            binds,
            vec![
                HostBind {
                    index: 0,
                    source: "/srv/data".into(),
                    readonly: false
                },
                HostBind {
                    index: 1,
                    source: "/var/lib/x/hosts".into(),
                    readonly: true
                },
                HostBind {
                    index: 2,
                    source: "/home/u/cfg".into(),
                    readonly: true
                },
            ]
        );
        let mounts = spec.mounts().clone().unwrap_or_default();
        let sources: Vec<String> = mounts
            .iter()
            .map(|m| {
                m.source()
                    .as_ref()
                    .map(|s| s.display().to_string())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            sources,
            [
                "proc",
                "/run/isola/share/containers/web/volumes/0",
                "/run/isola/share/containers/web/volumes/1",
                "shm",
                "/run/isola/share/containers/web/volumes/2",
            ]
        );
        // Options (ro) travel unchanged: the guest mounts read-only too.
        assert_eq!(
            mounts[4].options().clone().unwrap_or_default(),
            ["rbind", "ro"]
        );
        assert_eq!(
            spec.root().as_ref().map(|r| r.path().clone()),
            Some(PathBuf::from("rootfs"))
        );
        assert!(root_readonly(&spec));
    }

    #[test]
    fn bad_binds_name_the_field() {
        let mut spec = spec_with(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "options": ["rbind"]},
        ]));
        let err = rewrite(&mut spec, "c").expect_err("refused");
        assert_eq!(err.field, "mounts[1].source");
        assert!(err.to_string().contains("needs a source"), "{err}");

        let mut spec = spec_with(serde_json::json!([
            {"destination": "/data", "type": "bind", "source": "relative/dir"},
        ]));
        let err = rewrite(&mut spec, "c").expect_err("refused");
        assert_eq!(
            err.to_string(),
            "mounts[0].source: relative/dir is not an absolute host path"
        );
    }
}
