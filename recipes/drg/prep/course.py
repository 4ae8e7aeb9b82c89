"""Brief-hospital-course extraction from a MIMIC-IV discharge note (PAPER.md "Data").

The course is the text after the "Brief Hospital Course" header up to "Medications on
Admission". Fallbacks, in order: the same header up to "Discharge Medications"; a broader
HOSPITAL COURSE header ("Hospital Course:", "Summary of Hospital Course:", "Hospital Course by
Problem:") up to either end marker. Headers and end markers match case-insensitively with any
whitespace between their words. No header, or no end marker -> None (the note is dropped).

De-identified headers. MIMIC-IV-Note writes each word its de-identification removed as `___`,
and header words are among them: "Medications on Admission:" can read "___ on Admission:" (the
DRG-LLaMA preparation the paper reuses ends the course there too). Every header and end marker is
therefore also accepted with any one of its words written `___`, but only as a header line: on one
line, at its start, and followed by a colon or the line's end. Unanchored, "___ on admission" would
also end a course at prose such as "seen by Dr. ___ on admission".
"""

from __future__ import annotations

import re

_REMOVED = "___"  # how MIMIC-IV-Note writes a word the de-identification removed
_SEVERAL = r"(?:problems?|systems?)"


class _Section:
    """A header or end marker: `plain` anywhere, or one of `phrases` with one word written `___` as
    a header line. `search` returns the earliest match of either, as `re.Pattern.search` would."""

    def __init__(self, plain: str, *phrases: tuple[str, ...]):
        self.plain = re.compile(plain, re.IGNORECASE)
        forms = [r"[ \t]+".join(f"{_REMOVED}_*" if j == i else word for j, word in enumerate(words))
                 for words in phrases for i in range(len(words))]
        self.deidentified = re.compile(rf"[ \t]*(?:{'|'.join(forms)})[ \t]*(?::|$)", re.IGNORECASE | re.MULTILINE)

    def search(self, text: str, pos: int = 0) -> re.Match | None:
        found = self.plain.search(text, pos)
        limit = found.start() if found else len(text)
        # Only lines holding ___ can hold a de-identified form, so only they are tried: one regex over
        # every line start of the note would make the extraction several times slower.
        removed = text.find(_REMOVED, pos, limit)
        while removed != -1:
            line = text.rfind("\n", 0, removed) + 1
            if line >= pos and (match := self.deidentified.match(text, line)) is not None:
                return match
            line_end = text.find("\n", removed)
            if line_end == -1:
                break
            removed = text.find(_REMOVED, line_end, limit)
        return found


_BRIEF = _Section(r"brief\s+hospital\s+course\s*:?", ("brief", "hospital", "course"))
# The broad header needs a colon so that prose like "his hospital course was" does not match.
_BROAD = _Section(
    rf"(?:summary\s+of\s+)?hospital\s+course(?:\s+by\s+{_SEVERAL})?\s*:",
    ("hospital", "course"), ("summary", "of", "hospital", "course"), ("hospital", "course", "by", _SEVERAL),
    ("summary", "of", "hospital", "course", "by", _SEVERAL))
_MEDS_ON_ADMISSION = _Section(r"medications\s+on\s+admission", ("medications", "on", "admission"))
_DISCHARGE_MEDS = _Section(r"discharge\s+medications", ("discharge", "medications"))

BRIEF_TO_ADMISSION_MEDS = "brief_course_to_medications_on_admission"
BRIEF_TO_DISCHARGE_MEDS = "brief_course_to_discharge_medications"
BROAD_HEADER = "hospital_course_header"


def _cut(text: str, header: _Section, end: _Section) -> str | None:
    start = header.search(text)
    if start is None:
        return None
    stop = end.search(text, start.end())
    if stop is None:
        return None
    course = text[start.end():stop.start()].strip()
    return course or None


def extract_course(text: str) -> tuple[str | None, str | None]:
    """(course, method) where method names the rule that found it; (None, None) if none did."""
    rules = (
        (_BRIEF, _MEDS_ON_ADMISSION, BRIEF_TO_ADMISSION_MEDS),
        (_BRIEF, _DISCHARGE_MEDS, BRIEF_TO_DISCHARGE_MEDS),
        (_BROAD, _MEDS_ON_ADMISSION, BROAD_HEADER),
        (_BROAD, _DISCHARGE_MEDS, BROAD_HEADER),
    )
    for header, end, method in rules:
        course = _cut(text or "", header, end)
        if course is not None:
            return course, method
    return None, None
