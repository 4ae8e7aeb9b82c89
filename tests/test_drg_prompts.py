"""DRG prompts and evaluation metrics (hand-worked cases)."""

import math

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from recipes.drg.evaluate_metrics import (case_metrics, evaluate_cases, extract_answer, judge,
                                          majority_answer)
from recipes.drg.prompts import (DRG_INTRODUCTION, SYSTEM_PROMPT, build_messages,
                                 build_prompt_ids, build_prompt_text, format_completion)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COURSE = "Mr. X was admitted with community-acquired pneumonia and treated with ceftriaxone."


def tiny_tokenizer(chat_template=CHATML):
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<|im_start|>",
                                  "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SYSTEM_PROMPT, DRG_INTRODUCTION, COURSE], trainer)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    fast.chat_template = chat_template
    return fast


def test_messages_are_system_then_user_with_exact_question():
    messages = build_messages(COURSE)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == SYSTEM_PROMPT
    assert SYSTEM_PROMPT.endswith("Respond in the following format: <think>\n...\n</think>\n"
                                  "<answer>\n...\n</answer>")
    user = messages[1]["content"]
    assert user.startswith(DRG_INTRODUCTION)
    assert user.endswith(
        "What is the most likely Medicare Severity Diagnosis Related Group (MS-DRG) based on the "
        "following discharge summary of a hospitalization? Provide the complete text description "
        f"of the DRG code without including the numerical code. \n***{COURSE}***.")


@pytest.mark.parametrize("course", ["", "   \n\t", None])
def test_empty_course_rejected(course):
    with pytest.raises(ValueError, match="hospital_course"):
        build_messages(course)


def test_prompt_ids_apply_chat_template_with_generation_prompt():
    tok = tiny_tokenizer()
    ids = build_prompt_ids(tok, COURSE)
    assert all(isinstance(i, int) for i in ids)
    text = tok.decode(ids)
    assert text == build_prompt_text(tok, COURSE)
    assert text.endswith(f"***{COURSE}***.<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>")
    with pytest.raises(ValueError, match="max_tokens"):
        build_prompt_ids(tok, COURSE, max_tokens=5)


def test_tokenizer_without_chat_template_rejected():
    with pytest.raises(ValueError, match="no chat template"):
        build_prompt_ids(tiny_tokenizer(chat_template=None), COURSE)


# ----- evaluation metrics ---------------------------------------------------------------------

HF_MCC = "HEART FAILURE AND SHOCK WITH MCC"
HF_CC = "HEART FAILURE AND SHOCK WITH CC"
PNA_MCC = "SIMPLE PNEUMONIA AND PLEURISY WITH MCC"
PNA_CC = "SIMPLE PNEUMONIA AND PLEURISY WITH CC"


def test_extract_answer():
    assert extract_answer(format_completion("r", "heart failure and shock with mcc ")) == HF_MCC
    assert extract_answer("<think>r</think><answer>  </answer>") is None
    assert extract_answer(f"<answer>{HF_MCC}</answer>") is None  # no think block
    assert extract_answer(f"<think>r</think><answer>{HF_MCC}</answer> more") is None


def test_majority_ties_go_to_first_sampled():
    assert majority_answer([None, PNA_CC, HF_MCC, HF_MCC, PNA_CC]) == PNA_CC
    assert majority_answer([None, None]) is None
    assert majority_answer(["a", "B", "b"]) == "B"


def test_judge_levels():
    assert judge(HF_CC, HF_MCC) == {"drg": False, "base": True, "severity": False}
    assert judge(PNA_MCC, HF_MCC) == {"drg": False, "base": False, "severity": True}
    assert judge("NOT A DRG WITH MCC", HF_MCC) == {"drg": False, "base": False, "severity": False}
    assert judge("KIDNEY TRANSPLANT", "PANCREAS TRANSPLANT")["severity"]  # both unsplit
    with pytest.raises(ValueError, match="gold"):
        judge(HF_MCC, "HEART FAILURE")


def test_case_metrics_hand_worked():
    # k = 4: HF_CC twice (base right, severity wrong), PNA_MCC (severity right), HF_MCC (exact).
    # Majority: HF_CC (2 votes) -> drg wrong, base right, severity wrong.
    answers = [HF_CC, PNA_MCC, HF_CC, HF_MCC]
    m = case_metrics(answers, HF_MCC)
    assert m == {
        "drg/pass@1": 0.25, "drg/pass@k": 1.0, "drg/maj@k": 0.0,
        "base/pass@1": 0.75, "base/pass@k": 1.0, "base/maj@k": 1.0,
        "severity/pass@1": 0.5, "severity/pass@k": 1.0, "severity/maj@k": 0.0,
    }


def test_case_metrics_unanswered_and_invalid():
    m = case_metrics([None, "GARBAGE", None, HF_MCC], HF_MCC)
    # Votes: GARBAGE 1, HF_MCC 1 -> tie, GARBAGE sampled first -> Maj wrong.
    assert m["drg/pass@1"] == 0.25 and m["drg/pass@k"] == 1.0 and m["drg/maj@k"] == 0.0
    assert case_metrics([None, None], HF_MCC)["severity/maj@k"] == 0.0
    with pytest.raises(ValueError, match="no sampled answers"):
        case_metrics([], HF_MCC)


def test_evaluate_cases_means():
    out = evaluate_cases([[HF_MCC, HF_MCC], [PNA_CC, None]], [HF_MCC, PNA_MCC])
    assert out["drg/pass@1"] == 0.5 and out["drg/pass@k"] == 0.5 and out["drg/maj@k"] == 0.5
    assert out["base/pass@1"] == 0.75 and out["base/maj@k"] == 1.0
    assert out["cases"] == 2 and out["k"] == 2
    assert math.isnan(evaluate_cases([[HF_MCC], [HF_MCC, None]], [HF_MCC, HF_MCC])["k"])
    with pytest.raises(ValueError, match="gold"):
        evaluate_cases([[HF_MCC]], [HF_MCC, HF_MCC])
