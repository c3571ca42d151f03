"""`posttrain demo`: the offline RLHF pipeline on an embedded task, start to finish.

It makes a tiny random model and tokenizer, then runs the stages in order, each from the
previous one's output, measuring task accuracy (greedy, held-out and training problems) after each:

    model  -> sft -> reward -> ppo        (the classic SFT -> reward model -> PPO chain)
                  -> dpo                  (preference pairs, from the SFT model)
                  -> grpo                 (verifiable-reward RL from the same SFT model)

The reward stage first supervises the base model longer than the policy (a judge must know answers
the policy still gets wrong), then trains the reward model from it on pairs that reject plausible
wrong answers and pairs that reject other problems' answers. It reports pair accuracy and how often
the reward model's favourite answer is the correct one, which bounds what PPO can get from it.

then evaluates every stage's model side by side with ``posttrain eval`` (held-out accuracy with 95%
intervals, reward-model scores and win rate against SFT, preference accuracy on held-out pairs), and
writes ``report.md`` with both tables and metric plots into the output directory.
Everything is made locally; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

STAGES = ("sft", "dpo", "reward", "ppo", "grpo")


@dataclass
class DemoSettings:
    output_dir: str = "runs/demo"
    stages: tuple[str, ...] = STAGES
    seed: int = 0
    quick: bool = False
    model_size: str = "tiny"
    max_operand: int = 20
    ops: tuple[str, ...] = ("+",)
    sft_steps: int = 300
    sft_learning_rate: float = 3e-3
    batch_size: int = 64
    judge_sft_steps: int = 1000
    reward_steps: int = 1500
    reward_learning_rate: float = 1e-3
    online_steps: int = 200
    online_learning_rate: float = 1e-4
    online_temperature: float = 0.3
    dpo_steps: int = 200
    dpo_learning_rate: float = 1e-3
    dpo_beta: float = 0.5
    dpo_rpo_alpha: float = 1.0


@dataclass
class StageResult:
    name: str
    model_dir: str
    seconds: float
    accuracy: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _parse(argv: list[str]) -> DemoSettings:
    parser = argparse.ArgumentParser(prog="posttrain demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/demo", help="Where models, metrics and report.md go.")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"Comma-separated subset of {', '.join(STAGES)}.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="A much shorter run (smoke test): accuracies stay low.")
    args = parser.parse_args(argv)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        from posttrain.errors import ConfigError

        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}", field="stages", fix=f"choose from {', '.join(STAGES)}")
    settings = DemoSettings(output_dir=args.output_dir, stages=stages, seed=args.seed, quick=args.quick)
    if args.quick:
        settings.sft_steps, settings.judge_sft_steps, settings.reward_steps, settings.online_steps = 4, 4, 4, 2
        settings.dpo_steps = 2
    return settings


def distinct_problems(task, split: str) -> list[dict]:
    """Every problem of a split once, in a fixed order."""
    unique: dict[str, dict] = {}
    for problem in task.make_problems(20 * task.problem_space_size(), split=split):
        unique.setdefault(problem["question"], problem)
    return list(unique.values())


def _evaluate(model_dir: str, task, settings: DemoSettings) -> dict[str, float]:
    """Greedy accuracy on every held-out test problem and on every training problem."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.eval.accuracy import evaluate_task

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {split: evaluate_task(model, tokenizer, task, distinct_problems(task, split), max_new_tokens=6,
                                 batch_size=128)["accuracy"] for split in ("test", "train")}


def _common(settings: DemoSettings, stage: str) -> dict[str, Any]:
    return dict(output_dir=os.path.join(settings.output_dir, stage), seed=settings.seed, save_strategy="no",
                report_to="none", disable_tqdm=True, logging_steps=10)


