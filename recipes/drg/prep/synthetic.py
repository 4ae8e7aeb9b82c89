"""Synthetic DRG cases labelled by a real MS-DRG grouper (drgpy), for runs without MIMIC-IV.

    python -m recipes.drg.prep.synthetic --synthetic.out=data/drg_synth.jsonl --synthetic.n=2000 \
        [--synthetic.seed=0] [--synthetic.difficulty=easy|medium|hard] [--synthetic.num_drgs=K] \
        [--synthetic.principals=J18,I50,...] [--synthetic.paraphrase=0-2]
    python -m recipes.drg.prep.synthetic --config synth.yaml   # the same keys under `synthetic:` in a YAML file
    python -m recipes.drg.prep.synthetic --help                # every config key with its default

A case: a principal diagnosis (ICD-10-CM) or, for surgical DRGs, a principal diagnosis plus an
O.R. procedure (ICD-10-PCS); secondary diagnoses sampled to reach a target severity (a CC, an
MCC, or neither) from drgpy's CC/MCC lists, honouring its CC exclusions; distractors (CCs
excluded by the principal, non-O.R. procedures, past history, ruled-out conditions); a
MIMIC-style brief hospital course (synthetic_render.py). The label is what drgpy's v36 grouper
returns for the codes, mapped to the v34 title with the same DRG NUMBER; numbers absent from v34
are rejected. 43 numbers have a v36 title that differs from v34 (mostly spelling; ECMO/TIA/ankle
wording widened in a few); the curated pools avoid the widened criteria.

A case is also rejected (and redrawn) unless the grouper agrees with the reasoning written into
its chain of thought: the base DRG is that of the principal alone, the non-O.R. procedures do not
move it, and the severity is the one the counted CC/MCC imply. So `cot` is never wrong about the
label. Labels follow v36 grouping logic (CC lists and exclusions of FY2019), not v34's.

Output: JSONL with the MIMIC schema (records.RECORD_FIELDS) plus `codes` and `cot`. A missing or
bad key, or a knob the label space cannot meet (more DRGs than are reachable, principals that match
nothing), is one `error: ...` line naming the key, exit code 2.
"""

from __future__ import annotations

import functools
import random
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import icd10
from drgpy.msdrg import DRGEngine

from minigrpo.cli import run_command
from minigrpo.config import ConfigError, check, load_config, section, split_cli
from minigrpo.help import print_help, wants_help
from recipes.drg.prep.synthetic_render import Case, Secondary, render_cot, render_course
from recipes.drg.prep.synthetic_vocab import (HISTORY_MENTIONS, NON_OR_PROCEDURES, PRINCIPAL_CATEGORIES, RULED_OUT,
                                              SECONDARY_CARE, SURGICAL_CASES)
from recipes.drg.records import make_record, write_jsonl_atomic
from recipes.drg.tables import DrgEntry, DrgTables, load_tables

GROUPER_VERSION = "v36"  # the oldest MS-DRG version drgpy ships; v34 itself is not available
MAX_TRIES = 200  # redraws per case before giving up


@dataclass(frozen=True, slots=True)
class Knobs:
    paraphrase: int  # 0-2, see synthetic_render
    max_secondaries: int
    excluded_cc: float  # probability of adding a CC/MCC that the principal excludes
    non_or: float  # probability of non-O.R. procedures
    history: float  # probability of past-history mentions
    ruled_out: float  # probability of a ruled-out condition


DIFFICULTY = {
    "easy": Knobs(0, 2, 0.0, 0.0, 0.0, 0.0),
    "medium": Knobs(1, 4, 0.3, 0.3, 0.4, 0.3),
    "hard": Knobs(2, 6, 0.7, 0.6, 0.7, 0.7),
}
# Severity code wanted for the highest counted level, in order of preference (tables.py codes).
_PREFERENCE = {"MCC": (2, 1), "CC": (1, 3), None: (0, 3)}


