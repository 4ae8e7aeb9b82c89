"""Every seed of a run derives from `run.seed` through `derive_seed`, the one place seeds are made.

    seed = (base * 2^48 + step * 2^24 + rank * 2^8 + attempt) mod 2^63

The three fields sit in disjoint bit ranges (step < 2^24, rank < 2^16, attempt < 2^8, checked), so
within a run two different (step, rank, attempt) can never share a seed: no arithmetic coincidence
such as rank 1's first draw reusing rank 0's second attempt. The result fits every consumer
(torch.Generator, random.Random, vLLM's per-request seed).
"""

from __future__ import annotations

STEP_BITS, RANK_BITS, ATTEMPT_BITS = 24, 16, 8


def derive_seed(base: int, *, step: int = 0, rank: int = 0, attempt: int = 0) -> int:
    """The seed of (`step`, `rank`, `attempt`) in the run seeded `base`. `step` may be any per-run
    counter (optimizer step, epoch, batch start); `attempt` numbers the draws within one step."""
    for name, value, bits in (("step", step, STEP_BITS), ("rank", rank, RANK_BITS), ("attempt", attempt, ATTEMPT_BITS)):
        if not 0 <= value < 1 << bits:
            raise ValueError(f"derive_seed: {name}={value} is outside [0, 2^{bits})")
    packed = (step << (RANK_BITS + ATTEMPT_BITS)) | (rank << ATTEMPT_BITS) | attempt  # < 2^48
    return (base * (1 << 48) + packed) % (1 << 63)
