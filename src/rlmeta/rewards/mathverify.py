"""MATH correctness with math-verify, single and batched with hard timeouts.

math-verify 0.9 times out with ``signal.alarm`` (``parse(..., parsing_timeout=int)``,
``verify(..., timeout_seconds=int)``), which only works in the main thread and cannot stop
code stuck in C. ``math_verify_batch`` therefore scores pairs in worker processes, each
under a ``setitimer`` alarm, and kills a worker that outlives its deadline: a pair that
times out or crashes scores 0.0.
"""
from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import signal
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import wait

from rlmeta.answers import boxed_key, last_boxed
from rlmeta.rewards import register

logging.getLogger("math_verify").setLevel(logging.ERROR)  # its own timeout/parse warnings
log = logging.getLogger(__name__)
STARTUP_S = 120.0
"""Seconds a new worker may take to import and warm up before it is given up on."""


def _parse_gold(reference: str, to: int | None):
    from math_verify import parse  # imported on first use: sympy takes a second to load

    return parse(f"${reference}$", parsing_timeout=to) or parse(f"\\boxed{{{reference}}}", parsing_timeout=to)


def _verify(completion: str, reference: str | None, to: int | None) -> float:
    from math_verify import parse, verify

    box = last_boxed(completion or "")
    if not box or not reference:
        return 0.0
    gold = _parse_gold(reference, to)
    pred = parse(f"\\boxed{{{box}}}", parsing_timeout=to)
    return 1.0 if gold and pred and verify(gold, pred, timeout_seconds=to) else 0.0


def verify_one(completion: str, reference=None, timeout_s: float = 5.0) -> float:
    """1 when the completion's last ``\\boxed{}`` equals the reference under math-verify, in this process.

    Uses math-verify's own (whole-second) timeouts in the main thread and none elsewhere;
    ``math_correct`` (worker processes with hard timeouts) is what scoring uses.
    """
    main = threading.current_thread() is threading.main_thread()
    try:
        return _verify(completion, reference, max(1, math.ceil(timeout_s)) if main else None)
    except Exception:
        return 0.0


@register("math_correct", "math-verify equivalence of the last \\boxed{} with the reference", batched=True,
          answer=boxed_key)
def math_correct(completions, references, prompts=None, timeout_s: float = 5.0, workers: int = 2) -> list[float]:
    """Batched: 1.0 per completion whose last ``\\boxed{}`` math-verify finds equal to its reference.

    Runs in ``workers`` processes, ``timeout_s`` seconds per pair (a timeout or crash scores 0);
    ``workers=0`` scores in this process.
    """
    return math_verify_batch(list(zip(completions, references)), workers=workers, timeout_s=timeout_s)


@register("boxed_present", "the completion has a \\boxed{} answer (the MATH format rate)")
def boxed_present(completion: str, reference=None, prompt=None) -> float:
    return 1.0 if last_boxed(completion or "") is not None else 0.0


class _Timeout(BaseException):
    """Raised by the worker's alarm; BaseException so sympy's ``except Exception`` cannot swallow it."""


def _alarm(signum, frame):
    raise _Timeout()


def _score_pair(completion: str, reference: str | None) -> float:
    return _verify(completion, reference, None)


def _worker(conn, timeout_s: float) -> None:
    """Say "ready", then score (index, completion, reference) messages until ``None``;
    reply (index, score), score -1.0 marking a timeout."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _verify("$\\boxed{1}$", "1", None)  # warm up lazy parser set-up outside any deadline
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        idx, completion, reference = msg
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                score = float(_score_pair(completion, reference))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException as e:
            score = -1.0 if isinstance(e, _Timeout) else 0.0
        conn.send((idx, score))


def default_context() -> str:
    """``fork`` on Linux (workers start at once), ``spawn`` elsewhere."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def math_verify_batch(pairs, workers: int = 2, timeout_s: float = 5.0, context: str | None = None) -> list[float]:
    """``math_correct`` of each (completion, reference) pair, in ``workers`` processes.

    A pair gets ``timeout_s`` seconds of alarm-bounded work; a worker still busy
    ``timeout_s + max(1, timeout_s)`` seconds after it got the pair is killed and replaced
    (the clock starts once the worker has started and warmed up).
    Timeouts and crashes score 0.0. ``workers=0`` scores inline (main thread only).
    """
    pairs = list(pairs)
    import math_verify  # noqa: F401  (loaded once here, so forked workers start warm)

    if workers <= 0:
        return [verify_one(c, r, timeout_s) for c, r in pairs]
    results = [0.0] * len(pairs)
    todo = deque(range(len(pairs)))
    ctx = mp.get_context(context or default_context())
    hard = timeout_s + max(1.0, timeout_s)
    idle: list = []
    busy: dict = {}  # conn -> (index, deadline)
    procs: dict = {}  # conn -> process
    failed = start_failures = 0

    def start():
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, timeout_s), daemon=True)
        p.start()
        child.close()
        procs[parent] = p
        busy[parent] = (None, time.monotonic() + STARTUP_S)  # until it says "ready"

    def lost(i):  # a worker died or hung while scoring pair i (None: while starting)
        nonlocal failed, start_failures
        failed += i is not None
        start_failures += i is None
        if start_failures > 2 * workers:
            raise RuntimeError("math-verify worker processes keep failing to start")

    def drop(conn):
        p = procs.pop(conn)
        p.kill()
        p.join()
        conn.close()

    try:
        for _ in range(min(workers, len(pairs))):
            start()
        while todo or busy:
            while idle and todo:
                conn, i = idle.pop(), todo.popleft()
                try:
                    conn.send((i, *pairs[i]))
                except OSError:  # the idle worker died: retry the pair on a fresh one
                    todo.appendleft(i)
                    drop(conn)
                    start()
                    continue
                busy[conn] = (i, time.monotonic() + hard)
            if not busy:
                continue
            ready = wait(list(busy), timeout=max(0.0, min(d for _, d in busy.values()) - time.monotonic()))
            for conn in ready:
                i, _ = busy.pop(conn)
                try:
                    msg = conn.recv()
                    if i is not None:
                        failed += msg[1] < 0
                        results[msg[0]] = max(msg[1], 0.0)
                    idle.append(conn)
                except (EOFError, OSError):  # the worker died: score 0, replace it
                    lost(i)
                    drop(conn)
                    if todo:
                        start()
            now = time.monotonic()
            for conn, (i, deadline) in list(busy.items()):
                if now >= deadline:
                    del busy[conn]
                    lost(i)
                    drop(conn)
                    if todo:
                        start()
    finally:
        for conn in list(procs):
            with contextlib.suppress(OSError):
                conn.send(None)
        for conn, p in list(procs.items()):
            p.join(timeout=1.0)
            drop(conn)
    if failed:
        log.warning("math_verify_batch: %d of %d pairs timed out or crashed (scored 0)", failed, len(pairs))
    return results
