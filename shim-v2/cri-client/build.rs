// Generates the CRI messages (runtime.v1, vendored from the Kubernetes CRI
// API) with the pure-Rust protobuf parser: no protoc needed.
fn main() {
    protobuf_codegen::Codegen::new()
        .pure()
        .include("proto")
        .input("proto/api.proto")
        .cargo_out_dir("cri")
        .run_from_script();
}
