"""Fine-tune a tiny offline model on the embedded arithmetic task, TRL-style.

    python examples/sft.py
"""

from posttrain import SFTConfig, SFTTrainer, get_task
from posttrain.eval.accuracy import evaluate_task
from posttrain.models.tiny import create_tiny_model

model_dir = create_tiny_model("runs/example-model", size="small")
task = get_task("arithmetic")
train = task.as_messages(4000, split="train")

trainer = SFTTrainer(
    model=model_dir,
    args=SFTConfig(output_dir="runs/example-sft", per_device_train_batch_size=32, num_train_epochs=1,
                   learning_rate=2e-3, logging_steps=25, save_strategy="no"),
    train_dataset=train,
)
trainer.train()
trainer.save_model()
print(evaluate_task(trainer.model, trainer.processing_class, task, 200)["accuracy"])
