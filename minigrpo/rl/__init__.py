"""The GRPO loop's own helpers, apart from the training infrastructure shared with SFT.

    prompts.py   Prompt, length limits, curriculum filters, the resumable per-rank prompt stream
    groups.py    generate and score groups; dynamic resampling; DAPO filter-and-refill
    stats.py     the step's statistics: summed on device, reduced once per step

The math is `minigrpo/grpo.py`; the step that uses all of these is `minigrpo/trainer.py`.
"""
