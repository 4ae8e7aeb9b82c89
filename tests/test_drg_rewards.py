"""DRG rewards: hand-worked scores, the reference-code quirks (compat) and the v34 tables."""

import re
import shutil

import pytest

from recipes.drg.rewards import DrgReward, make_reward, parse_completion
from recipes.drg.tables import DATA_DIR, NO_SPLIT, TableError, first_with_split, load_tables

HF_MCC = "HEART FAILURE AND SHOCK WITH MCC"
HF_CC = "HEART FAILURE AND SHOCK WITH CC"
PNA_MCC = "SIMPLE PNEUMONIA AND PLEURISY WITH MCC"
PNA_NONE = "SIMPLE PNEUMONIA AND PLEURISY WITHOUT CC/MCC"
TABLES = load_tables()


def done(answer, think="The principal diagnosis is decompensated heart failure."):
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


def score(name, completion, gold, **kw):
    rewards, comp = make_reward(name, **kw)([completion], [{"solution": gold}])
    return rewards[0], {k: v[0] for k, v in comp.items()}


# ----- tables ---------------------------------------------------------------------------------

def test_tables_counts():
    entries = list(TABLES.by_description.values())
    assert len(entries) == 757
    assert len({e.base_id for e in entries}) == 340
    counts = {c: sum(e.severity == c for e in entries) for c in range(5)}
    assert counts == {2: 220, 1: 197, 0: 197, 3: 66, 4: 77}  # data/README.md
    assert TABLES.by_number[291].description == HF_MCC and TABLES.by_number[291].mdc == "MDC 05"
    assert TABLES.by_number[1].mdc == "PRE" and TABLES.by_number[1].surgical is True
    assert TABLES.lookup("  heart failure and shock with mcc ") is TABLES.by_number[291]
    assert len(TABLES.mapping) == 285 and sum(v is None for v in TABLES.mapping.values()) == 20


def test_missing_and_malformed_table_named(tmp_path):
    with pytest.raises(TableError, match="DRG_34.csv"):
        load_tables(tmp_path)
    for name in ("DRG_34.csv", "drg_34_base_severity.csv", "DRG34_Mapping.csv"):
        shutil.copy(DATA_DIR / name, tmp_path / name)
    text = (tmp_path / "drg_34_base_severity.csv").read_text().replace("cc_mcc", "ccmcc", 1)
    (tmp_path / "drg_34_base_severity.csv").write_text(text)
    with pytest.raises(TableError, match="drg_34_base_severity.csv.*cc_mcc"):
        load_tables(tmp_path)


# ----- format ---------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, ok", [
    (done(HF_MCC), True),
    (f"  <think>x</think><answer>{HF_MCC}</answer>\n\n", True),
    (f"<think>x</think> <answer>{HF_MCC}</answer> trailing", False),
    (f"<answer>{HF_MCC}</answer>", False),
    (f"<think>x</think><answer>{HF_MCC}</answer><answer>{HF_MCC}</answer>", False),
    (f"<think>a</think><answer>{HF_CC}</answer></think><answer>{HF_MCC}</answer>", False),
    (f"<think>x<answer>{HF_MCC}</answer></think><answer>{HF_MCC}</answer>", False),
    (f"preamble <think>x</think><answer>{HF_MCC}</answer>", False),
    ("<think>x</think><answer>", False),
])
def test_format(completion, ok):
    total, comp = score("dense", completion, HF_MCC)
    assert comp["format"] == (0.0 if ok else -2.0)
    if not ok:
        assert comp["accuracy"] == 0.0 and total == -2.0 and comp["correct"] == 0.0


def test_parse_completion_strips_answer():
    assert parse_completion(done(" heart failure and shock with mcc ")) == (
        "\nThe principal diagnosis is decompensated heart failure.\n",
        "heart failure and shock with mcc")


# ----- accuracy, hand-worked ------------------------------------------------------------------

@pytest.mark.parametrize("answer, strict, dense, balanced", [
    (HF_MCC, 2.0, 2.0, 2.0),                         # exact
    (HF_MCC.lower() + "  ", 2.0, 2.0, 2.0),          # case and whitespace do not matter
    (HF_CC, 0.0, 1.5, 1.0),                          # same base DRG
    (PNA_MCC, 0.0, 0.5, 1.0),                        # same severity (WITH MCC) only
    (PNA_NONE, 0.0, -0.5, -0.5),                     # neither
    ("HEART FAILURE", -1.5, -1.5, -1.5),             # not a v34 title
    ("291", -1.5, -1.5, -1.5),
    ("", -1.5, -1.5, -1.5),                          # empty
])
def test_accuracy_schemes(answer, strict, dense, balanced):
    for name, expected in (("strict", strict), ("dense", dense), ("balanced", balanced)):
        total, comp = score(name, done(answer), HF_MCC)
        assert comp["accuracy"] == expected, name
        assert total == comp["format"] + comp["accuracy"] + comp["cot_penalty"] == expected
        assert comp["correct"] == (1.0 if expected == 2.0 else 0.0)


