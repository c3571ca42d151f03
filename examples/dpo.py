"""DPO on a tiny offline model and the embedded arithmetic task, TRL-style.

    python examples/dpo.py

Each pair holds the right answer (chosen) and a plausible wrong one (rejected). The run prints
the held-out preference accuracy (how often the implicit reward ranks the right answer first)
before and after training: 0 before, since the policy equals the reference and every reward is 0.
"""

from posttrain import DPOConfig, DPOTrainer, get_task
from posttrain.models.tiny import create_tiny_model

model_dir = create_tiny_model("runs/example-dpo-model", size="tiny")
task = get_task("arithmetic")
train = task.as_preference(256, split="train")
held_out = task.as_preference(64, split="test")

trainer = DPOTrainer(
    model=model_dir,                    # the reference is a frozen copy of this model
    args=DPOConfig(output_dir="runs/example-dpo", beta=0.1, per_device_train_batch_size=16, num_train_epochs=2,
                   learning_rate=1e-3, logging_steps=8, save_strategy="no", max_length=64),
    train_dataset=train,
    eval_dataset=held_out,
)
before = trainer.evaluate()["eval_rewards/accuracies"]
trainer.train()
after = trainer.evaluate()["eval_rewards/accuracies"]
trainer.save_model()
print(f"held-out preference accuracy: {before:.2f} -> {after:.2f}")
# other losses: DPOConfig(loss_type=["sigmoid", "ipo"], loss_weights=[0.7, 0.3]), DPOConfig(rpo_alpha=1.0), ...
