#!/usr/bin/env python3
"""Where our SmolLM2-135M-Instruct (Q4_1 GGUF) logits differ from HF transformers' and llama.cpp's,
along the reference sequences of tests/fixtures/smollm2_reference.json (prompt + transformers' greedy
tokens, teacher-forced).

    cargo run --release --example smollm2_logits_dump -- MODEL.gguf /tmp/smollm2_ours.f32
    ~/.cache/llm-reference/venv/bin/python examples/smollm2_logit_compare.py transformers
    ~/.cache/llm-reference/llama/bin/python examples/smollm2_logit_compare.py llamacpp
    ~/.cache/llm-reference/venv/bin/python examples/smollm2_logit_compare.py compare [OURS.f32 ...]

(MODEL: $SMOLLM2_GGUF or ~/.cache/llm-reference/SmolLM2-135M-Instruct.Q4_1.gguf.) `transformers` and
`llamacpp` write /tmp/smollm2_{hf,llama}.npy (rows: the logits after the prompt and after each of the
first 31 greedy tokens); `llamacpp` also runs llama.cpp's own greedy decoding from each prompt and
reports how many tokens equal transformers'. `compare` prints, per prompt, the max |Δ logit| of each
side against transformers along the sequence and, at the steps where transformers' top-1 leads its
top-2 by less than 0.3, the three sides' top-2 gaps.
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "smollm2_reference.json")
MODEL = os.environ.get("SMOLLM2_GGUF", os.path.expanduser("~/.cache/llm-reference/SmolLM2-135M-Instruct.Q4_1.gguf"))


def load_reference():
    with open(FIXTURE) as f:
        return json.load(f)


def transformers_side(ref):
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(os.path.abspath(MODEL))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    rows = []
    with torch.no_grad():
        for p in ref["prompts"]:
            seq = p["ids"] + p["greedy"][:-1]
            logits = model(torch.tensor([seq])).logits[0]
            rows.append(logits[len(p["ids"]) - 1:].numpy())
    np.save("/tmp/smollm2_hf.npy", np.stack(rows))


def llamacpp_side(ref):
    import llama_cpp

    # As in generation_llamacpp_compare.py: no extra buffer types (they crash on some AVX-512 hosts).
    default_params = llama_cpp.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = params
    llama_cpp.llama.llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(model_path=MODEL, n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True,
                          n_threads=2, verbose=False)
    rows = []
    for pi, p in enumerate(ref["prompts"]):
        seq = p["ids"] + p["greedy"][:-1]
        llm.reset()
        llm.eval(seq)
        rows.append(np.array(llm.scores[len(p["ids"]) - 1:len(seq)], dtype=np.float32))
        # llama.cpp's own greedy decoding (prompt in one batch, then one token per step).
        llm.reset()
        llm.eval(p["ids"])
        got = []
        while len(got) < len(p["greedy"]):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            got.append(tok)
            llm.eval([tok])
        same = next((i for i, (a, b) in enumerate(zip(got, p["greedy"])) if a != b), len(got))
        print(f"llama.cpp greedy, prompt {pi}: {same}/{len(got)} tokens equal transformers'")
    np.save("/tmp/smollm2_llama.npy", np.stack(rows))


def top2(row):
    i = np.argsort(row)[-2:][::-1]
    return int(i[0]), float(row[i[0]] - row[i[1]])


def compare(ref, ours_paths):
    hf = np.load("/tmp/smollm2_hf.npy")
    sides = {}
    if os.path.exists("/tmp/smollm2_llama.npy"):
        sides["llama.cpp"] = np.load("/tmp/smollm2_llama.npy")
    for path in ours_paths:
        sides[os.path.basename(path)] = np.fromfile(path, dtype="<f4").reshape(hf.shape)
    for pi, p in enumerate(ref["prompts"]):
        want = p["greedy"]
        line = [f"prompt {pi}:"]
        for name, s in sides.items():
            d = np.abs(s[pi] - hf[pi]).max(axis=1)
            agree = next((t for t in range(len(want)) if int(np.argmax(s[pi][t])) != want[t]), len(want))
            line.append(f"{name}: max|Δ| {d.max():.4f} (median step {np.median(d):.4f}), first argmax "
                        f"change at step {agree}")
        print("  ".join(line))
        for t in range(len(want)):
            tok, gap = top2(hf[pi][t])
            if gap >= 0.3:
                continue
            cells = [f"transformers top1 {tok} gap {gap:.4f}"]
            for name, s in sides.items():
                st, sg = top2(s[pi][t])
                cells.append(f"{name} top1 {st} {'=' if st == tok else '≠'} gap {sg if st == tok else -sg:+.4f}")
            print(f"  step {t:2}: " + "; ".join(cells))


def main():
    ref = load_reference()
    what = sys.argv[1] if len(sys.argv) > 1 else "compare"
    if what == "transformers":
        transformers_side(ref)
    elif what == "llamacpp":
        llamacpp_side(ref)
    else:
        compare(ref, sys.argv[2:] or ["/tmp/smollm2_ours.f32"])


if __name__ == "__main__":
    main()
