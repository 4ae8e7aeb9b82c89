"""The reader-study kit: hand-computed kappas, blinding, and an export -> ratings -> aggregate round trip."""

import csv
import json
import math
import shutil

import pytest

from minigrpo.io import DataError, write_jsonl_atomic
from recipes.drg import reader_study
from recipes.drg.reader_study import blind_items, cohen_kappa, fleiss_kappa


def test_cohen_kappa_hand_computed():
    # p_o = 4/5; marginals A (2, 2, 1)/5, B (1, 3, 1)/5 -> p_e = (2 + 6 + 1)/25 = 0.36
    # kappa = (0.8 - 0.36) / 0.64 = 0.6875
    assert cohen_kappa([1, 1, 2, 2, 3], [1, 2, 2, 2, 3]) == pytest.approx(0.6875)
    assert cohen_kappa([1, 2, 3], [1, 2, 3]) == 1.0
    assert math.isnan(cohen_kappa([4, 4], [4, 4]))  # one label only: chance agreement is 1
    with pytest.raises(ValueError):
        cohen_kappa([1], [1, 2])


def test_fleiss_kappa_hand_computed():
    # 3 raters, 4 items; counts per item (label 1, label 2): (3,0) (2,1) (0,3) (1,2)
    # P_i = 1, 1/3, 1, 1/3 -> mean 2/3; p = (6/12, 6/12) -> P_e = 1/2; kappa = (2/3 - 1/2) / (1/2) = 1/3
    assert fleiss_kappa([[1, 1, 1], [1, 1, 2], [2, 2, 2], [1, 2, 2]]) == pytest.approx(1 / 3)
    assert fleiss_kappa([[5, 5, 5], [2, 2, 2]]) == 1.0
    with pytest.raises(ValueError):
        fleiss_kappa([[1, 1], [1, 1, 1]])


def test_blind_items_hide_the_model():
    cases = [{"problem": f"note {i}", "solution": "HEART FAILURE AND SHOCK WITH MCC", "note_id": f"n{i}"}
             for i in range(3)]
    good = "<think>\nfluid overload\n</think>\n<answer>HEART FAILURE AND SHOCK WITH CC</answer>"
    completions = {"model-a": [good] * 3, "model-b": ["no tags"] * 3}
    items, key = blind_items(cases, completions, seed=1)
    assert [i["item_id"] for i in items] == [f"item-{n:03d}" for n in range(1, 7)]
    assert all("model" not in item for item in items)
    assert sorted((v["model"], v["case"]) for v in key.values()) == sorted(
        (m, c) for m in completions for c in range(3))
    by_model = {item["item_id"]: key[item["item_id"]]["model"] for item in items}
    for item in items:
        if by_model[item["item_id"]] == "model-a":
            assert (item["reasoning"], item["answer"]) == ("fluid overload", "HEART FAILURE AND SHOCK WITH CC")
        else:
            assert item["answer"] == "" and item["reasoning"].endswith("no tags")
    assert blind_items(cases, completions, seed=1) == (items, key)  # seeded


def write_ratings(path, rows, criteria):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["item_id", *criteria, "comment"])
        writer.writeheader()
        for item_id, scores in rows.items():
            writer.writerow({"item_id": item_id, **scores, "comment": "a, \"quoted\" comment"})


