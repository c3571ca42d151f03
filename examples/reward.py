"""Train a reward model on the arithmetic preference pairs, then score answers with the pipeline.

    python examples/reward.py

This shows the API on a randomly initialised tiny model, which has to learn arithmetic itself to
rank held-out answers; starting from a fine-tuned model (see examples/sft.py) gives a useful one.
"""

from transformers import pipeline

from posttrain import RewardConfig, RewardTrainer, get_task
from posttrain.models.tiny import create_tiny_model

model_dir = create_tiny_model("runs/example-reward-base", size="tiny")   # a causal LM: a score head is added
task = get_task("arithmetic")

trainer = RewardTrainer(
    model=model_dir,
    args=RewardConfig(output_dir="runs/example-reward", per_device_train_batch_size=16, num_train_epochs=2,
                      learning_rate=1e-3, logging_steps=8, save_strategy="no", center_rewards_coefficient=0.01),
    train_dataset=task.as_preference(256, split="train", conversational=False),
    eval_dataset=task.as_preference(64, split="test", conversational=False),
)
trainer.train()
print("held-out accuracy:", trainer.evaluate()["eval_accuracy"])
trainer.save_model()

scorer = pipeline("text-classification", model="runs/example-reward")
for answer in ("5", "7"):
    text = f"Question: What is 2 + 3?\nAnswer: {answer}"
    print(text.replace("\n", " "), "->", scorer(text, function_to_apply="none")[0]["score"])
