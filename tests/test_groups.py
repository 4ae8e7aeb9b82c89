"""Dynamic resampling, DAPO filtering, curriculum filters and prompt limits do what they claim."""

import random

import pytest

from minigrpo.rl.groups import GroupSource, fill_with_signal, needs_resample, resample_groups
from minigrpo.rl.prompts import Prompt, PromptStream, apply_curriculum, limit_prompt_length
from minigrpo.rollout import Completion, SamplingParams


class ScriptedEngine:
    """Each prompt has a script: the k-th generate() call for it returns script[k] (one reward per sample)."""

    version = 0

    def __init__(self, scripts: dict[int, list[list[float]]]):
        self.scripts, self.calls, self.temperatures = scripts, {}, []

    def generate(self, prompts, n, sampling):
        self.temperatures.append(sampling.temperature)
        out = []
        for p in prompts:
            key = p[0]
            k = self.calls.get(key, 0)
            self.calls[key] = k + 1
            script = self.scripts[key]
            rewards = script[min(k, len(script) - 1)]
            assert len(rewards) == n
            out.append([Completion(list(p), [int(r * 10) + 100], [0.0], "stop", 0) for r in rewards])
        return out


def make_source(scripts, n=4):
    engine = ScriptedEngine(scripts)
    reward_fn = lambda texts, meta: ([float(t) for t in texts], {"correct": [float(float(t) > 0.5) for t in texts]})  # noqa: E731
    decode = lambda ids: str((ids[0] - 100) / 10)  # noqa: E731
    return GroupSource(engine, decode, reward_fn, SamplingParams(temperature=1.0, max_new_tokens=4), n), engine


def prompt(i):
    return Prompt(f"p{i}", [i], {})


def test_resampling_removes_zero_variance_when_possible_within_k():
    flat, mixed = [0.0] * 4, [0.0, 1.0, 0.0, 0.0]
    scripts = {1: [flat, flat, mixed], 2: [mixed], 3: [flat] * 20}
    source, engine = make_source(scripts)
    groups = source.generate([prompt(1), prompt(2), prompt(3)])
    assert [g.zero_variance for g in groups] == [True, False, True]
    out = resample_groups(source, groups, "std", attempts=5, temperatures=[0.7, 0.9], min_std=0.1, positive_threshold=0.0, rng=random.Random(0))
    assert not out[0].zero_variance and out[0].attempts == 3  # found on the 2nd resample
    assert out[1].attempts == 1 and engine.calls[2] == 1  # a good group is never regenerated
    assert out[2].zero_variance and out[2].attempts == 6 and engine.calls[3] == 6  # gives up after K
    assert set(engine.temperatures[1:]) <= {0.7, 0.9}  # resamples use the temperature list


def test_positive_variant_judges_the_new_rewards():
    low_var_neg = [-1.0, -0.5, -1.0, -0.5]  # std 0.25 >= 0.1 but no reward > 0
    pos_then = [0.0, 1.0, 0.0, 1.0]
    scripts = {1: [low_var_neg, low_var_neg, pos_then], 2: [pos_then, low_var_neg]}
    source, _ = make_source(scripts)
    groups = source.generate([prompt(1), prompt(2)])
    assert not needs_resample(groups[0], "std", 0.1, 0.0) and needs_resample(groups[0], "positive", 0.1, 0.0)
    out = resample_groups(source, groups, "positive", attempts=12, temperatures=[1.0], min_std=0.1, positive_threshold=0.0, rng=random.Random(0))
    assert out[0].rewards == pos_then and out[0].attempts == 3
    assert out[1].rewards == pos_then and out[1].attempts == 1  # passed at first: its second script never drawn


def test_dapo_filter_drops_zero_variance_and_refills():
    flat, mixed = [1.0] * 4, [0.0, 1.0, 1.0, 1.0]
    scripts = {i: [flat if i % 2 else mixed] for i in range(1, 20)}
    source, _ = make_source(scripts)
    stream = iter(range(5, 20))
    draw = lambda k: [prompt(next(stream)) for _ in range(k)]  # noqa: E731
    first = source.generate([prompt(i) for i in range(1, 5)])  # 2 flat, 2 mixed
    kept, dropped = fill_with_signal(source, first, draw, want=4, max_rounds=4)
    assert len(kept) == 4 and not any(g.zero_variance for g in kept)
    # first batch drops 1, 3; round 1 draws 5 (flat, dropped), 6 (kept); round 2 draws 7 (dropped); round 3 draws 8 (kept)
    assert dropped == 4


def test_dapo_filter_bounded_rounds():
    source, _ = make_source({i: [[0.0] * 4] for i in range(100)})
    draw_from = iter(range(10, 100))
    kept, dropped = fill_with_signal(source, source.generate([prompt(1), prompt(2)]), lambda k: [prompt(next(draw_from)) for _ in range(k)], want=2, max_rounds=3)
    assert kept == [] and dropped == 2 + 3 * 2


def test_curriculum_filters():
    ps = [prompt(i) for i in range(5)]
    records = {"p0": [1.0, 1.0], "p1": [0.0, 0.0], "p2": [1.0, 0.0], "p3": [0.0, 0.0, 1.0]}  # p4 unseen
    ids = lambda xs: [p.id for p in xs]  # noqa: E731
    assert ids(apply_curriculum(ps, records, "remove_easy")) == ["p1", "p2", "p3", "p4"]
    assert ids(apply_curriculum(ps, records, "remove_hard")) == ["p0", "p2", "p3", "p4"]
    assert ids(apply_curriculum(ps, records, "remove_both")) == ["p2", "p3", "p4"]
    assert ids(apply_curriculum(ps, records, "easy_to_hard")) == ["p0", "p2", "p3", "p1", "p4"]


def test_prompt_length_truncate_or_reject():
    ps = [Prompt("a", [1, 2, 3]), Prompt("b", [1, 2, 3, 4, 5, 6])]
    with pytest.warns(UserWarning, match="left-truncated"):
        kept, over = limit_prompt_length(ps, 4, "truncate")
    assert over == 1 and kept[1].ids == [3, 4, 5, 6]
    with pytest.warns(UserWarning, match="rejected"):
        kept, over = limit_prompt_length(ps, 4, "reject")
    assert [p.id for p in kept] == ["a"]
    with pytest.raises(ValueError, match="no prompt left"), pytest.warns(UserWarning):
        limit_prompt_length(ps, 2, "reject")


def test_prompt_stream_partitions_ranks_and_resumes():
    a, b = PromptStream(10, seed=3, rank=0, world_size=2), PromptStream(10, seed=3, rank=1, world_size=2)
    first_a, first_b = a.take(5), b.take(5)
    assert sorted(first_a + first_b) == list(range(10))  # one epoch, disjoint
    state = a.state_dict()
    cont = a.take(7)
    c = PromptStream(10, seed=3, rank=0, world_size=2)
    c.load_state_dict(state)
    assert c.take(7) == cont
