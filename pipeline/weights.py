"""Policy weights on disk: versioned safetensors folders, published atomically, verified on load.

The learner writes ``<root>/v000012/model.safetensors`` through a temporary folder and a rename, so
a reader never sees a half-written version, and announces the folder with the file's sha256. A
rollout process loads it only if the hash matches. Weights are loaded with safetensors: nothing on
disk or on the wire is unpickled.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "model.safetensors"


class WeightsError(RuntimeError):
    """Announced weights are missing or do not match their hash."""


@dataclass(frozen=True)
class PublishedPolicy:
    version: int
    uri: str
    sha256: str
    dtype: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    dtypes = {str(t.dtype).removeprefix("torch.") for t in state.values()}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def publish(state: dict[str, torch.Tensor], root: Path, version: int, keep: int,
            dtype: torch.dtype | None = None) -> PublishedPolicy:
    """Write ``state`` as version ``version`` under ``root`` and prune all but the newest ``keep``.
    ``dtype`` casts floating-point tensors (the rollout engine's dtype: bf16 halves the bytes every
    rollout reads and hashes); None writes them as they are."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"v{version:06d}"
    tmp = root / f".v{version:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # Tied parameters are the same tensor under two names; safetensors refuses them, so store
    # each once. Views of one storage at different offsets or shapes are different tensors.
    seen: set[tuple] = set()
    flat: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in seen:
            continue
        seen.add(ident)
        t = t.detach().cpu()
        flat[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    save_file(flat, str(tmp / WEIGHTS_FILE), metadata={"version": str(version)})
    digest = sha256_file(tmp / WEIGHTS_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    versions = sorted((p for p in root.glob("v[0-9]*") if p.is_dir()), key=lambda p: int(p.name[1:]))
    for old in versions[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return PublishedPolicy(version, str(final.resolve()), digest, _dtype_name(flat))


def verify_published(uri: str, sha256: str) -> Path:
    """The weights file of a published folder, after checking the announced sha256."""
    path = Path(uri) / WEIGHTS_FILE
    if not path.exists():
        raise WeightsError(f"announced weights not found: {path} (pruned or never written?)")
    actual = sha256_file(path)
    if actual != sha256:
        raise WeightsError(f"sha256 mismatch for {path}: announced {sha256[:12]}…, file {actual[:12]}…")
    return path


def load_verified(uri: str, sha256: str) -> dict[str, torch.Tensor]:
    """Load the weights of a published folder after checking the announced sha256."""
    return load_file(str(verify_published(uri, sha256)))
