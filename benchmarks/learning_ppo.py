"""Does PPO learn? SFT -> reward model -> PPO on the embedded arithmetic task, offline, on a CPU.

    python benchmarks/learning_ppo.py [--workdir DIR]                   # the recipe: PPO on the reward model
    python benchmarks/learning_ppo.py --workdir DIR --reward checker    # diagnostic: PPO on exact rewards

1. ``sft``: a tiny random model, briefly supervised on the task (the policy, ~50% correct);
2. ``rm-sft``: the same model supervised longer (it must judge answers the policy still gets wrong);
3. ``rm``: a reward model initialised from ``rm-sft`` (InstructGPT), trained on the task's
   preference pairs (correct vs plausible wrong answer) plus, by default, pairs whose rejected
   answer is another problem's answer (``Task.as_preference(rejected="other_answer")``);
4. ``ppo``: PPO from ``sft`` against ``rm`` (value model initialised from ``rm``).

Prints greedy accuracy before and after PPO on held-out problems and on training problems, the
reward model's pair accuracy, and the time of each stage (one CPU thread). Stages already done in
``--workdir`` are reused (``--redo STAGE`` reruns one), so PPO settings can be tried against a
fixed SFT model and reward model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="learning_ppo_run")
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--max-operand", type=int, default=20)
    parser.add_argument("--ops", default="+", help="operators of the arithmetic task")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=300, help="SFT steps of the policy (brief)")
    parser.add_argument("--rm-sft-steps", type=int, default=1000,
                        help="SFT steps of the model the reward model starts from (longer: it must judge answers "
                        "the policy still gets wrong)")
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument("--rm-steps", type=int, default=1500,
                        help="reward-model steps; with 600 the reward model's favourite answer is right on only 64%% of "
                        "training problems (barely above the policy), so PPO has nothing to climb")
    parser.add_argument("--rm-lr", type=float, default=1e-3)
    parser.add_argument("--rm-batch", type=int, default=64)
    parser.add_argument("--rm-center", type=float, default=0.01,
                        help="center_rewards_coefficient: larger values pull each pair's mean reward to 0, which "
                        "removes the per-prompt offsets a pairwise loss leaves free (PPO's critic must otherwise learn them)")
    parser.add_argument("--rm-data", default="balanced", choices=("task", "balanced", "samples"),
                        help="preference pairs: the task's (correct vs plausible wrong answer); 'balanced': those plus "
                        "as many whose rejected answer is another problem's correct one, so that no answer is "
                        "preferred for itself; 'samples': comparisons of the policy's (the SFT model's) own samples "
                        "labelled by the task's checker, as InstructGPT's labellers compared SFT outputs")
    parser.add_argument("--ppo-updates", type=int, default=200)
    parser.add_argument("--ppo-batch", type=int, default=64)
    parser.add_argument("--ppo-lr", type=float, default=1e-4)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--mini-batches", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.3,
                        help="sampling temperature of PPO; low values keep rollouts near the greedy answer that is evaluated")
    parser.add_argument("--vf-coef", type=float, default=0.1)
    parser.add_argument("--reward", default="model", choices=("model", "checker"),
                        help="PPO's scores: the reward model (the recipe), or the task's checker (a diagnostic "
                        "that shows what PPO learns from exact rewards; the reward model still starts the critic)")
    parser.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--sft-batch", type=int, default=64)
    parser.add_argument("--stop-after", choices=("sft", "rm"), default=None, help="stop after this stage")
    parser.add_argument("--redo", nargs="*", default=[], choices=("sft", "rm-sft", "rm", "ppo", "ppo-checker"), help="stages to rerun")
    return parser.parse_args(argv)


def _accuracy(model_dir: str, task, problems) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.eval.accuracy import evaluate_task

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return evaluate_task(model, tokenizer, task, problems, max_new_tokens=6, batch_size=100)["accuracy"]


def _quiet(output_dir: str, **values):
    return dict(output_dir=output_dir, save_strategy="no", disable_tqdm=True, report_to="none", **values)


def run_sft(args, task, start: str, out: str, steps: int) -> None:
    from posttrain import SFTConfig, SFTTrainer

    data = task.as_prompt_completion(min(steps * args.sft_batch, 8000), split="train", seed=args.seed)
    config = SFTConfig(**_quiet(out, per_device_train_batch_size=args.sft_batch, max_steps=steps,
                                learning_rate=args.sft_lr, lr_scheduler_type="cosine", warmup_steps=10,
                                logging_steps=25, seed=args.seed))
    trainer = SFTTrainer(model=start, args=config, train_dataset=data)
    trainer.train()
    trainer.save_model(out)


def sampled_preferences(task, sft_dir: str, problems, samples_per_prompt: int = 8, seed: int = 0):
    """Preference pairs from the SFT model's own samples, ranked by the task's checker.

    For each prompt, every (correct, incorrect) pair of its samples becomes a row (at most 4 per
    prompt), as in InstructGPT, where labellers rank the SFT model's outputs.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.rollout import HFRolloutEngine, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    model = AutoModelForCausalLM.from_pretrained(sft_dir)
    engine = HFRolloutEngine(model, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for start in range(0, len(problems), 64):
        chunk = problems[start:start + 64]
        prompts = [[{"role": "user", "content": p["question"]}] for p in chunk]
        ids = [tokenizer(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)["input_ids"] for m in prompts]
        batch = engine.generate(ids, num_generations=samples_per_prompt, generator=generator,
                                sampling=SamplingParams(max_completion_length=6, temperature=1.0))
        texts = batch.decode_completions(tokenizer)
        for g, (prompt, problem) in enumerate(zip(prompts, chunk)):
            group = [t for t in texts[g * samples_per_prompt:(g + 1) * samples_per_prompt] if t.strip()]
            good = [t for t in dict.fromkeys(group) if task.check(t, problem["answer"])]
            bad = [t for t in dict.fromkeys(group) if not task.check(t, problem["answer"])]
            for i, (chosen, rejected) in enumerate((c, r) for c in good for r in bad):
                if i == 4:
                    break
                rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                             "rejected": [{"role": "assistant", "content": rejected}]})
    return Dataset.from_list(rows)


