"""Prompts for DRG coding (PAPER.md "Prompts").

System prompt (GRPO and evaluation): verbatim from PAPER.md.
User prompt: a fixed introduction to MS-DRG, CC and MCC, then the question verbatim from
PAPER.md with the brief hospital course between `***`. PAPER.md does not give the exact wording
of the introduction, so `DRG_INTRODUCTION` is this recipe's own short paragraph covering the same
ground (what an MS-DRG is, what decides it, what a CC and an MCC are); it is not the study's text.
"""

from __future__ import annotations

from minigrpo.io import DataError

SYSTEM_PROMPT = (
    "You are a helpful AI Assistant that provides well-reasoned and detailed responses. You first "
    "think about the reasoning process as an internal monologue and then provide the user with "
    "the answer. Respond in the following format: <think>\n...\n</think>\n<answer>\n...\n</answer>"
)

# Recipe-written (see module docstring).
DRG_INTRODUCTION = (
    "MS-DRG (Medicare Severity Diagnosis Related Groups) is the system the U.S. Centers for "
    "Medicare & Medicaid Services use to classify inpatient hospital stays for payment. Each stay "
    "is assigned exactly one MS-DRG. The principal diagnosis (the condition chiefly responsible "
    "for the admission), or the principal operating-room procedure for surgical stays, decides "
    "the base DRG; secondary diagnoses then decide the severity level of that base DRG.\n\n"
    "CC and MCC in MS-DRG:\n"
    "CC (Complication or Comorbidity): a secondary diagnosis that increases the complexity of "
    "care and the resources used.\n"
    "MCC (Major Complication or Comorbidity): a secondary diagnosis with a greater effect on "
    "resource use than a CC.\n"
    "Depending on the base DRG, its descriptions are split WITH MCC, WITH CC (or WITH CC/MCC), "
    "WITHOUT CC/MCC or WITHOUT MCC; some base DRGs have no severity split.\n\n"
)

QUESTION = (
    "What is the most likely Medicare Severity Diagnosis Related Group (MS-DRG) based on the "
    "following discharge summary of a hospitalization? Provide the complete text description of "
    "the DRG code without including the numerical code. \n***{hospital_course}***."
)


def build_user_prompt(hospital_course: str) -> str:
    """Introduction + the PAPER.md question around the brief hospital course."""
    if not isinstance(hospital_course, str) or not hospital_course.strip():
        raise ValueError("hospital_course is empty: a DRG prompt needs the brief hospital course")
    return DRG_INTRODUCTION + QUESTION.format(hospital_course=hospital_course)


def build_messages(hospital_course: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    """[system, user] chat messages for one hospital course."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": build_user_prompt(hospital_course)},
    ]


def build_prompt_text(tokenizer, hospital_course: str, system_prompt: str = SYSTEM_PROMPT) -> str:
    """The chat-templated prompt as text, ending with the assistant generation prompt."""
    _require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(
        build_messages(hospital_course, system_prompt), add_generation_prompt=True, tokenize=False
    )


def build_prompt_ids(tokenizer, hospital_course: str, system_prompt: str = SYSTEM_PROMPT,
                     max_tokens: int | None = None) -> list[int]:
    """Token ids of the chat-templated prompt (generation prompt appended).

    `max_tokens`: ValueError when the prompt is longer (the caller decides to drop or truncate).
    """
    _require_chat_template(tokenizer)
    out = tokenizer.apply_chat_template(
        build_messages(hospital_course, system_prompt), add_generation_prompt=True, tokenize=True
    )
    ids = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5 may return a dict
    ids = [int(i) for i in ids]
    if max_tokens is not None and len(ids) > max_tokens:
        raise DataError(f"prompt has {len(ids)} tokens, more than max_tokens={max_tokens}")
    return ids


def format_completion(reasoning: str, answer: str) -> str:
    """A target in the rewarded format: `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`."""
    return f"<think>\n{reasoning.strip()}\n</think>\n<answer>\n{answer.strip()}\n</answer>"


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise DataError(f"tokenizer {name!r} has no chat template; DRG prompts need one")
