// Generates runtimeoptions.v1.Options, the message containerd's CRI plugin
// passes as runtime options, with the pure-Rust protobuf parser (no protoc
// needed), as the CRI test client's messages are.
fn main() {
    protobuf_codegen::Codegen::new()
        .pure()
        .include("proto")
        .input("proto/runtimeoptions.proto")
        .cargo_out_dir("runtimeoptions")
        .run_from_script();
}
