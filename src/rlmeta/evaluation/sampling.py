"""Metrics over the k samples of a prompt: pass@k, maj@k and mean@k.

- **pass@k** is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
  on Code", eq. 1): with n samples of which c are correct, ``1 - C(n-c, k) / C(n, k)``, the chance
  that at least one of k samples drawn without replacement from the n is correct. Computed in the
  product form of their code (no huge binomials).
- **maj@k** (majority voting, self-consistency; Wang et al. 2023): the most frequent final answer
  among the first k samples (``RewardSpec.answer`` extracts it), correct when that answer is. Ties go
  to the answer that appeared first, as lm-evaluation-harness's ``majority_vote`` does
  (``Counter.most_common``). Samples without an answer do not vote; none at all scores 0.
- **mean@k** is the mean accuracy of the samples, which does not depend on k (the plain accuracy).

Each is a per-prompt value, so base and trained compare with the same paired bootstrap over prompts
as every other number (``rlmeta.evaluation.stats``).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al.'s unbiased pass@k for ``c`` correct of ``n`` samples (``1 <= k <= n``)."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_correct(answers: Sequence[str | None], correct: Sequence[float], k: int) -> float:
    """maj@k of one prompt: 1.0 when the majority answer of the first ``k`` samples is correct.

    ``answers[i]`` is sample i's extracted answer (None: no answer), ``correct[i]`` its accuracy (0/1).
    The majority answer's correctness is that of the first sample that gave it."""
    votes = [(a, c) for a, c in zip(answers[:k], correct[:k]) if a is not None]
    if not votes:
        return 0.0
    winner, _ = Counter(a for a, _ in votes).most_common(1)[0]  # ties: first seen (insertion order)
    return float(next(c for a, c in votes if a == winner) >= 0.5)


def per_prompt(samples: Sequence[tuple[str | None, float]], ks: Sequence[int]) -> dict[str, dict[int, float]]:
    """{"pass": {k: pass@k}, "maj": {k: maj@k}} of one prompt's samples ``(answer, correct)`` in sample order."""
    n, c = len(samples), int(sum(x >= 0.5 for _, x in samples))
    answers, correct = [a for a, _ in samples], [x for _, x in samples]
    return {"pass": {k: pass_at_k(n, c, k) for k in ks}, "maj": {k: majority_correct(answers, correct, k) for k in ks}}