@dataclass(frozen=True)
class Principal:
    key: str  # sampling group: ICD-10-CM prefix or "surgical:<pcs>"
    code: str
    procedure: str | None
    procedure_text: str | None
    sex: str | None
    care: tuple[str, ...]
    base: DrgEntry  # the grouper's DRG for the principal (and procedure) alone


class Grouper:
    """drgpy's grouper with the DRG number mapped to the v34 table entry."""

    def __init__(self, tables: DrgTables):
        self.engine = _engine()
        self.tables = tables
        self.principal_pool: list[Principal] | None = None  # filled by build_principals

    def group(self, diagnoses: list[str], procedures: list[str], sex: str) -> DrgEntry | None:
        number = int(self.engine.get_drg(diagnoses, procedures, gender=sex))
        return self.tables.by_number.get(number)  # None: number absent from v34

    def secondary(self, code: str, principal: str) -> Secondary:
        info = self.engine.ccmap.get(code)
        if info is None:
            return Secondary(code, None)
        excluded = principal in self.engine.exmap.get(info["pdx"], ())
        return Secondary(code, info["level"], excluded)


@functools.lru_cache(maxsize=1)
def _engine() -> DRGEngine:
    return DRGEngine(GROUPER_VERSION)  # ~1 s to load; shared read-only by every Grouper


@functools.lru_cache(maxsize=1)
def default_grouper() -> Grouper:
    return Grouper(load_tables())


def regroup(codes: dict, grouper: Grouper | None = None) -> int:
    """DRG number drgpy gives the `codes` of a synthetic record (for checking labels)."""
    grouper = grouper or default_grouper()
    dx = [codes["principal"], *codes["secondary"]]
    return int(grouper.engine.get_drg(dx, codes["procedures"], gender=codes["sex"]))


def build_principals(grouper: Grouper, only: list[str] | None = None) -> list[Principal]:
    """Principal options whose grouping alone is stable and lands where the vocabulary expects."""
    if grouper.principal_pool is None:
        grouper.principal_pool = _principal_pool(grouper)
    out = grouper.principal_pool
    if only:
        out = [p for p in out if any(p.code.startswith(o.replace(".", "").upper()) for o in only)]
        if not out:
            raise ConfigError(f"no usable principal diagnosis matches {only}", key="principals")
    return out


def _principal_pool(grouper: Grouper) -> list[Principal]:
    out = []
    for prefix, expected, care in PRINCIPAL_CATEGORIES:
        for code in sorted(c for c, (billable, _) in icd10.codes.items()
                           if billable and c.startswith(prefix)):
            if code[0] in "ST" and not code.endswith("A"):
                continue  # injuries: initial encounter only
            if code not in grouper.engine.dxmap or not grouper.engine.dxmap[code]:
                continue
            alone = {grouper.group([code], [], sex) for sex in "FM"}
            if len(alone) == 1 and (base := alone.pop()) and base.number == expected:
                out.append(Principal(prefix, code, None, None, None, tuple(care), base))
    for code, pcs, text, sex in SURGICAL_CASES:
        base = grouper.group([code], [pcs], sex or "F")
        if base is not None and base.surgical:
            care = ("Admitted electively for surgery",) if code[0] in "MDE" else (
                "Surgery was consulted on admission",)
            out.append(Principal(f"surgical:{pcs}", code, pcs, text, sex, care, base))
    return out


