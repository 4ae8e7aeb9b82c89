"""The study runner end to end on two tiny arms (a few steps each): every output, and resume skips done cells."""

import json

from recipes.drg import study

TINY = [
    "--study.seeds=[0]", "--study.sft_sizes=[4,8]", "--study.sft_epochs=1", "--study.grpo_cases=2",
    "--study.test_cases=3", "--study.num_drgs=3", "--study.principals=", "--study.resamples=200",
    "--model.vocab_size=600", "--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_layers=1",
    "--model.num_heads=2", "--model.num_kv_heads=1",
    "--sft.data.batch_size=4", "--sft.data.max_seq_len=1000", "--grpo.grpo.max_prompt_tokens=1000",
    "--grpo.run.steps=2", "--grpo.grpo.prompts_per_step=2", "--grpo.rollout.samples_per_prompt=2",
    "--grpo.rollout.max_new_tokens=8", "--eval.k=2", "--eval.max_new_tokens=8",
]


def test_study_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "study"
    cfg = study.load_study_config([f"--study.output_dir={out}", "--study.cold_start=false", *TINY])
    assert [c.name for c in study.plan(cfg.study)] == ["base", "sft-4", "grpo-4", "sft-8", "grpo-8"]
    summary = study.run(cfg)
    for name in ("study.json", "results.md", "scaling.png", "before_after.png", "grpo_curves.png"):
        assert (out / name).is_file(), name
    for name in ("scaling.png", "before_after.png", "grpo_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for cell in ("base", "sft-4", "grpo-4", "sft-8", "grpo-8"):
        assert (out / "cells/s0" / cell / "done.json").is_file(), cell
    saved = json.loads((out / "study.json").read_text())
    assert [a["label"] for a in saved["arms"]] == ["SFT 4", "SFT 8"] == [a["label"] for a in summary["arms"]]
    arm = saved["arms"][0]
    for key in ("drg/pass@1", "base/maj@k", "severity/pass@k"):
        for phase in ("before", "after"):
            assert arm[phase][key]["low"] <= arm[phase][key]["mean"] <= arm[phase][key]["high"]
        delta = arm["delta"][key]
        assert delta["mean"] == arm["after"][key]["mean"] - arm["before"][key]["mean"]
        assert delta["low"] <= delta["mean"] <= delta["high"] and delta["n"] == 3
    assert saved["scaling"]["fits"]["SFT+GRPO"]["points"] == 2
    assert len(saved["curves"]["SFT 8"]) == 2 and "format_fail_frac" in saved["curves"]["SFT 8"][0]
    results = (out / "results.md").read_text()
    assert "| SFT 8 | 8 |" in results and "## CC/MCC status" in results and "Δ Pass@2" in results
    logs = capsys.readouterr().out
    assert "study: 5/5 cells done" in logs and "ETA" in logs

    # Resume with the cold-start arm added: the five done cells are skipped, only base -> grpo-cold runs.
    done = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("done.json")}
    (out / "cells/s0/grpo-cold/run").mkdir(parents=True)  # an unfinished cell from an interrupted run
    (out / "cells/s0/grpo-cold/run/partial").write_text("x")
    cfg = study.load_study_config([f"--study.output_dir={out}", "--study.cold_start=true", *TINY])
    summary = study.run(cfg)
    logs = capsys.readouterr().out
    assert logs.count("skipped (done.json)") == 5 and "study: 6/6 cells done (s0/grpo-cold" in logs
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert not (out / "cells/s0/grpo-cold/run/partial").exists()
    assert [a["label"] for a in summary["arms"]] == ["SFT 4", "SFT 8", "cold start"]
    assert "| cold start | 0 |" in (out / "results.md").read_text()

    # Other settings in the same folder are refused before anything runs.
    assert study.main([f"--study.output_dir={out}", *TINY, "--grpo.optim.lr=1e-3"]) == 2
    assert "holds a study with other settings" in capsys.readouterr().err
