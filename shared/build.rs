//! Compiles the `.proto` files in `proto/` with protox, a protobuf compiler
//! written in Rust, so that a fresh machine builds without `protoc`.

use std::path::PathBuf;

use prost::Message;

const PROTOS: [&str; 2] = ["inference/grpc_predict_v2.proto", "moge/v1/moge.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|file| root.join(file)).collect();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&root])?;

    // The encoded descriptors serve gRPC server reflection.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("moge_descriptor.bin"), descriptors.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Tensor payloads as `bytes::Bytes`, so decoding shares the request buffer.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