def _supervise(settings: DemoSettings, task, base_dir: str, stage: str, steps: int) -> str:
    from posttrain import SFTConfig, SFTTrainer

    args = SFTConfig(per_device_train_batch_size=settings.batch_size, max_steps=steps,
                     learning_rate=settings.sft_learning_rate, lr_scheduler_type="cosine", warmup_steps=10,
                     **_common(settings, stage))
    data = task.as_prompt_completion(min(steps * settings.batch_size, 8000), split="train", seed=settings.seed)
    trainer = SFTTrainer(model=base_dir, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model()
    return args.output_dir


def stage_sft(settings: DemoSettings, task, base_dir: str, results: dict[str, StageResult]) -> StageResult:
    return StageResult("sft", _supervise(settings, task, base_dir, "sft", settings.sft_steps), 0.0)


def _preference_pairs(task, size: int, seed: int):
    """Pairs rejecting a plausible wrong answer and pairs rejecting another problem's answer, mixed."""
    from datasets import concatenate_datasets

    return concatenate_datasets([
        task.as_preference(size, split="train", seed=seed + 1),
        task.as_preference(size, split="train", seed=seed + 4, rejected="other_answer"),
    ]).shuffle(seed=seed)


def stage_dpo(settings: DemoSettings, task, base_dir: str, results: dict[str, StageResult]) -> StageResult:
    from posttrain import DPOConfig, DPOTrainer

    args = DPOConfig(per_device_train_batch_size=settings.batch_size, max_steps=settings.dpo_steps,
                     learning_rate=settings.dpo_learning_rate, beta=settings.dpo_beta, rpo_alpha=settings.dpo_rpo_alpha,
                     lr_scheduler_type="cosine",
                     warmup_steps=5, **_common(settings, "dpo"))
    pairs = _preference_pairs(task, min(settings.dpo_steps * settings.batch_size, 8000), settings.seed + 10)
    trainer = DPOTrainer(model=results["sft"].model_dir, args=args, train_dataset=pairs)
    trainer.train()
    trainer.save_model()
    return StageResult("dpo", args.output_dir, 0.0)


def stage_reward(settings: DemoSettings, task, base_dir: str, results: dict[str, StageResult]) -> StageResult:
    from posttrain import RewardConfig, RewardTrainer
    from posttrain.eval.reward_model import top_answer_accuracy

    judge_dir = _supervise(settings, task, base_dir, "reward-sft", settings.judge_sft_steps)
    train = _preference_pairs(task, min(settings.reward_steps * settings.batch_size, 8000), settings.seed)
    args = RewardConfig(per_device_train_batch_size=settings.batch_size, max_steps=settings.reward_steps,
                        learning_rate=settings.reward_learning_rate, lr_scheduler_type="cosine", warmup_steps=10,
                        center_rewards_coefficient=0.01, **_common(settings, "reward"))
    test_problems = distinct_problems(task, "test")
    trainer = RewardTrainer(model=judge_dir, args=args, train_dataset=train,
                            eval_dataset=task.as_preference(test_problems, split="test", seed=settings.seed))
    trainer.train()
    trainer.save_model()
    candidates = sorted({p["answer"] for split in ("train", "test") for p in distinct_problems(task, split)})
    favourite = top_answer_accuracy(args.output_dir, test_problems, candidates, task=task)
    return StageResult("reward", args.output_dir, 0.0, accuracy=None,
                       extra={"pairwise_accuracy": trainer.evaluate().get("eval_accuracy"),
                              "favourite_answer_correct": favourite})


def stage_ppo(settings: DemoSettings, task, base_dir: str, results: dict[str, StageResult]) -> StageResult:
    from posttrain import PPOConfig, PPOTrainer

    batch = settings.batch_size
    args = PPOConfig(per_device_train_batch_size=batch, total_episodes=batch * settings.online_steps,
                     learning_rate=settings.online_learning_rate, response_length=6, num_ppo_epochs=4,
                     num_mini_batches=2, kl_coef=0.05, temperature=settings.online_temperature, missing_eos_penalty=1.0,
                     num_sample_generations=0, **_common(settings, "ppo"))
    prompts = task.as_prompt_only(batch * settings.online_steps, split="train", seed=settings.seed + 2)
    trainer = PPOTrainer(args=args, model=results["sft"].model_dir, reward_model=results["reward"].model_dir,
                         train_dataset=prompts)
    trainer.train()
    trainer.save_model()
    return StageResult("ppo", args.output_dir, 0.0)


def stage_grpo(settings: DemoSettings, task, base_dir: str, results: dict[str, StageResult]) -> StageResult:
    from posttrain import GRPOConfig, GRPOTrainer

    completions, group = 2 * settings.batch_size, 8
    args = GRPOConfig(per_device_train_batch_size=completions, num_generations=group, max_completion_length=6,
                      max_steps=settings.online_steps, learning_rate=settings.online_learning_rate,
                      temperature=settings.online_temperature, beta=0.0, warmup_steps=5, **_common(settings, "grpo"))
    prompts = task.as_prompt_only(settings.online_steps * completions // group, split="train", seed=settings.seed + 2)
    trainer = GRPOTrainer(model=results["sft"].model_dir, reward_funcs="accuracy", args=args, train_dataset=prompts)
    trainer.train()
    trainer.save_model()
    return StageResult("grpo", args.output_dir, 0.0)


STAGE_FUNCTIONS: dict[str, Callable] = {"sft": stage_sft, "dpo": stage_dpo, "reward": stage_reward, "ppo": stage_ppo,
                                        "grpo": stage_grpo}
STAGE_NEEDS = {"dpo": ("sft",), "reward": ("sft",), "ppo": ("sft", "reward"), "grpo": ("sft",)}


def run_demo(settings: DemoSettings) -> list[StageResult]:
    import torch

    from posttrain.errors import ConfigError
    from posttrain.models.tiny import create_tiny_model
    from posttrain.tasks import get_task

    for stage in settings.stages:
        missing = [need for need in STAGE_NEEDS.get(stage, ()) if need not in settings.stages]
        if missing:
            raise ConfigError(f"stage '{stage}' needs stage(s) {', '.join(missing)}", field="stages",
                              fix=f"add {', '.join(missing)} to --stages")
    torch.manual_seed(settings.seed)
    os.makedirs(settings.output_dir, exist_ok=True)
    task = get_task("arithmetic", max_operand=settings.max_operand, ops=settings.ops, seed=settings.seed)
    started = time.time()
    base_dir = create_tiny_model(os.path.join(settings.output_dir, "model"), size=settings.model_size,
                                 vocab_size=1024, seed=settings.seed)
    results: dict[str, StageResult] = {}
    base = StageResult("random init", base_dir, time.time() - started, accuracy=_evaluate(base_dir, task, settings))
    _announce(base)
    ordered = [base]
    for stage in settings.stages:
        started = time.time()
        result = STAGE_FUNCTIONS[stage](settings, task, base_dir, results)
        result.seconds = time.time() - started
        if stage != "reward":
            result.accuracy = _evaluate(result.model_dir, task, settings)
        results[stage] = result
        ordered.append(result)
        _announce(result)
    eval_table = evaluate_stages(settings, task, ordered)
    from posttrain.report.run_report import write_demo_report

    path = write_demo_report(settings.output_dir, ordered, task=repr(task), eval_table=eval_table)
    print(f"report: {path}")
    return ordered


def evaluate_stages(settings: DemoSettings, task, ordered: list[StageResult]) -> str:
    """One `posttrain eval` over every stage's model: held-out accuracy with intervals, reward-model
    scores and win rate against SFT, and preference accuracy on held-out pairs; returns the table."""
    from posttrain.cli.evaluate import _parser, run_eval
    from posttrain.report.eval_report import format_table, write_eval_outputs

    policies = [r.model_dir for r in ordered if r.name != "reward"]
    reward = [r.model_dir for r in ordered if r.name == "reward"]
    output_dir = os.path.join(settings.output_dir, "eval")
    argv = ["--model", *policies, *reward, "--task", "arithmetic", "--split", "test", "--num_problems", "all",
            "--task_args", f"max_operand={settings.max_operand}", f"ops={','.join(settings.ops)}", f"seed={settings.seed}",
            "--max_new_tokens", "6", "--batch_size", "128", "--output_dir", output_dir]
    if reward:
        os.makedirs(output_dir, exist_ok=True)
        pairs = os.path.join(output_dir, "held_out_pairs.jsonl")
        task.as_preference(distinct_problems(task, "test"), split="test", seed=settings.seed).to_json(pairs)
        argv += ["--reward_model", reward[0], "--preference_dataset", pairs]
    if any(r.name == "sft" for r in ordered):
        sft = next(r.model_dir for r in ordered if r.name == "sft")
        argv += ["--ref_model", sft]
        if reward:
            argv += ["--baseline", sft]
    args = _parser().parse_args(argv)
    started = time.time()
    results = run_eval(args)
    write_eval_outputs(output_dir, results, {**vars(args), "seconds": round(time.time() - started, 1)})
    table = format_table(results)
    print(table, flush=True)
    return table


def _announce(result: StageResult) -> None:
    accuracy = (f"accuracy: held-out {result.accuracy['test']:.1%}, train problems {result.accuracy['train']:.1%}"
                if result.accuracy is not None else "")
    extra = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.extra.items()
                      if v is not None)
    print(f"[demo] {result.name:<12} {result.seconds:6.0f}s  {accuracy} {extra}".rstrip(), flush=True)


def main(argv: list[str]) -> int:
    settings = _parse(argv)
    results = run_demo(settings)
    with open(os.path.join(settings.output_dir, "demo_results.json"), "w") as handle:
        json.dump([r.__dict__ for r in results], handle, indent=2)
    return 0
