//! NEFF reader tests: the real compiler fixture, damaged files, and writer → reader round trips.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::path::PathBuf;

use neuron_worker::neff::writer::{DenseLayer, assemble};
use neuron_worker::neff::{
    Activation, HEADER_LEN, NeffBuilder, NeffError, ProgramOp, parse_neff, read_neff, render_json, render_table,
};
use serde_json::json;

fn fixture() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/neff/matmul_small.neff");
    if path.exists() {
        Some(path)
    } else {
        eprintln!("NOTICE: {} is absent; skipping the real-NEFF test", path.display());
        None
    }
}

fn small_neff() -> Vec<u8> {
    NeffBuilder::new("small.neff")
        .input("a", "float32", &[2, 3])
        .output("b", "float32", &[2, 3])
        .op(ProgramOp::Copy { input: "a".into(), output: "b".into() })
        .build()
        .expect("builder input is valid")
}

#[test]
fn real_fixture_header_and_tensors() {
    let Some(path) = fixture() else { return };
    let info = read_neff(&path).expect("the fixture parses");
    let h = &info.header;
    assert_eq!(h.pkg_version, 2);
    assert_eq!(h.header_size, 1024);
    assert_eq!(h.data_size, 62464 - 1024);
    assert_eq!((h.neff_version_major, h.neff_version_minor), (2, 0));
    assert_eq!(h.name, "file.neff");
    assert_eq!(h.lnc_size, 2);
    assert_eq!(h.num_tpb, 1);
    assert_eq!(h.requested_tpb_count, 1);
    assert_eq!(h.uuid_hex(), "00a04c535fd94f07bffdd5eacdefc852");

    let names: Vec<&str> = info.inputs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["x", "y"]);
    let x = &info.inputs[0];
    assert_eq!(x.dtype.as_deref(), Some("float16"));
    assert_eq!(x.shape, Some(vec![128, 256]));
    assert_eq!(x.size_bytes, Some(65536));
    assert_eq!(neuron_worker::neff::tensor_data_type(x), Some(neuron_worker::tensor::DataType::Fp16));
    let y = &info.inputs[1];
    assert_eq!(y.shape, Some(vec![256, 128]));
    assert_eq!(y.size_bytes, Some(65536));

    assert_eq!(info.outputs.len(), 1, "output0 is declared in sg00 and sg01 but reported once");
    let out = &info.outputs[0];
    assert_eq!(out.name, "output0");
    assert_eq!(out.size_bytes, Some(32768));
    assert_eq!((out.dtype.as_ref(), out.shape.as_ref()), (None, None));

    let doc = render_json(&info);
    assert_eq!(doc["header"]["name"], "file.neff");
    assert_eq!(doc["header"]["lnc_size"], 2);
    assert_eq!(doc["outputs"], json!([{"name": "output0", "dtype": null, "shape": null, "size_bytes": 32768}]));
    assert_eq!(doc["inputs"][0], json!({"name": "x", "dtype": "float16", "shape": [128, 256], "size_bytes": 65536}));
    let table = render_table(&info);
    assert!(table.contains("file.neff"), "{table}");
    assert!(table.contains("float16  [128, 256]  65536"), "{table}");
    assert!(table.contains("output0"), "{table}");
}

#[test]
fn header_shorter_than_1024_bytes_is_truncated_header() {
    let bytes = small_neff();
    let err = parse_neff(&bytes[..1000], "short.neff").expect_err("must fail");
    assert!(matches!(err, NeffError::TruncatedHeader { len: 1000, .. }), "{err}");
    assert!(err.to_string().contains("short.neff"));
}

#[test]
fn payload_shorter_than_data_size_is_truncated_payload() {
    let bytes = small_neff();
    let cut = bytes.len() - 10;
    let err = parse_neff(&bytes[..cut], "cut.neff").expect_err("must fail");
    match err {
        NeffError::TruncatedPayload { expected, actual, .. } => {
            assert_eq!(expected, bytes.len() as u64);
            assert_eq!(actual, cut as u64);
        }
        other => panic!("wrong error: {other}"),
    }
}

#[test]
fn huge_data_size_is_refused_without_allocating() {
    let mut bytes = small_neff();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = parse_neff(&bytes, "huge.neff").expect_err("must fail");
    assert!(matches!(err, NeffError::TruncatedPayload { expected: u64::MAX, .. }), "{err}");
}

#[test]
fn header_size_below_1024_is_bad_header() {
    let mut bytes = small_neff();
    bytes[8..16].copy_from_slice(&16u64.to_le_bytes());
    let err = parse_neff(&bytes, "bad.neff").expect_err("must fail");
    assert!(matches!(err, NeffError::BadHeader { .. }), "{err}");
}

