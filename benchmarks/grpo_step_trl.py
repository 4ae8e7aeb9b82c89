"""TRL's GRPOTrainer on the contract of benchmarks/grpo_step.py, in its own interpreter, one step per request.

TRL is no dependency of minigrpo. Make a venv for it once (torch pinned, so that pip keeps the CPU wheel):

    python3 -m venv /tmp/trl-venv && /tmp/trl-venv/bin/pip install torch==2.13.0 trl transformers==5.19.0

and pass `--trl-python /tmp/trl-venv/bin/python` to grpo_step.py. `TRLVariant` (in grpo_step's interpreter)
starts this file under that one. The worker builds the trainer, says it is ready, and then takes one optimizer
step for each "go" line on stdin. It answers each step with one line of timings and token counts on stdout.
Interleaved with minigrpo's steps, it shares their machine load.

The worker gets the same model folder, prompt texts (tokenized by the same tokenizer), reward and config:
num_generations 8, max_completion_length 64, beta 0.04, loss_type "dapo", 8 completions per micro-batch x 8
accumulation steps (64 completions and one generation per optimizer step), temperature 1, HF generate (no vLLM),
fp32 with bf16 and gradient checkpointing off (TRL turns both on by default), constant lr 1e-5. Its phases are timed
by wrapping `_generate` + `_calculate_rewards` (generate) and `_get_per_token_logps_and_entropies` on the reference
model; update = the rest of the step. TRL's generate uses the policy itself: it has no weight sync.

Only torch, transformers, datasets, trl and examples/digits.py (for the reward) are imported here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STEP_MARK = "GRPO_STEP_JSON "  # the worker's result lines on stdout start with this


class TRLVariant:
    """TRL's GRPOTrainer in a subprocess that takes one optimizer step per 'go' line and answers with its timings."""

    name = "TRL"

    def __init__(self, python: str, spec: dict, work: Path):
        spec_path, self.log = work / "trl_spec.json", work / "trl_worker.log"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [python, __file__, str(spec_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=ROOT,
                env=env,
            )
        self.info = self._read()  # the worker is ready: TRL's version, its tokenization of the prompts

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(STEP_MARK):
                return json.loads(line[len(STEP_MARK) :])
        raise RuntimeError(f"the TRL worker ended (exit {self.proc.wait()}); see {self.log}")

    def step(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=600)


def trl_worker(spec_path: str) -> None:
    """Runs under the TRL interpreter: only torch, transformers, datasets and trl are imported."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, __version__

    from examples.digits import digit_fraction

    def emit(record: dict) -> None:
        print(STEP_MARK + json.dumps(record), flush=True)

    def reward(prompts, completions, **kwargs):
        return [digit_fraction(c) for c in completions]

    args = GRPOConfig(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["samples"],
        gradient_accumulation_steps=spec["prompts_per_step"],
        num_generations=spec["samples"],
        max_completion_length=spec["new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.04,
        loss_type="dapo",
        epsilon=0.2,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        max_steps=spec["steps"],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
    )
    dataset = Dataset.from_dict({"prompt": spec["prompts"]})
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=reward, args=args, train_dataset=dataset)
    seconds, cpu, tokens = {}, {}, {}

    def add(table: dict, key: str, value: float) -> None:
        table[key] = table.get(key, 0) + value

    def timed(phase_of, fn):
        """fn, its seconds added to the phase that phase_of(*args, **kwargs) names."""

        def wrapper(*args, **kwargs):
            phase = phase_of(*args, **kwargs)
            start, start_cpu = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            add(seconds, phase, time.perf_counter() - start)
            add(cpu, phase, time.process_time() - start_cpu)
            return out

        return wrapper

    def logps_phase(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs) -> str:
        """reference (the frozen model), forward (the loss's, with grad; part of update) or old."""
        phase = "reference" if model is trainer.ref_model else "forward" if torch.is_grad_enabled() else "old"
        add(tokens, f"{phase}_positions", input_ids.numel())
        add(tokens, f"{phase}_fed", int(attention_mask.sum()))
        add(tokens, f"{phase}_pairs", input_ids.shape[0] * input_ids.shape[1] ** 2)
        add(tokens, f"{phase}_head_rows", int(attention_mask[:, -logits_to_keep:].sum()))  # its head: labelled rows
        return phase

    generate_one = trainer._generate_single_turn

    def counted_generate(prompt_ids, *a, **k):
        completion_ids, logprobs = generate_one(prompt_ids, *a, **k)
        longest = max(len(c) for c in completion_ids)  # HF generate feeds every row until all are done
        add(tokens, "generate_fed", len(prompt_ids) * (max(map(len, prompt_ids)) + max(longest - 1, 0)))
        add(tokens, "completion_tokens", sum(map(len, completion_ids)))
        return completion_ids, logprobs

    trainer._generate_single_turn = counted_generate
    trainer._generate = timed(lambda *args, **kwargs: "generate", trainer._generate)
    trainer._calculate_rewards = timed(lambda *args, **kwargs: "generate", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed(logps_phase, trainer._get_per_token_logps_and_entropies)

    class Lockstep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if sys.stdin.readline().strip() != "go":
                raise SystemExit(0)
            for table in (seconds, cpu, tokens):
                table.clear()
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            steps = {
                "wall": (seconds, time.perf_counter() - self.start),
                "cpu": (cpu, time.process_time() - self.start_cpu),
            }
            record = {"tokens": dict(tokens)}
            for clock, (table, step) in steps.items():
                phases = {phase: table.get(phase, 0.0) for phase in ("generate", "reference", "old", "sync")}
                phases["update"] = step - sum(phases.values())  # loss forwards, backwards, optimizer, the rest
                record[clock] = {"seconds": phases, "step": step}
            emit(record)

    trainer.add_callback(Lockstep())
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    prompt_tokens = [len(ids) for ids in tokenizer(spec["prompts"])["input_ids"]]
    emit({"trl": __version__, "prompt_tokens": prompt_tokens, "threads": torch.get_num_threads()})
    trainer.train()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    trl_worker(sys.argv[1])
