"""Reward verifier: checks a model completion against a reference answer with math-verify.

Why one file: the normalisation rules (integer lists included), the status semantics and the two
timeout layers are one contract, documented here where they are enforced.

What counts as correct
    The gold answer and the completion are each parsed by ``math_verify.parse`` with LaTeX and
    plain-expression extraction; ``math_verify.verify(gold, pred)`` decides equality (string
    match, numeric match to 6 decimals, or symbolic equality). Gold answers are normalised first:
    a GSM8K solution keeps only the text after its last ``####``; escaped dollars (currency,
    ``\\$18.90``) and LaTeX's negative thin space (``32,\\!348``) are dropped; and a gold that is
    not already inside math delimiters (``$``, ``\\(``, ``\\[``, ``\\boxed``) is wrapped in
    ``$...$``, because math-verify only parses bare LaTeX reliably inside them (bare
    ``\\sqrt{2}`` parses to nothing, bare ``2\\pi`` to ``2``, a bare ``\\begin{pmatrix}`` to its
    last entry). Completions are parsed as they are, but for escaped dollars; ``\\boxed{...}`` has top priority, then "final answer is"-style anchors, then the
    last number or expression in the text (so "42", "#### 42" and "The answer is 42" all work; a
    completion with ``####`` is read after its last one, as GSM8K's answers are).
    ``\\frac{1}{2}`` against gold ``0.5`` is CORRECT (math-verify reads ``$0.5$`` as 1/2).

Integer lists (a fast path before math-verify)
    A completion made only of integers separated by whitespace, each with its sign attached
    (``" 7 12 10"``, ``" -3 -6"``, ``"42"``), against a gold that is one integer, is decided by
    its *last* integer, in plain Python (``integer_list_verdict``). This is the rule the text above
    states ("the last number"), made exact for the arithmetic task's worked solutions (running
    totals): math-verify's expression extraction reads ``" -3 -6"`` as the expression ``-3-6 = -9``
    and ``"6 -1"`` as 5 (and ``"34 63 824"`` as 63824, a space as thousands separator), which
    would mis-score every worked solution with a negative total after the first. A free-standing minus
    (``"6 - 1"``) is an expression and still goes to math-verify. The fast path costs about 2 µs
    against math-verify's ~0.9 ms, and ``VerifierPool`` applies it in the calling process, so the
    demo's completions never cross a pipe.

Statuses
    CORRECT (reward 1.0), WRONG (a math value was extracted and it does not match), NO_ANSWER
    (nothing was extracted; or only text that does not parse as math and does not string-match
    the gold; or the completion is longer than ``max_chars``, which is rejected,
    not truncated, because a cut can change the answer and the length cap exists to bound
    adversarial parse time), ERROR and TIMEOUT (all 0.0).
    ERROR is its own status because it means *the verifier* failed (math-verify or sympy raised,
    the gold did not parse, a worker process crashed), not that the model was wrong. Folding it
    into WRONG would hide verifier bugs and bad data behind a plausible reward; as its own
    status it is counted in ``VerifierPool.stats`` and can be alerted on. math-verify is called
    with ``raise_on_error=True`` so its internal exceptions reach us instead of becoming False.

Timeouts
    Two layers. (1) math-verify's own per-call ``signal.alarm`` timeouts (whole seconds; they
    only work in a main thread, so ``verify_one`` disables them off the main thread). When one
    fires, ``verify_one`` returns TIMEOUT. They cannot interrupt long-running C code such as a
    huge integer power, and a parse plus several comparisons each get their own alarm, so they
    do not bound the total. (2) ``VerifierPool`` therefore runs ``verify_one`` in worker processes
    and the *parent* enforces a per-item wall-clock deadline: a worker that has not answered
    within ``timeout_s`` is killed (SIGKILL), its item recorded as TIMEOUT, a fresh worker is
    started and the remaining items carry on. A worker that dies mid-item gives ERROR for that
    item and is replaced. ``workers=0`` runs in-process with layer (1) only, for tests/debugging.

Departure from the usual reward-function pattern, which logs a parse/verify exception and
scores it 0.0 exactly like a wrong answer: here it is ERROR (still reward 0.0, but visible).
"""

from __future__ import annotations

