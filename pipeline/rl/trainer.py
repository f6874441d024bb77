"""Training backends of the learner: plain torch, or DeepSpeed (ZeRO stage 0-3), one interface.

A backend owns the trainable model and its optimiser. The learner calls the model through
:attr:`Trainer.model` (the DeepSpeed engine under DeepSpeed), hands each loss to :meth:`step`,
asks :meth:`full_state_dict` for the weights it publishes, and saves/loads checkpoints. Both
backends run AdamW with the same hyper-parameters and the same learning-rate schedule
(:func:`lr_at`, set on the optimiser before every update, so the schedule is a function of the
update count and resumes exactly), so a DeepSpeed run in fp32 reproduces the plain loop.

- :class:`TorchTrainer`: one process, ``torch.optim.AdamW``; a checkpoint is one ``torch.save``
  file of model and optimiser state, loaded back with ``weights_only=True``.
- :class:`DeepSpeedTrainer`: ``deepspeed.initialize`` with a JSON config from
  ``infra/deepspeed/`` (ZeRO stage, precision, communication); the optimiser, clipping and batch
  sizes are filled in from the learner config so one JSON serves every run. Runs on CPU
  (``DS_ACCELERATOR=cpu``) and GPU, in one process (rank variables set here when no launcher
  did) or many (``deepspeed``/``torchrun`` launcher). Published weights are the fp32 master
  weights, gathered across ranks under ZeRO-3 (``safe_get_full_fp32_param``): never the
  partitioned placeholders, never a bf16 copy that drops small updates.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import socket
import sys
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.config import LearnerConfig
from schemas import SCORED_TRAJECTORY, Columns, concat, decode, encode, headers_for, split_groups

TRAINER_FILE = "trainer.pt"
DS_TAG = "state"


def lr_at(update: int, lr: float, warmup_steps: int) -> float:
    """Learning rate of optimiser update ``update`` (0-based): linear warm-up to ``lr`` over
    ``warmup_steps`` updates, lr * min(1, (update + 1) / warmup_steps), then constant."""
    if warmup_steps <= 0:
        return lr
    return lr * min(1.0, (update + 1) / warmup_steps)


class Trainer(Protocol):
    """Gradients of any number of ``backward`` calls (micro-batches) add up until ``update``
    applies them; ``step`` is the two for one loss."""

    model: torch.nn.Module
    rank: int
    world_size: int
    updates: int
    device: torch.device
    """Where this rank's model lives (and what collectives must send: NCCL takes GPU tensors)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def update(self) -> float: ...

    def step(self, loss: torch.Tensor) -> float: ...

    def barrier(self) -> None: ...

    def close(self) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]: ...

    def save(self, path: Path) -> None: ...

    def load(self, path: Path) -> None: ...


def _publishable(module: torch.nn.Module, value_of) -> dict[str, torch.Tensor]:
    """``module.state_dict()``'s keys with each parameter replaced by ``value_of(param)``
    (buffers as they are), as fp32-faithful CPU tensors; tied parameters share one tensor."""
    by_name = dict(module.named_parameters(remove_duplicate=False))
    cache: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        param = by_name.get(name)
        if param is None:
            out[name] = tensor.detach().cpu().clone()
            continue
        if id(param) not in cache:
            cache[id(param)] = value_of(param).detach().cpu().clone()
        out[name] = cache[id(param)]
    return out


class TorchTrainer:
    """Plain torch AdamW on one process."""

    def __init__(self, model: torch.nn.Module, lc: LearnerConfig) -> None:
        self.model = model
        self.lc = lc
        self.rank, self.world_size, self.updates = 0, 1, 0
        self.device = next(model.parameters()).device
        opt = lc.optimizer
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr_at(0, opt.lr, opt.warmup_steps),
                                           betas=(0.9, 0.99), weight_decay=opt.weight_decay)

    def backward(self, loss: torch.Tensor) -> None:
        """Add this loss's gradient to those of the update being accumulated."""
        loss.backward()

    def update(self) -> float:
        """Clip and apply the accumulated gradient (AdamW); returns its norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.updates, self.lc.optimizer.lr, self.lc.optimizer.warmup_steps)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.lc.optimizer.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return float(norm)

    def step(self, loss: torch.Tensor) -> float:
        self.backward(loss)
        return self.update()

    def barrier(self) -> None:
        """One process: nothing to wait for."""

    def close(self) -> None:
        """One process: nothing to tear down."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return _publishable(self.model, lambda p: p)

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "updates": self.updates}, path / TRAINER_FILE)

    def load(self, path: Path) -> None:
        state = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_single_process_env() -> None:
    """Rank variables for a DeepSpeed run started without a launcher (one process)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def ensure_extensions_dir() -> None:
    """One torch-extension build folder per Python environment, unless ``TORCH_EXTENSIONS_DIR`` is
    set. DeepSpeed compiles the ops it uses on first use into torch's default folder, which every
    environment of one Python version shares; the build records the environment's include paths,
    so without a folder of its own each virtualenv would rebuild over the other's at every start."""
    env = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / f"env-{env}"))


