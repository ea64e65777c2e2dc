//! Compiles the Open Inference Protocol service definition without needing `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not baked in at compile time: a build script compiled in one checkout
    // and reused from another (a copied target folder) must still find this checkout's protos.
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let proto_dir = format!("{manifest}/../../proto");
    let protos = [format!("{proto_dir}/grpc_service.proto"), format!("{proto_dir}/agent.proto")];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(&protos, [proto_dir.as_str()])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
