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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

OK, OVER_CAP, KILLED, TIMEOUT, FAILED = "ok", "over cap", "killed at cap", "timeout", "failed"


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
               poll_s: float = 0.05) -> dict:
    """Run ``cmd`` (which prints one ``RESULT {json}`` line) under a resident-memory cap.

    Returns ``{"status", "result", "polled_peak_rss_mb", "wall_s", "error"}``; ``status`` is one of
    ok, over cap (finished, but its own peak RSS passed the cap), killed at cap, timeout, failed.
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
            status = FAILED
            error = "\n".join((stderr or stdout).strip().splitlines()[-15:]) or f"exit code {proc.returncode}"
        elif result["peak_rss_mb"] > cap_mb:
            status = OVER_CAP
        else:
            status = OK
    return {"status": status, "result": result, "polled_peak_rss_mb": polled_peak, "wall_s": wall_s, "error": error}


def sweep(lengths: list[int], make_command: Callable[[int], list[str]], cap_mb: float, timeout_s: float,
          env: dict | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Run each length in turn (shortest first) and stop after the first that does not fit."""
    rows = []
    for length in sorted(lengths):
        run = run_capped(make_command(length), cap_mb, timeout_s, env=env)
        result = run["result"] or {}
        row = {
            "length": length, "status": run["status"],
            "sec_per_step": result.get("sec_per_step"), "tokens_per_sec": result.get("tokens_per_sec"),
            # the process's own maximum when it finished; the watchdog's sample when it was killed
            "peak_rss_mb": result.get("peak_rss_mb", run["polled_peak_rss_mb"]),
            "polled_peak_rss_mb": run["polled_peak_rss_mb"], "peak_gpu_mb": result.get("peak_gpu_mb"),
            "first_step_loss": result.get("first_step_loss"), "losses": result.get("losses"), "wall_s": run["wall_s"], "error": run["error"],
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if run["status"] != OK:
            break
    return rows


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
    return f"{entry['method']} {entry['impl']} (checkpointing {entry['checkpointing']}{', ' + levers if levers else ''})"


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
            lines.append(f"{entry['method']:<6} {entry['impl']:<10} {entry['checkpointing']:<5} "
                         f"{(entry.get('label') or '-')[:28]:<28} {row['length']:>7} {sec} {tok} {rss} {loss} {row['status']:<14}")
        fit = entry["longest_fit"]
        lines.append(f"{'':<6} {entry['impl']:<10} longest length within {entry.get('memory_cap_mb', cap_mb):,.0f} MB: "
                     f"{fit if fit is not None else 'none'}")
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
    for entry in entries:
        fitting = [row for row in entry["rows"] if row["status"] == OK]
        line, = ax.plot([r["length"] for r in fitting], [r["peak_rss_mb"] for r in fitting], marker="o",
                        label=series_label(entry))
        stopped = [row for row in entry["rows"] if row["status"] != OK and row["peak_rss_mb"]]
        for row in stopped:  # where the sweep stopped: the memory seen then, marked with a cross
            ax.plot([row["length"]], [row["peak_rss_mb"]], marker="x", markersize=10, color=line.get_color())
    ax.axhline(cap_mb, color="grey", linestyle="--", linewidth=1, label=f"cap {cap_mb:,.0f} MB")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per row (GRPO: completion tokens)")
    ax.set_ylabel("peak RSS (MB)")
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


def worker_command(impl: str, method: str, length: int, steps: int, options: dict) -> list[str]:
    return [sys.executable, "-m", "benchmarks.worker", "--impl", impl, "--method", method,
            "--workload", f"long-{length}", "--steps", str(steps), "--options", json.dumps(options)]


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
                        help="keep the other series already in --out (same method, library and checkpointing is replaced)")
    args = parser.parse_args(argv)

    cap_mb = args.memory_cap_gb * 1024
    lengths = [int(x) for x in args.lengths.split(",")]
    entries = []
    for method in args.methods.split(","):
        for impl in args.impls.split(","):
            env = child_env(impl, args.trl_path)
            checkpointing = effective_checkpointing(impl, args.checkpointing)
            entry = {"method": method, "impl": impl, "checkpointing": checkpointing, "memory_cap_mb": cap_mb,
                     "steps": args.steps}
            if impl == "trl" and subprocess.run([sys.executable, "-c", "import trl"], cwd=ROOT, env=env,
                                                capture_output=True).returncode != 0:
                print(f"  [{method}] trl: not importable; install the bench extra or pass --trl-path", flush=True)
                entries.append({**entry, "rows": [], "longest_fit": None, "error": "trl not importable"})
                continue
            options = {} if args.checkpointing == "defaults" else {"activation_checkpointing": args.checkpointing == "on"}
            options.update(json.loads(args.posttrain_options if impl == "posttrain" else args.trl_options))
            entry["label"] = options_label(options)

            def show(row, method=method, impl=impl):
                detail = f"{row['sec_per_step']:.2f} s/step" if row["sec_per_step"] is not None else (row["error"] or "")
                rss = f"{row['peak_rss_mb']:,.0f} MB" if row["peak_rss_mb"] is not None else "-"
                print(f"  [{method}] {impl} {row['length']}: {row['status']}, {rss}, {detail.splitlines()[-1][:80] if detail else ''}",
                      flush=True)

            rows = sweep(lengths, lambda n: worker_command(impl, method, n, args.steps, {**method_options(method, n), **options}),
                         cap_mb, args.timeout_s, env=env, on_row=show)
            entries.append({**entry, "options": options, "rows": rows, "longest_fit": longest_fit(rows)})

    if args.append and os.path.exists(args.out):
        with open(args.out) as handle:
            kept = [e for e in json.load(handle).get("entries", [])
                    if not any(series_label(e) == series_label(new) for new in entries)]
        entries = kept + entries
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
