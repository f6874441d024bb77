"""The tiny default policy: a character-level tokenizer built offline and a small Qwen2 model.

Nothing here touches a model hub. The tokenizer is built with the ``tokenizers`` library from a
fixed character set and wrapped as a ``PreTrainedTokenizerFast``, so the folder it is saved in loads
like any Hugging Face checkpoint (transformers and vLLM).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARSET = "0123456789+-*=() "


def build_char_tokenizer(charset: str = CHARSET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character of ``charset`` plus the specials."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in charset:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def build_tiny_qwen2(vocab_size: int, hidden_size: int = 128, layers: int = 4, heads: int = 4,
                     kv_heads: int = 2, intermediate_size: int = 384, max_positions: int = 64,
                     seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2-architecture causal LM (fp32, tied embeddings)."""
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        rope_theta=10_000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def load_policy(path: str | Path) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """Load a saved model folder (safetensors weights + tokenizer) in fp32 on the CPU."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model at {path} (config.json missing)")
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer.padding_side = "left"
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
