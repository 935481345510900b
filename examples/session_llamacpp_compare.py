#!/usr/bin/env python3
"""The kept-session turn, llama.cpp's side: time to first token of 16 tokens appended to a kept K/V
cache of H tokens (llama.cpp keeps the context in its KV cache between evals, as our sessions do).

    ~/.cache/llm-reference/llama/bin/python examples/session_llamacpp_compare.py [MODEL.gguf] \
        [--threads 2] [--reps 3] [--history 1024 2048]

Ours: `cargo run --release --example session_bench -- MODEL H...` (the "kept session" figure).
For each H: evaluate H history tokens once (not timed), then --reps times: evaluate 16 new tokens
on top of the kept cache and take the logits of the last one (timed), then remove those 16 from
the cache again. Prints `sessions: llama.cpp ttft after H tokens of history (+16 new): X ms`.
llama.cpp runs without its extra buffer types and with OMP_WAIT_POLICY=passive (see
generation_llamacpp_compare.py for why).
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=os.environ.get(
        "SMOLLM2_GGUF", os.path.expanduser("~/.cache/llm-reference/SmolLM2-135M-Instruct.Q4_1.gguf")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--history", type=int, nargs="+", default=[1024, 2048])
    a = ap.parse_args()
    import llama_cpp

    default_params = llama_cpp.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = params
    llama_cpp.llama.llama_cpp.llama_model_default_params = params
    top = max(a.history) + 32
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=top, n_threads=a.threads, n_threads_batch=a.threads,
                          n_batch=512, n_ubatch=512, verbose=False)
    vocab = llm.n_vocab()
    for h in a.history:
        history = [100 + (i * 7919) % (vocab - 200) for i in range(h)]
        new = [150 + (i * 104729) % (vocab - 300) for i in range(16)]
        llm.reset()
        llm.eval(history)
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            llm.eval(new)
            llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            times.append(time.perf_counter() - t)
            # Back to the kept history: drop the 16 appended positions.
            llm.n_tokens = h
            mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
            llama_cpp.llama_memory_seq_rm(mem, 0, h, -1)
        print(f"sessions: llama.cpp ttft after {h} tokens of history (+16 new): "
              f"{statistics.median(times) * 1e3:.2f} ms (threads {a.threads}, load {os.getloadavg()[0]:.1f})",
              flush=True)


if __name__ == "__main__":
    main()
