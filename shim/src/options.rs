//! The runtime options containerd hands a shim that is not runc:
//! `runtimeoptions.v1.Options { type_url = 1; config_path = 2; }`, which
//! the CRI plugin fills from the runtime's `options.ConfigPath` and
//! `ctr run --runtime-config-path`. isola reads its config path from it.

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::CodedInputStream;

/// The protobuf name of containerd's generic runtime options.
pub const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

/// The config path in `options`, if they are runtimeoptions with one.
pub fn config_path(options: Option<&Any>) -> Result<Option<String>, String> {
    let Some(any) = options else { return Ok(None) };
    let name = any.type_url.rsplit('/').next().unwrap_or("");
    if name != RUNTIME_OPTIONS_TYPE {
        // runc's options, or a type we do not know: nothing for us.
        return Ok(None);
    }
    let mut input = CodedInputStream::from_bytes(&any.value);
    let mut path = None;
    loop {
        let tag = input
            .read_raw_tag_or_eof()
            .map_err(|e| format!("runtime options: {e}"))?;
        let Some(tag) = tag else { break };
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            path = Some(
                input
                    .read_string()
                    .map_err(|e| format!("runtime options: config_path: {e}"))?,
            );
        } else {
            let wire_type = containerd_shim_protos::protobuf::rt::WireType::new(wire)
                .ok_or_else(|| format!("runtime options: bad wire type {wire}"))?;
            input
                .skip_field(wire_type)
                .map_err(|e| format!("runtime options: {e}"))?;
        }
    }
    Ok(path.filter(|p| !p.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::CodedOutputStream;

    fn options(type_url: &str, config_path: &str) -> Any {
        let mut value = Vec::new();
        {
            let mut out = CodedOutputStream::vec(&mut value);
            out.write_string(1, "io.containerd.isola.v2")
                .expect("write");
            out.write_string(2, config_path).expect("write");
            out.write_uint32(7, 1).expect("write");
            out.flush().expect("flush");
        }
        Any {
            type_url: type_url.to_string(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn the_config_path_is_read_from_runtime_options() {
        let any = options(
            "types.containerd.io/runtimeoptions.v1.Options",
            "/etc/isola/x.toml",
        );
        assert_eq!(
            config_path(Some(&any)),
            Ok(Some("/etc/isola/x.toml".into()))
        );
        assert_eq!(
            config_path(Some(&options("runtimeoptions.v1.Options", ""))),
            Ok(None)
        );
    }

    #[test]
    fn other_options_are_ignored_and_garbage_is_an_error() {
        assert_eq!(config_path(None), Ok(None));
        let runc = options("containerd.runc.v1.Options", "/x");
        assert_eq!(config_path(Some(&runc)), Ok(None));
        let bad = Any {
            type_url: RUNTIME_OPTIONS_TYPE.into(),
            value: vec![0x12, 0x05, b'a'],
            ..Default::default()
        };
        assert!(config_path(Some(&bad)).is_err());
    }
}
