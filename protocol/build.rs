//! Generates the agent API's Rust code from `protos/*.proto` with
//! ttrpc-codegen's pure-Rust protobuf parser (no `protoc` needed): the
//! messages (rust-protobuf 3) and async ttrpc clients and servers.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTO_DIR: &str = "protos";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_DIR}");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);

    // Every .proto file of the directory, in a stable order: a new file
    // (for instance a future service of isola.agent.v1) needs no change
    // here, only its module in src/lib.rs.
    let mut inputs = Vec::new();
    for entry in fs::read_dir(PROTO_DIR)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "proto") {
            println!("cargo:rerun-if-changed={}", path.display());
            inputs.push(path);
        }
    }
    inputs.sort();
    if inputs.is_empty() {
        return Err(format!("no .proto file in {PROTO_DIR}/").into());
    }

    Codegen::new()
        .out_dir(&out_dir)
        .include(PROTO_DIR)
        .inputs(&inputs)
        .rust_protobuf()
        .rust_protobuf_customize(
            ProtobufCustomize::default()
                .gen_mod_rs(false)
                .generate_accessors(true),
        )
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
        .map_err(|err| format!("generating Rust code from {PROTO_DIR}/*.proto: {err}"))?;

    for input in &inputs {
        let stem = input
            .file_stem()
            .and_then(|stem| stem.to_str())
            .ok_or_else(|| format!("{}: file name is not UTF-8", input.display()))?;
        strip_inner_attributes(&out_dir.join(format!("{stem}.rs")))?;
        strip_inner_attributes(&out_dir.join(format!("{stem}_ttrpc.rs")))?;
    }
    Ok(())
}

/// `include!` cannot take a file with inner attributes or inner doc
/// comments (rust-lang/rust#18810); the generated files start with some.
/// The lints they allowed are allowed on the including module instead.
fn strip_inner_attributes(path: &Path) -> Result<(), Box<dyn Error>> {
    let Ok(text) = fs::read_to_string(path) else {
        // A .proto file without services has no _ttrpc.rs.
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            let line = line.trim_start();
            !line.starts_with("#!") && !line.starts_with("//!")
        })
        .collect();
    fs::write(path, kept.join("\n") + "\n")
        .map_err(|err| format!("rewriting {}: {err}", path.display()))?;
    Ok(())
}
