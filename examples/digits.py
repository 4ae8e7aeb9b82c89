"""A dependency-free task with a verifiable reward that a tiny random model learns in a few steps.

Prompt: "write digits: <seed text>". Reward: the fraction of the completion's non-space characters
that are digits (in [0, 1]); `correct` = 1 when that fraction is at least 0.5. A random model emits
digits only by chance (the tiny tokenizer has number tokens from its corpus), so the reward starts
low and GRPO raises it by shifting probability to number tokens. Checkable by eye, no deps.

    torchrun --nproc_per_node 2 -m examples.digits --model.path DIR --run.output_dir OUT
"""

from __future__ import annotations

import sys

from minigrpo.rl.prompts import Prompt

WORDS = ["patient", "admitted", "chest", "pain", "heart", "failure", "sepsis", "stable", "course", "home"]


def make_prompts(tokenizer, n: int = 64) -> list[Prompt]:
    prompts = []
    for i in range(n):
        text = f"write digits: {WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} {i}"
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        prompts.append(Prompt(f"digits-{i}", list(ids), {"text": text}))
    return prompts


def digit_fraction(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


def reward_fn(completions: list[str], metadata: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
    rewards = [digit_fraction(c) for c in completions]
    return rewards, {"digits": rewards, "correct": [float(r >= 0.5) for r in rewards]}


def main(argv: list[str]) -> int:
    from minigrpo.cli import run_command
    from minigrpo.config import load_config, split_cli
    from minigrpo.help import print_help, wants_help
    from minigrpo.model import load_tokenizer
    from minigrpo.trainer import GRPORunConfig, GRPOTrainer

    if wants_help(argv):
        return print_help(__doc__, GRPORunConfig)

    def body() -> None:
        cfg = load_config(GRPORunConfig, *split_cli(argv))
        tokenizer = load_tokenizer(cfg.model.path, require_chat_template=True)
        GRPOTrainer(cfg, make_prompts(tokenizer), reward_fn).train()

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
