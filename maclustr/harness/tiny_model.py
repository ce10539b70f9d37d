"""Build a tiny random-weight llama model that a real ``mlx_lm.server`` can load.

Why: tests and the demo need a *real* upstream (HTTP/1.0 quirks, keepalive comments,
model echo, fingerprints) without downloading gigabytes. A 64-wide, 2-layer llama with a
512-token byte-level BPE tokenizer builds in well under a second and decodes hundreds of
tokens per second on one CPU core. Random weights emit arbitrary text (even partial UTF-8),
so nothing should assume readable output.

Heavy imports (mlx, mlx_lm, tokenizers) happen inside functions so that importing this
module is free for tests that never build a model.

CLI: ``python -m maclustr.harness.tiny_model OUT_DIR [--seed N]`` builds the model and prints
its path.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
from typing import Any

SPECIAL_TOKENS: list[str] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512

# ChatML, as used by Qwen: the gateway's production models speak it too.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": VOCAB_SIZE,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

# Small built-in corpus: enough byte-level merges to fill a 512-token vocabulary.
_CORPUS: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "import os\nimport sys\nprint('hello')\n",
    "Regression analysis estimates the relationship between variables.",
    "The mean, the median, and the variance summarise a distribution.",
    "Write a short summary of the following text in one sentence.",
    "You are a helpful assistant. Answer the question concisely.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "Large language models generate text one token at a time.",
    "The cluster serves several models behind one OpenAI-compatible door.",
    "Prices rose by three percent while interest rates stayed flat.",
]


def _train_tokenizer() -> Any:
    """Train a ByteLevel BPE tokenizer; deterministic so every model shares one vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return tok


_LAST_FILE = "special_tokens_map.json"  # make_tiny_model writes it last


def make_tiny_model(out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write config, seeded random weights and a tokenizer to ``out_dir``; return it.

    Different seeds give different weights (so two directories are two distinct models
    from the server's point of view), while the tokenizer is identical for all seeds.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(CONFIG))  # type: ignore[no-untyped-call, unused-ignore]
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})

    (out_dir / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")

    tok = _train_tokenizer()
    tok.save(str(out_dir / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (out_dir / _LAST_FILE).write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2) + "\n"
    )
    return out_dir


def build_in_child(models: list[tuple[pathlib.Path, int]], timeout: float = 300) -> None:
    """Build the (out_dir, seed) models not built yet, in one child process.

    Why a child: importing mlx_lm lowers the importer's open-file limit to (2048, 4096) for
    good (mlx_lm/utils.py), and the demo's and the bench's own processes must keep theirs
    (the bench holds thousands of streams open). A model counts as built once its last file
    is written, so a build that was cut short is redone."""
    todo = [(str(d), seed) for d, seed in models if not (d / _LAST_FILE).exists()]
    if not todo:
        return
    code = ("import pathlib\n"
            "from maclustr.harness.tiny_model import make_tiny_model\n"
            f"for out, seed in {todo!r}:\n"
            "    make_tiny_model(pathlib.Path(out), seed=seed)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build one tiny model and print its absolute path."""
    parser = argparse.ArgumentParser(description="Build a tiny random-weight llama model.")
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_model(args.out_dir, seed=args.seed).resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
