"""Do GRPO and RLOO learn? A briefly SFT-trained model, then online RL with the `accuracy` reward.

    python benchmarks/learning_online.py --method grpo [--workdir DIR] [--steps 200] [--lr 5e-5] [--batch 128]
    python benchmarks/learning_online.py --method rloo
    python benchmarks/learning_online.py --method grpo --impl trl   # TRL's trainer on the same run (bench extra)

1. SFT the project's random ``small`` model on the embedded arithmetic task (max_operand 10) with
   ``SFTTrainer``, one shuffled pass over the training problems per epoch, and stop as soon as it
   answers ``--sft-target`` of the training problems (greedy). The model is cached in
   ``--workdir/sft``: later runs, and the other method, start from the same SFT model;
2. GRPO or RLOO from it: prompts from the train split, the built-in ``accuracy`` reward;
3. greedy exact-match accuracy on every held-out test problem (41) and every training problem (146)
   before, every ``--eval-every`` steps and after, with the time each stage took.

``--impl trl`` runs step 2 with TRL's ``GRPOTrainer``/``RLOOTrainer`` instead, from the same SFT model,
with the same settings and the same reward function, so the two reward and accuracy curves and the
two run times can be set side by side. Gradient checkpointing is off for both (TRL turns it on by default).

Everything runs offline on the CPU; the figures are printed and saved to ``--workdir/<method>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import TrainerCallback


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("grpo", "rloo"), default="grpo")
    parser.add_argument("--impl", choices=("posttrain", "trl"), default="posttrain",
                        help="whose trainer runs the RL stage (trl needs the bench extra)")
    parser.add_argument("--workdir", default="learning_online_run")
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--max-operand", type=int, default=10)
    parser.add_argument("--ops", default="+-", help="operators of the arithmetic task, e.g. '+' or '+-'")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on shared cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=300, help="SFT length (the cosine schedule's horizon)")
    parser.add_argument("--sft-target", type=float, default=0.3,
                        help="stop SFT early once greedy accuracy on training problems reaches this (0: never)")
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--sft-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=None,
                        help="RL learning rate (default: 5e-5 for GRPO; 1e-4 for RLOO, whose advantages are not "
                        "divided by the group's standard deviation and so come out smaller)")
    parser.add_argument("--batch", type=int, default=128, help="completions per step (per_device_train_batch_size)")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--schedule", default="linear", help="lr_scheduler_type of the RL stage")
    parser.add_argument("--max-completion-length", type=int, default=6)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--redo-sft", action="store_true")
    return parser.parse_args(argv)


def _quiet(output_dir: str, **values):
    return dict(output_dir=output_dir, save_strategy="no", disable_tqdm=True, report_to="none", **values)


def distinct_problems(task, split: str) -> list[dict]:
    """Every problem of a split once (41 test and 146 train problems at max_operand=10)."""
    unique: dict[str, dict] = {}
    for problem in task.make_problems(5000, split=split):
        unique.setdefault(problem["question"], problem)
    return list(unique.values())


class StopAtAccuracy(TrainerCallback):
    """Stop SFT once greedy accuracy on training problems reaches ``target`` (checked every ``every`` steps)."""

    def __init__(self, task, problems, tokenizer, target: float, every: int = 25) -> None:
        self.task, self.problems, self.tokenizer, self.target, self.every = task, problems, tokenizer, target, every
        self.reached: tuple[int, float] | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from posttrain.eval.accuracy import evaluate_task

        if self.target and state.global_step % self.every == 0:
            accuracy = evaluate_task(model, self.tokenizer, self.task, self.problems, max_new_tokens=6,
                                     batch_size=100)["accuracy"]
            print(f"  SFT step {state.global_step}: train-problem accuracy {accuracy:.3f}", flush=True)
            if accuracy >= self.target:
                self.reached = (state.global_step, accuracy)
                control.should_training_stop = True
        return control


def run_sft(args, task, start: str, out: str) -> None:
    from transformers import AutoTokenizer

    from posttrain import SFTConfig, SFTTrainer

    # every training problem once per epoch: shuffled passes over the problems learn far faster here than
    # batches drawn from a long list of repeats (measured: 46% vs 12% of training problems after 150 steps)
    data = task.as_prompt_completion(distinct_problems(task, "train"))
    config = SFTConfig(**_quiet(out, per_device_train_batch_size=args.sft_batch, max_steps=args.sft_steps,
                                learning_rate=args.sft_lr, lr_scheduler_type="cosine", warmup_steps=20,
                                adam_beta2=0.98, logging_steps=25, seed=args.seed))
    tokenizer = AutoTokenizer.from_pretrained(start)
    stop = StopAtAccuracy(task, distinct_problems(task, "train"), tokenizer, args.sft_target)
    trainer = SFTTrainer(model=start, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[stop])
    trainer.train()
    trainer.save_model(out)


class AccuracyCallback(TrainerCallback):
    """Greedy accuracy on held-out test problems (and on train problems) every ``every`` steps and at the end."""

    def __init__(self, task, test_problems, train_problems, tokenizer, every: int, curve: list) -> None:
        self.task, self.tokenizer, self.every, self.curve = task, tokenizer, every, curve
        self.problems = {"test": test_problems, "train": train_problems}
        self.started = time.time()

    def evaluate(self, model, step: int) -> None:
        from posttrain.eval.accuracy import evaluate_task

        point = {"step": step}
        for split, problems in self.problems.items():
            point[split] = evaluate_task(model, self.tokenizer, self.task, problems, max_new_tokens=6,
                                         batch_size=100)["accuracy"]
        point["seconds"] = round(time.time() - self.started, 1)
        self.curve.append(point)
        print(f"  step {step:4d}  accuracy: test {point['test']:.3f}, train prompts {point['train']:.3f}  "
              f"({point['seconds']:.0f} s)", flush=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self.evaluate(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.evaluate(model, state.global_step)


def run_online(args, task, sft_dir: str, test_problems, out: str) -> dict:
    from transformers import AutoTokenizer

    if args.impl == "trl":
        import trl as library
    else:
        import posttrain as library
    from posttrain.rewards import BUILTIN_REWARDS

    config_class, trainer_class = ((library.GRPOConfig, library.GRPOTrainer) if args.method == "grpo"
                                   else (library.RLOOConfig, library.RLOOTrainer))
    prompts = task.as_prompt_only(args.steps * args.batch // args.num_generations, split="train", seed=args.seed + 2)
    config = config_class(**_quiet(
        out, per_device_train_batch_size=args.batch, num_generations=args.num_generations, max_steps=args.steps,
        learning_rate=args.lr, max_completion_length=args.max_completion_length, temperature=args.temperature,
        beta=args.beta, logging_steps=10, seed=args.seed, warmup_steps=5, lr_scheduler_type=args.schedule,
        activation_checkpointing=False, bf16=False,  # TRL turns both on by default
    ))
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    curve: list[dict] = []
    train_problems = distinct_problems(task, "train")
    callback = AccuracyCallback(task, test_problems, train_problems, tokenizer, args.eval_every, curve)
    # the function object rather than its name, so that TRL scores completions with the same code
    trainer = trainer_class(model=sft_dir, reward_funcs=BUILTIN_REWARDS["accuracy"], args=config,
                            train_dataset=prompts, processing_class=tokenizer, callbacks=[callback])
    callback.evaluate(trainer.model, 0)
    started = time.time()
    trainer.train()
    rewards = [(r["step"], round(r["reward"], 3)) for r in trainer.state.log_history if "reward" in r]
    return {"seconds": round(time.time() - started, 1), "accuracy_curve": curve, "reward_curve": rewards}


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    if args.lr is None:
        args.lr = 5e-5 if args.method == "grpo" else 1e-4
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from posttrain.models.tiny import tiny_model_path
    from posttrain.tasks import get_task

    task = get_task("arithmetic", max_operand=args.max_operand, ops=tuple(args.ops))
    test = distinct_problems(task, "test")
    os.makedirs(args.workdir, exist_ok=True)
    sft_dir = os.path.join(args.workdir, "sft")
    if args.redo_sft or not os.path.isfile(os.path.join(sft_dir, "config.json")):
        started = time.time()
        run_sft(args, task, tiny_model_path("qwen2", args.size), sft_dir)
        print(f"SFT: {args.sft_steps} steps in {time.time() - started:.0f} s", flush=True)
    print(f"{args.method.upper()} ({args.impl}): {args.steps} steps, {args.batch} completions/step "
          f"({args.batch // args.num_generations} prompts x {args.num_generations}), lr {args.lr}", flush=True)
    name = args.method if args.impl == "posttrain" else f"{args.method}-{args.impl}"
    result = run_online(args, task, sft_dir, test, os.path.join(args.workdir, name))
    first, last = result["accuracy_curve"][0], result["accuracy_curve"][-1]
    before, after = first["test"], last["test"]
    summary = {"method": args.method, "impl": args.impl, "settings": vars(args), "before": before, "after": after,
               "train_prompts_before": first["train"], "train_prompts_after": last["train"], **result}
    json.dump(summary, open(os.path.join(args.workdir, f"{name}.json"), "w"), indent=1)
    print(f"test accuracy: {before:.3f} -> {after:.3f} ({after - before:+.3f}) after {args.steps} {args.method.upper()} "
          f"steps in {result['seconds']:.0f} s ({len(test)} held-out problems, greedy); on train prompts "
          f"{first['train']:.3f} -> {last['train']:.3f}", flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
