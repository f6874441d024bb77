"""Where rollout workers find announced policy weights: the run's local folder, or an S3-compatible
object store for workers on other nodes (`[weights]` in the run config).

The learner always writes a version folder locally first (`pipeline.model.weights.publish`). With
``store = "s3"`` it then uploads the folder's files to
``s3://<bucket>/<prefix>/<run>/policies/v<version>/`` (the weights first, ``manifest.json`` last, so
a manifest in the store means its files are there) and announces that URI. A worker:

- refuses any URI but exactly this run's folder for the announced version (a forged announcement
  cannot make it download another key);
- fetches ``manifest.json`` (at most 1 MiB) and checks its sha256 against the announcement before
  reading anything it lists; file names must be plain names, sizes must match before and after
  download;
- downloads into ``<cache>/.v<version>.<pid>.tmp`` and renames it to ``<cache>/v<version>``, then
  loads it only through `verify_published` (every file's size and sha256, nothing extra), exactly as
  a local folder; keeps the newest ``keep`` versions.

A version that is gone from the store (pruned after newer ones) is `PolicyMissing`, as a pruned
local folder is. Credentials come from boto3's chain (environment, profile, instance or pod role).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from pipeline.config import RunConfig, S3Weights
from pipeline.model.weights import (
    MANIFEST, MAX_MANIFEST_BYTES, VERSION_FOLDER, PolicyMissing, WeightsError, folder_name, published_versions,
    verify_published,
)

log = logging.getLogger(__name__)

SCHEME = "s3://"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,200}", re.ASCII)


def s3_client(cfg: S3Weights):
    """A boto3 S3 client for the configured store (path-style addressing when an endpoint is given,
    as SeaweedFS and MinIO want)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise RuntimeError('[weights] store = "s3" needs boto3: pip install "rlstream[s3]"') from None
    style = "path" if cfg.endpoint_url else "auto"
    return boto3.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region,
                        config=Config(signature_version="s3v4", s3={"addressing_style": style},
                                      connect_timeout=5, read_timeout=30,
                                      retries={"max_attempts": 3, "mode": "standard"}))


class StoreUnavailable(Exception):
    """The object store did not answer as it should (unreachable, access denied, a server error):
    the announcement stays valid and is tried again, unlike bad weights."""


