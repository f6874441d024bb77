"""rlstream installed as a wheel, used from outside the checkout: `rlstream --help`, a service
that starts and stops on the shipped config, and the guard against another installed package
named like one of ours (`pipeline`, `services`, `schemas`, `infra` are generic names).

The wheel goes into a new virtualenv whose dependencies come from this environment's
site-packages through a `.pth` line (nothing is downloaded, and the checkout is not on the path:
the editable install's finder is not loaded that way)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # built from a copy: a build leaves build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for package in ("schemas", "pipeline", "services", "infra"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("rlstream-*.whl"))
    env = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = next((env / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], check=True, capture_output=True)
    return env


def _run(env: Path, args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(env / "bin" / "rlstream")] + args, cwd=cwd, env=clean, capture_output=True,
                          text=True, timeout=120, **kw)


def test_help_and_the_packages_come_from_the_wheel(venv, tmp_path):
    out = _run(venv, ["--help"], tmp_path)
    assert out.returncode == 0 and "demo" in out.stdout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import pipeline, services, infra; "
                            "print(pipeline.__file__); print(infra.__file__)"], cwd=tmp_path, capture_output=True,
                           text=True, check=True).stdout.split()
    assert all(str(venv) in w and str(REPO) not in w for w in where)


def test_a_service_starts_on_the_shipped_config_and_stops_on_sigterm(venv, tmp_path):
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([str(venv / "bin" / "rlstream"), "reward", "--set", f'workdir="{tmp_path / "run"}"',
                             "--set", f'kafka.bootstrap_servers="memory://{uuid.uuid4().hex[:6]}"',
                             "--set", "metrics.enabled=false", "--set", "reward.verifier_workers=0"],
                            cwd=tmp_path, env=dict(clean, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 90
    for line in proc.stdout:
        lines.append(line)
        if "ready" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    out = "".join(lines) + rest
    assert any("ready" in line for line in lines), out[-3000:]
    assert proc.returncode == 0, out[-3000:]


def test_another_package_named_like_ours_is_refused_not_run(venv, tmp_path):
    fake = tmp_path / "shadow" / "pipeline"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(venv / "bin" / "rlstream"), "--help"], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(clean, PYTHONPATH=str(tmp_path / "shadow")), timeout=60)
    assert out.returncode != 0 and "another installed package of that name shadows it" in out.stderr
    assert str(fake / "__init__.py") in out.stderr
