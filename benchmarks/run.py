"""Side-by-side benchmarks of posttrain against TRL, alternating the two in one run.

    python -m benchmarks.run                       # every method and workload available
    python -m benchmarks.run --methods sft --workloads big-vocab --rounds 2 --steps 6
    python -m benchmarks.run --methods grpo --checkpointing defaults   # TRL as it ships: checkpointing on

Each measurement runs in a fresh process; rounds alternate posttrain and TRL so that machine
drift hits both. Prints a table and writes JSON (default: benchmarks/results/latest.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_worker(impl, method, workload, steps, options) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.worker", "--impl", impl, "--method", method, "--workload", workload,
           "--steps", str(steps), "--options", json.dumps(options)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"impl": impl, "method": method, "workload": workload, "error": "\n".join(tail)}


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1].get("error", "failed")}
    return {
        "sec_per_step": statistics.median(r["sec_per_step"] for r in ok),
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in ok),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
        "peak_gpu_mb": max(r["peak_gpu_mb"] for r in ok) if ok[0].get("peak_gpu_mb") is not None else None,
        "device": ok[0].get("device", "cpu"),
        "first_step_loss": ok[0]["first_step_loss"],
        "mean_reward": statistics.mean(x for r in ok for x in r.get("rewards", [])) if any(r.get("rewards") for r in ok) else None,
        "runs": len(ok),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="sft,dpo,reward,grpo,rloo")
    parser.add_argument("--workloads", default="small,big-vocab")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--impls", default="posttrain,trl")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"))
    parser.add_argument("--options", default="{}",
                        help='JSON of config fields for both libraries, e.g. \'{"per_device_train_batch_size": 32}\'')
    parser.add_argument("--posttrain-options", default="{}", help="JSON of extra posttrain config fields")
    parser.add_argument("--trl-options", default="{}", help="JSON of extra TRL config fields")
    parser.add_argument("--checkpointing", choices=("off", "on", "defaults"), default="off",
                        help="gradient checkpointing for both libraries: off (like for like, the default), on, or "
                        "each library's own default (TRL turns it on; posttrain, like transformers, leaves it off)")
    args = parser.parse_args(argv)

    impls = args.impls.split(",")
    results = []
    for method in args.methods.split(","):
        for workload in args.workloads.split(","):
            runs = {impl: [] for impl in impls}
            for round_index in range(args.rounds):
                order = impls if round_index % 2 == 0 else impls[::-1]
                for impl in order:
                    options = {} if args.checkpointing == "defaults" else {"activation_checkpointing": args.checkpointing == "on"}
                    options.update(json.loads(args.options))
                    options.update(json.loads(args.posttrain_options if impl == "posttrain" else args.trl_options))
                    started = time.time()
                    r = run_worker(impl, method, workload, args.steps, options)
                    r["wall_s"] = time.time() - started
                    runs[impl].append(r)
                    status = "error" if "error" in r else f"{r['sec_per_step']:.2f} s/step"
                    print(f"  [{method}/{workload}] round {round_index + 1} {impl}: {status}", flush=True)
            entry = {"method": method, "workload": workload, "raw": runs,
                     **{impl: summarise(runs[impl]) for impl in impls}}
            results.append(entry)

    print()
    header = (f"{'method':<6} {'workload':<10} {'impl':<10} {'s/step':>8} {'tok/s':>9} {'peak RSS MB':>12} "
              f"{'peak GPU MB':>12} {'1st loss':>9} {'reward':>7}")
    print(header)
    print("-" * len(header))
    for entry in results:
        for impl in impls:
            s = entry[impl]
            if "error" in s:
                print(f"{entry['method']:<6} {entry['workload']:<10} {impl:<10} ERROR: {s['error'].splitlines()[-1][:60]}")
                continue
            loss = f"{s['first_step_loss']:>9.4f}" if s["first_step_loss"] is not None else f"{'-':>9}"
            reward = f"{s['mean_reward']:>7.3f}" if s.get("mean_reward") is not None else f"{'-':>7}"
            gpu = f"{s['peak_gpu_mb']:>12.0f}" if s.get("peak_gpu_mb") is not None else f"{'-':>12}"
            print(f"{entry['method']:<6} {entry['workload']:<10} {impl:<10} {s['sec_per_step']:>8.2f} "
                  f"{s['tokens_per_sec']:>9.0f} {s['peak_rss_mb']:>12.0f} {gpu} {loss} {reward}")
        if all("error" not in entry.get(i, {"error": 1}) for i in ("posttrain", "trl")):
            p, t = entry["posttrain"], entry["trl"]
            entry["speedup_steps_per_sec"] = t["sec_per_step"] / p["sec_per_step"]
            entry["rss_ratio"] = p["peak_rss_mb"] / t["peak_rss_mb"]
            memory = f"{entry['rss_ratio']:.2f}x peak RSS"
            if p.get("peak_gpu_mb") and t.get("peak_gpu_mb"):
                entry["gpu_memory_ratio"] = p["peak_gpu_mb"] / t["peak_gpu_mb"]
                memory += f", {entry['gpu_memory_ratio']:.2f}x peak GPU memory"
            agreement = ""
            if p["first_step_loss"] is not None and t["first_step_loss"] is not None:
                agreement = f", first-step loss diff {abs(p['first_step_loss'] - t['first_step_loss']):.2e}"
            print(f"{'':<17} posttrain/TRL: {entry['speedup_steps_per_sec']:.2f}x steps/s, {memory}{agreement}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump({"results": results, "argv": sys.argv[1:], "checkpointing": args.checkpointing, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, handle, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