@contextmanager
def _store_errors(what: str):
    """botocore's errors as ours: a missing key is `PolicyMissing`, anything else `StoreUnavailable`."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            raise PolicyMissing(f"{what} is not in the store (pruned or never uploaded?)") from None
        raise StoreUnavailable(f"object store error on {what}: {e}") from e
    except (BotoCoreError, Boto3Error) as e:  # Boto3Error: e.g. a download out of retries
        raise StoreUnavailable(f"object store error on {what}: {e}") from e


class S3Policies:
    """One run's policy versions in an S3-compatible store."""

    def __init__(self, cfg: S3Weights, run: str, client=None) -> None:
        self.cfg, self.run = cfg, run
        self.client = client if client is not None else s3_client(cfg)
        self.root_key = "/".join(p for p in (cfg.prefix.strip("/"), run, "policies") if p)

    def key(self, version: int) -> str:
        return f"{self.root_key}/{folder_name(version)}"

    def uri(self, version: int) -> str:
        return f"{SCHEME}{self.cfg.bucket}/{self.key(version)}"

    # -- the learner's side ------------------------------------------------------------------------
    def upload(self, folder: Path, version: int) -> str:
        """Upload a published version folder (its manifest last); returns the URI to announce."""
        folder = Path(folder)
        names = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
        for name in [*names, MANIFEST]:
            self.client.upload_file(str(folder / name), self.cfg.bucket, f"{self.key(version)}/{name}")
        return self.uri(version)

    def versions(self) -> list[int]:
        """Versions complete in the store (their manifest is there), oldest first."""
        found = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.cfg.bucket, Prefix=f"{self.root_key}/")
        for page in pages:
            for obj in page.get("Contents", []):
                folder, _, name = obj["Key"][len(self.root_key) + 1:].partition("/")
                m = VERSION_FOLDER.fullmatch(folder)
                if m is not None and name == MANIFEST:
                    found.append(int(m.group(1)))
        return sorted(found)

    def prune(self, keep: int) -> None:
        """Delete every version but the newest ``keep`` (its manifest first, so a half-deleted
        version is no longer complete)."""
        for version in self.versions()[:-keep]:
            self.client.delete_object(Bucket=self.cfg.bucket, Key=f"{self.key(version)}/{MANIFEST}")
            listed = self.client.list_objects_v2(Bucket=self.cfg.bucket, Prefix=f"{self.key(version)}/")
            objects = [{"Key": o["Key"]} for o in listed.get("Contents", [])]
            if objects:
                self.client.delete_objects(Bucket=self.cfg.bucket, Delete={"Objects": objects, "Quiet": True})

    # -- a worker's side -----------------------------------------------------------------------------
    def _get_manifest(self, version: int) -> bytes:
        key = f"{self.key(version)}/{MANIFEST}"
        with _store_errors(f"{SCHEME}{self.cfg.bucket}/{key}"):
            head = self.client.head_object(Bucket=self.cfg.bucket, Key=key)
            if int(head["ContentLength"]) > MAX_MANIFEST_BYTES:
                raise WeightsError(f"{SCHEME}{self.cfg.bucket}/{key} is {head['ContentLength']} bytes; a manifest "
                                   f"is at most {MAX_MANIFEST_BYTES}")
            return self.client.get_object(Bucket=self.cfg.bucket, Key=key)["Body"].read(MAX_MANIFEST_BYTES + 1)

    def fetch(self, uri: str, sha256: str, version: int, cache: Path) -> Path:
        """Download version ``version`` announced as ``uri`` into ``cache/v<version>`` (reused if
        its manifest there has the announced sha256) and return that folder; the caller loads it
        with `verify_published`."""
        if uri != self.uri(version):
            raise WeightsError(f"policy uri {uri!r} is not this run's version {version} in the store "
                               f"({self.uri(version)})")
        final = Path(cache) / folder_name(version)
        try:
            if hashlib.sha256((final / MANIFEST).read_bytes()).hexdigest() == sha256:
                return final  # downloaded before (`verify_published` still checks every file)
        except OSError:
            pass  # not cached; a cached copy of other contents is replaced below
        raw = self._get_manifest(version)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise WeightsError(f"{uri}/{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
        actual = hashlib.sha256(raw).hexdigest()
        if actual != sha256:
            raise WeightsError(f"sha256 mismatch for {uri}/{MANIFEST}: announced {sha256[:12]}…, store {actual[:12]}…")
        try:
            files = {str(n): int(v["bytes"]) for n, v in json.loads(raw)["files"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{uri}/{MANIFEST} is not a manifest: {e}") from e
        bad = [n for n in files if not _PLAIN_NAME.fullmatch(n) or n == MANIFEST]
        if bad:
            raise WeightsError(f"{uri}/{MANIFEST} lists files that are not plain names: {bad[:4]}")
        tmp = Path(cache) / f".{folder_name(version)}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for name, size in sorted(files.items()):
                key = f"{self.key(version)}/{name}"
                with _store_errors(f"{uri}/{name}"):
                    stored = int(self.client.head_object(Bucket=self.cfg.bucket, Key=key)["ContentLength"])
                    if stored != size:
                        raise WeightsError(f"{uri}/{name} is {stored} bytes in the store, {size} in its manifest")
                    self.client.download_file(self.cfg.bucket, key, str(tmp / name))
            (tmp / MANIFEST).write_bytes(raw)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final


class PolicySource(Protocol):
    def files(self, uri: str, sha256: str, version: int) -> list[Path]:
        """The verified safetensors files of an announced version (`PolicyMissing`/`WeightsError`)."""


class LocalSource:
    """Announced folders under the run's own ``<workdir>/policies`` (one node, or a shared volume)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def files(self, uri: str, sha256: str, version: int) -> list[Path]:
        return verify_published(uri, sha256, self.root, version)


class S3Source:
    """Announced versions in the object store, downloaded into ``cache`` (the newest ``keep`` kept)."""

    def __init__(self, store: S3Policies, cache: Path, keep: int) -> None:
        self.store, self.cache, self.keep = store, Path(cache), keep

    def files(self, uri: str, sha256: str, version: int) -> list[Path]:
        folder = self.store.fetch(uri, sha256, version, self.cache)
        try:
            files = verify_published(str(folder.resolve()), sha256, self.cache, version)
        except WeightsError as e:
            # The local copy is not what was announced: a file damaged in the cache since it was
            # downloaded, or a bad download. Fetch it again once; only a copy fresh from the store
            # that still fails its check makes the announcement bad.
            log.warning("policy v%d in %s fails its check (%s): fetching it again", version, folder, e)
            shutil.rmtree(folder, ignore_errors=True)
            folder = self.store.fetch(uri, sha256, version, self.cache)
            try:
                files = verify_published(str(folder.resolve()), sha256, self.cache, version)
            except WeightsError:
                shutil.rmtree(folder, ignore_errors=True)  # a bad download is not kept for next time
                raise
        for _, old in published_versions(self.cache)[:-self.keep]:
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        return files


def policy_source(cfg: RunConfig, worker: str) -> PolicySource:
    """The configured source of announced weights for one rollout worker."""
    w = cfg.weights
    if w.store == "local":
        return LocalSource(cfg.workdir / "policies")
    cache = (w.cache_dir / cfg.name if w.cache_dir is not None else cfg.workdir / "policy-cache") / worker
    return S3Source(S3Policies(w, cfg.name), cache, cfg.learner.keep_policies)
