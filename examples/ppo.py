"""SFT -> reward model -> PPO on the embedded arithmetic task, offline, in one script.

    python examples/ppo.py

Each stage writes an ordinary model directory under runs/; the last one loads with
`transformers.pipeline("text-generation", model="runs/example-ppo")`.
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

task = get_task("arithmetic", max_operand=10)
base = create_tiny_model("runs/example-base", size="small")

# 1. supervised fine-tuning on demonstrations
sft = SFTTrainer(
    model=base,
    args=SFTConfig(output_dir="runs/example-sft", per_device_train_batch_size=32, max_steps=300,
                   learning_rate=2e-3, lr_scheduler_type="cosine", logging_steps=50, save_strategy="no"),
    train_dataset=task.as_prompt_completion(4000, split="train"),
)
sft.train()
sft.save_model()

# 2. a reward model, initialised from the SFT model, on preference pairs (correct vs wrong answer)
reward = RewardTrainer(
    model="runs/example-sft",
    args=RewardConfig(output_dir="runs/example-rm", per_device_train_batch_size=32, max_steps=150,
                      learning_rate=5e-4, center_rewards_coefficient=0.01, logging_steps=50, save_strategy="no"),
    train_dataset=task.as_preference(4000, split="train", seed=1),
)
reward.train()
reward.save_model()

# 3. PPO: the policy starts from the SFT model, the value model from the reward model
ppo = PPOTrainer(
    args=PPOConfig(output_dir="runs/example-ppo", per_device_train_batch_size=32, total_episodes=1920,
                   learning_rate=3e-5, num_ppo_epochs=4, num_mini_batches=2, kl_coef=0.02,
                   response_length=6, missing_eos_penalty=1.0, logging_steps=10, save_strategy="no"),
    model="runs/example-sft",
    reward_model="runs/example-rm",
    train_dataset=task.as_prompt_only(2000, split="train", seed=2),
)
ppo.train()
ppo.save_model()

# 4. held-out accuracy before and after PPO
for name, model in (("SFT", sft.model), ("PPO", ppo.policy)):
    print(name, evaluate_task(model, ppo.processing_class, task, 200)["accuracy"])