#[test]
fn payload_that_is_not_gzip_is_bad_gzip() {
    let mut bytes = small_neff();
    bytes[HEADER_LEN] = b'P';
    let err = parse_neff(&bytes, "nogzip.neff").expect_err("must fail");
    assert!(matches!(err, NeffError::BadGzip { .. }), "{err}");

    let mut bytes = small_neff();
    let mid = HEADER_LEN + 20;
    for b in &mut bytes[mid..mid + 40] {
        *b ^= 0x5a;
    }
    let err = parse_neff(&bytes, "corrupt.neff").expect_err("must fail");
    assert!(matches!(err, NeffError::BadGzip { .. }), "{err}");
}

#[test]
fn gzip_of_garbage_is_bad_tar() {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&[7u8; 1500]).expect("in-memory write");
    let payload = gz.finish().expect("in-memory gzip");
    let mut bytes = small_neff()[..HEADER_LEN].to_vec();
    bytes[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&payload);
    let err = parse_neff(&bytes, "notar.neff").expect_err("must fail");
    assert!(matches!(err, NeffError::BadTar { .. }), "{err}");
}

#[test]
fn archive_without_neff_json_is_missing_neff_json() {
    let bytes = assemble("x.neff", 1, &[("sg00/def.json", b"{\"var\": {}}")]).expect("in memory");
    let err = parse_neff(&bytes, "nojson.neff").expect_err("must fail");
    assert!(matches!(err, NeffError::MissingNeffJson { .. }), "{err}");
    assert!(err.to_string().contains("nojson.neff"));
}

#[test]
fn invalid_json_is_bad_json_naming_the_entry() {
    let bytes = assemble("x.neff", 1, &[("neff.json", b"{not json")]).expect("in memory");
    let err = parse_neff(&bytes, "badjson.neff").expect_err("must fail");
    match err {
        NeffError::BadJson { entry, .. } => assert_eq!(entry, "neff.json"),
        other => panic!("wrong error: {other}"),
    }
}

#[test]
fn missing_file_is_io_error() {
    let err = read_neff("/nonexistent/model.neff").expect_err("must fail");
    assert!(matches!(err, NeffError::Io { .. }), "{err}");
}

#[test]
fn writer_round_trip_linear() {
    let weight: Vec<f32> = (0..64 * 16).map(|i| i as f32 / 100.0).collect();
    let layer = DenseLayer {
        weight,
        bias: Some(vec![0.5; 16]),
        in_features: 64,
        out_features: 16,
        activation: Activation::None,
    };
    let builder = NeffBuilder::dense_chain("linear_b8", 8, "INPUT0", "OUTPUT0", &[layer]);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("linear.neff");
    builder.write_to(&path).expect("writes");
    let bytes = std::fs::read(&path).expect("reads back");
    let info = read_neff(&path).expect("parses");
    assert_eq!(info.header.pkg_version, 2);
    assert_eq!(info.header.header_size, 1024);
    assert_eq!(info.header.data_size, bytes.len() as u64 - 1024);
    assert_eq!(info.header.name, "linear_b8");
    assert_eq!(info.inputs.len(), 1);
    assert_eq!(info.inputs[0].name, "INPUT0");
    assert_eq!(info.inputs[0].dtype.as_deref(), Some("float32"));
    assert_eq!(info.inputs[0].shape, Some(vec![8, 64]));
    assert_eq!(info.inputs[0].size_bytes, Some(8 * 64 * 4));
    assert_eq!(info.outputs[0].name, "OUTPUT0");
    assert_eq!(info.outputs[0].shape, Some(vec![8, 16]));
    assert_eq!(info.outputs[0].size_bytes, Some(8 * 16 * 4));

    let payload = &bytes[HEADER_LEN..];
    let entries = neuron_worker::neff::archive::read_entries(payload, "linear", |p| p.starts_with("standin/"))
        .expect("archive reads");
    let program: serde_json::Value = serde_json::from_slice(&entries["standin/program.json"]).expect("program is JSON");
    assert_eq!(program["version"], 1);
    assert_eq!(program["ops"][0]["op"], "dense");
    assert_eq!(program["ops"][0]["activation"], "none");
    assert_eq!(program["blobs"]["w0"]["shape"], json!([64, 16]));
    assert_eq!(entries["standin/w0.bin"].len(), 64 * 16 * 4);
    assert_eq!(entries["standin/b0.bin"][..4], 0.5f32.to_le_bytes());
}