def run_reward_model(args, task, rm_start: str, out: str, policy_dir: str) -> float:
    from datasets import concatenate_datasets

    from posttrain import RewardConfig, RewardTrainer

    size = min(args.rm_steps * args.rm_batch, 8000)
    parts = []
    if args.rm_data.startswith(("task", "balanced")):
        parts.append(task.as_preference(size, split="train", seed=args.seed + 1))
    if args.rm_data.startswith("balanced"):
        parts.append(task.as_preference(size, split="train", seed=args.seed + 4, rejected="other_answer"))
    if args.rm_data.endswith("samples"):
        problems = task.make_problems(size // 2, split="train", seed=args.seed + 1)
        parts.append(sampled_preferences(task, policy_dir, problems, seed=args.seed))
    train = concatenate_datasets(parts).shuffle(seed=args.seed)
    test = task.as_preference(args.eval_n, split="test", seed=args.seed)
    config = RewardConfig(**_quiet(out, per_device_train_batch_size=args.rm_batch, max_steps=args.rm_steps,
                                   learning_rate=args.rm_lr, lr_scheduler_type="cosine", warmup_steps=10,
                                   logging_steps=25, seed=args.seed, center_rewards_coefficient=args.rm_center))
    trainer = RewardTrainer(model=rm_start, args=config, train_dataset=train, eval_dataset=test)
    trainer.train()
    trainer.save_model(out)
    metrics = trainer.evaluate()
    return float(metrics.get("eval_accuracy", float("nan")))


def checker_trainer_class(task):
    """A PPOTrainer whose scores come from the task's checker (+1 correct, -1 not) instead of the reward model.

    A diagnostic: it separates what PPO can learn from what the learned reward model can teach.
    """
    from posttrain import PPOTrainer

    class CheckerScoredPPOTrainer(PPOTrainer):
        def reward_scores(self, sequences):
            scores = []
            width = sequences.prompt_width
            for ids, mask in zip(sequences.input_ids, sequences.attention_mask):
                prompt = self._tokenizer.decode(ids[:width][mask[:width].bool()].tolist())
                completion = self._tokenizer.decode(ids[width:][mask[width:].bool()].tolist(), skip_special_tokens=True)
                a, b = (int(x) for x in re.findall(r"What is (\d+) \+ (\d+)\?", prompt)[-1])
                scores.append(1.0 if task.check(completion, a + b) else -1.0)
            return torch.tensor(scores, device=sequences.input_ids.device)

    return CheckerScoredPPOTrainer


def run_ppo(args, task, sft_dir: str, rm_dir: str, out: str) -> list[dict]:
    from posttrain import PPOConfig, PPOTrainer

    prompts = task.as_prompt_only(args.ppo_updates * args.ppo_batch, split="train", seed=args.seed + 2)
    config = PPOConfig(**_quiet(out, per_device_train_batch_size=args.ppo_batch,
                                total_episodes=args.ppo_updates * args.ppo_batch, learning_rate=args.ppo_lr,
                                num_ppo_epochs=args.ppo_epochs, num_mini_batches=args.mini_batches,
                                kl_coef=args.kl_coef, response_length=6, temperature=args.temperature, vf_coef=args.vf_coef, lam=args.lam,
                                missing_eos_penalty=1.0, logging_steps=5, seed=args.seed, num_sample_generations=0))
    trainer_class = checker_trainer_class(task) if args.reward == "checker" else PPOTrainer
    trainer = trainer_class(args=config, model=sft_dir, reward_model=rm_dir, train_dataset=prompts)
    trainer.train()
    trainer.save_model(out)
    return [e for e in trainer.state.log_history if "objective/scores" in e]


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from posttrain.models.tiny import tiny_model_path
    from posttrain.tasks import get_task

    task = get_task("arithmetic", max_operand=args.max_operand, ops=tuple(args.ops))
    test = task.make_problems(args.eval_n, seed=args.seed, split="test")
    seen = task.make_problems(args.eval_n, seed=args.seed + 3, split="train")
    os.makedirs(args.workdir, exist_ok=True)
    ppo_name = "ppo" if args.reward == "model" else "ppo-checker"
    sft_dir, rm_sft_dir, rm_dir, ppo_dir = (os.path.join(args.workdir, name) for name in ("sft", "rm-sft", "rm", ppo_name))
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
    stage("sft", sft_dir, lambda: run_sft(args, task, start, sft_dir, args.sft_steps))
    if "sft_accuracy" not in summary or "sft_train_accuracy" not in summary or "sft" in args.redo:
        summary["sft_accuracy"] = _accuracy(sft_dir, task, test)
        summary["sft_train_accuracy"] = _accuracy(sft_dir, task, seen)
    print(f"SFT: test accuracy {summary['sft_accuracy']:.3f} ({summary.get('sft_seconds', '?')} s)", flush=True)
    if args.stop_after == "sft":
        return summary
    stage("rm-sft", rm_sft_dir, lambda: run_sft(args, task, start, rm_sft_dir, args.rm_sft_steps))
    stage("rm", rm_dir, lambda: run_reward_model(args, task, rm_sft_dir, rm_dir, sft_dir))
    print(f"reward model: pair accuracy on test {summary.get('rm_result', float('nan')):.3f} "
          f"({summary.get('rm_seconds', '?')} s)", flush=True)
    from posttrain.eval.reward_model import top_answer_accuracy

    if "rm_top_answer_accuracy" not in summary or "rm" in args.redo:
        candidates = sorted({p["answer"] for p in test + seen})
        summary["rm_top_answer_accuracy"] = top_answer_accuracy(rm_dir, test, candidates, task=task)
        summary["rm_top_answer_train_accuracy"] = top_answer_accuracy(rm_dir, seen, candidates, task=task)
        json.dump(summary, open(summary_path, "w"), indent=1)
    print(f"reward model's favourite answer is right on {summary['rm_top_answer_accuracy']:.3f} of held-out and "
          f"{summary['rm_top_answer_train_accuracy']:.3f} of training problems", flush=True)
    if args.stop_after == "rm":
        return summary
    stage(ppo_name, ppo_dir, lambda: run_ppo(args, task, sft_dir, rm_dir, ppo_dir))
    logs = summary.get(f"{ppo_name}_result") or []
    if logs:
        first, last = logs[0], logs[-1]
        print(f"{ppo_name}: score {first['objective/scores']:.3f} -> {last['objective/scores']:.3f}, "
              f"kl {last['objective/kl']:.3f} ({summary.get(f'{ppo_name}_seconds', '?')} s)", flush=True)
    summary[f"{ppo_name}_accuracy"] = _accuracy(ppo_dir, task, test)
    summary[f"{ppo_name}_train_accuracy"] = _accuracy(ppo_dir, task, seen)
    json.dump(summary, open(summary_path, "w"), indent=1)
    print(f"accuracy on held-out problems: SFT {summary['sft_accuracy']:.3f} -> {ppo_name} "
          f"{summary[f'{ppo_name}_accuracy']:.3f}; on training problems: SFT {summary['sft_train_accuracy']:.3f} -> "
          f"{ppo_name} {summary[f'{ppo_name}_train_accuracy']:.3f} ({len(test)} problems each, greedy)", flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
