"""The tiny default policy: a character-level tokenizer built offline and a small Qwen2 model.

Nothing here touches a model hub. The tokenizer is built with the ``tokenizers`` library from a
fixed character set and wrapped as a ``PreTrainedTokenizerFast``, so the folder it is saved in loads
like any Hugging Face checkpoint (transformers and vLLM). `load_policy` loads any causal LM folder,
this one or a user's, strictly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

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


ARCHITECTURES = ("qwen2", "qwen3", "llama")
"""Architectures `build_tiny` makes (transformers' ``model_type``)."""


def build_tiny(arch: str, vocab_size: int, hidden_size: int = 128, layers: int = 4, heads: int = 4,
               kv_heads: int = 2, intermediate_size: int = 384, max_positions: int = 64, seed: int = 0,
               tie_word_embeddings: bool = True, tokenizer=None):
    """A randomly initialised causal LM of architecture ``arch`` (``qwen2``: the default policy;
    ``qwen3``: with q/k norms; ``llama``), fp32, with the special tokens of ``tokenizer`` (default:
    those of `build_char_tokenizer`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {ARCHITECTURES}")
    extra = {"head_dim": hidden_size // heads} if arch == "qwen3" else {}
    config = AutoConfig.for_model(
        arch, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings, rope_theta=10_000.0,
        torch_dtype="float32", **special_ids(tokenizer), **extra)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def special_ids(tokenizer=None) -> dict[str, int | None]:
    """``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` of a tokenizer (a missing pad token
    is the EOS, as `load_policy` sets it), or of `build_char_tokenizer` when None."""
    if tokenizer is None:
        return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}


def build_tiny_qwen2(vocab_size: int, hidden_size: int = 128, layers: int = 4, heads: int = 4,
                     kv_heads: int = 2, intermediate_size: int = 384, max_positions: int = 64,
                     seed: int = 0) -> Qwen2ForCausalLM:
    """The default policy's architecture (`build_tiny` with ``qwen2``)."""
    return build_tiny("qwen2", vocab_size, hidden_size, layers, heads, kv_heads, intermediate_size, max_positions,
                      seed)


class ModelLoadError(RuntimeError):
    """A model folder that does not load as exactly the model its config describes."""


def load_policy(path: str | Path, trust_remote_code: bool = False, dtype: torch.dtype | None = None):
    """Load a Hugging Face causal LM folder (any architecture transformers knows) and its tokenizer.

    - The class comes from the folder's ``config.json`` (``AutoModelForCausalLM``): a Llama or a
      Qwen3 folder loads as itself. Remote code runs only with ``trust_remote_code`` (the run
      config's ``model.trust_remote_code``).
    - Strict: a weight the architecture expects but the checkpoint lacks, one the checkpoint has
      but the architecture does not, or one of the wrong shape is an error naming them, never a
      freshly initialised tensor and a warning. (Weights the config ties, such as a tied
      ``lm_head``, are not missing.)
    - ``dtype``: float32 on CPU by default; on a GPU the config's ``torch_dtype`` (bf16 for most
      instruct models).
    - The tokenizer gets a pad token if it has none (its eos), and pads on the left (generation).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model at {path} (config.json missing)")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if dtype is None:
        dtype = (getattr(config, "torch_dtype", None) or torch.bfloat16) if torch.cuda.is_available() else torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    # ignore_mismatched_sizes: transformers then reports a weight of the wrong shape in the loading
    # info (below: an error naming it) instead of raising its own RuntimeError that names nothing.
    model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True,
                                                       ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code)
    problems = {kind: sorted(str(k) for k in info.get(kind) or []) for kind in
                ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}"
                           for k, v in problems.items())
        raise ModelLoadError(f"{path} does not match its {type(model).__name__} config ({detail}); the weights "
                             "are not this model's")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"{path}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def export_pretrained(state: dict[str, torch.Tensor], source: str | Path, out: str | Path,
                      dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> Path:
    """Write trained weights as a complete Hugging Face folder that transformers and vLLM load as
    it is: every file of the ``source`` model folder but its weights (config, generation config,
    tokenizer and its chat template), plus ``model.safetensors`` of ``state``; a generation config
    is made from the model config if the source has none. Written beside ``out`` and renamed into
    place, so a reader never sees half of it."""
    from safetensors.torch import save_file

    from pipeline.model.prompts import load_generation_config
    from pipeline.model.weights import flatten

    source, out = Path(source), Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, tmp / f.name)
    if not (tmp / "generation_config.json").exists():
        generation = load_generation_config(source, trust_remote_code)  # the one config.json implies
        if generation is not None:
            generation.save_pretrained(tmp)
    save_file(flatten(state, dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
