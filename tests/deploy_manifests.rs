//! The deployment files under `deploy/` pass command-line flags to the
//! worker. This test keeps them honest: every `--flag` they use must be one
//! that `neuron-worker serve --help` lists, and the ports they expose must be
//! the ports of the worker's default addresses.
//!
//! No YAML parser: the flags are found by scanning the non-comment text of the
//! manifests (in those files `--` only occurs in container args) and the
//! `CMD` line of the Dockerfile. YAML documents that run another program (an
//! `image:` that is not neuron-worker: the endpoint picker, Valkey) are left
//! out; their flags are not the worker's.
//!
//! The fleet manifests (`deploy/gateway`) also name the worker's metrics (the
//! endpoint picker's configuration) and headers: those must be what a running
//! worker exports.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// The YAML manifests that start the worker, with their text.
fn manifests() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for sub in ["k8s", "kserve", "gateway"] {
        let dir = deploy_dir().join(sub);
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        entries.sort();
        for p in entries {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
            out.push((p, worker_documents(&text)));
        }
    }
    assert!(!out.is_empty(), "no manifests found under {}", deploy_dir().display());
    out
}

/// The `---`-separated YAML documents of `text` that do not run another
/// program: none of their `image:` lines names an image other than
/// `neuron-worker` (any registry, any tag).
fn worker_documents(text: &str) -> String {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.starts_with("---") {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    let other_program = |doc: &str| {
        doc.lines().map(strip_comment).any(|l| {
            l.trim().trim_start_matches("- ").strip_prefix("image:").is_some_and(|image| {
                let image = image.trim().trim_matches(['"', '\'']);
                !image.rsplit('/').next().unwrap_or(image).starts_with("neuron-worker")
            })
        })
    };
    docs.into_iter().filter(|d| !other_program(d)).collect::<Vec<_>>().join("---\n")
}

/// The text of a YAML (or Dockerfile) line with its comment removed.
fn strip_comment(line: &str) -> &str {
    let t = line.trim_start();
    if t.starts_with('#') {
        return "";
    }
    match line.find(" #") {
        Some(i) => &line[..i],
        None => line,
    }
}

fn is_flag_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

/// Every `--flag` in the non-comment text, with its value when written as
/// `--flag=value`, `--flag value` or `"--flag", "value"`.
fn flags_in(text: &str) -> Vec<(String, Option<String>)> {
    let lines: Vec<&str> = text.lines().map(strip_comment).collect();
    let mut out = Vec::new();
    for (n, code) in lines.iter().enumerate() {
        let mut rest = *code;
        while let Some(i) = rest.find("--") {
            let after = &rest[i + 2..];
            let end = after.find(|c: char| !is_flag_char(c)).unwrap_or(after.len());
            let name = &after[..end];
            rest = &after[end..];
            if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_lowercase()) {
                continue;
            }
            let value = if let Some(v) = rest.strip_prefix('=') {
                let v_end = v.find(['"', '\'', ',', ']', ' ']).unwrap_or(v.len());
                Some(v[..v_end].to_string())
            } else if rest.trim_matches(['"', '\'', ' ']).is_empty() {
                // YAML list: `- --flag` with the value as the next item.
                lines
                    .get(n + 1)
                    .and_then(|next| next.trim().strip_prefix("- "))
                    .map(|v| v.trim().trim_matches(['"', '\'']))
                    .filter(|v| !v.is_empty() && !v.starts_with('-'))
                    .map(str::to_string)
            } else {
                // `"--flag", "value"` (JSON array) or `--flag value`.
                let v = rest.trim_start_matches(['"', '\'']).trim_start_matches([',', ' ']);
                let v = v.trim_start_matches(['"', '\'']);
                let v_end = v.find(['"', '\'', ',', ']', ' ']).unwrap_or(v.len());
                let v = &v[..v_end];
                (!v.is_empty() && !v.starts_with('-')).then(|| v.to_string())
            };
            out.push((format!("--{name}"), value));
        }
    }
    out
}

/// The `CMD` line of the Dockerfile (the worker's default arguments).
fn dockerfile_cmd() -> String {
    let p = deploy_dir().join("Dockerfile");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    text.lines().filter(|l| l.trim_start().starts_with("CMD")).collect::<Vec<_>>().join("\n")
}

