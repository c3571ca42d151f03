"""SFT -> reward model -> PPO on the embedded arithmetic task, offline, in one script (~2 CPU minutes).

    python examples/ppo.py

Each stage writes an ordinary model directory under runs/; the last one loads with
`transformers.pipeline("text-generation", model="runs/example-ppo")`. docs/ppo.md explains each step.
"""

from posttrain import (
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
    get_task,
)
from posttrain.eval.accuracy import evaluate_task
from posttrain.models.tiny import create_tiny_model

task = get_task("arithmetic", max_operand=20, ops=("+",))
base = create_tiny_model("runs/example-base", size="tiny")
demonstrations = task.as_prompt_completion(8000, split="train")


def supervised(output_dir: str, steps: int) -> SFTTrainer:
    trainer = SFTTrainer(
        model=base,
        args=SFTConfig(output_dir=output_dir, per_device_train_batch_size=64, max_steps=steps, learning_rate=3e-3,
                       lr_scheduler_type="cosine", warmup_steps=10, logging_steps=50, save_strategy="no"),
        train_dataset=demonstrations,
    )
    trainer.train()
    trainer.save_model()
    return trainer


# 1. the policy: briefly supervised; the reward model's starting point: supervised longer
sft = supervised("runs/example-sft", 300)
supervised("runs/example-rm-start", 1000)

# 2. a reward model on preference pairs (correct vs a plausible wrong answer)
reward = RewardTrainer(
    model="runs/example-rm-start",
    args=RewardConfig(output_dir="runs/example-rm", per_device_train_batch_size=64, max_steps=600,
                      learning_rate=1e-3, logging_steps=100, save_strategy="no"),
    train_dataset=task.as_preference(8000, split="train", seed=1),
)
reward.train()
reward.save_model()

# 3. PPO: the policy starts from the SFT model, the value model from the reward model
ppo = PPOTrainer(
    args=PPOConfig(output_dir="runs/example-ppo", per_device_train_batch_size=64, total_episodes=3200,
                   learning_rate=3e-5, num_ppo_epochs=4, num_mini_batches=2, kl_coef=0.05, response_length=6,
                   temperature=0.3, missing_eos_penalty=1.0, logging_steps=10, save_strategy="no"),
    model="runs/example-sft",
    reward_model="runs/example-rm",
    train_dataset=task.as_prompt_only(3200, split="train", seed=2),
)
ppo.train()
ppo.save_model()

# 4. held-out accuracy before and after PPO
for name, model in (("SFT", sft.model), ("PPO", ppo.policy)):
    print(name, evaluate_task(model, ppo.processing_class, task, 200, max_new_tokens=6)["accuracy"])