class Generator:
    def __init__(self, seed: int = 0, difficulty: str = "medium", num_drgs: int | None = None,
                 principals: list[str] | None = None, paraphrase: int | None = None,
                 tables: DrgTables | None = None):
        if difficulty not in DIFFICULTY:
            raise ConfigError(f"unknown difficulty {difficulty!r}; valid: {sorted(DIFFICULTY)}", key="difficulty")
        if paraphrase is not None and paraphrase not in (0, 1, 2):
            raise ConfigError(f"paraphrase must be 0, 1 or 2, got {paraphrase}", key="paraphrase")
        self.grouper = Grouper(tables) if tables is not None else default_grouper()
        self.tables = self.grouper.tables
        self.knobs = DIFFICULTY[difficulty]
        self.paraphrase = self.knobs.paraphrase if paraphrase is None else paraphrase
        self.seed = seed
        self.rng = random.Random(seed)
        self.levels: dict[int, list[DrgEntry]] = defaultdict(list)
        for entry in sorted(self.tables.by_number.values(), key=lambda e: e.number):
            self.levels[entry.base_id].append(entry)
        self.options = self._targets(build_principals(self.grouper, principals))
        if num_drgs is not None:
            reachable = sorted({e.number for p in self.options for e in self.options[p].values()})
            if not 1 <= num_drgs <= len(reachable):
                raise ConfigError(f"num_drgs must be in [1, {len(reachable)}], got {num_drgs}", key="num_drgs")
            keep = set(random.Random(seed).sample(reachable, num_drgs))
            self.options = {p: {lvl: e for lvl, e in t.items() if e.number in keep}
                            for p, t in self.options.items()}
            self.options = {p: t for p, t in self.options.items() if t}
        self.groups: dict[str, list[Principal]] = defaultdict(list)
        for p in self.options:
            self.groups[p.key].append(p)

    def expected(self, base: DrgEntry, highest: str | None) -> DrgEntry | None:
        levels = self.levels[base.base_id]
        if len(levels) == 1:
            return levels[0]
        by_code = {e.severity: e for e in levels}
        return next((by_code[c] for c in _PREFERENCE[highest] if c in by_code), None)

    def _targets(self, principals: list[Principal]) -> dict[Principal, dict]:
        """For each principal: reachable severity target -> the v34 entry it should give."""
        targets = {}
        for p in principals:
            pools = self._pools(p)
            reach = {}
            for highest in (None, "CC", "MCC"):
                if highest and not pools[highest]:
                    continue
                entry = self.expected(p.base, highest)
                if entry is not None:
                    reach[highest] = entry
            targets[p] = reach
        return targets

    def _pools(self, p: Principal) -> dict:
        pools = {None: [], "CC": [], "MCC": [], "excluded": []}
        for code in SECONDARY_CARE:
            if code[:3] == p.code[:3]:
                continue
            sec = self.grouper.secondary(code, p.code)
            pools["excluded" if sec.excluded else sec.level].append(sec)
        return pools

    def sample_case(self) -> tuple[Case, Principal, DrgEntry]:
        rng, k = self.rng, self.knobs
        for _ in range(MAX_TRIES):
            p = rng.choice(self.groups[rng.choice(sorted(self.groups))])
            highest = rng.choice(sorted(self.options[p], key=str))
            pools = self._pools(p)
            chosen = []
            if highest == "MCC":
                chosen += rng.sample(pools["MCC"], 1)
            if highest in ("MCC", "CC") and pools["CC"] and (highest == "CC" or rng.random() < .5):
                chosen += rng.sample(pools["CC"], 1)
            if pools["excluded"] and rng.random() < k.excluded_cc:
                chosen += rng.sample(pools["excluded"], 1)
            fill = max(0, rng.randint(0, k.max_secondaries) - len(chosen))
            chosen += rng.sample(pools[None], min(fill, len(pools[None])))
            rng.shuffle(chosen)
            non_or = (rng.sample(sorted(NON_OR_PROCEDURES), rng.randint(1, 2))
                      if rng.random() < k.non_or else [])
            case = Case(p.code, chosen, p.procedure, p.procedure_text, non_or,
                        p.sex or rng.choice("FM"),
                        rng.sample(HISTORY_MENTIONS, rng.randint(1, 2)) if rng.random() < k.history else [],
                        rng.sample(RULED_OUT, 1) if rng.random() < k.ruled_out else [])
            final = self._check(case, p, highest)
            if final is not None:
                return case, p, final
        raise RuntimeError(f"no consistent case after {MAX_TRIES} draws; widen the label space")

    def _check(self, case: Case, p: Principal, highest: str | None) -> DrgEntry | None:
        """The grouper's label, or None when it disagrees with the reasoning the CoT will state."""
        dx = [case.principal] + [s.code for s in case.secondaries]
        surgery = [case.procedure] if case.procedure else []
        final = self.grouper.group(dx, surgery + case.non_or, case.sex)
        if final is None or final != self.options[p].get(highest):
            return None
        if case.non_or and self.grouper.group(dx, surgery, case.sex) != final:
            return None
        return final

    def generate(self, n: int) -> list[dict]:
        rows = []
        for i in range(n):
            case, p, final = self.sample_case()
            text = render_course(case, self.rng.choice(p.care), self.paraphrase, self.rng)
            codes = {"principal": case.principal, "secondary": [s.code for s in case.secondaries],
                     "procedures": ([case.procedure] if case.procedure else []) + case.non_or,
                     "sex": case.sex, "grouper": f"drgpy {GROUPER_VERSION}"}
            cot = render_cot(case, p.base, final, self.levels[final.base_id])
            rows.append(make_record(f"synth-{self.seed}-{i:06d}", 90_000_000 + i, text,
                                    final.description, self.tables, codes=codes, cot=cot))
        return rows


