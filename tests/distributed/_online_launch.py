"""Runs the online trainers (GRPO, RLOO, online DPO, PPO) for a layout-invariance test and records what they did.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/_online_launch.py OUT_DIR RUN [RUN ...]
    python tests/distributed/_online_launch.py OUT_DIR RUN          (one process)

Each run trains a tiny model for two steps at a fixed global batch, split evenly over the processes.
Every process writes ``OUT_DIR/<run>.rank<r>.pt`` with what it sampled (keyed by step, prompt text and
completion index: completion text, reward, advantage); process 0 adds the final weights. A run that
raises writes the error instead, so the other runs still report.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

PROMPTS = [f"What is {i} + {(3 * i) % 7}?" for i in range(8)]  # the same token count each
TRAINERS = ("grpo", "grpo_gdpo", "rloo", "online_dpo", "ppo")


def length_reward(prompts, completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


def digit_reward(prompts, completions, **kwargs):
    return [float(sum(ch.isdigit() or ch == " " for ch in c)) for c in completions]


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_trainer(run: str, out_dir: str):
    """The trainer of ``run`` for this process, its global batch split over ``WORLD_SIZE`` processes."""
    from datasets import Dataset

    from posttrain.models.tiny import tiny_model_path

    _, world = _world()
    model = tiny_model_path()
    dataset = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    # plain SGD: a weight then differs between runs exactly as its gradient does, whereas Adam's first steps divide
    # by |gradient| and blow the all-reduce's rounding up wherever a gradient is near zero (by how much depends on
    # the CPU's kernels)
    common = dict(output_dir=os.path.join(out_dir, run), use_cpu=True, max_steps=2, optim="sgd", learning_rate=0.1,
                  seed=11, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none")
    if run.startswith("grpo"):
        from posttrain import GRPOConfig, GRPOTrainer

        # 4 prompts x 2 completions a step over all processes
        extra = dict(scale_rewards="batch") if run == "grpo" else dict(multi_objective_aggregation="normalize_then_sum")
        args = GRPOConfig(per_device_train_batch_size=8 // world, num_generations=2, max_completion_length=6,
                          **extra, **common)
        return GRPOTrainer(model, reward_funcs=[length_reward, digit_reward], args=args, train_dataset=dataset)
    if run == "rloo":
        from posttrain import RLOOConfig, RLOOTrainer

        args = RLOOConfig(per_device_train_batch_size=8 // world, num_generations=2, max_completion_length=6,
                          normalize_advantages=True, **common)
        return RLOOTrainer(model, reward_funcs=[length_reward, digit_reward], args=args, train_dataset=dataset)
    if run == "online_dpo":
        from posttrain import OnlineDPOConfig, OnlineDPOTrainer

        args = OnlineDPOConfig(per_device_train_batch_size=4 // world, max_completion_length=6, **common)
        return OnlineDPOTrainer(model, reward_funcs=[length_reward], args=args, train_dataset=dataset)
    if run == "ppo":
        from posttrain import PPOConfig, PPOTrainer

        common.pop("max_steps")
        args = PPOConfig(per_device_train_batch_size=4 // world, total_episodes=8, response_length=6, num_ppo_epochs=2,
                         num_mini_batches=1, num_sample_generations=0, **common)
        return PPOTrainer(args=args, model=model, reward_model=tiny_model_path(reward=True), train_dataset=dataset)
    raise ValueError(f"unknown run {run!r}; use one of {TRAINERS}")


def record_rollouts(trainer, run: str) -> list[dict]:
    """Wrap the trainer's sampling step so that each generation is appended to the returned list."""
    records: list[dict] = []
    tokenizer = trainer._tokenizer

    def add(step, prompts, texts, rewards, advantages):
        counts: dict[str, int] = {}
        for prompt, text, reward, advantage in zip(prompts, texts, rewards, advantages):
            member = counts[str(prompt)] = counts.get(str(prompt), -1) + 1
            records.append({"step": step, "prompt": str(prompt), "member": member, "completion": text,
                            "reward": float(reward), "advantage": float(advantage)})

    if run in ("grpo", "grpo_gdpo", "rloo"):
        original = trainer._generate_and_score

        def generate_and_score(batch, mode, **kwargs):
            scored = original(batch, mode, **kwargs)
            texts = [c[0]["content"] if isinstance(c, list) else c for c in scored.completions]
            add(trainer.state.global_step, scored.prompts, texts, scored.rewards.tolist(),
                scored.rows.advantages.tolist())
            return scored

        trainer._generate_and_score = generate_and_score
    elif run == "online_dpo":
        original = trainer._rank

        def rank(inputs, generated):
            first_wins, scores = original(inputs, generated)
            texts = generated.decode_completions(tokenizer)
            prompts = [p for p in inputs["prompt"] for _ in range(2)]
            add(trainer.state.global_step, prompts, texts, scores.tolist(), [0.0] * len(texts))
            return first_wins, scores

        trainer._rank = rank
    else:
        original = trainer._rollout

        def rollout(batch):
            result = original(batch)
            texts = tokenizer.batch_decode([ids[m.bool()].tolist() for ids, m in zip(result.completion_ids,
                                            result.completion_mask)])
            advantages = (result.advantages * result.loss_mask).sum(-1).tolist()
            add(trainer.state.global_step, batch["prompt"], texts, result.scores.tolist(), advantages)
            return result

        trainer._rollout = rollout
    return records


def final_weights(trainer, run: str) -> dict[str, torch.Tensor]:
    if run == "ppo":
        networks = {"policy": trainer.policy, "value": trainer.value_model}
    else:
        networks = {"policy": trainer.accelerator.unwrap_model(trainer.model)}
    return {f"{kind}.{name}": param.detach().cpu().clone() for kind, network in networks.items()
            for name, param in network.named_parameters()}


def run_one(run: str, out_dir: str) -> dict:
    torch.set_num_threads(1)
    rank, world = _world()
    try:
        trainer = build_trainer(run, out_dir)
        records = record_rollouts(trainer, run)
        initial = final_weights(trainer, run) if rank == 0 else None
        trainer.train()
        result = {"records": records, "world_size": world}
        if rank == 0:
            result["initial_weights"], result["weights"] = initial, final_weights(trainer, run)
    except Exception:  # noqa: BLE001 - reported to the test, which fails with this text
        result = {"error": traceback.format_exc(), "world_size": world}
    torch.save(result, os.path.join(out_dir, f"{run}.rank{rank}.pt"))
    return result


def main(argv: list[str]) -> None:
    out_dir, runs = argv[0], argv[1:]
    os.makedirs(out_dir, exist_ok=True)
    for run in runs:
        run_one(run, out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