def test_export_aggregate_round_trip(tmp_path, tiny_model_dir, capsys):
    from recipes.drg.prep.synthetic import generate

    data = tmp_path / "test.jsonl"
    cases = generate(5, seed=3, difficulty="easy", num_drgs=3)
    write_jsonl_atomic(data, cases)
    second = tmp_path / "second"
    shutil.copytree(tiny_model_dir, second)
    out = tmp_path / "reader"
    args = ["export", f"--export.models=[{tiny_model_dir},{second}]", f"--export.data={data}",
            f"--export.out={out}", "--export.cases=3", "--export.criteria=[reasoning,faithfulness]",
            "--eval.max_new_tokens=8"]
    assert reader_study.main(args) == 0
    logs = capsys.readouterr()
    assert "data-use agreement" in logs.err
    assert not any(c["problem"][:40] in logs.out + logs.err for c in cases)  # no patient text in logs

    rows = list(csv.DictReader((out / "cases.csv").open()))
    key = json.loads((out / "reader_key.json").read_text())
    assert len(rows) == 6 and [r["item_id"] for r in rows] == sorted(key["items"])
    assert {r["note"] for r in rows} <= {c["problem"] for c in cases}
    html = (out / "form.html").read_text()
    assert all(f'name="{r["item_id"]}|reasoning"' in html for r in rows)
    assert "data-use" in html and "<script src" not in html and "http" not in html  # self-contained
    for text in ((out / "cases.csv").read_text(), html):
        assert str(tiny_model_dir) not in text and str(second) not in text  # blinded
    assert reader_study.main(args) == 2  # a second export into the same folder is refused

    # Two raters on `reasoning`: A = 1 1 2 2 3 3, B = 1 2 2 2 3 1 over items 1..6.
    # p_o = 4/6; marginals A (2, 2, 2)/6, B (2, 3, 1)/6 -> p_e = 12/36; kappa = (2/3 - 1/3) / (2/3) = 0.5
    ids = sorted(key["items"])
    a, b = [1, 1, 2, 2, 3, 3], [1, 2, 2, 2, 3, 1]
    write_ratings(tmp_path / "alice.csv", {i: {"reasoning": x, "faithfulness": 4} for i, x in zip(ids, a)},
                  key["criteria"])
    write_ratings(tmp_path / "bob.csv", {i: {"reasoning": x, "faithfulness": ""} for i, x in zip(ids, b)},
                  key["criteria"])
    report_path = tmp_path / "report.json"
    assert reader_study.main(["aggregate", f"--aggregate.key={out / 'reader_key.json'}",
                              f"--aggregate.ratings=[{tmp_path / 'alice.csv'},{tmp_path / 'bob.csv'}]",
                              f"--aggregate.out={report_path}"]) == 0
    report = json.loads(report_path.read_text())
    assert report["agreement"]["reasoning"] == {"statistic": "cohen", "kappa": pytest.approx(0.5), "items": 6}
    assert report["agreement"]["faithfulness"]["items"] == 0  # bob left it blank
    for model in key["models"]:
        mine = [(x + y) / 2 for i, x, y in zip(ids, a, b) if key["items"][i]["model"] == model]
        stats = report["models"][model]["reasoning"]
        assert stats["n"] == 3 and stats["mean"] == pytest.approx(sum(mine) / 3)
        assert stats["low"] <= stats["mean"] <= stats["high"]
        assert report["models"][model]["faithfulness"]["mean"] == 4.0
    assert report["models"]["all"]["reasoning"]["n"] == 6
    assert "| reasoning | cohen | 0.500 | 6 |" in report_path.with_suffix(".md").read_text()

    # A third rater: Fleiss' kappa over the three, checked against the function.
    c = [1, 1, 2, 3, 3, 3]
    write_ratings(tmp_path / "carol.csv", {i: {"reasoning": x} for i, x in zip(ids, c)}, key["criteria"])
    report = reader_study.aggregate(reader_study.load_config(reader_study.AggregateConfig, None, [
        f"--aggregate.key={out / 'reader_key.json'}",
        f"--aggregate.ratings=[{tmp_path / 'alice.csv'},{tmp_path / 'bob.csv'},{tmp_path / 'carol.csv'}]"]))
    assert report["agreement"]["reasoning"]["statistic"] == "fleiss"
    assert report["agreement"]["reasoning"]["kappa"] == pytest.approx(fleiss_kappa([list(t) for t in zip(a, b, c)]))


def test_bad_ratings_name_file_row_and_column(tmp_path):
    key = {"item-001", "item-002"}
    bad = tmp_path / "dave.csv"
    write_ratings(bad, {"item-001": {"reasoning": 3}, "item-002": {"reasoning": 7}}, ["reasoning"])
    with pytest.raises(DataError, match=r"dave.csv:3: column 'reasoning' must be an integer 1..5"):
        reader_study.read_ratings(bad, ["reasoning"], 5, key)
    write_ratings(bad, {"item-009": {"reasoning": 3}}, ["reasoning"])
    with pytest.raises(DataError, match=r"dave.csv:2: item_id 'item-009' is not in the key"):
        reader_study.read_ratings(bad, ["reasoning"], 5, key)
    with pytest.raises(DataError, match="no column 'severity'"):
        reader_study.read_ratings(bad, ["reasoning", "severity"], 5, key)
