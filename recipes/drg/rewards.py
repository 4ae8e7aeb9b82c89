"""Rule-based DRG rewards (PAPER.md "Rewards"): total = format + accuracy (+ CoT-first penalty).

- Format: 0 if the whole completion is `<think>...</think><answer>...</answer>` (exactly one
  block of each, whitespace allowed around and between), else -2; accuracy is then 0.
- Accuracy: the answer (upper-cased, stripped) must be one of the 757 v34 descriptions, else
  -1.5 (also when empty). Exact DRG -> 2.0. Otherwise, by scheme:
    strict   0
    dense    same base DRG -> 1.5; else same severity -> 0.5; else -0.5
    balanced same base DRG -> 1.0; else same severity -> 1.0; else -0.5
  "balanced" is the paper's (appendix A.2: exact 2.0, principal diagnosis only 1.0, CC/MCC status
  only 1.0, any other valid DRG -0.5, invalid -1.5); the released code has none, so this is its
  one implementation here.
  Base and severity come from `drg_34_base_severity.csv` (base_drg_id, cc_mcc). Severity partial
  credit needs a gold DRG that has a severity split (cc_mcc != 4): the reference code also gives
  none to titles without WITH/WITHOUT.
- `compat=True` reproduces the reference code (rewards_dense.py): its format regex, exact match
  tested as "gold is a substring of the answer" (24 wrong pairs score 2.0), and principal/status
  from the first whole-word WITH/WITHOUT, each tested as a substring of the answer.
- CoT-first penalty (PAPER.md "Training", ablations): a v34 title inside the first 50
  whitespace tokens of the think block adds `cot_first_penalty` (<= 0; 0, the default, disables
  it; the paper gives no value, SUGGESTED_COT_FIRST_PENALTY = -1.0 is this recipe's choice).

Components reported per completion: format, accuracy, cot_penalty and correct (1.0 iff the
answer is exactly the gold title, in compat mode too, so accuracy reports stay honest).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from recipes.drg.tables import NO_SPLIT, DrgTables, first_with_split, load_tables, normalize

FORMAT_FAIL = -2.0
INVALID_ANSWER = -1.5
EXACT = 2.0
COT_WINDOW_TOKENS = 50
SUGGESTED_COT_FIRST_PENALTY = -1.0

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT = re.compile(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>\s*", re.DOTALL)
# The reference format check and answer extraction (rewards_dense.py), for compat=True.
_REFERENCE_FORMAT = re.compile(
    r"^\s*<think>.*?</think>\s*<answer>(?:(?!<answer>|</answer>).)*?</answer>\s*$", re.DOTALL
)
_REFERENCE_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class PartialCredit:
    """Accuracy for a valid but wrong answer: same base DRG, else same severity, else other."""

    base: float
    severity: float
    other: float


SCHEMES = {
    "strict": PartialCredit(0.0, 0.0, 0.0),
    "dense": PartialCredit(1.5, 0.5, -0.5),
    "balanced": PartialCredit(1.0, 1.0, -0.5),  # the paper's appendix A.2
}


def parse_completion(completion: str) -> tuple[str, str] | None:
    """(think, answer) when the completion is exactly one think block then one answer block."""
    if any(completion.count(tag) != 1 for tag in _TAGS):
        return None
    match = _FORMAT.fullmatch(completion)
    if match is None:
        return None
    return match.group(1), match.group(2).strip()


def cot_mentions_title(think: str, tables: DrgTables, window: int = COT_WINDOW_TOKENS) -> bool:
    """True when a whole v34 title lies inside the first `window` whitespace tokens of `think`."""
    head = " ".join(think.split()[:window]).upper()
    return any(title in head for title in tables.descriptions)


@dataclass
class DrgReward:
    """`reward_fn(completions, metadata) -> (rewards, components)`; metadata[i]["solution"] is gold."""

    name: str
    compat: bool = False
    cot_first_penalty: float = 0.0
    cot_window: int = COT_WINDOW_TOKENS
    tables: DrgTables = field(default_factory=load_tables, repr=False)

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise ValueError(f"unknown DRG reward {self.name!r}; valid names: {sorted(SCHEMES)}")
        if self.cot_first_penalty > 0:
            raise ValueError(f"cot_first_penalty must be <= 0, got {self.cot_first_penalty}")
        if self.cot_window < 1:
            raise ValueError(f"cot_window must be >= 1, got {self.cot_window}")
        self.credit = SCHEMES[self.name]

    def __call__(self, completions: list[str], metadata: list[dict]):
        if len(completions) != len(metadata):
            raise ValueError(f"{len(completions)} completions but {len(metadata)} metadata rows")
        components: dict[str, list[float]] = {
            "format": [], "accuracy": [], "cot_penalty": [], "correct": []
        }
        for i, (completion, meta) in enumerate(zip(completions, metadata)):
            solution = meta.get("solution") if isinstance(meta, dict) else None
            if not isinstance(solution, str) or not solution.strip():
                raise ValueError(f"metadata[{i}] has no 'solution' (gold v34 description)")
            for key, value in self.score(completion, solution).items():
                components[key].append(value)
        rewards = [f + a + c for f, a, c in zip(
            components["format"], components["accuracy"], components["cot_penalty"])]
        return rewards, components

    def score(self, completion: str, solution: str) -> dict[str, float]:
        gold = normalize(solution)
        if gold not in self.tables.by_description:
            raise ValueError(f"solution is not a v34 description: {solution!r}")
        if self.compat:
            if not _REFERENCE_FORMAT.fullmatch(completion):
                return _scores(FORMAT_FAIL, 0.0, 0.0, False)
            found = _REFERENCE_ANSWER.search(completion)
            think = completion.split("</think>", 1)[0].split("<think>", 1)[-1]
            answer = normalize(found.group(1))
        else:
            parsed = parse_completion(completion)
            if parsed is None:
                return _scores(FORMAT_FAIL, 0.0, 0.0, False)
            think, answer = parsed[0], normalize(parsed[1])
        penalty = 0.0
        if self.cot_first_penalty and cot_mentions_title(think, self.tables, self.cot_window):
            penalty = self.cot_first_penalty
        accuracy = self._accuracy(answer, gold)
        return _scores(0.0, accuracy, penalty, answer == gold)

    def _accuracy(self, answer: str, gold: str) -> float:
        predicted = self.tables.by_description.get(answer)
        if not answer or predicted is None:
            return INVALID_ANSWER
        if self.compat:
            return self._reference_accuracy(answer, gold)
        if answer == gold:
            return EXACT
        truth = self.tables.by_description[gold]
        if predicted.base_id == truth.base_id:
            return self.credit.base
        if truth.severity != NO_SPLIT and predicted.severity == truth.severity:
            return self.credit.severity
        return self.credit.other

    def _reference_accuracy(self, answer: str, gold: str) -> float:
        if gold in answer:  # the reference's exact-match test (quirk 1)
            return EXACT
        split = first_with_split(gold)  # quirk 2: principal/status at the first WITH/WITHOUT
        if split is None:
            return self.credit.other
        principal, status = split
        if principal and principal in answer:
            return self.credit.base
        if status and status in answer:
            return self.credit.severity
        return self.credit.other


def _scores(fmt: float, accuracy: float, penalty: float, correct: bool) -> dict[str, float]:
    return {"format": fmt, "accuracy": accuracy, "cot_penalty": penalty,
            "correct": 1.0 if correct else 0.0}


def make_reward(name: str, compat: bool = False, cot_first_penalty: float = 0.0) -> DrgReward:
    """Reward by scheme name: "strict", "dense" or "balanced" (ValueError otherwise)."""
    return DrgReward(name=name, compat=compat, cot_first_penalty=cot_first_penalty)
