"""2 ranks reduce step statistics while rank 1 holds no groups (as after DAPO filtering)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from minigrpo.dist import destroy_distributed, init_distributed  # noqa: E402
from minigrpo.grpo import StepCounts  # noqa: E402
from minigrpo.rl.groups import Group, RolloutInfo  # noqa: E402
from minigrpo.rl.prompts import Prompt  # noqa: E402
from minigrpo.rollout import Completion  # noqa: E402
from minigrpo.rl.stats import StepStats  # noqa: E402

info = init_distributed()
groups = []
if info.rank == 0:
    comps = [Completion([1], [5, 6], [0.0, 0.0], "stop", 0), Completion([1], [7], [0.0], "length", 0)]
    groups = [Group(Prompt("p", [1]), comps, ["a", "b"], [1.0, 0.0], {"correct": [1.0, 0.0]}, 1.0, attempts=3)]
counts = StepCounts(tokens=3, sequences=2, micro_batches=1, max_completion_tokens=2)
m = StepStats(info.device, has_kl=False).reduce(groups, counts, RolloutInfo(len(groups), resampled=True), over_long=0)
if info.is_main:
    print(json.dumps(m))
destroy_distributed()