import importlib
import re
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import math_verify
from math_verify.errors import TimeoutException as _MathVerifyTimeout

__all__ = ["VerifyStatus", "Verdict", "verify_one", "integer_list_verdict", "math_verify_one", "VerifierPool",
           "DEFAULT_MAX_CHARS"]

DEFAULT_MAX_CHARS = 4000
VERIFIER_VERSION = 2
"""Raised whenever the same completion can get a different verdict (2: integer lists read by their
last number). Cached evaluations (`services.demo.base_eval_key`) include it."""
_DETAIL_CHARS = 200
_MATH_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")
_THOUSANDS = re.compile(r"(?<=\d),\\!\s*(?=\d{3}(?!\d))")
# Gold: bare LaTeX or expressions, no anchors needed. Completion: \boxed{} wins over anchors.
_GOLD_CONFIG = (math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig())
_PRED_CONFIG = (
    math_verify.LatexExtractionConfig(boxed_match_priority=0),
    math_verify.ExprExtractionConfig(),
)


class VerifyStatus(str, Enum):
    CORRECT = "correct"
    WRONG = "wrong"
    NO_ANSWER = "no_answer"  # nothing parseable in the completion (or it exceeded max_chars)
    ERROR = "error"  # the verifier itself failed: never reported as WRONG
    TIMEOUT = "timeout"  # math-verify's alarm fired, or the pool's parent-side deadline passed


@dataclass(frozen=True)
class Verdict:
    status: VerifyStatus
    reward: float  # 1.0 iff status is CORRECT, else 0.0
    detail: str  # what happened: parsed values or exception, at most ~200 chars


class VerifyFn(Protocol):
    def __call__(
        self, completion: str, answer: str, *, max_chars: int, signal_timeout_s: int | None
    ) -> Verdict: ...


