"""Does PPO learn? SFT -> reward model -> PPO on the embedded arithmetic task, offline, on a CPU.

    python benchmarks/learning_ppo.py [--workdir DIR] [--size small] [--ppo-updates 60]

1. SFT a tiny random model briefly on the task (prompt-completion, conversational);
2. train a reward model on the task's preference pairs (correct vs plausible wrong answer),
   initialised from the SFT model (InstructGPT);
3. PPO from the SFT model against that reward model.

Prints the test accuracy (greedy, held-out problems) of the SFT model and of the PPO policy, the
reward model's pair accuracy, and the time of each stage. Stages already done in ``--workdir`` are
reused (delete the folder to start over), so PPO settings can be tried against a fixed SFT + RM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="learning_ppo_run")
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--max-operand", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--rm-steps", type=int, default=150)
    parser.add_argument("--rm-lr", type=float, default=5e-4)
    parser.add_argument("--rm-batch", type=int, default=32)
    parser.add_argument("--ppo-updates", type=int, default=60)
    parser.add_argument("--ppo-batch", type=int, default=32)
    parser.add_argument("--ppo-lr", type=float, default=3e-5)
    parser.add_argument("--kl-coef", type=float, default=0.02)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--mini-batches", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--sft-batch", type=int, default=32)
    parser.add_argument("--stop-after", choices=("sft", "rm"), default=None, help="stop after this stage")
    parser.add_argument("--redo", nargs="*", default=[], choices=("sft", "rm", "ppo"), help="stages to rerun")
    return parser.parse_args(argv)


def _accuracy(model_dir: str, task, problems) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.eval.accuracy import evaluate_task

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return evaluate_task(model, tokenizer, task, problems, max_new_tokens=6, batch_size=100)["accuracy"]


def _quiet(output_dir: str, **values):
    return dict(output_dir=output_dir, save_strategy="no", disable_tqdm=True, report_to="none", **values)


def run_sft(args, task, start: str, out: str) -> None:
    from posttrain import SFTConfig, SFTTrainer

    data = task.as_prompt_completion(min(args.sft_steps * args.sft_batch, 8000), split="train", seed=args.seed)
    config = SFTConfig(**_quiet(out, per_device_train_batch_size=args.sft_batch, max_steps=args.sft_steps,
                                learning_rate=args.sft_lr, lr_scheduler_type="cosine", warmup_steps=10,
                                logging_steps=25, seed=args.seed))
    trainer = SFTTrainer(model=start, args=config, train_dataset=data)
    trainer.train()
    trainer.save_model(out)


def run_reward_model(args, task, sft_dir: str, out: str) -> float:
    from posttrain import RewardConfig, RewardTrainer

    train = task.as_preference(min(args.rm_steps * args.rm_batch, 8000), split="train", seed=args.seed + 1)
    test = task.as_preference(args.eval_n, split="test", seed=args.seed)
    config = RewardConfig(**_quiet(out, per_device_train_batch_size=args.rm_batch, max_steps=args.rm_steps,
                                   learning_rate=args.rm_lr, lr_scheduler_type="cosine", warmup_steps=10,
                                   logging_steps=25, seed=args.seed, center_rewards_coefficient=0.01))
    trainer = RewardTrainer(model=sft_dir, args=config, train_dataset=train, eval_dataset=test)
    trainer.train()
    trainer.save_model(out)
    metrics = trainer.evaluate()
    return float(metrics.get("eval_accuracy", float("nan")))


def run_ppo(args, task, sft_dir: str, rm_dir: str, out: str) -> list[dict]:
    from posttrain import PPOConfig, PPOTrainer

    prompts = task.as_prompt_only(args.ppo_updates * args.ppo_batch, split="train", seed=args.seed + 2)
    config = PPOConfig(**_quiet(out, per_device_train_batch_size=args.ppo_batch,
                                total_episodes=args.ppo_updates * args.ppo_batch, learning_rate=args.ppo_lr,
                                num_ppo_epochs=args.ppo_epochs, num_mini_batches=args.mini_batches,
                                kl_coef=args.kl_coef, response_length=6, temperature=args.temperature,
                                missing_eos_penalty=1.0, logging_steps=5, seed=args.seed, num_sample_generations=0))
    trainer = PPOTrainer(args=config, model=sft_dir, reward_model=rm_dir, train_dataset=prompts)
    trainer.train()
    trainer.save_model(out)
    return [e for e in trainer.state.log_history if "objective/scores" in e]


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from posttrain.models.tiny import tiny_model_path
    from posttrain.tasks import get_task

    task = get_task("arithmetic", max_operand=args.max_operand)
    test = task.make_problems(args.eval_n, seed=args.seed, split="test")
    seen = task.make_problems(args.eval_n, seed=args.seed + 3, split="train")
    os.makedirs(args.workdir, exist_ok=True)
    sft_dir, rm_dir, ppo_dir = (os.path.join(args.workdir, name) for name in ("sft", "rm", "ppo"))
    summary_path = os.path.join(args.workdir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else {}

    def stage(name: str, directory: str, work) -> None:
        if name in args.redo or not os.path.isfile(os.path.join(directory, "config.json")):
            started = time.time()
            result = work()
            summary[f"{name}_seconds"] = round(time.time() - started, 1)
            if result is not None:
                summary[f"{name}_result"] = result
            json.dump(summary, open(summary_path, "w"), indent=1)

    start = tiny_model_path("qwen2", args.size)
    stage("sft", sft_dir, lambda: run_sft(args, task, start, sft_dir))
    if "sft_accuracy" not in summary or "sft_train_accuracy" not in summary or "sft" in args.redo:
        summary["sft_accuracy"] = _accuracy(sft_dir, task, test)
        summary["sft_train_accuracy"] = _accuracy(sft_dir, task, seen)
    print(f"SFT: test accuracy {summary['sft_accuracy']:.3f} ({summary.get('sft_seconds', '?')} s)", flush=True)
    if args.stop_after == "sft":
        return summary
    stage("rm", rm_dir, lambda: run_reward_model(args, task, sft_dir, rm_dir))
    print(f"reward model: pair accuracy on test {summary.get('rm_result', float('nan')):.3f} "
          f"({summary.get('rm_seconds', '?')} s)", flush=True)
    if args.stop_after == "rm":
        return summary
    stage("ppo", ppo_dir, lambda: run_ppo(args, task, sft_dir, rm_dir, ppo_dir))
    logs = summary.get("ppo_result") or []
    if logs:
        first, last = logs[0], logs[-1]
        print(f"PPO: reward {first['objective/scores']:.3f} -> {last['objective/scores']:.3f}, "
              f"kl {last['objective/kl']:.3f} ({summary.get('ppo_seconds', '?')} s)", flush=True)
    summary["ppo_accuracy"] = _accuracy(ppo_dir, task, test)
    summary["ppo_train_accuracy"] = _accuracy(ppo_dir, task, seen)
    json.dump(summary, open(summary_path, "w"), indent=1)
    print(f"accuracy on held-out problems: SFT {summary['sft_accuracy']:.3f} -> PPO {summary['ppo_accuracy']:.3f}; "
          f"on training problems: SFT {summary['sft_train_accuracy']:.3f} -> PPO {summary['ppo_train_accuracy']:.3f} "
          f"({len(test)} problems each, greedy)", flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
