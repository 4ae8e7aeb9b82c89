"""A reader study of the models' reasoning (the paper had physicians rate it): export, rate, aggregate.

    python -m recipes.drg.reader_study export --export.models=[A/hf,B/hf] --export.data=test.jsonl \\
        --export.out=reader [--export.cases=20] [--export.seed=0] [--eval.max_new_tokens=...]
    python -m recipes.drg.reader_study aggregate --aggregate.key=reader/reader_key.json \\
        --aggregate.ratings=[alice.csv,bob.csv] [--aggregate.out=reader/report.json]
    python -m recipes.drg.reader_study export --help      # every key of a subcommand with its default

export samples `cases` test cases (seeded), one completion per case from each model (eval.* sampling,
the paper's T 0.6 / top-p 0.95 by default), shuffles all (case, model) items together and numbers
them item-001, item-002, ... so nothing in an item tells which model wrote it. It writes
  cases.csv        item, case, note, reasoning, answer, gold DRG, and an empty column per criterion
  form.html        the same as a self-contained rating form (no network); "Download ratings" saves a
                   CSV of item_id + criteria + comment
  reader_key.json  which model wrote which item, the criteria and the scale: the coordinator keeps it
Each rater returns one CSV (from the form, or cases.csv filled in a spreadsheet); the file name is the
rater's name. aggregate unblinds with the key and reports, per model and criterion, the mean rating
with its 95% bootstrap interval over items (each item's score: the mean over its raters), and the
inter-rater agreement per criterion on the items every rater scored: Cohen's kappa for 2 raters
(Cohen 1960), Fleiss' kappa for more (Fleiss 1971), the scale's points taken as categories.

The exported files hold the notes' text. Real MIMIC-IV text stays under its PhysioNet data-use
agreement: share the files only with credentialed raters, never with online services. No patient
text is printed by either subcommand; errors name files, rows and columns only.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from html import escape
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `python recipes/drg/reader_study.py`

from minigrpo.cli import run_command
from minigrpo.config import ConfigError, check, load_config, section, split_cli
from minigrpo.dist import init_distributed
from minigrpo.help import print_help, wants_help
from minigrpo.io import DataError, atomic_write_text, write_json_atomic
from minigrpo.model import check_model_dir, load_tokenizer
from recipes.drg.evaluate import EvalSettings, build_engine, sample_completions
from recipes.drg.evaluate_metrics import bootstrap_mean
from recipes.drg.records import read_cases
from recipes.drg.rewards import parse_completion

CRITERION_TEXT = {
    "reasoning": "The reasoning is clinically sound and supports the answer.",
    "faithfulness": "The reasoning uses only facts found in the note (nothing invented).",
    "principal": "It identifies the right principal diagnosis or procedure.",
    "severity": "It identifies the complications and comorbidities that set the CC/MCC status.",
}
DATA_USE_WARNING = ("These files hold the notes' text. Real MIMIC-IV text must stay under its PhysioNet data-use "
                    "agreement: share them only with credentialed raters, never with online services.")
TEXT_COLUMNS = ("item_id", "case_id", "gold_drg", "answer", "reasoning", "note")


@dataclass(slots=True)
class ExportSettings:
    models: list[str] = field(default_factory=list)  # HF model folders to compare (blinded in the export)
    data: str = ""  # test cases JSONL (records.py schema)
    out: str = ""  # output folder (must not hold a previous export)
    cases: int = 20  # cases sampled from data; each gives one item per model
    seed: int = 0  # case sample, item order and sampling seed
    criteria: list[str] = field(default_factory=lambda: list(CRITERION_TEXT))  # rated 1..scale each
    scale: int = 5  # Likert points (1 = not at all, scale = fully)

    def __post_init__(self) -> None:
        check(self.cases >= 1, "export.cases", "must be >= 1")
        check(self.scale >= 2, "export.scale", "must be >= 2")
        check(len(self.criteria) >= 1 and len(set(self.criteria)) == len(self.criteria), "export.criteria",
              "must name at least one criterion, each once")
        check(all(c.isidentifier() for c in self.criteria), "export.criteria", "names must be identifiers")


@dataclass(slots=True)
class ExportConfig:
    export: ExportSettings = section(ExportSettings)
    eval: EvalSettings = section(EvalSettings)  # sampling; k is ignored (one completion per item)


@dataclass(slots=True)
class AggregateSettings:
    key: str = ""  # the export's reader_key.json
    ratings: list[str] = field(default_factory=list)  # one CSV per rater; the file name (stem) is the rater
    out: str = ""  # report JSON ("" = report.json beside the key); a .md table is written next to it
    level: float = 0.95  # interval coverage
    resamples: int = 2000  # bootstrap resamples
    seed: int = 0

    def __post_init__(self) -> None:
        check(0 < self.level < 1, "aggregate.level", "must be in (0, 1)")
        check(self.resamples >= 1, "aggregate.resamples", "must be >= 1")


@dataclass(slots=True)
class AggregateConfig:
    aggregate: AggregateSettings = section(AggregateSettings)


# ----------------------------------------------------------------------------- export


def blind_items(cases: list[dict], completions: dict[str, list[str]], seed: int) -> tuple[list[dict], dict]:
    """Items (one per case and model) in a seeded random order, numbered item-001...; and the key.

    `completions[model][i]` is the model's completion for `cases[i]`. An item carries no model field.
    """
    pairs = [(i, model) for i in range(len(cases)) for model in completions]
    random.Random(seed).shuffle(pairs)
    width = max(3, len(str(len(pairs))))
    items, key = [], {}
    for n, (i, model) in enumerate(pairs, start=1):
        item_id = f"item-{n:0{width}d}"
        text = completions[model][i]
        parsed = parse_completion(text)
        reasoning, answer = (parsed[0].strip(), parsed[1]) if parsed else (f"(malformed completion, whole)\n{text}", "")
        items.append({"item_id": item_id, "case_id": f"case-{i + 1:0{width}d}", "gold_drg": cases[i]["solution"],
                      "answer": answer, "reasoning": reasoning, "note": cases[i]["problem"]})
        key[item_id] = {"model": model, "case": i, "note_id": str(cases[i].get("note_id", ""))}
    return items, key


def items_csv(items: list[dict], criteria: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, [*TEXT_COLUMNS, *criteria, "comment"], lineterminator="\n")
    writer.writeheader()
    for item in items:
        writer.writerow({**item, **{c: "" for c in criteria}, "comment": ""})
    return buffer.getvalue()


def form_html(items: list[dict], criteria: list[str], scale: int) -> str:
    """A self-contained rating form: the items, a radio row per criterion, a comment, a CSV download."""
    def radios(item_id: str, criterion: str) -> str:
        points = "".join(f'<label><input type="radio" name="{item_id}|{criterion}" value="{v}">{v}</label>'
                         for v in range(1, scale + 1))
        text = escape(CRITERION_TEXT.get(criterion, criterion))
        return f'<div class="crit"><b>{escape(criterion)}</b> <span>{text}</span><br>{points}</div>'

    sections = []
    for item in items:
        iid = item["item_id"]
        sections.append(
            f'<section><h2>{iid} <small>({item["case_id"]})</small></h2>'
            f'<details open><summary>Note</summary><pre>{escape(item["note"])}</pre></details>'
            f'<h3>Reasoning</h3><pre>{escape(item["reasoning"])}</pre>'
            f'<p><b>Answer:</b> {escape(item["answer"]) or "<i>(none)</i>"}<br>'
            f'<b>Gold DRG:</b> {escape(item["gold_drg"])}</p>'
            + "".join(radios(iid, c) for c in criteria)
            + f'<textarea name="{iid}|comment" placeholder="comment (optional)"></textarea></section>')
    data = json.dumps({"criteria": criteria, "ids": [i["item_id"] for i in items]}).replace("</", "<\\/")
    return _FORM.format(warning=escape(DATA_USE_WARNING), scale=scale, count=len(items),
                        sections="\n".join(sections), data=data)


_FORM = """<!doctype html>
<html><head><meta charset="utf-8"><title>DRG reader study</title>
<style>
body {{ font-family: sans-serif; max-width: 60rem; margin: 1rem auto; padding: 0 1rem; }}
pre {{ white-space: pre-wrap; background: #f6f6f6; padding: .5rem; }}
section {{ border-top: 2px solid #888; margin-top: 1.5rem; }}
.warn {{ background: #fff3cd; padding: .5rem; border: 1px solid #d6b656; }}
.crit {{ margin: .4rem 0; }} .crit label {{ margin-right: .8rem; }} .crit span {{ color: #555; }}
textarea {{ width: 100%; height: 3rem; }}
</style></head><body>
<h1>DRG reader study</h1>
<p class="warn">{warning}</p>
<p>{count} items. Models are hidden and items shuffled. Rate each criterion from 1 (not at all) to {scale}
(fully); leave a criterion blank to skip it. Then download your ratings and return the CSV.</p>
<p>Rater name: <input id="rater"> <button onclick="downloadRatings()">Download ratings CSV</button></p>
{sections}
<p><button onclick="downloadRatings()">Download ratings CSV</button></p>
<script>
const FORM = {data};
function quote(s) {{ return '"' + String(s).replace(/"/g, '""') + '"'; }}
function downloadRatings() {{
  const rows = [["item_id", ...FORM.criteria, "comment"].join(",")];
  for (const id of FORM.ids) {{
    const cells = [id];
    for (const c of FORM.criteria) {{
      const checked = document.querySelector('input[name="' + id + '|' + c + '"]:checked');
      cells.push(checked ? checked.value : "");
    }}
    cells.push(quote(document.querySelector('textarea[name="' + id + '|comment"]').value));
    rows.push(cells.join(","));
  }}
  const rater = document.getElementById("rater").value.trim().replace(/[^A-Za-z0-9_-]/g, "_") || "rater";
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([rows.join("\\n") + "\\n"], {{type: "text/csv"}}));
  link.download = rater + ".csv";
  link.click();
}}
</script></body></html>
"""


def write_export(out: Path, items: list[dict], key: dict, settings: ExportSettings) -> dict[str, Path]:
    paths = {"csv": out / "cases.csv", "form": out / "form.html", "key": out / "reader_key.json"}
    atomic_write_text(paths["csv"], items_csv(items, settings.criteria))
    atomic_write_text(paths["form"], form_html(items, settings.criteria, settings.scale))
    write_json_atomic(paths["key"], {"criteria": settings.criteria, "scale": settings.scale,
                                     "models": settings.models, "data": settings.data, "items": key})
    return paths


def sample_model(model: str, cases: list[dict], settings: EvalSettings) -> list[str]:
    """One completion per case from `model` (evaluate.py's engine and sampling)."""
    check_model_dir(model)
    tokenizer = load_tokenizer(model, require_chat_template=True)
    engine = build_engine(model, settings, init_distributed())
    return [group[0] for group in sample_completions(engine, tokenizer, cases, settings)]


def export(cfg: ExportConfig) -> dict[str, Path]:
    settings = cfg.export
    check(init_distributed().world_size == 1, "export", "runs as one process (python -m ...), not under torchrun")
    check(len(settings.models) >= 1, "export.models", "is required (one or more HF model folders)")
    check(len(set(settings.models)) == len(settings.models), "export.models", "names a model twice")
    check(bool(settings.data), "export.data", "is required (a DRG test cases JSONL)")
    check(bool(settings.out), "export.out", "is required (an output folder)")
    out = Path(settings.out)
    if (out / "reader_key.json").exists():
        raise ConfigError(f"{out} holds a previous export (reader_key.json); choose another export.out")
    cases = read_cases(settings.data, require_rows=True)
    chosen = random.Random(settings.seed).sample(cases, min(settings.cases, len(cases)))
    sampling = replace(cfg.eval, k=1, seed=settings.seed)
    completions = {model: sample_model(model, chosen, sampling) for model in settings.models}
    items, key = blind_items(chosen, completions, settings.seed)
    paths = write_export(out, items, key, settings)
    print(f"reader study: {len(items)} items ({len(chosen)} cases x {len(settings.models)} models) -> "
          f"{paths['csv']}, {paths['form']}; the key {paths['key']} stays with the coordinator", flush=True)
    print(f"WARNING: {DATA_USE_WARNING}", file=sys.stderr, flush=True)
    return paths


# ----------------------------------------------------------------------------- agreement


def cohen_kappa(first: list, second: list) -> float:
    """Cohen's kappa of two raters' labels on the same items: (p_o - p_e) / (1 - p_e); nan if p_e = 1."""
    if len(first) != len(second) or not first:
        raise ValueError(f"need two equal, non-empty label lists, got {len(first)} and {len(second)}")
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second)) / n
    count_a, count_b = Counter(first), Counter(second)
    expected = sum(count_a[c] * count_b[c] for c in count_a) / (n * n)
    return float("nan") if expected == 1 else (observed - expected) / (1 - expected)


def fleiss_kappa(labels: list[list]) -> float:
    """Fleiss' kappa: labels[i] = the n raters' labels of item i (same n for every item); nan if P_e = 1.

    P_i = (sum_j n_ij^2 - n) / (n (n - 1)),  p_j = sum_i n_ij / (N n),  kappa = (mean P_i - sum p_j^2) / (1 - sum p_j^2)
    """
    if not labels or len({len(row) for row in labels}) != 1 or len(labels[0]) < 2:
        raise ValueError("need items each rated by the same number (>= 2) of raters")
    n, total = len(labels[0]), len(labels) * len(labels[0])
    agreement = [(sum(v * v for v in Counter(row).values()) - n) / (n * (n - 1)) for row in labels]
    shares = Counter(label for row in labels for label in row)
    expected = sum((v / total) ** 2 for v in shares.values())
    observed = sum(agreement) / len(agreement)
    return float("nan") if expected == 1 else (observed - expected) / (1 - expected)


# ----------------------------------------------------------------------------- aggregate


def read_ratings(path: Path, criteria: list[str], scale: int, known: set[str]) -> dict[str, dict[str, int]]:
    """{item_id: {criterion: rating}} of one rater's CSV (blank cells skipped); DataError naming file/row/column."""
    if not path.is_file():
        raise DataError(f"missing ratings file: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("item_id", *criteria) if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} (needs item_id and {', '.join(criteria)})")
        ratings: dict[str, dict[str, int]] = {}
        for row_number, row in enumerate(reader, start=2):
            item = (row["item_id"] or "").strip()
            if item not in known:
                raise DataError(f"{path}:{row_number}: item_id {item!r} is not in the key")
            if item in ratings:
                raise DataError(f"{path}:{row_number}: {item} is rated twice")
            scores = {}
            for c in criteria:
                cell = (row[c] or "").strip()
                if not cell:
                    continue
                if not cell.isdigit() or not 1 <= int(cell) <= scale:
                    raise DataError(f"{path}:{row_number}: column {c!r} must be an integer 1..{scale} or blank")
                scores[c] = int(cell)
            ratings[item] = scores
    return ratings


def agreement(by_rater: dict[str, dict[str, dict[str, int]]], criterion: str) -> dict:
    """Kappa of `criterion` on the items every rater scored: Cohen's for 2 raters, Fleiss' for more."""
    raters = sorted(by_rater)
    if len(raters) < 2:
        return {"statistic": None, "kappa": None, "items": 0}
    shared = sorted(set.intersection(*[{i for i, s in by_rater[r].items() if criterion in s} for r in raters]))
    labels = [[by_rater[r][i][criterion] for r in raters] for i in shared]
    statistic = "cohen" if len(raters) == 2 else "fleiss"
    kappa = None
    if labels:
        value = cohen_kappa(*map(list, zip(*labels))) if statistic == "cohen" else fleiss_kappa(labels)
        kappa = None if math.isnan(value) else value  # nan (all raters used one label) -> null in JSON
    return {"statistic": statistic, "kappa": kappa, "items": len(shared)}


def summarize(key: dict, by_rater: dict[str, dict[str, dict[str, int]]], settings: AggregateSettings) -> dict:
    """Per model and criterion: mean rating with its bootstrap interval over items; agreement per criterion."""
    criteria, items = key["criteria"], key["items"]
    models: dict[str, dict] = {}
    for model in [*key["models"], "all"]:
        models[model] = {}
        for c in criteria:
            scores = []
            for item_id, info in items.items():
                if model != "all" and info["model"] != model:
                    continue
                given = [by_rater[r][item_id][c] for r in by_rater if c in by_rater[r].get(item_id, {})]
                if given:
                    scores.append(sum(given) / len(given))
            stats = bootstrap_mean(scores, settings.level, settings.resamples, settings.seed) if scores else {"n": 0}
            models[model][c] = stats
    return {"raters": sorted(by_rater), "criteria": criteria, "scale": key["scale"], "level": settings.level,
            "models": models, "agreement": {c: agreement(by_rater, c) for c in criteria}}


def report_markdown(report: dict) -> str:
    pct = round(100 * report["level"])
    lines = [f"# Reader study: {len(report['raters'])} raters, scale 1..{report['scale']}", "",
             f"Mean rating [{pct}% bootstrap interval over items] (items rated)", "",
             "| model | " + " | ".join(report["criteria"]) + " |", "|---|" + "---|" * len(report["criteria"])]
    for model, row in report["models"].items():
        cells = [f"{s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}] ({s['n']})" if s["n"] else "-"
                 for s in row.values()]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += ["", "| criterion | agreement | kappa | items |", "|---|---|---|---|"]
    for c, a in report["agreement"].items():
        kappa = "n/a" if a["kappa"] is None else f"{a['kappa']:.3f}"
        lines.append(f"| {c} | {a['statistic'] or 'one rater'} | {kappa} | {a['items']} |")
    return "\n".join(lines) + "\n"


def aggregate(cfg: AggregateConfig) -> dict:
    settings = cfg.aggregate
    check(bool(settings.key), "aggregate.key", "is required (the export's reader_key.json)")
    check(len(settings.ratings) >= 1, "aggregate.ratings", "is required (one CSV per rater)")
    key_path = Path(settings.key)
    if not key_path.is_file():
        raise DataError(f"missing reader key: {key_path}")
    key = json.loads(key_path.read_text())
    if not {"criteria", "scale", "models", "items"} <= set(key):
        raise DataError(f"{key_path}: not a reader study key (needs criteria, scale, models, items)")
    by_rater: dict[str, dict[str, dict[str, int]]] = {}
    for name in settings.ratings:
        path = Path(name)
        if path.stem in by_rater:
            raise ConfigError(f"two ratings files for rater {path.stem!r}; name each file after its rater")
        by_rater[path.stem] = read_ratings(path, key["criteria"], key["scale"], set(key["items"]))
    report = summarize(key, by_rater, settings)
    out = Path(settings.out or key_path.with_name("report.json"))
    write_json_atomic(out, report)
    text = report_markdown(report)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text + f"-> {out}, {out.with_suffix('.md')}", flush=True)
    return report


COMMANDS = {"export": (ExportConfig, export), "aggregate": (AggregateConfig, aggregate)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if wants_help(argv):
            return print_help(__doc__, ExportConfig)
        print(f"usage: python -m recipes.drg.reader_study {{{','.join(COMMANDS)}}} [--section.key=value ...]",
              file=sys.stderr)
        return 2
    config_class, body = COMMANDS[argv[0]]
    if wants_help(argv[1:]):
        return print_help(__doc__, config_class)
    return run_command(lambda: body(load_config(config_class, *split_cli(argv[1:]))))


if __name__ == "__main__":
    sys.exit(main())
