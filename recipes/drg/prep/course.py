"""Brief-hospital-course extraction from a MIMIC-IV discharge note (PAPER.md "Data").

The course is the text after the "Brief Hospital Course" header up to "Medications on
Admission". Fallbacks, in order: the same header up to "Discharge Medications"; a broader
HOSPITAL COURSE header ("Hospital Course:", "Summary of Hospital Course:", "Hospital Course by
Problem:") up to either end marker. Headers and end markers match case-insensitively with any
whitespace between their words. No header, or no end marker -> None (the note is dropped).
"""

from __future__ import annotations

import re

_BRIEF = re.compile(r"brief\s+hospital\s+course\s*:?", re.IGNORECASE)
# The broad header needs a colon so that prose like "his hospital course was" does not match.
_BROAD = re.compile(
    r"(?:summary\s+of\s+)?hospital\s+course(?:\s+by\s+(?:problems?|systems?))?\s*:", re.IGNORECASE)
_MEDS_ON_ADMISSION = re.compile(r"medications\s+on\s+admission", re.IGNORECASE)
_DISCHARGE_MEDS = re.compile(r"discharge\s+medications", re.IGNORECASE)

BRIEF_TO_ADMISSION_MEDS = "brief_course_to_medications_on_admission"
BRIEF_TO_DISCHARGE_MEDS = "brief_course_to_discharge_medications"
BROAD_HEADER = "hospital_course_header"


def _cut(text: str, header: re.Pattern, end: re.Pattern) -> str | None:
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