#[test]
fn writer_rejects_inconsistent_programs() {
    let err = NeffBuilder::new("bad")
        .input("a", "float32", &[2, 3])
        .output("b", "float32", &[2, 4])
        .op(ProgramOp::Copy { input: "a".into(), output: "b".into() })
        .build()
        .expect_err("6 values cannot fill 8");
    assert!(matches!(err, NeffError::InvalidBuild { .. }), "{err}");

    let err = NeffBuilder::new("bad")
        .input("a", "float32", &[2, 3])
        .output("b", "float32", &[2, 3])
        .op(ProgramOp::Add { a: "a".into(), b: "missing".into(), output: "b".into() })
        .build()
        .expect_err("unknown buffer");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn tensors_without_signature_come_from_def_json_only() {
    let def = br#"{"var": {"w": {"type": "file", "size": 8, "var_id": 0},
                  "in1": {"type": "input", "size": 12, "var_id": 2},
                  "in0": {"type": "input", "size": 4, "var_id": 1},
                  "out": {"type": "output", "size": 16, "var_id": 3}}}"#;
    let bytes = assemble("d.neff", 1, &[("neff.json", b"{}"), ("./sg00/def.json", def)]).expect("in memory");
    let info = parse_neff(&bytes, "d.neff").expect("parses");
    let inputs: Vec<(&str, Option<u64>)> = info.inputs.iter().map(|t| (t.name.as_str(), t.size_bytes)).collect();
    assert_eq!(inputs, [("in0", Some(4)), ("in1", Some(12))]);
    assert_eq!(info.outputs.len(), 1);
    assert_eq!(info.outputs[0].size_bytes, Some(16));
    assert_eq!(info.outputs[0].dtype, None);
}

#[test]
fn standin_library_is_built_next_to_the_tests() {
    let path = nrt_standin::standin_library_path().expect("cargo test builds libnrt_standin.so");
    assert!(path.ends_with("libnrt_standin.so"), "{}", path.display());
}

/// The writer's output runs on the stand-in runtime (same program format on both sides).
#[test]
fn written_mlp_runs_on_the_standin() {
    use nrt_standin::abi::NRT_SUCCESS;
    use nrt_standin::runtime::Runtime;
    let dims = [(256u64, 1024u64, Activation::Gelu), (1024, 1024, Activation::Gelu), (1024, 256, Activation::None)];
    let layers: Vec<DenseLayer> = dims
        .iter()
        .enumerate()
        .map(|(l, &(i, o, activation))| DenseLayer {
            weight: (0..i * o).map(|k| (((k * 7 + l as u64) % 11) as f32 - 5.0) / 200.0).collect(),
            bias: Some((0..o).map(|j| (j % 3) as f32 / 10.0).collect()),
            in_features: i,
            out_features: o,
            activation,
        })
        .collect();
    let batch = 2usize;
    let neff =
        NeffBuilder::dense_chain("mlp_b2", batch as u64, "INPUT0", "OUTPUT0", &layers).build().expect("valid mlp");
    let x: Vec<f32> = (0..batch * 256).map(|k| ((k % 9) as f32 - 4.0) / 4.0).collect();
    // Naive reference.
    let gelu = |v: f32| {
        let v = f64::from(v);
        (0.5 * v * (1.0 + nrt_standin::program::erf(v / std::f64::consts::SQRT_2))) as f32
    };
    let mut h = x.clone();
    for layer in &layers {
        let (i, o) = (layer.in_features as usize, layer.out_features as usize);
        let bias = layer.bias.as_deref().unwrap_or_default();
        h = h
            .chunks(i)
            .flat_map(|row| {
                (0..o).map(move |j| {
                    let v = bias[j] + (0..i).map(|k| row[k] * layer.weight[k * o + j]).sum::<f32>();
                    if layer.activation == Activation::Gelu { gelu(v) } else { v }
                })
            })
            .collect();
    }
    let rt = Runtime::default();
    assert_eq!(rt.init(nrt_standin::knobs::Knobs::default()), NRT_SUCCESS);
    let model = rt.load(&neff, 0, 1).expect("stand-in loads the written NEFF");
    let input = rt.tensor_allocate(0, 0, batch * 256 * 4, "INPUT0").expect("alloc");
    let output = rt.tensor_allocate(0, 0, batch * 256 * 4, "OUTPUT0").expect("alloc");
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(rt.tensor(input).expect("tensor").write(0, &bytes), NRT_SUCCESS);
    let (ins, outs) = (rt.set_allocate().expect("set"), rt.set_allocate().expect("set"));
    assert_eq!(rt.set_add(ins, "INPUT0", input), NRT_SUCCESS);
    assert_eq!(rt.set_add(outs, "OUTPUT0", output), NRT_SUCCESS);
    assert_eq!(rt.execute(model, ins, outs, 1), NRT_SUCCESS);
    let mut y = vec![0u8; batch * 256 * 4];
    assert_eq!(rt.tensor(output).expect("tensor").read(0, &mut y), NRT_SUCCESS);
    let y: Vec<f32> = y.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    for (k, (a, b)) in y.iter().zip(&h).enumerate() {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "element {k}: {a} vs {b}");
    }
}