def skip_shm_comm_on_cpu() -> None:
    """DeepSpeed compiles a shared-memory all-reduce op at the first start on CPU in every
    environment (about 40 s of both cores) that training never calls: it serves DeepSpeed
    inference's `inference_all_reduce` only, and training collectives go through torch.distributed
    (gloo on CPU). Marked incompatible, it is not built."""
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(path: Path, lc: LearnerConfig) -> dict[str, Any]:
    """The JSON at ``path`` with the learner's optimiser, clipping and batch sizes filled in.

    The JSON decides the ZeRO stage, precision and communication; it must not set ``optimizer``,
    ``scheduler``, ``gradient_clipping`` or batch sizes, which come from ``[learner]`` (one source
    of truth; a conflicting value is an error, not silently overridden)."""
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"DeepSpeed config not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    owned = {"optimizer", "scheduler", "gradient_clipping", "train_batch_size",
             "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "managed_gradient_accumulation"}
    clash = sorted(owned & set(cfg))
    if clash:
        raise ValueError(f"DeepSpeed config {path} sets {clash}; these come from [learner] in the run config")
    cfg = copy.deepcopy(cfg)
    cfg.update({
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # The learner decides how many micro-batches make an update (a token budget): `backward`
        # only accumulates, `step` reduces across ranks and updates.
        "managed_gradient_accumulation": False,
        "gradient_clipping": lc.optimizer.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr_at(0, lc.optimizer.lr, lc.optimizer.warmup_steps), "betas": [0.9, 0.99], "eps": 1e-8,
            "weight_decay": lc.optimizer.weight_decay, "torch_adam": True}},
    })
    return cfg


class DeepSpeedTrainer:
    """The model under ``deepspeed.initialize``; see the module docstring."""

    def __init__(self, model: torch.nn.Module, lc: LearnerConfig, config_path: Path) -> None:
        ensure_single_process_env()
        ensure_extensions_dir()
        skip_shm_comm_on_cpu()
        import deepspeed

        self.lc = lc
        self.config = deepspeed_config(config_path, lc)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=self.config)
        self.model = self.engine
        self.device = torch.device(self.engine.device)
        self.rank = self.engine.global_rank
        self.world_size = self.engine.world_size
        self.updates = 0
        self.zero_stage = int(self.engine.zero_optimization_stage())

    def backward(self, loss: torch.Tensor) -> None:
        """Add this loss's gradient to those of the update being accumulated (no reduction yet)."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def update(self) -> float:
        """Reduce across ranks, clip and update through the engine; returns the global gradient norm."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.updates, self.lc.optimizer.lr, self.lc.optimizer.warmup_steps)
        local = None
        if self.zero_stage == 0 and self.world_size == 1:  # the engine reports no norm without ZeRO
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            local = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        self.engine.step()
        self.updates += 1
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else (local if local is not None else math.nan)

    def step(self, loss: torch.Tensor) -> float:
        self.backward(loss)
        return self.update()

    def barrier(self) -> None:
        if self.world_size > 1:
            import deepspeed.comm as dist

            dist.barrier()

    def close(self) -> None:
        """End of a successful run, on every rank: wait for the others, then destroy the process group.
        Exiting with it alive lets gloo's worker threads outlive the interpreter; the process then
        aborts ("terminate called without an active exception", SIGABRT) after its work is done,
        and the launcher reports the run as failed. Not called after an error: a collective with
        ranks that are gone would hang."""
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            self.barrier()
            tdist.destroy_process_group()
            # DeepSpeed keeps a clone of the world group; a trainer built later in this process
            # (an in-process run after another, the tests) would get a group that no longer exists.
            from deepspeed.utils import groups

            groups._WORLD_GROUP = None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 master weights of every parameter (a collective under ZeRO-3: call on all ranks)."""
        from deepspeed.utils import safe_get_full_fp32_param

        def value_of(p: torch.nn.Parameter) -> torch.Tensor:
            full = safe_get_full_fp32_param(p)
            return (full if full is not None else p).float()

        return _publishable(self.engine.module, value_of)

    def save(self, path: Path) -> None:
        """Model and optimiser state of every rank (a collective: call on all ranks)."""
        self.engine.save_checkpoint(str(path), tag=DS_TAG, client_state={"updates": self.updates},
                                    save_latest=False)

    def load(self, path: Path) -> None:
        loaded, client = self.engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")
        self.updates = int(client["updates"])


def make_trainer(model: torch.nn.Module, lc: LearnerConfig, repo_root: Path | None = None) -> Trainer:
    """The backend named by ``learner.backend``; a relative ``learner.deepspeed_config`` is
    resolved against the repository (where ``infra/deepspeed/`` lives)."""
    if lc.backend == "torch":
        return TorchTrainer(model, lc)
    path = Path(lc.deepspeed_config)
    if not path.is_absolute() and not path.exists():
        path = (repo_root or Path(__file__).resolve().parents[1]) / path
    return DeepSpeedTrainer(model, lc, path)


class BatchChannel:
    """Rank 0 hands every training batch to the other ranks: Arrow IPC bytes broadcast as a
    uint8 tensor (never pickle), preceded by a header (byte count, stop flag). The tensors live on
    the rank's device (the trainer's): NCCL broadcasts only GPU tensors, gloo CPU ones."""

    def __init__(self, trainer: Trainer) -> None:
        self.world_size = trainer.world_size
        self.device = trainer.device

    def send(self, groups: list[Columns] | None) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        payload = encode(SCORED_TRAJECTORY, concat(groups)) if groups else b""
        dist.broadcast(torch.tensor([len(payload), int(groups is None)], dtype=torch.int64, device=self.device), src=0)
        if payload:
            dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device), src=0)

    def recv(self) -> list[Columns] | None:
        import torch.distributed as dist

        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        if int(header[1]):
            return None
        buf = torch.empty(int(header[0]), dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, src=0)
        # Rank 0's own uncompressed encoding: its buffers hold no more than the payload itself.
        payload = buf.cpu().numpy().tobytes()
        _, cols = decode(SCORED_TRAJECTORY, payload, headers_for(SCORED_TRAJECTORY), max_decoded_bytes=len(payload))
        return split_groups(cols)
