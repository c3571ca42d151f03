"""The length sweep's logic with a fake workload: a child that holds ``length`` MB and reports a RESULT line."""

import json
import sys

import pytest

from benchmarks import length_sweep

FAKE_CHILD = """
import json, sys, time
megabytes, hold_s, reported = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
block = b"x" * (megabytes * 2**20)  # written, so resident
time.sleep(hold_s)
# VmHWM: ru_maxrss would start from the forking pytest process's resident size
hwm_kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
peak = hwm_kb / 1024 if reported == "measured" else float(reported)
if megabytes < 0:
    sys.exit("fake failure")
print("RESULT " + json.dumps({"sec_per_step": megabytes / 100, "tokens_per_sec": 1e4 / max(megabytes, 1),
                              "peak_rss_mb": peak, "first_step_loss": 1.0}))
"""


def fake_command(megabytes, hold_s=0.0, reported="measured"):
    return [sys.executable, "-c", FAKE_CHILD, str(megabytes), str(hold_s), str(reported)]


def test_watchdog_kills_the_length_over_the_cap_and_the_sweep_stops():
    started = []

    def make_command(length):
        started.append(length)
        return fake_command(length, hold_s=20.0 if length >= 400 else 0.0)

    rows = length_sweep.sweep([800, 10, 400, 40], make_command, cap_mb=200, timeout_s=60)

    assert started == [10, 40, 400]  # shortest first, nothing after the first that does not fit
    assert [row["status"] for row in rows] == [length_sweep.OK, length_sweep.OK, length_sweep.KILLED]
    assert rows[-1]["wall_s"] < 10  # killed, not left to finish its 20 s
    assert rows[-1]["peak_rss_mb"] > 200 and rows[-1]["sec_per_step"] is None
    assert rows[0]["peak_rss_mb"] < rows[1]["peak_rss_mb"] < 200
    assert length_sweep.longest_fit(rows) == 40


def test_a_run_that_finishes_over_the_cap_counts_as_not_fitting():
    # the child reports a peak (its own ru_maxrss in real runs) above the cap that polling never saw
    rows = length_sweep.sweep([1, 2], lambda n: fake_command(n, reported=str(300.0 * n)), cap_mb=400, timeout_s=60)
    assert [row["status"] for row in rows] == [length_sweep.OK, length_sweep.OVER_CAP]
    assert rows[1]["peak_rss_mb"] == 600.0
    assert length_sweep.longest_fit(rows) == 1


def test_timeout_and_failure_stop_the_sweep():
    rows = length_sweep.sweep([1, 2], lambda n: fake_command(n, hold_s=20.0), cap_mb=400, timeout_s=0.5)
    assert [row["status"] for row in rows] == [length_sweep.TIMEOUT] and rows[0]["wall_s"] < 10
    assert length_sweep.longest_fit(rows) is None

    rows = length_sweep.sweep([1, 2], lambda n: fake_command(-n), cap_mb=400, timeout_s=60)
    assert [row["status"] for row in rows] == [length_sweep.FAILED]
    assert "fake failure" in rows[0]["error"]


@pytest.mark.slow  # runs child processes and plots
def test_main_writes_table_json_and_plot_and_appends_series(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(length_sweep, "worker_command",
                        lambda impl, method, length, steps, options, **where: fake_command(length, hold_s=20.0 if length >= 400 else 0.0))
    out = tmp_path / "sweep.json"
    args = ["--methods", "sft", "--impls", "posttrain", "--lengths", "10,40,400,800", "--memory-cap-gb", str(200 / 1024),
            "--out", str(out)]
    assert length_sweep.main(args) == 0
    table = capsys.readouterr().out
    assert "longest length within 200 MB: 40" in table
    assert "killed at cap" in table

    saved = json.loads(out.read_text())
    (entry,) = saved["entries"]
    assert (entry["method"], entry["impl"], entry["checkpointing"], entry["longest_fit"]) == ("sft", "posttrain", "off", 40)
    assert [row["length"] for row in entry["rows"]] == [10, 40, 400]
    assert set(entry["rows"][0]) >= {"length", "status", "sec_per_step", "tokens_per_sec", "peak_rss_mb"}
    assert saved["memory_cap_mb"] == pytest.approx(200)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "sweep.png").stat().st_size > 0

    # another checkpointing setting is a second series; rerunning the same one adds its lengths to it
    assert length_sweep.main(args + ["--checkpointing", "on", "--append", "--lengths", "10"]) == 0
    assert length_sweep.main(args + ["--checkpointing", "on", "--append", "--lengths", "40"]) == 0
    entries = json.loads(out.read_text())["entries"]
    assert [(e["checkpointing"], e["longest_fit"]) for e in entries] == [("off", 40), ("on", 40)]
    assert [row["length"] for row in entries[1]["rows"]] == [10, 40]
    assert length_sweep.main(args + ["--checkpointing", "on", "--append", "--lengths", "40,400"]) == 0
    entries = json.loads(out.read_text())["entries"]
    assert [row["length"] for row in entries[1]["rows"]] == [10, 40, 400]
    assert [row["status"] for row in entries[1]["rows"]][2] != "ok" and entries[1]["longest_fit"] == 40


