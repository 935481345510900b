#!/usr/bin/env python3
"""Generation speed, ours vs llama.cpp, on the same GGUF and thread count, run alternately.

    ~/.cache/llm-reference/llama/bin/python examples/generation_llamacpp_compare.py [MODEL.gguf] \
        [--threads 2] [--reps 5] [--prompt 512] [--decode 64] [--streams 16] [--ours BIN] [--baseline BIN]

(llama-cpp-python in that venv; MODEL defaults to $SMOLLM2_GGUF or
~/.cache/llm-reference/SmolLM2-135M-Instruct.Q4_1.gguf.) Builds
`cargo build --release --example gguf_generation_bench` (our side: the model called directly, no
server; NEURON_WORKER_ISA=avx2 in the environment caps our kernels at AVX2), then alternates, --reps
times: one run of ours, one of llama.cpp (n_threads = n_threads_batch = --threads): a --prompt-token
prompt processed in one batch (n_batch = n_ubatch = prompt) and --decode greedy decode tokens.
llama.cpp runs without its extra buffer types (repacking/AMX crash in llama_decode on some
AVX-512 machines with the reference build) and with OMP_WAIT_POLICY=passive unless set.
Ours also decodes --streams sequences together (one token each per step). Medians over the
repetitions are printed as `generation: <figure> ours X, llama.cpp Y, ratio Z` lines, with the
load average before and after (other work on the machine slows both sides) and the decode roofline
(weights read per token over the triad bandwidth measured by our example on the same machine).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time



class LlamaCpp:
    def __init__(self, path, threads, prompt_len, decode_len):
        import llama_cpp
        import numpy as np

        # llama.cpp's extra buffer types (weight repacking, AMX) crash inside llama_decode on some
        # AVX-512 machines with this build; the plain CPU buffers run the same kernels otherwise.
        default_params = llama_cpp.llama_model_default_params

        def params():
            p = default_params()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama_model_default_params = params
        llama_cpp.llama.llama_cpp.llama_model_default_params = params
        self.np = np
        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=prompt_len + decode_len + 8, n_threads=threads,
                                   n_threads_batch=threads, n_batch=prompt_len, n_ubatch=prompt_len,
                                   verbose=False)
        self.vocab = self.llm.n_vocab()
        self.prompt = [100 + (i * 7919) % (self.vocab - 200) for i in range(prompt_len)]
        self.decode_len = decode_len
        self.run()  # warm-up

    def argmax_last(self):
        """Greedy token from the last evaluated position's logits (`scores` is only filled with
        logits_all)."""
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(self.np.ctypeslib.as_array(ptr, shape=(self.vocab,)).argmax())

    def run(self):
        """(prompt tok/s, decode tok/s, median decode step s) of one repetition."""
        llm = self.llm
        llm.reset()
        t = time.perf_counter()
        llm.eval(self.prompt)
        prefill = time.perf_counter() - t
        tok = self.argmax_last()
        steps = []
        t = time.perf_counter()
        for _ in range(self.decode_len):
            s = time.perf_counter()
            llm.eval([tok])
            steps.append(time.perf_counter() - s)
            tok = self.argmax_last()
        decode = time.perf_counter() - t
        return len(self.prompt) / prefill, self.decode_len / decode, statistics.median(steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=os.environ.get(
        "SMOLLM2_GGUF", os.path.expanduser("~/.cache/llm-reference/SmolLM2-135M-Instruct.Q4_1.gguf")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--ours", help="a build of gguf_generation_bench to run as ours instead of building it")
    ap.add_argument("--baseline", help="another build of gguf_generation_bench (e.g. of an older commit) run "
                    "alternately too; its medians are printed beside ours")
    ap.add_argument("--llamacpp-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.llamacpp_child:
        # One llama.cpp repetition in its own process, so that a crash of the library is reported
        # instead of ending the comparison.
        print(json.dumps(LlamaCpp(a.model, a.threads, a.prompt, a.decode).run()))
        return 0
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = dict(os.environ, NEURON_WORKER_QUANT_THREADS=str(a.threads), NEURON_WORKER_LINEAR_THREADS=str(a.threads))
    if a.ours:
        exe = a.ours
    else:
        subprocess.run(["cargo", "build", "--release", "--example", "gguf_generation_bench"], cwd=root, check=True)
        exe = os.path.join(root, "target", "release", "examples", "gguf_generation_bench")
    load_before = os.getloadavg()
    ours, theirs, failures, base = [], [], [], []
    child = [sys.executable, os.path.abspath(__file__), a.model, "--threads", str(a.threads), "--prompt", str(a.prompt),
             "--decode", str(a.decode), "--llamacpp-child"]
    def run_ours(binary):
        return json.loads(subprocess.run([binary, a.model, str(a.prompt), str(a.decode), str(a.streams)], env=env,
                                         check=True, capture_output=True, text=True).stdout)

    for _ in range(a.reps):
        ours.append(run_ours(exe))
        if a.baseline:
            base.append(run_ours(a.baseline))
        # OpenMP workers that spin (the default) collapse when other work shares the cores.
        r = subprocess.run(child, capture_output=True, text=True,
                           env=dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "passive")))
        if r.returncode == 0:
            theirs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        else:
            failures.append(f"exit status {r.returncode} ({r.stderr.strip()[-200:]})")
    if not theirs:
        print(f"llama.cpp failed on every repetition: {failures[0]}; figures of ours only", file=sys.stderr)
        theirs = [(float("nan"),) * 3]
    load_after = os.getloadavg()
    med = lambda xs: statistics.median(xs)
    o = {k: med([r[k] for r in ours]) for k in ["prompt_tok_s", "decode_tok_s", "decode_step_p50_s",
                                                 "streams_total_tok_s", "streams_step_p99_s", "triad_bytes_s"]}
    pp, tg, step = (med([r[i] for r in theirs]) for i in range(3))
    isa = f"{ours[0]['isa']} quantized / {ours[0]['f32_isa']} f32"
    print(f"model {os.path.basename(a.model)}, {a.threads} threads, our kernels: {isa}, "
          f"medians of {a.reps} alternating repetitions; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    lines = [
        ("single-stream decode tok/s", o["decode_tok_s"], tg),
        (f"prompt processing {a.prompt} tokens tok/s", o["prompt_tok_s"], pp),
        (f"{a.streams}-stream total decode tok/s (vs llama.cpp single stream)", o["streams_total_tok_s"], tg),
        (f"inter-token latency ms, ours p99 at {a.streams} streams vs llama.cpp single-stream median",
         1e3 * o["streams_step_p99_s"], 1e3 * step),
    ]
    for name, x, y in lines:
        print(f"generation: {name} ours {x:.2f}, llama.cpp {y:.2f}, ratio {x / y:.2f}")
    print(f"ITL check: our p99 step at {a.streams} streams {1e3 * o['streams_step_p99_s']:.2f} ms / our single-stream "
          f"median {1e3 * o['decode_step_p50_s']:.2f} ms = {o['streams_step_p99_s'] / o['decode_step_p50_s']:.2f} "
          f"(target <= 2)")
    if base:
        b = {k: med([r[k] for r in base]) for k in o}
        print(f"baseline {a.baseline}: prompt {b['prompt_tok_s']:.2f} tok/s (ours {o['prompt_tok_s']:.2f}), decode "
              f"{b['decode_tok_s']:.2f} tok/s (ours {o['decode_tok_s']:.2f}), {a.streams}-stream total "
              f"{b['streams_total_tok_s']:.2f} tok/s (ours {o['streams_total_tok_s']:.2f}), p99 step at {a.streams} "
              f"streams / single-stream median {b['streams_step_p99_s'] / b['decode_step_p50_s']:.2f} "
              f"(ours {o['streams_step_p99_s'] / o['decode_step_p50_s']:.2f})")
    weights = ours[0]["weight_bytes_per_token"]
    roof = o["triad_bytes_s"] / weights
    print(f"generation: decode fraction of the bandwidth roofline ({weights / 1e6:.1f} MB/token, triad "
          f"{o['triad_bytes_s'] / 1e9:.1f} GB/s, bound {roof:.0f} tok/s) ours {o['decode_tok_s'] / roof:.2f}, "
          f"llama.cpp {tg / roof:.2f}, ratio {o['decode_tok_s'] / tg:.2f}")
    print("per repetition (ours decode, llama.cpp decode, ours prompt, llama.cpp prompt, ours 16-stream):")
    for r, t in zip(ours, theirs):
        print(f"  {r['decode_tok_s']:.1f} {t[1]:.1f} {r['prompt_tok_s']:.1f} {t[0]:.1f} {r['streams_total_tok_s']:.1f}")


if __name__ == "__main__":
    sys.exit(main())
