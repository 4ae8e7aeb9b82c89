"""Evaluation metrics for DRG coding (PAPER.md "Evaluation"); pure functions, no I/O.

k answers are sampled per case (the paper: 8, temperature 0.6, top_p 0.95).
- Pass@1: mean correctness over the k answers.
- Pass@k: 1 if any of the k answers is correct.
- Maj@k: 1 if the most frequent answer is correct. Completions with no extractable answer do not
  vote (like a mode that drops missing values); ties go to the tied answer sampled first, so the
  result depends only on the order of the samples. No votes at all -> wrong.
Each metric is reported at three levels:
- drg: the answer is exactly the gold v34 title;
- base: the answer is a v34 title with the gold's base DRG (base_drg_id of the base/severity
  table; the principal diagnosis in PAPER.md);
- severity: the answer is a v34 title with the gold's cc_mcc code (the CC/MCC status; two
  titles without a severity split agree).
An answer that is not one of the 757 titles is wrong at every level. For Maj@k the majority DRG
answer is chosen first and then judged at each level.

Uncertainty: `bootstrap_mean` is a percentile bootstrap over test cases (Efron & Tibshirani 1993,
ch. 13); `paired_bootstrap` resamples the same cases for two models, so the interval of a
difference (SFT -> SFT+GRPO on one test set) excludes the case-to-case variance both share.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from recipes.drg.rewards import parse_completion
from recipes.drg.tables import DrgTables, load_tables, normalize

LEVELS = ("drg", "base", "severity")
METRICS = ("pass@1", "pass@k", "maj@k")


def extract_answer(completion: str) -> str | None:
    """Upper-cased, stripped answer of a well-formed completion; None if malformed or empty.

    Well-formed = the reward's format check (one think block, then one answer block).
    """
    parsed = parse_completion(completion)
    if parsed is None:
        return None
    answer = normalize(parsed[1])
    return answer or None


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """Most frequent non-None answer (normalised); ties -> the one that appears first."""
    votes = [normalize(a) for a in answers if a is not None]
    if not votes:
        return None
    counts = Counter(votes)
    best = max(counts.values())
    return next(a for a in votes if counts[a] == best)


def judge(answer: str | None, gold: str, tables: DrgTables | None = None) -> dict[str, bool]:
    """Correctness of one answer at the drg / base / severity levels."""
    tables = tables or load_tables()
    truth = tables.lookup(gold)
    if truth is None:
        raise ValueError(f"gold is not a v34 description: {gold!r}")
    predicted = tables.lookup(answer)
    if predicted is None:
        return {level: False for level in LEVELS}
    return {
        "drg": predicted.number == truth.number,
        "base": predicted.base_id == truth.base_id,
        "severity": predicted.severity == truth.severity,
    }


def case_metrics(answers: Sequence[str | None], gold: str,
                 tables: DrgTables | None = None) -> dict[str, float]:
    """Pass@1, Pass@k and Maj@k at each level for one case; keys like "drg/pass@1"."""
    if len(answers) == 0:
        raise ValueError(f"no sampled answers for gold {gold!r}")
    tables = tables or load_tables()
    judged = [judge(a, gold, tables) for a in answers]
    majority = judge(majority_answer(answers), gold, tables)
    out = {}
    for level in LEVELS:
        hits = [j[level] for j in judged]
        out[f"{level}/pass@1"] = sum(hits) / len(hits)
        out[f"{level}/pass@k"] = float(any(hits))
        out[f"{level}/maj@k"] = float(majority[level])
    return out


def evaluate_cases(samples: Sequence[Sequence[str | None]], golds: Sequence[str],
                   tables: DrgTables | None = None) -> dict:
    """Mean of `case_metrics` over cases (fractions in [0, 1]), plus "cases", "k" and "per_case"
    (each metric's list of per-case values, in case order)."""
    if len(samples) != len(golds):
        raise ValueError(f"{len(samples)} sample lists but {len(golds)} gold descriptions")
    if not golds:
        raise ValueError("no cases to evaluate")
    tables = tables or load_tables()
    per_case = [case_metrics(answers, gold, tables) for answers, gold in zip(samples, golds)]
    summary = {key: sum(c[key] for c in per_case) / len(per_case) for key in per_case[0]}
    ks = {len(answers) for answers in samples}
    summary["per_case"] = {key: [c[key] for c in per_case] for key in per_case[0]}  # for bootstrap intervals
    summary["cases"] = float(len(per_case))
    summary["k"] = float(ks.pop()) if len(ks) == 1 else float("nan")  # nan: k varies by case
    return summary


def _resample_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(values), size=(resamples, len(values)))  # (resamples, cases)
    return values[index].mean(axis=1)


def bootstrap_mean(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of `values` with its percentile-bootstrap interval: {"mean", "low", "high", "n"}."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to bootstrap")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    means = _resample_means(x, resamples, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(x.mean()), "low": float(low), "high": float(high), "n": int(x.size)}


def paired_bootstrap(before: Sequence[float], after: Sequence[float], level: float = 0.95,
                     resamples: int = 2000, seed: int = 0) -> dict:
    """after - before on the same cases, resampled together: {"mean", "low", "high", "n"} of the difference."""
    if len(before) != len(after):
        raise ValueError(f"paired values differ in length: {len(before)} vs {len(after)}")
    diff = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    return bootstrap_mean(diff, level, resamples, seed)