fn serve_help() -> String {
    let bin = env!("CARGO_BIN_EXE_neuron-worker");
    let out = Command::new(bin)
        .args(["serve", "--help"])
        .env_remove("NEURON_WORKER_GRPC_ADDR")
        .env_remove("NEURON_WORKER_METRICS_ADDR")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`neuron-worker serve --help` failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("--grpc-addr"),
        "`neuron-worker serve --help` does not look like the serve help:\n{stdout}"
    );
    stdout
}

/// Whether `flag` is listed in the help text as a whole word
/// (`--tls-cert` must not be found inside `--tls-cert-chain`).
fn help_has_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let before_ok = i == 0 || !is_flag_char(help[..i].chars().next_back().unwrap());
        let after = &help[i + flag.len()..];
        let after_ok = after.chars().next().is_none_or(|c| !is_flag_char(c));
        before_ok && after_ok
    })
}

/// The flags used in `sources` that the help text does not list.
fn unknown_flags(sources: &[(String, String)], help: &str) -> Vec<String> {
    let mut missing = BTreeSet::new();
    for (name, text) in sources {
        for (flag, _) in flags_in(text) {
            if !help_has_flag(help, &flag) {
                missing.insert(format!("{flag} (used in {name})"));
            }
        }
    }
    missing.into_iter().collect()
}

/// The `[default: ...]` value clap prints for `flag`, if any.
fn help_default(help: &str, flag: &str) -> Option<String> {
    let start = help
        .match_indices(flag)
        .find(|(i, _)| {
            let line_start = help[..*i].rfind('\n').map_or(0, |n| n + 1);
            // The option's own heading line, not a mention in another's text.
            help[line_start..*i].trim().is_empty() || help[line_start..*i].trim_end().ends_with(',')
        })?
        .0;
    // The option's block ends where the next option's heading begins
    // (`  -x, --long` or `      --long`).
    let tail = &help[start + flag.len()..];
    let block_end = [tail.find("\n  -"), tail.find("\n      --")]
        .into_iter()
        .flatten()
        .min()
        .map_or(help.len(), |n| start + flag.len() + n);
    let block = &help[start..block_end];
    let d = block.find("[default: ")?;
    let v = &block[d + "[default: ".len()..];
    Some(v[..v.find(']')?].trim().to_string())
}

fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')?.1.parse().ok()
}

fn sources() -> Vec<(String, String)> {
    let mut s: Vec<(String, String)> = manifests().into_iter().map(|(p, t)| (p.display().to_string(), t)).collect();
    s.push(("deploy/Dockerfile (CMD)".to_string(), dockerfile_cmd()));
    s
}

