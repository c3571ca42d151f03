"""How long a row each library can train on under a memory cap: seconds/step, tokens/s, peak RSS.

    python -m benchmarks.length_sweep --methods sft --impls posttrain,trl \\
        --lengths 1024,2048,4096,8192 --memory-cap-gb 8 --steps 2
    python -m benchmarks.length_sweep --methods sft --impls posttrain --checkpointing on --append

Every length runs in its own process (``benchmarks.worker`` on the ``long-<tokens>`` workload:
the big-vocabulary model with positions extended, one row per step). A watchdog polls the
process's resident memory and kills it once it passes the cap; a run that finishes with a peak
RSS over the cap counts as over the cap too. Each library's sweep stops at the first length that
does not fit (over the cap, killed, past ``--timeout-s``, or failed). For GRPO the length is the
completion length, sampled from a fixed 64-word prompt (2 completions per step).

TRL comes from the ``bench`` extra; ``--trl-path DIR`` adds a directory holding it (for example
one made with ``pip install --no-deps --target DIR trl==1.16.0``) to the TRL processes'
``PYTHONPATH`` only. Prints a table, writes JSON and a plot of peak memory against length.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

from benchmarks.workloads import LONG_PREFIXES

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

OK, OVER_CAP, KILLED, TIMEOUT, FAILED = "ok", "over cap", "killed at cap", "timeout", "failed"
OUT_OF_GPU_MEMORY = "out of GPU memory"
# prompt tokens of a GRPO row of the long workloads: the 64-word prompt in the chat template, with the
# generation prompt (seen as the (2, 1, C, 69 + C) attention mask of a shared-prompt forward)
GRPO_PROMPT_TOKENS = 69


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(child) for child in handle.read().split())
        except OSError:
            continue  # exited meanwhile
    return found


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB (from /proc/<pid>/statm)."""
    total_kb = 0
    for member in _descendants(pid):
        try:
            with open(f"/proc/{member}/statm") as handle:
                total_kb += int(handle.read().split()[1]) * PAGE_KB
        except (OSError, IndexError, ValueError):
            continue
    return total_kb / 1024


def run_capped(cmd: list[str], cap_mb: float, timeout_s: float, env: dict | None = None,
               poll_s: float = 0.05, gpu_cap_mb: float | None = None) -> dict:
    """Run ``cmd`` (which prints one ``RESULT {json}`` line) under a resident-memory cap.

    Returns ``{"status", "result", "polled_peak_rss_mb", "wall_s", "error"}``; ``status`` is one of
    ok, over cap (finished, but its own peak RSS, or its peak GPU memory past ``gpu_cap_mb``, passed
    the cap), killed at cap, timeout, out of GPU memory (a CUDA allocation failed), failed.
    """
    started = time.perf_counter()
    polled_peak, status = 0.0, None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        while proc.poll() is None:
            rss = tree_rss_mb(proc.pid)
            polled_peak = max(polled_peak, rss)
            if rss > cap_mb:
                status = KILLED
            elif time.perf_counter() - started > timeout_s:
                status = TIMEOUT
            if status is not None:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: it and its children only
                proc.wait()
                break
            time.sleep(poll_s)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    wall_s = time.perf_counter() - started
    result = None
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    error = None
    if status is None:
        if result is None:
            error = "\n".join((stderr or stdout).strip().splitlines()[-15:]) or f"exit code {proc.returncode}"
            status = OUT_OF_GPU_MEMORY if "OutOfMemoryError" in error or "CUDA out of memory" in error else FAILED
        elif result["peak_rss_mb"] > cap_mb or (
                gpu_cap_mb is not None and (result.get("peak_gpu_mb") or 0.0) > gpu_cap_mb):
            status = OVER_CAP
        else:
            status = OK
    return {"status": status, "result": result, "polled_peak_rss_mb": polled_peak, "wall_s": wall_s, "error": error}