def test_trl_path_reaches_only_the_trl_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/already/there")
    trl_env = length_sweep.child_env("trl", str(tmp_path))
    assert trl_env["PYTHONPATH"].split(":") == [str(tmp_path), "/already/there"]
    assert length_sweep.child_env("posttrain", str(tmp_path))["PYTHONPATH"] == "/already/there"
    assert length_sweep.effective_checkpointing("trl", "defaults") == "on"
    assert length_sweep.effective_checkpointing("posttrain", "defaults") == "off"


def test_phase_sampler_charges_a_rise_in_resident_memory_to_the_phase_that_caused_it():
    from benchmarks.memory_phases import PhaseSampler

    held = []

    def allocate():
        held.append(b"x" * (64 * 2**20))  # written, so resident

    with PhaseSampler() as sampler:
        sampler.phase("quiet", lambda: None)()
        sampler.phase("allocating", allocate)()
    assert sampler.raised.get("allocating", 0.0) > 48
    assert sampler.raised.get("quiet", 0.0) < 16
    assert sampler.peak["allocating"] >= sampler.peak["quiet"] + 48
    assert sampler.current == "other"


def test_long_workloads_are_named_by_their_length():
    from benchmarks.workloads import WORKLOADS, workload_by_name

    long = workload_by_name("long-4096")
    assert (long.max_length, long.batch_size, long.vocab_size) == (4096, 1, 151_936)
    # rows are cut to exactly the length: the shortest generated chat (assistant -20%) is longer still,
    # and so is a preference prompt plus one completion (half the assistant length)
    assert long.max_positions >= 4096 and long.assistant_tokens * 0.8 > long.max_length
    assert long.user_tokens + long.assistant_tokens // 2 > long.max_length
    assert workload_by_name("small") is WORKLOADS["small"]
    with pytest.raises(SystemExit, match="long-<tokens>"):
        workload_by_name("long-many")
    cmd = length_sweep.worker_command("trl", "grpo", 512, 2, length_sweep.method_options("grpo", 512))
    assert cmd[cmd.index("--workload") + 1] == "long-512"
    assert json.loads(cmd[cmd.index("--options") + 1])["max_completion_length"] == 512


@pytest.mark.slow  # runs child processes
def test_each_lever_is_its_own_series(tmp_path, monkeypatch):
    """Runs with different memory options append as separate series (named by the options), losses kept."""
    monkeypatch.setattr(length_sweep, "worker_command",
                        lambda impl, method, length, steps, options, **where: fake_command(length))
    out = tmp_path / "sweep.json"
    base = ["--methods", "sft", "--impls", "posttrain", "--lengths", "10", "--memory-cap-gb", "1", "--out", str(out),
            "--append"]
    for options in ("{}", '{"activation_offloading": true}', '{"tiled_mlp": true, "sequence_tile_size": 512}',
                    '{"activation_offloading": true}'):
        assert length_sweep.main(base + ["--posttrain-options", options]) == 0
    entries = json.loads(out.read_text())["entries"]
    assert [e["label"] for e in entries] == ["", "sequence_tile_size=512+tiled_mlp", "activation_offloading"]
    assert "activation_offloading" in length_sweep.series_label(entries[-1])
    assert entries[0]["rows"][0]["losses"] is None and entries[0]["rows"][0]["first_step_loss"] == 1.0


