"""Policy weights on disk: versioned folders, published atomically, verified before they are read.

The learner writes ``<workdir>/policies/v000012/`` through a temporary folder and a rename, so a
reader never sees a half-written version: ``model.safetensors`` and ``manifest.json``, which lists
every file of the folder with its size and sha256. The PolicyUpdate announces the folder with the
sha256 of the manifest. A loader (`verify_published`) accepts a folder only if

- it is exactly ``<root>/v<version, 6 digits>`` of its own run's policy folder, after resolving
  every symlink (a URI elsewhere is refused: a forged announcement cannot point a rollout at
  another file on the machine);
- the folder and everything in it are regular files or the folder itself, never symlinks, FIFOs
  or devices (a FIFO would block the reader forever), checked with ``lstat`` before anything is
  opened;
- the manifest has the announced sha256 and every file its listed size and sha256, and nothing
  else lies in the folder.

A folder that is gone (pruned after newer versions, or never written) is `PolicyMissing`: the
caller skips it with a warning. Weights are loaded with safetensors; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "model.safetensors"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "rlstream-policy/1"
MAX_MANIFEST_BYTES = 1 << 20
VERSION_FOLDER = re.compile(r"v([0-9]{6,})", re.ASCII)


class WeightsError(RuntimeError):
    """Announced weights are unusable: outside the run's policy folder, not regular files, or not
    matching their hashes."""


class PolicyMissing(WeightsError):
    """The announced folder does not exist (pruned after newer versions, or never written)."""


@dataclass(frozen=True)
class PublishedPolicy:
    version: int
    uri: str
    sha256: str
    """sha256 of the folder's manifest.json."""
    dtype: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_name(version: int) -> str:
    return f"v{version:06d}"


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    dtypes = {str(t.dtype).removeprefix("torch.") for t in state.values()}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def flatten(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors for safetensors, each stored once: tied parameters are the same
    tensor under two names (safetensors refuses that), so only the first name is kept (loaders
    re-tie them from the config); views of one storage at different offsets or shapes are
    different tensors. ``dtype`` casts the floating-point ones."""
    seen: set[tuple] = set()
    flat: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in seen:
            continue
        seen.add(ident)
        t = t.detach().cpu()
        flat[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    return flat


def publish(state: dict[str, torch.Tensor], root: Path, version: int, keep: int,
            dtype: torch.dtype | None = None) -> PublishedPolicy:
    """Write ``state`` as version ``version`` under ``root`` and prune all but the newest ``keep``.
    ``dtype`` casts floating-point tensors (the rollout engine's dtype: bf16 halves the bytes every
    rollout reads and hashes); None writes them as they are."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / folder_name(version)
    tmp = root / f".{folder_name(version)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    flat = flatten(state, dtype)
    save_file(flat, str(tmp / WEIGHTS_FILE), metadata={"version": str(version)})
    files = {WEIGHTS_FILE: {"bytes": (tmp / WEIGHTS_FILE).stat().st_size, "sha256": sha256_file(tmp / WEIGHTS_FILE)}}
    manifest = json.dumps({"format": MANIFEST_FORMAT, "version": version, "files": files}, indent=1).encode()
    (tmp / MANIFEST).write_bytes(manifest)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for _, old in published_versions(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return PublishedPolicy(version, str(final.resolve()), hashlib.sha256(manifest).hexdigest(), _dtype_name(flat))


def published_versions(root: Path) -> list[tuple[int, Path]]:
    """(version, folder) of every folder `publish` wrote under ``root``, oldest first: real
    folders (not symlinks) named v<version> whose manifest declares that version. Anything else
    there (a FIFO, a link, a folder someone made) is neither counted nor pruned."""
    out = []
    for p in Path(root).glob("v[0-9]*"):
        m = VERSION_FOLDER.fullmatch(p.name)
        try:
            if m is None or not stat.S_ISDIR(os.lstat(p).st_mode) or not stat.S_ISREG(os.lstat(p / MANIFEST).st_mode):
                continue
            if json.loads((p / MANIFEST).read_text()).get("version") != int(m.group(1)):
                continue
        except (OSError, ValueError, AttributeError):
            continue
        out.append((int(m.group(1)), p))
    return sorted(out)


def _regular(path: Path, what: str) -> os.stat_result:
    """lstat ``path``; WeightsError unless it is a regular file (not a symlink, FIFO or device)."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise WeightsError(f"{what} {path} is not a regular file (mode {stat.filemode(st.st_mode)})")
    return st


def _locate(uri: str, root: Path | None, version: int | None) -> Path:
    """The announced folder, checked to be ``<root>/v<version>`` itself when ``root`` is given."""
    folder = Path(uri)
    if root is not None:
        if not folder.is_absolute():
            raise WeightsError(f"policy uri {uri!r} is not an absolute path")
        root_real = Path(os.path.realpath(root))
        m = VERSION_FOLDER.fullmatch(folder.name)
        if folder.parent != root_real and Path(os.path.realpath(folder.parent)) != root_real:
            raise WeightsError(f"policy uri {uri!r} is outside this run's policy folder {root_real}")
        if m is None or (version is not None and int(m.group(1)) != version):
            raise WeightsError(f"policy uri {uri!r} is not the folder {folder_name(version or 0)} of "
                               f"version {version}")
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        raise PolicyMissing(f"announced weights not found: {folder} (pruned or never written?)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise WeightsError(f"policy uri {uri!r} is not a folder (mode {stat.filemode(st.st_mode)})")
    return folder


def verify_published(uri: str, sha256: str, root: Path | None = None, version: int | None = None) -> list[Path]:
    """The weight files (``*.safetensors``) of a published folder, after every check of the module
    docstring; ``root`` is the run's policy folder (None skips the location check: a folder the
    caller made itself). Raises `PolicyMissing` or `WeightsError`."""
    folder = _locate(uri, root, version)
    manifest_path = folder / MANIFEST
    try:
        st = _regular(manifest_path, "manifest")
    except FileNotFoundError:
        raise PolicyMissing(f"announced weights not found: {manifest_path} (pruned or never written?)") from None
    if st.st_size > MAX_MANIFEST_BYTES:
        raise WeightsError(f"{manifest_path} is {st.st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
    raw = manifest_path.read_bytes()
    actual = hashlib.sha256(raw).hexdigest()
    if actual != sha256:
        raise WeightsError(f"sha256 mismatch for {manifest_path}: announced {sha256[:12]}…, file {actual[:12]}…")
    try:
        manifest = json.loads(raw)
        files = {str(name): (int(v["bytes"]), str(v["sha256"])) for name, v in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{manifest_path} is not a manifest: {e}") from e
    if manifest.get("format") != MANIFEST_FORMAT or (version is not None and manifest.get("version") != version):
        raise WeightsError(f"{manifest_path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                           f"expected {MANIFEST_FORMAT!r} version {version}")
    present = set(os.listdir(folder)) - {MANIFEST}
    if present != set(files):
        raise WeightsError(f"{folder} holds {sorted(present)[:8]}, its manifest lists {sorted(files)[:8]}")
    weights = []
    for name, (size, digest) in sorted(files.items()):
        path = folder / name
        if _regular(path, "weights file").st_size != size:
            raise WeightsError(f"{path} is not {size} bytes as its manifest says")
        if sha256_file(path) != digest:
            raise WeightsError(f"sha256 mismatch for {path}: the manifest says {digest[:12]}…")
        if name.endswith(".safetensors"):
            weights.append(path)
    if not weights:
        raise WeightsError(f"{folder} holds no .safetensors file")
    return weights


def load_files(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Tensors of verified safetensors files (`verify_published`)."""
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        state.update(load_file(str(path)))
    return state


def load_verified(uri: str, sha256: str, root: Path | None = None, version: int | None = None) -> dict[str, torch.Tensor]:
    """Load the weights of a published folder after `verify_published`."""
    return load_files(verify_published(uri, sha256, root, version))
