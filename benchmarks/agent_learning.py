"""Does GRPO with tools learn? SFT on oracle tool-use logs, then GRPO with the tools, posttrain and TRL side by side.

    python benchmarks/agent_learning.py [--workdir DIR] [--impls posttrain,trl] [--steps 400] [--kinds add]
    PYTHONPATH=/tmp/trl-bench:$PWD python benchmarks/agent_learning.py --impls trl   # TRL 1.16 (bench extra)

1. SFT the project's random ``tiny`` model (the demo's size) on the embedded tool-use task (``posttrain.tasks.tool_use``;
   by default ``--kinds add``: "What is 66 + 16?" with the one tool ``add``, two-digit operands) with
   ``SFTTrainer``: one text prompt/completion row per assistant turn of each oracle conversation, so the loss
   covers the calls and answers, never the tool results. Half the conversations (``--sft-schema-free-share``)
   are rendered without the tool schema: behind the ~250 schema tokens alone the tiny model does not learn to
   copy the operands within the budget. The SFT is short on purpose (700 steps), so the start leaves room.
   Cached in ``--workdir/sft``; every implementation starts from the same model.
2. Held-out accuracy of the SFT model (greedy, ``--eval-n`` test problems) with the tools executed
   (``posttrain.eval.tool_use.evaluate_with_tools``) and without tools (the same questions, no tools in
   the prompt: the model must answer from its weights).
3. For each of ``--impls``: ``GRPOTrainer(tools=<the tools the kinds call>)`` from the SFT model with the
   ``tool_answer_reward`` reward, then held-out accuracy with tools and seconds per step.

posttrain's side needs ``posttrain.GRPOTrainer(tools=...)``; where the installed posttrain does not accept
``tools`` yet, that side is skipped with a message. TRL needs a response parser on the tokenizer to read
tool calls; the tiny tokenizer's Hermes-style template is not among the templates TRL recognises, so the
benchmark sets ``tokenizer.response_template`` to the parser TRL uses for Qwen3's identical call format.

Everything runs offline on the CPU; the table is printed and the figures saved to ``--workdir/agent_learning.json``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

import torch


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", default="posttrain,trl", help="comma-separated: posttrain, trl")
    parser.add_argument("--workdir", default="agent_learning_run")
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"), help="tiny: the demo's size")
    parser.add_argument("--kinds", default="add",
                        help="comma-separated question kinds (posttrain.tasks.tool_use.KINDS); the prompt offers only "
                             "the tools they call")
    parser.add_argument("--min-operand", type=int, default=10)
    parser.add_argument("--max-operand", type=int, default=99)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is fastest on shared cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-problems", type=int, default=3000, help="oracle conversations in the SFT data")
    parser.add_argument("--sft-schema-free-share", type=float, default=0.5,
                        help="share of the SFT conversations rendered without the tool schemas in the prompt")
    parser.add_argument("--sft-steps", type=int, default=700)
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument("--sft-batch", type=int, default=16)
    parser.add_argument("--eval-n", type=int, default=100, help="held-out test problems evaluated")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=32, help="completions per step (per_device_train_batch_size)")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-completion-length", type=int, default=160,
                        help="tokens per episode, calls, tool results and answer together (TRL counts them so)")
    parser.add_argument("--max-tool-calling-iterations", type=int, default=4)
    parser.add_argument("--redo-sft", action="store_true")
    return parser.parse_args(argv)


def _quiet(output_dir: str, **values):
    return dict(output_dir=output_dir, save_strategy="no", disable_tqdm=True, report_to="none", **values)


def run_sft(args, task, start: str, out: str) -> float:
    from transformers import AutoTokenizer

    from posttrain import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(start)
    from datasets import concatenate_datasets

    # a share of the conversations is rendered without the tool schemas: on short prompts the tiny model learns
    # to copy the operands into the call, which it does not learn within the budget behind ~250 schema tokens
    short = round(args.sft_problems * args.sft_schema_free_share)
    parts = [task.as_turn_completions(args.sft_problems - short, tokenizer, split="train", seed=args.seed)]
    if short:
        parts.append(task.as_turn_completions(short, tokenizer, split="train", seed=args.seed + 1, tool_names=()))
    data = concatenate_datasets(parts).shuffle(seed=args.seed)
    config = SFTConfig(**_quiet(out, per_device_train_batch_size=args.sft_batch, max_steps=args.sft_steps,
                                learning_rate=args.sft_lr, lr_scheduler_type="cosine", warmup_steps=20,
                                adam_beta2=0.98, logging_steps=25, seed=args.seed, max_length=1024))
    trainer = SFTTrainer(model=start, args=config, train_dataset=data, processing_class=tokenizer)
    started = time.time()
    trainer.train()
    trainer.save_model(out)
    return time.time() - started


def held_out(model_dir_or_model, tokenizer, task, problems, use_tools: bool = True) -> dict:
    from transformers import AutoModelForCausalLM

    from posttrain.eval.tool_use import evaluate_with_tools

    model = (AutoModelForCausalLM.from_pretrained(model_dir_or_model) if isinstance(model_dir_or_model, str)
             else model_dir_or_model)
    result = evaluate_with_tools(model, tokenizer, task, problems, use_tools=use_tools, max_new_tokens=64,
                                 batch_size=50, n_samples=2)
    return {key: result[key] for key in ("accuracy", "call_accuracy", "turns", "samples")}


def _grpo_config(config_class, args, out: str):
    return config_class(**_quiet(
        out, per_device_train_batch_size=args.batch, num_generations=args.num_generations, max_steps=args.steps,
        learning_rate=args.lr, max_completion_length=args.max_completion_length, temperature=args.temperature,
        beta=0.0, logging_steps=5, seed=args.seed, warmup_steps=3, lr_scheduler_type="constant_with_warmup",
        max_tool_calling_iterations=args.max_tool_calling_iterations,
        activation_checkpointing=False, bf16=False,  # TRL turns both on by default
    ))


def _trl_tokenizer(tokenizer):
    """TRL parses tool calls with ``tokenizer.response_template`` and sets one only for chat templates it
    knows; the tiny template writes calls exactly as Qwen3 does (``\\n<tool_call>\\n{json}\\n</tool_call>``
    before ``<|im_end|>``), so TRL's Qwen3 parser reads them."""
    from trl.chat_template_utils import qwen3_template

    tokenizer.response_template = qwen3_template
    return tokenizer


