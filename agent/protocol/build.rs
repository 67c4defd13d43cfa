use std::path::Path;
use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

/// Generated files start with inner attributes and inner doc comments,
/// which `include!` cannot take; lib.rs carries those allowances on the modules it
/// wraps the files in, so they are dropped here.
fn strip_inner_attributes(path: &Path) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.starts_with("#![") && !l.starts_with("//!")
        })
        .collect();
    std::fs::write(path, kept.join("\n"))
}

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    let out_dir = std::env::var("OUT_DIR").map_err(std::io::Error::other)?;
    Codegen::new()
        .out_dir(&out_dir)
        .input("proto/agent.proto")
        .include("proto")
        .rust_protobuf()
        .customize(Customize::default())
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()?;
    for file in ["agent.rs", "agent_ttrpc.rs"] {
        strip_inner_attributes(&Path::new(&out_dir).join(file))?;
    }
    Ok(())
}