def test_balanced_is_the_papers_appendix_a2():
    # Exact 2.0, principal diagnosis (base DRG) only 1.0, CC/MCC status only 1.0, other valid -0.5,
    # invalid -1.5; the format rule is unchanged (-2, accuracy 0).
    cases = [
        (HF_MCC, HF_MCC, 2.0),                                   # exact
        (HF_CC, HF_MCC, 1.0),                                    # base only (WITH CC vs WITH MCC)
        ("HEART FAILURE AND SHOCK WITHOUT CC/MCC", HF_MCC, 1.0),  # base only, other severity
        (PNA_MCC, HF_MCC, 1.0),                                  # CC/MCC status only
        (HF_MCC, PNA_MCC, 1.0),                                  # the same, the other way round
        (PNA_NONE, HF_MCC, -0.5),                                # neither
        ("PANCREAS TRANSPLANT", "KIDNEY TRANSPLANT", -0.5),      # unsplit gold: no status credit
        ("SIMPLE PNEUMONIA", HF_MCC, -1.5),                      # not a v34 title
        ("", HF_MCC, -1.5),                                      # empty
    ]
    for answer, gold, expected in cases:
        total, comp = score("balanced", done(answer), gold)
        assert (comp["format"], comp["accuracy"], total) == (0.0, expected, expected), (answer, gold)
        assert comp["correct"] == (1.0 if answer == gold else 0.0)
    total, comp = score("balanced", f"<answer>{HF_MCC}</answer>", HF_MCC)
    assert (comp["format"], comp["accuracy"], total) == (-2.0, 0.0, -2.0)
    # compat mode uses the same credits at the reference code's first-WITH split
    assert score("balanced", done(HF_CC), HF_MCC, compat=True)[0] == 1.0
    assert score("balanced", done(PNA_MCC), HF_MCC, compat=True)[0] == 1.0
    assert score("balanced", done(PNA_NONE), HF_MCC, compat=True)[0] == -0.5


def test_severity_credit_needs_a_split_gold():
    # Gold KIDNEY TRANSPLANT has no severity split; another unsplit title is not "same severity".
    gold = "KIDNEY TRANSPLANT"
    assert TABLES.lookup(gold).severity == NO_SPLIT
    assert score("dense", done("PANCREAS TRANSPLANT"), gold)[1]["accuracy"] == -0.5


def test_batch_interface_and_errors():
    fn = make_reward("dense")
    rewards, comp = fn([done(HF_MCC), done(HF_CC), "junk"], [{"solution": HF_MCC}] * 3)
    assert rewards == [2.0, 1.5, -2.0]
    assert set(comp) == {"format", "accuracy", "cot_penalty", "correct"}
    assert comp["correct"] == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="solution"):
        fn([done(HF_MCC)], [{"problem": "x"}])
    with pytest.raises(ValueError, match="not a v34 description"):
        fn([done(HF_MCC)], [{"solution": "HEART FAILURE"}])
    with pytest.raises(ValueError, match=r"'lenient'.*balanced.*dense.*strict"):
        make_reward("lenient")
    with pytest.raises(ValueError, match="cot_first_penalty"):
        make_reward("strict", cot_first_penalty=1.0)


# ----- CoT-first penalty ----------------------------------------------------------------------

def test_cot_first_penalty_window():
    early = f"The answer is {HF_CC.lower()} because of shock."
    late = " ".join(["word"] * 50) + f" so {HF_CC}"
    split_lines = "Maybe HEART FAILURE\nAND   SHOCK WITH CC fits."
    assert score("dense", done(HF_MCC, early), HF_MCC, cot_first_penalty=-1.0)[0] == 1.0
    assert score("dense", done(HF_MCC, late), HF_MCC, cot_first_penalty=-1.0)[0] == 2.0
    assert score("dense", done(HF_MCC, split_lines), HF_MCC,
                 cot_first_penalty=-1.0)[1]["cot_penalty"] == -1.0
    assert score("dense", done(HF_MCC, early), HF_MCC)[1]["cot_penalty"] == 0.0  # off by default


# ----- reference-code quirks (compat=True) ----------------------------------------------------

def substring_pairs():
    titles = sorted(TABLES.descriptions)
    return [(g, a) for g in titles for a in titles if g != a and g in a]


