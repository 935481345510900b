"""A small generated sentence-embedding model for the interop suite (no download): a seeded random
BERT (hidden 32, 2 layers, 4 heads, vocabulary 100, 64 positions) written as an HF folder with
``config.json``, ``model.safetensors`` (written by hand: 8-byte header length, JSON header, f32
data), a WordPiece ``tokenizer.json`` whose words are ``tok5`` ... ``tok99`` (id = the number) and
the sentence-transformers files (mean pooling, L2 normalisation).

Used by ``test_openai_embeddings.py``; runnable alone to look at the files:
``python tests/interop/bert_fixture.py OUT_DIR`` writes ``OUT_DIR/embedder/1/...``.
"""

import json
import os
import struct
import sys

import numpy as np

HIDDEN, LAYERS, HEADS, INTER, VOCAB, MAX_POS, TYPES = 32, 2, 4, 64, 100, 64, 2
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CLS, SEP = 2, 3


def vocab():
    """Token -> id: the five specials, then ``tokN`` with id N."""
    v = {t: i for i, t in enumerate(SPECIALS)}
    v.update({f"tok{i}": i for i in range(len(SPECIALS), VOCAB)})
    return v


def ids_of(text):
    """The ids the tokenizer must give ``text`` (words ``tokN`` separated by spaces): [CLS] N... [SEP]."""
    v = vocab()
    return [CLS] + [v[w] for w in text.split()] + [SEP]


def weights(seed=7):
    rng = np.random.default_rng(seed)
    w = {}

    def add(name, shape, scale, offset=0.0):
        w[name] = (offset + scale * rng.uniform(-1.0, 1.0, size=shape)).astype("<f4")

    add("embeddings.word_embeddings.weight", (VOCAB, HIDDEN), 0.5)
    add("embeddings.position_embeddings.weight", (MAX_POS, HIDDEN), 0.5)
    add("embeddings.token_type_embeddings.weight", (TYPES, HIDDEN), 0.5)
    add("embeddings.LayerNorm.weight", (HIDDEN,), 0.2, 1.0)
    add("embeddings.LayerNorm.bias", (HIDDEN,), 0.1)
    for layer in range(LAYERS):
        p = f"encoder.layer.{layer}."
        for part in ("query", "key", "value"):
            add(f"{p}attention.self.{part}.weight", (HIDDEN, HIDDEN), 0.3)
            add(f"{p}attention.self.{part}.bias", (HIDDEN,), 0.1)
        add(f"{p}attention.output.dense.weight", (HIDDEN, HIDDEN), 0.2)
        add(f"{p}attention.output.dense.bias", (HIDDEN,), 0.1)
        add(f"{p}attention.output.LayerNorm.weight", (HIDDEN,), 0.2, 1.0)
        add(f"{p}attention.output.LayerNorm.bias", (HIDDEN,), 0.1)
        add(f"{p}intermediate.dense.weight", (INTER, HIDDEN), 0.2)
        add(f"{p}intermediate.dense.bias", (INTER,), 0.1)
        add(f"{p}output.dense.weight", (HIDDEN, INTER), 0.15)
        add(f"{p}output.dense.bias", (HIDDEN,), 0.1)
        add(f"{p}output.LayerNorm.weight", (HIDDEN,), 0.2, 1.0)
        add(f"{p}output.LayerNorm.bias", (HIDDEN,), 0.1)
    return w


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        data = array.tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def tokenizer_json():
    special = lambda t: {"id": t, "type_id": 0}  # noqa: E731
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in enumerate(SPECIALS)
        ],
        "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                       "strip_accents": None, "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": special("[CLS]")}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": special("[SEP]")}],
            "pair": [{"SpecialToken": special("[CLS]")}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": special("[SEP]")}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [CLS], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [SEP], "tokens": ["[SEP]"]},
            },
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab()},
    }


def write(root, name="embedder"):
    """Writes ``root/name/1/...``; returns the version folder."""
    d = os.path.join(root, name, "1")
    os.makedirs(os.path.join(d, "1_Pooling"), exist_ok=True)
    config = {"model_type": "bert", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "intermediate_size": INTER, "hidden_act": "gelu",
              "layer_norm_eps": 1e-12, "vocab_size": VOCAB, "max_position_embeddings": MAX_POS,
              "type_vocab_size": TYPES}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    write_safetensors(os.path.join(d, "model.safetensors"), weights())
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(), f)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    with open(os.path.join(d, "modules.json"), "w") as f:
        json.dump(modules, f)
    with open(os.path.join(d, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": False,
                   "pooling_mode_mean_tokens": True}, f)
    return d


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else "."))