#[test]
fn deploy_flags_are_flags_of_the_worker() {
    let sources = sources();
    // The scan must see the flags every launcher needs, or it checks nothing.
    for (name, text) in &sources {
        let flags: Vec<String> = flags_in(text).into_iter().map(|(f, _)| f).collect();
        let starts_worker = text.contains("- serve") || text.contains("\"serve\"");
        if starts_worker {
            for needed in ["--grpc-addr", "--model-repository"] {
                assert!(flags.iter().any(|f| f == needed), "{name} starts the worker without {needed}: {flags:?}");
            }
        }
    }
    let used: usize = sources.iter().map(|(_, t)| flags_in(t).len()).sum();
    assert!(used >= 10, "found only {used} flags in the deploy files: the scanner is broken");

    let help = serve_help();
    let missing = unknown_flags(&sources, &help);
    assert!(
        missing.is_empty(),
        "deploy/ uses flags that `neuron-worker serve --help` does not list:\n  {}\n--- help ---\n{help}",
        missing.join("\n  ")
    );

    // NEURON_WORKER_* variables set in the manifests must be ones the worker reads.
    for (name, text) in &sources {
        for line in text.lines().map(strip_comment) {
            if let Some(i) = line.find("NEURON_WORKER_") {
                let var: String = line[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                assert!(help.contains(&var), "{name} sets {var}, which `serve --help` does not list");
            }
        }
    }
}

#[test]
fn deploy_ports_match_the_default_addresses() {
    let help = serve_help();
    let grpc_default = help_default(&help, "--grpc-addr").expect("serve --help shows no default for --grpc-addr");
    let metrics_default =
        help_default(&help, "--metrics-addr").expect("serve --help shows no default for --metrics-addr");
    let http_default = help_default(&help, "--http-addr").expect("serve --help shows no default for --http-addr");
    let grpc_port = port_of(&grpc_default).expect("default --grpc-addr has no port");
    let metrics_port = port_of(&metrics_default).expect("default --metrics-addr has no port");
    let http_port = port_of(&http_default).expect("default --http-addr has no port");
    assert_eq!(
        (grpc_port, metrics_port, http_port),
        (8001, 8002, 8000),
        "the deploy files are written for ports 8001, 8002 and 8000"
    );

    let mut seen_grpc = 0;
    for (name, text) in sources() {
        for (flag, value) in flags_in(&text) {
            let want = match flag.as_str() {
                "--grpc-addr" => grpc_port,
                "--metrics-addr" => metrics_port,
                "--http-addr" => http_port,
                _ => continue,
            };
            let value = value.unwrap_or_else(|| panic!("{name}: {flag} has no value"));
            assert!(
                value.starts_with("0.0.0.0:"),
                "{name}: {flag}={value} must listen on all interfaces in a container"
            );
            assert_eq!(port_of(&value), Some(want), "{name}: {flag}={value}, but the worker's default port is {want}");
            if flag == "--grpc-addr" {
                seen_grpc += 1;
                if name.ends_with(".yaml") {
                    assert!(
                        text.contains(&format!("containerPort: {grpc_port}")),
                        "{name}: no containerPort {grpc_port}"
                    );
                }
            }
        }
    }
    assert!(seen_grpc >= 3, "expected --grpc-addr in the Deployment, the ServingRuntime and the Dockerfile");

    let k8s = deploy_dir().join("k8s");
    let service = std::fs::read_to_string(k8s.join("service.yaml")).expect("deploy/k8s/service.yaml");
    for p in [grpc_port, metrics_port, http_port] {
        assert!(service.contains(&format!("port: {p}")), "service.yaml does not publish port {p}");
    }
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("deploy/Dockerfile");
    assert!(
        dockerfile.lines().any(|l| l.trim() == format!("EXPOSE {http_port} {grpc_port} {metrics_port}")),
        "Dockerfile does not EXPOSE {http_port} {grpc_port} {metrics_port}"
    );
}

/// The checks above must be able to fail: a manifest flag the worker lacks is
/// reported, and the scanner reads the forms the manifests use.
#[test]
fn scanner_reports_flags_the_worker_lacks() {
    let manifest = "\
# --not-checked: comments are skipped
args:
  - serve
  - --grpc-addr=0.0.0.0:8001
  - --model-repository
  - /models
  - --frobnicate=3   # a flag the worker does not have
";
    let cmd = r#"CMD ["serve", "--grpc-addr", "0.0.0.0:8001", "--tls-cert-chain", "x"]"#;
    let flags = flags_in(manifest);
    assert_eq!(
        flags,
        vec![
            ("--grpc-addr".to_string(), Some("0.0.0.0:8001".to_string())),
            ("--model-repository".to_string(), Some("/models".to_string())),
            ("--frobnicate".to_string(), Some("3".to_string())),
        ]
    );
    assert_eq!(flags_in(cmd)[0], ("--grpc-addr".to_string(), Some("0.0.0.0:8001".to_string())));

    let help = "\
Usage: neuron-worker serve [OPTIONS]

Options:
      --grpc-addr <GRPC_ADDR>
          gRPC listen address [env: NEURON_WORKER_GRPC_ADDR=] [default: 127.0.0.1:8001]
      --model-repository <DIR>
          Model repository [env: NEURON_WORKER_MODEL_REPOSITORY=]
      --tls-cert <PEM>
          Server certificate
  -h, --help
          Print help
";
    let sources = vec![("m.yaml".to_string(), manifest.to_string()), ("Dockerfile".to_string(), cmd.to_string())];
    assert_eq!(
        unknown_flags(&sources, help),
        vec!["--frobnicate (used in m.yaml)".to_string(), "--tls-cert-chain (used in Dockerfile)".to_string()]
    );
    assert_eq!(help_default(help, "--grpc-addr").as_deref(), Some("127.0.0.1:8001"));
    assert_eq!(help_default(help, "--model-repository"), None);
}

/// The fleet overlay passes the shared store to the worker, and the other
/// programs' flags (endpoint picker, Valkey) are not mistaken for the worker's.
#[test]
fn gateway_overlay_sets_the_session_store() {
    let gateway = deploy_dir().join("gateway");
    let kustomization =
        std::fs::read_to_string(gateway.join("kustomization.yaml")).expect("deploy/gateway/kustomization.yaml");
    let flags = flags_in(&worker_documents(&kustomization));
    let store = flags.iter().find(|(f, _)| f == "--session-store").and_then(|(_, v)| v.clone());
    assert_eq!(store.as_deref(), Some("redis://neuron-worker-sessions:6379/0"), "flags of the overlay: {flags:?}");

    let picker =
        std::fs::read_to_string(gateway.join("endpoint-picker.yaml")).expect("deploy/gateway/endpoint-picker.yaml");
    assert!(
        flags_in(&picker).iter().any(|(f, _)| f == "--pool-name"),
        "the scan must see the picker's flags in the raw text"
    );
    assert!(
        flags_in(&worker_documents(&picker)).is_empty(),
        "the picker's documents must be left out of the worker flag check"
    );
    let store = std::fs::read_to_string(gateway.join("session-store.yaml")).expect("deploy/gateway/session-store.yaml");
    assert!(
        flags_in(&worker_documents(&store)).is_empty(),
        "Valkey's documents must be left out of the worker flag check"
    );
    let mixed = "image: neuron-worker:1\nargs: [serve, --grpc-addr=0.0.0.0:8001]\n---\nimage: ghcr.io/x/epp:v1\nargs: [--pool-name=p]\n";
    assert_eq!(flags_in(&worker_documents(mixed)), vec![("--grpc-addr".to_string(), Some("0.0.0.0:8001".to_string()))]);
}

/// Every `neuron_worker_*` metric the endpoint picker is configured to read is
/// one a running worker exports (the built-in generative model `tiny_decoder`
/// included), and the worker names itself in `x-worker-id`.
#[tokio::test]
async fn gateway_picker_reads_metrics_the_worker_exports() {
    let config = std::fs::read_to_string(deploy_dir().join("gateway").join("endpoint-picker-config.yaml"))
        .expect("deploy/gateway/endpoint-picker-config.yaml");
    let mut wanted = BTreeSet::new();
    for line in config.lines().map(strip_comment) {
        let mut rest = line;
        while let Some(i) = rest.find("neuron_worker_") {
            let name: String =
                rest[i..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
            rest = &rest[i + name.len()..];
            wanted.insert(name);
        }
    }
    for needed in [
        "neuron_worker_num_requests_waiting",
        "neuron_worker_num_requests_running",
        "neuron_worker_kv_cache_usage_perc",
    ] {
        assert!(wanted.contains(needed), "the picker config does not read {needed}: {wanted:?}");
    }

    let worker = common::start().await;
    let addr = worker.server.metrics_addr.expect("metrics address").to_string();
    let reply = common::http_get(&addr, "/metrics").await;
    let exported: BTreeSet<&str> =
        reply.lines().filter(|l| l.starts_with("neuron_worker_")).filter_map(|l| l.split(['{', ' ']).next()).collect();
    let missing: Vec<&String> = wanted.iter().filter(|m| !exported.contains(m.as_str())).collect();
    assert!(
        missing.is_empty(),
        "the picker config reads metrics the worker does not export: {missing:?}\nexported: {exported:?}"
    );
    assert!(
        reply.lines().any(|l| l.eq_ignore_ascii_case("x-worker-id: test-worker")),
        "the metrics response does not carry x-worker-id:\n{}",
        reply.lines().take(12).collect::<Vec<_>>().join("\n")
    );
    worker.server.shutdown.cancel();
}