def test_substring_pairs_count_is_24():
    pairs = substring_pairs()
    assert len(pairs) == 24
    assert ("COMPLICATED PEPTIC ULCER WITH MCC", "UNCOMPLICATED PEPTIC ULCER WITH MCC") in pairs


@pytest.mark.parametrize("gold, answer", substring_pairs())
def test_substring_pair_scores_exact_only_in_compat(gold, answer):
    for name in ("strict", "dense", "balanced"):
        _, quirky = score(name, done(answer), gold, compat=True)
        _, fixed = score(name, done(answer), gold)
        assert quirky["accuracy"] == 2.0 and quirky["correct"] == 0.0
        assert fixed["accuracy"] < 2.0 and fixed["correct"] == 0.0


_SEVERITY_SUFFIX = re.compile(r"\s(WITH|WITHOUT|W|W/O)\s+(MCC|CC/MCC|CC)\b")


def table_base_text(entry):
    """Title minus its severity phrase (the table's split, ignoring its spelling fixes)."""
    if entry.severity == NO_SPLIT:
        return entry.description
    last = list(_SEVERITY_SUFFIX.finditer(entry.description))[-1]
    return entry.description[:last.start()].strip()


def first_with_cases():
    cases = []
    for entry in TABLES.by_description.values():
        split = first_with_split(entry.description)
        principal = split[0] if split else entry.description
        if principal != table_base_text(entry):
            cases.append(entry)
    return cases


def test_first_with_split_disagrees_with_table_137_times():
    # PAPER.md says 136; counting every title whose first-WITH/WITHOUT principal differs from the
    # table's base gives 137 (113 with a severity split, 24 without).
    cases = first_with_cases()
    assert len(cases) == 137
    assert sum(e.severity != NO_SPLIT for e in cases) == 113


def test_first_with_cases_scored_by_table():
    # By default partial credit follows base_drg_id / cc_mcc for every first-WITH case and answer.
    dense = make_reward("dense")
    answers = sorted(TABLES.descriptions)
    for truth in first_with_cases():
        for answer in answers:
            got = dense._accuracy(answer, truth.description)
            pred = TABLES.by_description[answer]
            if answer == truth.description:
                want = 2.0
            elif pred.base_id == truth.base_id:
                want = 1.5
            elif truth.severity != NO_SPLIT and pred.severity == truth.severity:
                want = 0.5
            else:
                want = -0.5
            assert got == want, (truth.description, answer)


@pytest.mark.parametrize("gold, answer, quirky, fixed", [
    # principal "CORONARY BYPASS" is in every CABG title: wrong base scored as base match
    ("CORONARY BYPASS WITH PTCA WITH MCC",
     "CORONARY BYPASS WITHOUT CARDIAC CATHETERIZATION WITHOUT MCC", 1.5, -0.5),
    # status "WITH PDX HEMORRHAGE WITH MCC" is not a severity: a same-severity answer gets -0.5
    ("INTRACRANIAL VASCULAR PROCEDURES WITH PDX HEMORRHAGE WITH MCC", PNA_MCC, -0.5, 0.5),
    ("OTHER MAJOR CARDIOVASCULAR PROCEDURES W MCC",  # no WITH word: reference gives no credit
     "OTHER MAJOR CARDIOVASCULAR PROCEDURES W CC", -0.5, 1.5),
    ("KIDNEY TRANSPLANT", "SIMULTANEOUS PANCREAS AND KIDNEY TRANSPLANT", 2.0, -0.5),
    (HF_MCC, "SIMPLE PNEUMONIA AND PLEURISY WITH MCC", 0.5, 0.5),
])
def test_compat_examples(gold, answer, quirky, fixed):
    assert score("dense", done(answer), gold, compat=True)[1]["accuracy"] == quirky
    assert score("dense", done(answer), gold)[1]["accuracy"] == fixed


def test_compat_format_is_reference_regex():
    # The reference regex lets a second answer block hide inside the think block (format 0),
    # then scores the first <answer> it finds ("x": not a title, -1.5).
    sneaky = f"<think>a<answer>x</answer></think><answer>{HF_MCC}</answer>"
    assert score("dense", sneaky, HF_MCC, compat=True)[0] == -1.5
    assert score("dense", sneaky, HF_MCC)[0] == -2.0


def test_reward_object_is_reusable():
    fn = DrgReward("strict")
    assert fn([done(HF_MCC)], [{"solution": HF_MCC}])[0] == [2.0]
    assert fn([done(HF_CC)], [{"solution": HF_MCC}])[0] == [0.0]


def test_cot_first_penalty_in_compat_mode():
    think = f"{HF_MCC} is my first guess."
    total, comp = score("strict", done(HF_MCC, think), HF_MCC, compat=True, cot_first_penalty=-1.0)
    assert comp["cot_penalty"] == -1.0 and total == 1.0