def sweep(lengths: list[int], make_command: Callable[[int], list[str]], cap_mb: float, timeout_s: float,
          env: dict | None = None, on_row: Callable[[dict], None] | None = None,
          gpu_cap_mb: float | None = None) -> list[dict]:
    """Run each length in turn (shortest first) and stop after the first that does not fit."""
    rows = []
    for length in sorted(lengths):
        run = run_capped(make_command(length), cap_mb, timeout_s, env=env, gpu_cap_mb=gpu_cap_mb)
        result = run["result"] or {}
        row = {
            "length": length, "status": run["status"],
            "sec_per_step": result.get("sec_per_step"), "tokens_per_sec": result.get("tokens_per_sec"),
            # the process's own maximum when it finished; the watchdog's sample when it was killed
            "peak_rss_mb": result.get("peak_rss_mb", run["polled_peak_rss_mb"]),
            "polled_peak_rss_mb": run["polled_peak_rss_mb"], "peak_gpu_mb": result.get("peak_gpu_mb"),
            "first_step_loss": result.get("first_step_loss"), "losses": result.get("losses"), "wall_s": run["wall_s"], "error": run["error"],
            **{key: result.get(key) for key in ("device", "model_params", "model_layers", "attention_width")},
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if run["status"] != OK:
            break
    return rows


def step_sequence_lengths(method: str, length: int) -> list[int]:
    """Tokens of each sequence one step of the ``long-<length>`` workload trains on: one row for SFT,
    a chosen and a rejected row for DPO, two prompt + completion rows for GRPO and RLOO."""
    if method in ("grpo", "rloo"):
        return [GRPO_PROMPT_TOKENS + length] * 2
    if method == "dpo":
        return [length, length]
    return [length]


def model_flops(params: int, layers: int, attention_width: int, sequence_lengths: list[int],
                passes: float = 3.0) -> float:
    """Model FLOPs of ``passes`` forward-equivalents (3: forward and backward) over causal sequences.

    Per sequence of n tokens: ``2 * params * n`` for the matrix products of the weights (the tied
    head counted once, the embedding lookup free) plus ``2 * layers * attention_width * n**2`` for
    ``QK^T`` and ``AV`` under the causal mask (each ``2 n^2 d`` in full, half of it causal); times
    ``passes``. Recomputation (checkpointing, offloading, tiling) is not counted, as MFU does not.
    """
    tokens = sum(sequence_lengths)
    squares = sum(n * n for n in sequence_lengths)
    return passes * (2.0 * params * tokens + 2.0 * layers * attention_width * squares)


def step_model_flops(method: str, length: int, params: int, layers: int, attention_width: int) -> float:
    """One step's model FLOPs: forward and backward over the trained rows, plus DPO's reference forward.
    GRPO's sampling is left out (its decoding is bound by memory bandwidth, not FLOPs)."""
    passes = 4.0 if method == "dpo" else 3.0
    return model_flops(params, layers, attention_width, step_sequence_lengths(method, length), passes)


def mfu(flops_per_step: float, sec_per_step: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOPs per second over the card's peak."""
    return flops_per_step / sec_per_step / (peak_tflops * 1e12)


def add_mfu(method: str, rows: list[dict], peak_tflops: float) -> None:
    """Set ``model_flops_per_step`` and ``mfu`` on each timed row that reports its model's shape."""
    for row in rows:
        if row.get("model_params") and row.get("sec_per_step"):
            row["model_flops_per_step"] = step_model_flops(method, row["length"], row["model_params"],
                                                           row["model_layers"], row["attention_width"])
            row["mfu"] = mfu(row["model_flops_per_step"], row["sec_per_step"], peak_tflops)


def longest_fit(rows: list[dict]) -> int | None:
    fitting = [row["length"] for row in rows if row["status"] == OK]
    return max(fitting) if fitting else None


def options_label(options: dict) -> str:
    """The options that set a memory lever, as a short name ("activation_offloading+tiled_mlp"); "" for none."""
    shown = [name if value is True else f"{name}={value}" for name, value in sorted(options.items())
             if name not in ("activation_checkpointing", "gradient_checkpointing") and value not in (False, None)]
    return "+".join(shown)


def series_label(entry: dict) -> str:
    levers = entry.get("label") or ""
    where = "" if entry.get("device", "cpu") == "cpu" and entry.get("model", "h256") == "h256" else \
        f", {entry.get('model', 'h256')} on {entry.get('device', 'cpu')}"
    return (f"{entry['method']} {entry['impl']} (checkpointing {entry['checkpointing']}"
            f"{', ' + levers if levers else ''}{where})")


def merge_series(earlier: list[dict], new: list[dict]) -> list[dict]:
    """``earlier`` entries followed by ``new`` ones; a new entry of a series already there takes over its
    rows of the lengths it ran and keeps the others (so a sweep can be extended one length at a time)."""
    merged = [dict(entry) for entry in earlier]
    for entry in new:
        same = [index for index, old in enumerate(merged) if series_label(old) == series_label(entry)]
        if not same:
            merged.append(entry)
            continue
        old = merged.pop(same[0])
        ran = {row["length"] for row in entry["rows"]}
        rows = sorted([row for row in old["rows"] if row["length"] not in ran] + entry["rows"],
                      key=lambda row: row["length"])
        merged.append({**entry, "rows": rows, "longest_fit": longest_fit(rows)})
    return merged


def format_table(entries: list[dict], cap_mb: float) -> str:
    header = (f"{'method':<6} {'impl':<10} {'ckpt':<5} {'levers':<28} {'length':>7} {'s/step':>8} {'tok/s':>8} "
              f"{'peak RSS MB':>12} {'loss 1':>9} {'status':<14}")
    lines = [header, "-" * len(header)]
    for entry in entries:
        for row in entry["rows"]:
            sec = f"{row['sec_per_step']:>8.2f}" if row["sec_per_step"] is not None else f"{'-':>8}"
            tok = f"{row['tokens_per_sec']:>8.0f}" if row["tokens_per_sec"] else f"{'-':>8}"
            rss = f"{row['peak_rss_mb']:>12,.0f}" if row["peak_rss_mb"] is not None else f"{'-':>12}"
            loss = f"{row['first_step_loss']:>9.5f}" if row.get("first_step_loss") is not None else f"{'-':>9}"
            gpu = ""
            if entry.get("device") == "cuda":
                gpu = f" GPU {row['peak_gpu_mb']:,.0f} MB" if row.get("peak_gpu_mb") is not None else " GPU -"
                gpu += f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else ""
            lines.append(f"{entry['method']:<6} {entry['impl']:<10} {entry['checkpointing']:<5} "
                         f"{(entry.get('label') or '-')[:28]:<28} {row['length']:>7} {sec} {tok} {rss} {loss} "
                         f"{row['status']:<14}{gpu}")
        fit = entry["longest_fit"]
        within = f"{entry.get('memory_cap_mb', cap_mb):,.0f} MB"
        if entry.get("gpu_memory_cap_mb") is not None:
            within = f"{entry['gpu_memory_cap_mb']:,.0f} MB of GPU memory"
        lines.append(f"{'':<6} {entry['impl']:<10} longest length within {within}: {fit if fit is not None else 'none'}")
    return "\n".join(lines)


def plot(entries: list[dict], cap_mb: float, path: str) -> bool:
    """Peak RSS against length, one line per library (and method, checkpointing); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    on_gpu = any(entry.get("device") == "cuda" for entry in entries)
    key = "peak_gpu_mb" if on_gpu else "peak_rss_mb"
    for entry in entries:
        fitting = [row for row in entry["rows"] if row["status"] == OK and row.get(key) is not None]
        line, = ax.plot([r["length"] for r in fitting], [r[key] for r in fitting], marker="o",
                        label=series_label(entry))
        stopped = [row for row in entry["rows"] if row["status"] != OK and row.get(key)]
        for row in stopped:  # where the sweep stopped: the memory seen then, marked with a cross
            ax.plot([row["length"]], [row[key]], marker="x", markersize=10, color=line.get_color())
    ax.axhline(cap_mb, color="grey", linestyle="--", linewidth=1, label=f"cap {cap_mb:,.0f} MB")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per row (GRPO: completion tokens)")
    ax.set_ylabel("peak GPU memory (MB)" if on_gpu else "peak RSS (MB)")
    ax.set_title("Peak memory against sequence length (x: stopped)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def method_options(method: str, length: int) -> dict:
    if method in ("grpo", "rloo"):
        return {"max_completion_length": length, "per_device_train_batch_size": 2, "num_generations": 2}
    return {}


def worker_command(impl: str, method: str, length: int, steps: int, options: dict, workload_prefix: str = "long",
                   worker_args: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "benchmarks.worker", "--impl", impl, "--method", method,
            "--workload", f"{workload_prefix}-{length}", "--steps", str(steps), "--options", json.dumps(options),
            *worker_args]


def child_env(impl: str, trl_path: str | None) -> dict:
    env = dict(os.environ)
    if impl == "trl" and trl_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(trl_path), env.get("PYTHONPATH")) if p)
    return env


def effective_checkpointing(impl: str, checkpointing: str) -> str:
    if checkpointing != "defaults":
        return checkpointing
    return "on" if impl == "trl" else "off"  # TRL 1.16 turns it on; posttrain keeps the transformers default


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="sft")
    parser.add_argument("--impls", default="posttrain,trl")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--memory-cap-gb", type=float, default=16.0)
    parser.add_argument("--steps", type=int, default=2, help="steps per run; the first is not timed")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per length; a run past it stops the sweep")
    parser.add_argument("--checkpointing", choices=("off", "on", "defaults"), default="defaults",
                        help="gradient checkpointing: each library's default (TRL on, posttrain off), or on/off for both")
    parser.add_argument("--posttrain-options", default="{}", help="JSON of extra posttrain config fields")
    parser.add_argument("--trl-options", default="{}", help="JSON of extra TRL config fields")
    parser.add_argument("--trl-path", default=None, help="directory holding trl, added to the TRL runs' PYTHONPATH")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "length_sweep.json"))
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--append", action="store_true",
                        help="keep the series already in --out; a rerun of the same series (method, library, "
                             "checkpointing, levers) adds its lengths to it, replacing those run again")
    parser.add_argument("--model", choices=sorted(LONG_PREFIXES), default="h256",
                        help="h256: the small big-vocabulary model; qwen2.5-0.5b: a random model of Qwen2.5-0.5B's shape")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: train on the GPU, report peak GPU memory and MFU (stops at once without CUDA)")
    parser.add_argument("--bf16", action="store_true", help="load the model in bfloat16 and train with bf16=True")
    parser.add_argument("--gpu-memory-cap-gb", type=float, default=None,
                        help="with --device cuda: each run may allocate at most this much GPU memory")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the card's peak dense bf16 TFLOPS for MFU (H100 SXM: 989)")
    args = parser.parse_args(argv)

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("length_sweep: --device cuda needs a CUDA GPU and torch sees none "
                  "(torch.cuda.is_available() is False); run it on a GPU machine or use --device cpu",
                  file=sys.stderr)
            return 2
    cap_mb = args.memory_cap_gb * 1024
    gpu_cap_mb = args.gpu_memory_cap_gb * 1024 if args.gpu_memory_cap_gb is not None and args.device == "cuda" else None
    worker_args: tuple[str, ...] = ("--model-dtype", "bfloat16") if args.bf16 else ()
    if gpu_cap_mb is not None:
        worker_args += ("--gpu-memory-cap-mb", str(gpu_cap_mb))
    lengths = [int(x) for x in args.lengths.split(",")]
    entries = []
    for method in args.methods.split(","):
        for impl in args.impls.split(","):
            env = child_env(impl, args.trl_path)
            checkpointing = effective_checkpointing(impl, args.checkpointing)
            entry = {"method": method, "impl": impl, "checkpointing": checkpointing, "memory_cap_mb": cap_mb,
                     "steps": args.steps, "model": args.model, "device": args.device, "gpu_memory_cap_mb": gpu_cap_mb}
            if impl == "trl" and subprocess.run([sys.executable, "-c", "import trl"], cwd=ROOT, env=env,
                                                capture_output=True).returncode != 0:
                print(f"  [{method}] trl: not importable; install the bench extra or pass --trl-path", flush=True)
                entries.append({**entry, "rows": [], "longest_fit": None, "error": "trl not importable"})
                continue
            options = {} if args.checkpointing == "defaults" else {"activation_checkpointing": args.checkpointing == "on"}
            options.update(json.loads(args.posttrain_options if impl == "posttrain" else args.trl_options))
            entry["label"] = options_label(options)
            if args.bf16:
                options["bf16"] = True

            def show(row, method=method, impl=impl):
                detail = f"{row['sec_per_step']:.2f} s/step" if row["sec_per_step"] is not None else (row["error"] or "")
                rss = f"{row['peak_rss_mb']:,.0f} MB" if row["peak_rss_mb"] is not None else "-"
                print(f"  [{method}] {impl} {row['length']}: {row['status']}, {rss}, {detail.splitlines()[-1][:80] if detail else ''}",
                      flush=True)

            def command(n, method=method, impl=impl, options=options):
                return worker_command(impl, method, n, args.steps, {**method_options(method, n), **options},
                                      workload_prefix=LONG_PREFIXES[args.model], worker_args=worker_args)

            rows = sweep(lengths, command, cap_mb, args.timeout_s, env=env, on_row=show, gpu_cap_mb=gpu_cap_mb)
            if args.device == "cuda":
                add_mfu(method, rows, args.peak_tflops)
            entries.append({**entry, "options": options, "rows": rows, "longest_fit": longest_fit(rows)})

    if args.append and os.path.exists(args.out):
        with open(args.out) as handle:
            entries = merge_series(json.load(handle).get("entries", []), entries)
    print()
    print(format_table(entries, cap_mb))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"entries": entries, "memory_cap_mb": cap_mb, "steps": args.steps, "argv": sys.argv[1:],
                   "time": time.strftime("%Y-%m-%d %H:%M:%S")}, handle, indent=2)
    print(f"\nwrote {args.out}")
    plot_path = args.plot or os.path.splitext(args.out)[0] + ".png"
    if plot(entries, cap_mb, plot_path):
        print(f"wrote {plot_path}")
    else:
        print("matplotlib is not installed (the plots extra): no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