def generate(n: int, seed: int = 0, difficulty: str = "medium", num_drgs: int | None = None,
             principals: list[str] | None = None, paraphrase: int | None = None) -> list[dict]:
    """n synthetic records (same seed and knobs -> identical records)."""
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}", key="n")
    return Generator(seed, difficulty, num_drgs, principals, paraphrase).generate(n)


@dataclass(slots=True)
class SyntheticSettings:
    """The `synthetic` section: how many cases, which knobs, and the output file."""

    out: str = ""  # output JSONL file (required)
    n: int = 0  # cases to write (required, >= 1)
    seed: int = 0  # same seed and knobs -> identical records
    difficulty: Literal["easy", "medium", "hard"] = "medium"  # distractor knobs (DIFFICULTY)
    num_drgs: int = 0  # keep K distinct DRGs of those reachable; 0 = all
    principals: list[str] = field(default_factory=list)  # ICD-10-CM codes or prefixes to draw from; [] = all
    paraphrase: int | None = None  # 0-2 (synthetic_render.py); null = the difficulty's

    def __post_init__(self) -> None:
        check(self.n >= 0, "synthetic.n", f"must be >= 1, got {self.n}")
        check(self.difficulty in DIFFICULTY, "synthetic.difficulty",
              f"must be one of {sorted(DIFFICULTY)}, got {self.difficulty!r}")
        check(self.num_drgs >= 0, "synthetic.num_drgs", f"must be >= 1 (or 0 = all), got {self.num_drgs}")
        check(self.paraphrase in (None, 0, 1, 2), "synthetic.paraphrase", f"must be 0, 1 or 2, got {self.paraphrase}")


@dataclass(slots=True)
class SyntheticConfig:
    synthetic: SyntheticSettings = section(SyntheticSettings)


def run(cfg: SyntheticConfig) -> list[dict]:
    """Check the keys, generate, and write the JSONL; returns the records."""
    settings = cfg.synthetic
    check(bool(settings.out), "synthetic.out", "is required (the output JSONL file)")
    check(settings.n >= 1, "synthetic.n", "is required (the number of cases, >= 1)")
    try:
        rows = generate(settings.n, settings.seed, settings.difficulty, settings.num_drgs or None,
                        settings.principals or None, settings.paraphrase)
    except ConfigError as e:  # a knob the label space cannot meet: name it as the command line spells it
        raise ConfigError(f"config key 'synthetic.{e.key}': {e}", key=f"synthetic.{e.key}") from None
    write_jsonl_atomic(Path(settings.out), rows)
    drgs = len({r["drg"] for r in rows})
    print(f"wrote {len(rows)} cases over {drgs} distinct v34 DRGs to {settings.out}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        return print_help(__doc__, SyntheticConfig)
    return run_command(lambda: run(load_config(SyntheticConfig, *split_cli(argv))))


if __name__ == "__main__":
    sys.exit(main())