# ----------------------------------------------------------------------------- the GPU sweep


def test_model_flops_worked_out_by_hand():
    # 10 parameters, 2 layers, attention width 4, sequences of 3 and 5 tokens:
    # forward = 2*10*(3+5) + 2*2*4*(9+25) = 160 + 544 = 704; forward and backward = 3 * 704
    assert length_sweep.model_flops(10, 2, 4, [3, 5]) == 2112
    assert length_sweep.model_flops(10, 2, 4, [3, 5], passes=1.0) == 704
    # DPO: a chosen and a rejected row, trained (3 passes) plus the reference forward (1)
    assert length_sweep.step_model_flops("dpo", 3, 10, 2, 4) == 4 * (2 * 10 * 6 + 2 * 2 * 4 * 18)
    assert length_sweep.step_model_flops("sft", 3, 10, 2, 4) == 3 * (2 * 10 * 3 + 2 * 2 * 4 * 9)
    prompt = length_sweep.GRPO_PROMPT_TOKENS
    assert length_sweep.step_sequence_lengths("grpo", 100) == [prompt + 100, prompt + 100]
    # 989e12 FLOPs in 2 s on a 989 TFLOPS card: half its peak
    assert length_sweep.mfu(989e12, 2.0, 989.0) == pytest.approx(0.5)


def test_mfu_is_added_to_each_timed_row():
    rows = [{"length": 3, "sec_per_step": 0.5, "model_params": 10, "model_layers": 2, "attention_width": 4},
            {"length": 5, "sec_per_step": None, "model_params": 10, "model_layers": 2, "attention_width": 4}]
    length_sweep.add_mfu("sft", rows, peak_tflops=1e-12)  # a peak of 1 FLOP/s
    assert rows[0]["model_flops_per_step"] == 3 * (2 * 10 * 3 + 2 * 2 * 4 * 9)
    assert rows[0]["mfu"] == pytest.approx(rows[0]["model_flops_per_step"] / 0.5)
    assert "mfu" not in rows[1]


def test_a_cuda_sweep_without_a_gpu_stops_with_one_line(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert length_sweep.main(["--device", "cuda", "--model", "qwen2.5-0.5b", "--bf16"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "CUDA" in captured.err and "Traceback" not in captured.err


@pytest.mark.slow  # starts a shell and Python
def test_the_gpu_script_without_a_gpu_stops_with_one_line():
    import os
    import subprocess

    script = os.path.join(length_sweep.ROOT, "benchmarks", "gpu_length_sweep.sh")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
    assert "no CUDA GPU" in done.stderr and "Traceback" not in done.stderr


def test_gpu_runs_over_their_cap_do_not_fit():
    out_of_memory = [sys.executable, "-c", "import sys; sys.exit('torch.OutOfMemoryError: CUDA out of memory.')"]
    run = length_sweep.run_capped(out_of_memory, cap_mb=1000, timeout_s=60, gpu_cap_mb=500)
    assert run["status"] == length_sweep.OUT_OF_GPU_MEMORY
    over = [sys.executable, "-c", 'print(\'RESULT {"peak_rss_mb": 10, "peak_gpu_mb": 600}\')']
    assert length_sweep.run_capped(over, cap_mb=1000, timeout_s=60, gpu_cap_mb=500)["status"] == length_sweep.OVER_CAP
    assert length_sweep.run_capped(over, cap_mb=1000, timeout_s=60, gpu_cap_mb=700)["status"] == length_sweep.OK


def test_the_half_billion_workload_has_qwen2_5_0_5b_shape():
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from benchmarks.workloads import MODEL_SHAPES, workload_by_name

    workload = workload_by_name("long05b-2048")
    assert (workload.shape, workload.max_length, workload.vocab_size) == ("qwen2.5-0.5b", 2048, 151_936)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151_936, tie_word_embeddings=True, **MODEL_SHAPES[workload.shape]))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(494e6, rel=0.01)  # Qwen2.5-0.5B: 0.49B
    cmd = length_sweep.worker_command("posttrain", "dpo", 2048, 2, {}, workload_prefix="long05b",
                                      worker_args=("--model-dtype", "bfloat16"))
    assert cmd[cmd.index("--workload") + 1] == "long05b-2048" and cmd[-2:] == ["--model-dtype", "bfloat16"]