def _truncate(text: str, limit: int = _DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _verdict(status: VerifyStatus, detail: str) -> Verdict:
    reward = 1.0 if status is VerifyStatus.CORRECT else 0.0
    return Verdict(status, reward, _truncate(detail))


def _describe_exc(exc: BaseException) -> str:
    try:
        message = str(exc)
    except Exception:  # a message built lazily from a huge sympy object can itself fail
        message = "<unprintable>"
    return f"{type(exc).__name__}: {message}"


def _shown(parsed: list) -> str:
    """The extracted source strings of a parse result. Never str() a sympy object here: printing
    a pathological expression can recurse or hang (math-verify warns about this too)."""
    strings = [x for x in parsed if isinstance(x, str)]
    return _truncate(repr(strings[0]), 60) if strings else f"<{type(parsed[0]).__name__}>"


def _gold_tail(answer: str) -> str:
    """A reference answer's final part: a GSM8K solution's text after its last ``####``, stripped."""
    return answer.rsplit("####", 1)[-1].strip() if "####" in answer else answer.strip()


def gold_text(answer: str) -> str:
    """Normalise a reference answer for parsing: GSM8K tail after ``####``, no escaped dollars or
    ``\\!``, then ``$...$`` unless already delimited."""
    text = _THOUSANDS.sub("", _gold_tail(answer))  # 32,\\!348 and 11,\\! 111 are thousands separators, not tuples
    text = text.replace("\\$", "").replace("\\!", "").strip()
    if text and not any(marker in text for marker in _MATH_DELIMITERS):
        text = f"${text}$"
    return text


def completion_text(completion: str) -> str:
    """A completion as parsed: after its last ``####`` if it has one (GSM8K's final-answer
    marker: the worked steps before it hold ``$`` signs and ``<<a+b=c>>`` notes that extraction
    would otherwise pick numbers from), escaped dollars (currency) dropped, since ``\\$36``
    otherwise hides the number from math-verify's extraction."""
    if "####" in completion:
        completion = completion.rsplit("####", 1)[1]
    return completion.replace("\\$", "")


_INTEGER = re.compile(r"[+-]?[0-9]{1,15}")
_INTEGER_LIST = re.compile(r"[ \t\n]*(?:-?[0-9]{1,15}[ \t\n]+)*-?[0-9]{1,15}[ \t\n]*")  # ASCII only


def integer_list_verdict(completion: str, answer: str) -> Verdict | None:
    """CORRECT or WRONG when the completion is only whitespace-separated integers (sign attached)
    and the gold is one integer: the completion's last integer is its answer. ``None`` for
    anything else (math-verify decides). At most 15 digits per number, so ints compare exactly as
    math-verify's numbers would."""
    gold = _gold_tail(answer)
    if not _INTEGER.fullmatch(gold) or not _INTEGER_LIST.fullmatch(completion):
        return None
    numbers = completion.split()  # the pattern allows only ASCII space, tab and newline between them
    shown = f"gold={gold!r} pred={numbers[-1]!r}" + (f" (last of {len(numbers)} numbers)" if len(numbers) > 1 else "")
    return _verdict(VerifyStatus.CORRECT if int(numbers[-1]) == int(gold) else VerifyStatus.WRONG, shown)


def precheck(completion: str, max_chars: int) -> Verdict | None:
    """The cheap checks done before any parsing; a Verdict if they already decide the item."""
    if len(completion) > max_chars:
        return _verdict(
            VerifyStatus.NO_ANSWER, f"completion too long: {len(completion)} > max_chars={max_chars}"
        )
    return None


def verify_one(
    completion: str,
    answer: str,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    signal_timeout_s: int | None = 5,
) -> Verdict:
    """Verify one completion against one reference answer, in-process. Never raises for bad input.

    ``signal_timeout_s`` is math-verify's per-call alarm in whole seconds (None/0 disables it); it
    is disabled automatically off the main thread, where ``signal.alarm`` cannot be used.
    """
    early = precheck(completion, max_chars) or integer_list_verdict(completion, answer)
    if early is not None:
        return early
    return math_verify_one(completion, answer, signal_timeout_s=signal_timeout_s)


def math_verify_one(completion: str, answer: str, *, signal_timeout_s: int | None = 5) -> Verdict:
    """``verify_one`` without its cheap checks: math-verify alone (parse gold, parse completion,
    compare)."""
    if threading.current_thread() is not threading.main_thread():
        signal_timeout_s = None
    stage = "parse gold"
    try:
        gold = math_verify.parse(
            gold_text(answer),
            extraction_config=_GOLD_CONFIG,
            parsing_timeout=signal_timeout_s,
            raise_on_error=True,
        )
        if not gold:
            return _verdict(VerifyStatus.ERROR, f"gold answer unparseable: {answer!r}")
        stage = "parse completion"
        pred = math_verify.parse(
            completion_text(completion),
            extraction_config=_PRED_CONFIG,
            parsing_timeout=signal_timeout_s,
            raise_on_error=True,
        )
        if not pred:
            return _verdict(VerifyStatus.NO_ANSWER, "no answer extracted from completion")
        stage = "compare"
        ok = math_verify.verify(gold, pred, timeout_seconds=signal_timeout_s, raise_on_error=True)
    except _MathVerifyTimeout:  # a BaseException in math-verify, so not caught below
        return _verdict(VerifyStatus.TIMEOUT, f"math-verify timeout ({signal_timeout_s}s) in {stage}")
    except Exception as exc:
        return _verdict(VerifyStatus.ERROR, f"{stage}: {_describe_exc(exc)}")
    shown = f"gold={_shown(gold)} pred={_shown(pred)}"
    if ok:
        return _verdict(VerifyStatus.CORRECT, shown)
    if all(isinstance(x, str) for x in pred):  # only math-verify's unparsed string fallback
        return _verdict(VerifyStatus.NO_ANSWER, f"extracted text is not parseable math: {shown}")
    return _verdict(VerifyStatus.WRONG, shown)


def _resolve(spec: str) -> VerifyFn:
    """Import a ``"module:function"`` spec (a string, so a spawned worker can import it)."""
    module_name, _, attr = spec.partition(":")
    fn = getattr(importlib.import_module(module_name), attr)
    if not callable(fn):
        raise TypeError(f"{spec} is not callable")
    return fn


_READY = "ready"
_DEFAULT_VERIFY_FN = "pipeline.verify.verifier:verify_one"


def _worker_main(conn, verify_fn: str, max_chars: int, signal_timeout_s: int | None) -> None:
    """Worker process loop. Receives ``(idx, completion, answer)`` of plain str (``None`` = stop),
    sends ``(idx, status, reward, detail)``. The first message is ``"ready"`` or a failure text."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        fn = _resolve(verify_fn)
        fn("0", "0", max_chars=max_chars, signal_timeout_s=signal_timeout_s)  # warm caches/regexes
    except BaseException as exc:
        conn.send(f"worker startup failed: {_describe_exc(exc)}")
        return
    conn.send(_READY)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        idx, completion, answer = msg
        try:
            v = fn(completion, answer, max_chars=max_chars, signal_timeout_s=signal_timeout_s)
            out = (idx, VerifyStatus(v.status).value, float(v.reward), str(v.detail))
        except Exception as exc:  # verify_one does not raise; a custom verify_fn might
            out = (idx, VerifyStatus.ERROR.value, 0.0, _truncate(f"verify fn: {_describe_exc(exc)}"))
        conn.send(out)


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: mp_connection.Connection
    state: str  # "starting" | "idle" | "busy"
    deadline: float  # monotonic; meaningful when starting or busy
    item: int | None = None


class VerifierPool:
    """Runs ``verify_one`` in ``workers`` spawned processes with a parent-enforced per-item timeout.

    Start method is "spawn": the parent (a trainer/reward service) may hold torch/CUDA threads,
    and forking a multithreaded process can copy locks in a held state (and CUDA cannot be
    forked). Spawn gives each worker a fresh interpreter and touches no global multiprocessing
    state (unlike "forkserver" preloading); the cost is ~0.5-1.5 s of imports per (re)start,
    which only timeouts and crashes pay. Workers are started and warmed up in ``__init__``, so import time never counts
    against an item's deadline.

    Spawned workers re-import the parent's ``__main__``, so a script that builds a pool needs the
    usual ``if __name__ == "__main__":`` guard (otherwise: RuntimeError at startup, not a hang).

    ``workers=0`` verifies in-process in the calling thread: no parent-side timeout, only
    math-verify's own alarms (main thread only). For tests and debugging.

    ``_verify_fn`` is a ``"module:function"`` spec with ``verify_one``'s signature, a test hook
    (e.g. a function that hangs on a sentinel). ``stats`` counts verdicts per status value
    cumulatively; ``restarts`` counts replaced workers.
    """

    def __init__(
        self,
        workers: int = 1,
        timeout_s: float = 5.0,
        max_chars: int = DEFAULT_MAX_CHARS,
        *,
        _verify_fn: str = _DEFAULT_VERIFY_FN,
        startup_timeout_s: float = 60.0,
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.workers = workers
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self.startup_timeout_s = startup_timeout_s
        # math-verify's alarms take whole seconds; keep them under the parent deadline so a slow
        # sympy call usually ends as a graceful TIMEOUT without killing the worker.
        self._signal_timeout_s = max(1, int(timeout_s / 2))
        self._verify_fn_spec = _verify_fn
        self.stats: dict[str, int] = {s.value: 0 for s in VerifyStatus}
        self.restarts = 0
        self._ctx = mp.get_context("spawn")
        self._slots: list[_Worker] = []
        self._closed = False
        if workers == 0:
            self._inline_fn: Callable[..., Verdict] = _resolve(_verify_fn)
            return
        try:
            for _ in range(workers):  # appended one by one so close() reaps partial starts
                self._slots.append(self._start_worker())
            self._run(pairs=[], queue=deque(), results=[])  # wait until every worker is ready
        except BaseException:
            self.close()
            raise

    # -- public -----------------------------------------------------------------------------

    def verify(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        """Verify ``(completion, answer)`` pairs; verdicts come back in the same order."""
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        for i, (completion, answer) in enumerate(pairs):
            if type(completion) is not str or type(answer) is not str:  # only plain str is sent
                raise TypeError(f"pair {i}: completion and answer must be str")
        # The cheap checks run here; with the default verify function, so does the integer-list
        # fast path (a custom one, e.g. a test hook, sees every item that passes precheck).
        fast = self._verify_fn_spec == _DEFAULT_VERIFY_FN
        results: list[Verdict | None] = [precheck(c, self.max_chars) or (integer_list_verdict(c, a) if fast else None)
                                         for c, a in pairs]
        queue = deque(i for i, r in enumerate(results) if r is None)
        if self.workers == 0:
            for i in queue:
                completion, answer = pairs[i]
                results[i] = self._inline_fn(
                    completion,
                    answer,
                    max_chars=self.max_chars,
                    signal_timeout_s=self._signal_timeout_s,
                )
        else:
            self._run(pairs, queue, results)
        verdicts: list[Verdict] = []
        for r in results:
            assert r is not None
            self.stats[r.status.value] += 1
            verdicts.append(r)
        return verdicts

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._slots:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self._slots:
            w.proc.join(timeout=1.0)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=1.0)
            w.conn.close()
        self._slots = []

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self._verify_fn_spec, self.max_chars, self._signal_timeout_s),
            name="rlstream-verifier",
            daemon=True,
        )
        proc.start()
        child_conn.close()  # so recv() sees EOF when the child dies
        deadline = time.monotonic() + self.startup_timeout_s
        return _Worker(proc, parent_conn, "starting", deadline)

    def _restart(self, slot: int) -> None:
        old = self._slots[slot]
        if old.proc.is_alive():
            old.proc.kill()
        old.proc.join(timeout=1.0)
        old.conn.close()
        self.restarts += 1
        self._slots[slot] = self._start_worker()

    def _run(
        self,
        pairs: Sequence[tuple[str, str]],
        queue: deque[int],
        results: list[Verdict | None],
    ) -> None:
        """Dispatch queued items to idle workers until the queue is empty and no worker is busy
        or starting. Raises RuntimeError if a worker cannot start (bad spec, broken env)."""
        resent: set[int] = set()
        while True:
            for slot, w in enumerate(self._slots):
                if w.state != "idle" or not queue:
                    continue
                idx = queue.popleft()
                if self._dispatch(slot, idx, pairs):
                    continue
                if idx in resent:  # a worker died idle twice in a row for this item
                    results[idx] = _verdict(VerifyStatus.ERROR, "could not send item to a worker")
                else:  # the idle worker died between items: not this item's fault, retry once
                    resent.add(idx)
                    queue.appendleft(idx)
            waiting = [w for w in self._slots if w.state != "idle"]
            if not waiting:
                return
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            ready = mp_connection.wait([w.conn for w in waiting], timeout=timeout)
            for conn in ready:
                slot = next(i for i, w in enumerate(self._slots) if w.conn is conn)
                self._receive(slot, results)
            now = time.monotonic()
            for slot, w in enumerate(self._slots):
                if w.state == "idle" or w.deadline > now or w.conn in ready:
                    continue
                if w.state == "starting":
                    raise RuntimeError(f"verifier worker not ready after {self.startup_timeout_s}s")
                assert w.item is not None
                results[w.item] = _verdict(
                    VerifyStatus.TIMEOUT,
                    f"no answer within {self.timeout_s}s; worker pid {w.proc.pid} killed",
                )
                self._restart(slot)

    def _dispatch(self, slot: int, idx: int, pairs: Sequence[tuple[str, str]]) -> bool:
        """Send one item to an idle worker; False (and a restart) if the worker is gone."""
        w = self._slots[slot]
        completion, answer = pairs[idx]
        try:
            w.conn.send((idx, completion, answer))
        except OSError:
            self._restart(slot)
            return False
        w.state, w.item, w.deadline = "busy", idx, time.monotonic() + self.timeout_s
        return True

    def _receive(self, slot: int, results: list[Verdict | None]) -> None:
        w = self._slots[slot]
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            w.proc.join(timeout=1.0)
            if w.state == "starting":
                raise RuntimeError(
                    f"verifier worker exited during startup (exitcode {w.proc.exitcode})"
                ) from None
            assert w.item is not None
            results[w.item] = _verdict(
                VerifyStatus.ERROR, f"worker pid {w.proc.pid} died, exitcode {w.proc.exitcode}"
            )
            self._restart(slot)
            return
        if w.state == "starting":
            if msg != _READY:
                raise RuntimeError(str(msg))
            w.state = "idle"
            return
        idx, status, reward, detail = msg
        if idx != w.item:
            raise RuntimeError(f"verifier protocol error: expected item {w.item}, got {idx}")
        results[idx] = Verdict(VerifyStatus(status), float(reward), detail)
        w.state, w.item = "idle", None
