//! Build script: compiles `proto/` with protox (pure Rust, no system protoc) and tonic-prost-build,
//! and writes the file descriptor set used by server reflection and the config text-format parser.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] =
    &["inference/grpc_service.proto", "inference/model_config.proto", "neuronworker/v1/sessions.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let present: Vec<&str> = PROTOS.iter().copied().filter(|p| PathBuf::from("proto").join(p).exists()).collect();
    let fds = protox::compile(&present, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .compile_fds(fds)?;
    Ok(())
}