def accepts_tools(trainer_class) -> bool:
    """Whether ``trainer_class(..., tools=...)`` is accepted: posttrain's ``GRPOTrainer.__init__`` takes
    ``(*args, **kwargs)`` and names its arguments on a base class, so every ``__init__`` in the MRO counts."""
    return any("tools" in inspect.signature(cls.__init__).parameters
               for cls in trainer_class.__mro__ if "__init__" in vars(cls))


def run_grpo(impl: str, args, task, sft_dir: str, test_problems, out: str) -> dict:
    from transformers import AutoTokenizer

    from posttrain.tasks.tool_use import make_tools, tool_answer_reward

    if impl == "trl":
        import trl as library
    else:
        import posttrain as library
        if not accepts_tools(library.GRPOTrainer):
            return {"skipped": "posttrain.GRPOTrainer does not accept tools= yet (it lands with the multi-turn "
                               "rollout branch); nothing was run"}
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    if impl == "trl":
        tokenizer = _trl_tokenizer(tokenizer)
    prompts = task.as_prompt_only(args.steps * args.batch // args.num_generations, split="train",
                                  seed=args.seed + 2)
    config = _grpo_config(library.GRPOConfig, args, out)
    trainer = library.GRPOTrainer(model=sft_dir, reward_funcs=tool_answer_reward, args=config, train_dataset=prompts,
                                  processing_class=tokenizer, tools=make_tools(names=task.tool_names()))
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    rewards = [(r["step"], round(r["reward"], 3)) for r in trainer.state.log_history if "reward" in r]
    tools_metrics = [(r["step"], {k: round(v, 3) for k, v in r.items() if k.startswith("tools/")})
                     for r in trainer.state.log_history if any(k.startswith("tools/") for k in r)]
    eval_tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    return {"seconds": round(seconds, 1), "seconds_per_step": round(seconds / args.steps, 2),
            "after": held_out(trainer.model, eval_tokenizer, task, test_problems), "reward_curve": rewards,
            "tools_metrics": tools_metrics}


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    from posttrain.models.tiny import tiny_model_path
    from posttrain.tasks.tool_use import ToolUseTask

    impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    unknown = [name for name in impls if name not in ("posttrain", "trl")]
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; use posttrain and/or trl")
    task = ToolUseTask(max_operand=args.max_operand, kinds=args.kinds.split(","), seed=args.seed,
                       min_operand=args.min_operand)
    test = task.make_problems(args.eval_n, split="test", seed=args.seed + 7)
    os.makedirs(args.workdir, exist_ok=True)
    sft_dir = os.path.join(args.workdir, "sft")
    summary: dict = {"settings": vars(args), "task": repr(task)}
    if args.redo_sft or not os.path.isfile(os.path.join(sft_dir, "config.json")):
        summary["sft_seconds"] = round(run_sft(args, task, tiny_model_path("qwen2", args.size), sft_dir), 1)
        print(f"SFT: {args.sft_steps} steps in {summary['sft_seconds']:.0f} s", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    summary["sft_with_tools"] = held_out(sft_dir, tokenizer, task, test, use_tools=True)
    summary["sft_without_tools"] = held_out(sft_dir, tokenizer, task, test, use_tools=False)
    print(f"SFT start, {len(test)} held-out problems: with tools {summary['sft_with_tools']['accuracy']:.3f} "
          f"(calls matching the oracle {summary['sft_with_tools']['call_accuracy']:.3f}), without tools "
          f"{summary['sft_without_tools']['accuracy']:.3f}", flush=True)
    for impl in impls:
        print(f"GRPO ({impl}) with tools: {args.steps} steps, {args.batch} completions/step", flush=True)
        summary[impl] = run_grpo(impl, args, task, sft_dir, test, os.path.join(args.workdir, f"grpo-{impl}"))
        if "skipped" in summary[impl]:
            print(f"  {impl}: skipped: {summary[impl]['skipped']}", flush=True)
    json.dump(summary, open(os.path.join(args.workdir, "agent_learning.json"), "w"), indent=1, default=str)
    start = summary["sft_with_tools"]["accuracy"]
    print(f"\n{'run':<22}{'held-out acc':>14}{'vs SFT':>9}{'s/step':>9}")
    print(f"{'SFT, without tools':<22}{summary['sft_without_tools']['accuracy']:>14.3f}{'':>9}{'':>9}")
    print(f"{'SFT, with tools':<22}{start:>14.3f}{'':>9}{'':>9}")
    for impl in impls:
        if "skipped" in summary[impl]:
            print(f"{'GRPO ' + impl:<22}{'skipped':>14}")
            continue
        after = summary[impl]["after"]["accuracy"]
        print(f"{'GRPO ' + impl + ', tools':<22}{after:>14.3f}{after - start:>+9.3f}"
              f"{summary[impl]['seconds_per_step']:>9.2f}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
