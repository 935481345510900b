#!/usr/bin/env python3
"""Generation speed, ours vs llama.cpp, on the same GGUF and thread count, run side by side.

    ~/.cache/llm-reference/llama/bin/python examples/generation_llamacpp_compare.py [MODEL.gguf] [--threads 2]

(llama-cpp-python in that venv; MODEL defaults to $SMOLLM2_GGUF or
~/.cache/llm-reference/SmolLM2-135M-Instruct.Q4_1.gguf.) Builds and runs
`cargo run --release --example gguf_generation_bench` for our side (NEURON_WORKER_QUANT_ISA can cap it
at avx2), then llama.cpp with n_threads = --threads: a 512-token prompt processed in one batch
(n_batch = n_ubatch = 512) and 64 greedy decode tokens. Prints
`generation: <figure> ours X, llama.cpp Y, ratio Z` lines and the decode roofline.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import llama_cpp


def llamacpp(path, threads, prompt_len, decode_len):
    llm = llama_cpp.Llama(model_path=path, n_ctx=prompt_len + decode_len + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=prompt_len, n_ubatch=prompt_len, verbose=False)
    vocab = llm.n_vocab()
    prompt = [100 + (i * 7919) % (vocab - 200) for i in range(prompt_len)]
    best = float("inf")
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        best = min(best, time.perf_counter() - t)
    tok = int(max(range(vocab), key=lambda i: llm.scores[llm.n_tokens - 1][i]))
    t = time.perf_counter()
    for _ in range(decode_len):
        llm.eval([tok])
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
    decode = time.perf_counter() - t
    return prompt_len / best, decode_len / decode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=os.environ.get(
        "SMOLLM2_GGUF", os.path.expanduser("~/.cache/llm-reference/SmolLM2-135M-Instruct.Q4_1.gguf")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    a = ap.parse_args()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, NEURON_WORKER_QUANT_THREADS=str(a.threads), NEURON_WORKER_LINEAR_THREADS=str(a.threads))
    subprocess.run(["cargo", "build", "--release", "--example", "gguf_generation_bench"], cwd=root, check=True)
    ours = json.loads(subprocess.run(
        [os.path.join(root, "target", "release", "examples", "gguf_generation_bench"), a.model, str(a.prompt),
         str(a.decode)], env=env, check=True, capture_output=True, text=True).stdout)
    pp, tg = llamacpp(a.model, a.threads, a.prompt, a.decode)
    print(f"model {os.path.basename(a.model)}, {a.threads} threads, our kernels: {ours['isa']}")
    for name, o, l in [(f"prompt processing {a.prompt} tokens (tok/s)", ours["prompt_tok_s"], pp),
                       ("single-stream decode (tok/s)", ours["decode_tok_s"], tg)]:
        print(f"generation: {name} ours {o:.1f}, llama.cpp {l:.1f}, ratio {o / l:.2f}")
    print(f"roofline: {ours['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token, triad "
          f"{ours['triad_bytes_s'] / 1e9:.1f} GB/s -> {ours['roofline_decode_tok_s']:.0f} tok/s bound; ours at "
          f"{100 * ours['decode_tok_s'] / ours['roofline_decode_tok_s']:.0f}%, llama.cpp at "
          f"{100 * tg / ours['roofline_decode_tok_s']:.0f}%")


if __name__ == "__main__":
    sys.exit(main())
