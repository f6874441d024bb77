"""Published weights: round trip, tied tensors, hash check, pruning, no temporary folder left."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hashlib
import os

from pipeline.model.weights import (
    MANIFEST,
    WEIGHTS_FILE,
    PolicyMissing,
    WeightsError,
    load_verified,
    publish,
    published_versions,
    sha256_file,
    verify_published,
)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 4, generator=g),
        "a.bias": torch.randn(3, generator=g),
        "b.weight": torch.randn(2, 3, generator=g),
    }


def test_round_trip_equal_tensors(tmp_path: Path):
    state = _state()
    pub = publish(state, tmp_path, version=12, keep=3)
    assert pub.version == 12
    assert pub.uri == str((tmp_path / "v000012").resolve())
    assert pub.sha256 == sha256_file(tmp_path / "v000012" / MANIFEST)  # the manifest hashes every file
    assert pub.dtype == "float32"
    loaded = load_verified(pub.uri, pub.sha256)
    assert set(loaded) == set(state)
    for name, t in state.items():
        torch.testing.assert_close(loaded[name], t, atol=0, rtol=0)


def test_mixed_dtype_name(tmp_path: Path):
    pub = publish({"x": torch.zeros(2), "y": torch.zeros(2, dtype=torch.bfloat16)}, tmp_path, 0, 1)
    assert pub.dtype == "mixed"


def test_published_in_the_engines_dtype(tmp_path: Path):
    state = {**_state(), "steps": torch.tensor([3, 4], dtype=torch.int64)}
    fp32 = publish(state, tmp_path / "fp32", 1, keep=1)
    bf16 = publish(state, tmp_path / "bf16", 1, keep=1, dtype=torch.bfloat16)
    assert bf16.dtype == "mixed"  # floats cast, the integer tensor left alone
    loaded = load_verified(bf16.uri, bf16.sha256)
    assert loaded["steps"].dtype == torch.int64 and loaded["steps"].tolist() == [3, 4]
    for name in _state():
        assert loaded[name].dtype == torch.bfloat16
        torch.testing.assert_close(loaded[name], state[name].to(torch.bfloat16), atol=0, rtol=0)
    size = lambda pub: (Path(pub.uri) / WEIGHTS_FILE).stat().st_size  # noqa: E731
    assert size(bf16) < size(fp32)


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def test_tied_tensors_stored_once_and_load(tmp_path: Path):
    torch.manual_seed(0)
    src = _Tied()
    pub = publish(src.state_dict(), tmp_path, version=1, keep=1)
    loaded = load_verified(pub.uri, pub.sha256)
    assert set(loaded) == {"embed.weight"}  # the first name of the shared storage is kept
    dst = _Tied()
    missing, unexpected = dst.load_state_dict(loaded, strict=False)
    assert missing == ["head.weight"] and unexpected == []
    torch.testing.assert_close(dst.head.weight, src.embed.weight, atol=0, rtol=0)
    assert dst.head.weight.data_ptr() == dst.embed.weight.data_ptr()  # still tied after loading


def test_views_of_one_storage_are_all_kept(tmp_path: Path):
    fused = torch.arange(6.0)
    state = {"q": fused[:3], "k": fused[3:]}  # different tensors, same storage (fused qkv style)
    pub = publish(state, tmp_path, version=1, keep=1)
    loaded = load_verified(pub.uri, pub.sha256)
    assert set(loaded) == {"q", "k"}
    torch.testing.assert_close(loaded["k"], torch.tensor([3.0, 4.0, 5.0]), atol=0, rtol=0)


def test_sha_mismatch_raises(tmp_path: Path):
    pub = publish(_state(), tmp_path, version=1, keep=1)
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_verified(pub.uri, "0" * 64)


def test_only_the_runs_own_version_folder_of_regular_files_loads(tmp_path: Path):
    root = tmp_path / "policies"
    pub = publish(_state(), root, version=3, keep=2)
    assert verify_published(pub.uri, pub.sha256, root, 3) == [Path(pub.uri) / WEIGHTS_FILE]
    # Announced under another version, or pointing outside the run's policy folder: refused.
    with pytest.raises(WeightsError, match="not the folder"):
        verify_published(pub.uri, pub.sha256, root, 4)
    elsewhere = publish(_state(), tmp_path / "other", version=3, keep=1)
    with pytest.raises(WeightsError, match="outside"):
        verify_published(elsewhere.uri, elsewhere.sha256, root, 3)
    with pytest.raises(WeightsError, match="outside"):
        verify_published(str(root / ".." / "other" / "v000003"), elsewhere.sha256, root, 3)
    # A symlinked version folder, a symlinked or FIFO file in it: refused before anything is opened.
    os.symlink(Path(elsewhere.uri), root / "v000005")
    with pytest.raises(WeightsError, match="not a folder"):
        verify_published(str(root / "v000005"), elsewhere.sha256, root, 5)
    evil = publish(_state(), root, version=6, keep=5)
    os.mkfifo(Path(evil.uri) / "extra.bin")
    with pytest.raises(WeightsError, match="holds"):
        verify_published(evil.uri, evil.sha256, root, 6)
    (Path(evil.uri) / "extra.bin").unlink()
    weights = Path(evil.uri) / WEIGHTS_FILE
    weights.rename(Path(evil.uri) / "real.bin")
    os.symlink(Path(evil.uri) / "real.bin", weights)
    (Path(evil.uri) / "real.bin").rename(tmp_path / "real.bin")
    os.symlink(tmp_path / "real.bin", Path(evil.uri) / "real.bin")
    with pytest.raises(WeightsError):
        verify_published(evil.uri, evil.sha256, root, 6)
    # Pruned: a warning for the caller, not an error about the announcement.
    with pytest.raises(PolicyMissing):
        verify_published(str(root / "v000001"), pub.sha256, root, 1)


def test_every_file_of_the_manifest_is_checked(tmp_path: Path):
    pub = publish(_state(), tmp_path, version=1, keep=1)
    manifest = Path(pub.uri) / MANIFEST
    text = manifest.read_text().replace('"bytes": ', '"bytes": 1')  # a size that lies
    manifest.write_text(text)
    with pytest.raises(WeightsError, match="bytes"):
        load_verified(pub.uri, hashlib.sha256(text.encode()).hexdigest())


def test_tampered_file_raises(tmp_path: Path):
    pub = publish(_state(), tmp_path, version=1, keep=1)
    path = Path(pub.uri) / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_verified(pub.uri, pub.sha256)


def test_missing_folder_raises(tmp_path: Path):
    with pytest.raises(PolicyMissing, match="not found"):
        load_verified(str(tmp_path / "v000099"), "0" * 64)


def test_pruning_keeps_newest(tmp_path: Path):
    for v in (1, 2, 9, 10, 11):
        publish(_state(), tmp_path, version=v, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000010", "v000011"]


def test_republishing_a_version_replaces_it(tmp_path: Path):
    publish({"x": torch.zeros(2)}, tmp_path, version=3, keep=2)
    pub = publish({"x": torch.ones(2)}, tmp_path, version=3, keep=2)
    torch.testing.assert_close(load_verified(pub.uri, pub.sha256)["x"], torch.ones(2), atol=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000003"]


def test_no_tmp_folder_left_behind(tmp_path: Path):
    tmp_path.joinpath(".v000002.tmp").mkdir()  # left by a crashed earlier attempt at v2
    publish(_state(), tmp_path, version=1, keep=5)
    publish(_state(), tmp_path, version=2, keep=5)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["v000001", "v000002"]
    assert not any(".tmp" in p.name for p in tmp_path.rglob("*"))


def test_only_real_published_folders_are_counted_and_pruned(tmp_path: Path):
    for v in (1, 2):
        publish(_state(), tmp_path, version=v, keep=5)
    os.mkfifo(tmp_path / "v000900")
    os.symlink("/tmp", tmp_path / "v000901")
    (tmp_path / "v000902").mkdir()  # no manifest
    assert [v for v, _ in published_versions(tmp_path)] == [1, 2]
    publish(_state(), tmp_path, version=3, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000002", "v000003", "v000900", "v000901", "v000902"]


class _Store:
    """The object store's `fetch` semantics over a folder `publish` wrote: download into
    ``cache/v<version>`` unless a copy whose manifest has the announced hash is there already."""

    def __init__(self, published: Path) -> None:
        self.published, self.downloads = published, 0

    def fetch(self, uri: str, sha256: str, version: int, cache: Path) -> Path:
        import shutil

        final = Path(cache) / Path(uri).name
        if (final / MANIFEST).exists() and hashlib.sha256((final / MANIFEST).read_bytes()).hexdigest() == sha256:
            return final
        self.downloads += 1
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(self.published, final)
        return final


def test_a_damaged_cached_copy_is_fetched_again_not_taken_for_a_bad_announcement(tmp_path: Path):
    from pipeline.model.weight_store import S3Source

    pub = publish(_state(), tmp_path / "store", version=3, keep=1)
    store = _Store(Path(pub.uri))
    source = S3Source(store, tmp_path / "cache", keep=2)
    [first] = source.files(pub.uri, pub.sha256, 3)
    assert store.downloads == 1
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF  # the cached file is damaged after it was downloaded and checked
    first.write_bytes(bytes(data))
    [again] = source.files(pub.uri, pub.sha256, 3)  # the manifest still matches: the cache is used, fails, refetched
    assert store.downloads == 2 and again.read_bytes() == (Path(pub.uri) / WEIGHTS_FILE).read_bytes()
    # A copy that fails fresh from the store is a bad announcement: an error, and nothing kept.
    (Path(pub.uri) / WEIGHTS_FILE).write_bytes(bytes(data))
    import shutil

    shutil.rmtree(tmp_path / "cache" / "v000003")
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        source.files(pub.uri, pub.sha256, 3)
    assert not (tmp_path / "cache" / "v000003").exists()
