"""`posttrain eval`: evaluate saved models side by side and write one table.

    posttrain eval --model runs/demo/sft runs/demo/grpo --task arithmetic --num_samples 8
    posttrain eval --model sft ppo --reward_model rm --baseline sft --dataset_name prompts.jsonl
    posttrain eval --model rm --preference_dataset pairs.jsonl
    posttrain eval --model dpo --ref_model sft --preference_dataset pairs.jsonl --lm_dataset chat.jsonl

Each --model is a model directory, a PEFT adapter directory or a hub id (from the local cache when
offline). Writes eval.json, eval.md (with sample completions) and eval.png into --output_dir.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

from posttrain.errors import ConfigError, DataError

logger = logging.getLogger("posttrain")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain eval", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", required=True,
                        help="Models to evaluate: directories, PEFT adapter directories or hub ids.")
    parser.add_argument("--output_dir", default="eval_output", help="Where eval.json, eval.md and eval.png go.")
    prompts = parser.add_argument_group("task accuracy (generation)")
    prompts.add_argument("--task", default=None, help="An embedded task with checkable answers (e.g. arithmetic).")
    prompts.add_argument("--task_args", nargs="*", default=[], metavar="KEY=VALUE",
                         help="Options of the task, e.g. max_operand=20 ops=+,-")
    prompts.add_argument("--split", default="test", help="Which split of the task (test or train).")
    prompts.add_argument("--num_problems", default="64",
                         help="How many task problems to draw, or 'all' for every distinct problem of the split.")
    prompts.add_argument("--text_prompts", action="store_true",
                         help="Give task prompts as plain text ('Question: ... Answer:') instead of chat messages.")
    prompts.add_argument("--dataset_name", default=None,
                         help="A prompt dataset (file, folder or hub id) with a 'prompt' column and the columns "
                              "its reward functions read (e.g. 'answer').")
    prompts.add_argument("--dataset_split", default="test", help="Split of --dataset_name (a lone file is its own split).")
    prompts.add_argument("--reward_funcs", nargs="+", default=None,
                         help="Reward specs as for GRPO (builtin name, module:function, file.py:function -- which "
                              "imports and runs that file -- or a reward-model directory). Default: the task's own "
                              "check, or 'accuracy' for a dataset with an 'answer' column.")
    prompts.add_argument("--num_samples", type=int, default=0,
                         help="Also draw k samples per prompt at --temperature: mean@k and pass@k. 0: greedy only.")
    prompts.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature for --num_samples.")
    prompts.add_argument("--max_new_tokens", type=int, default=32, help="Most new tokens per completion.")
    prompts.add_argument("--reward_model", default=None,
                         help="A reward-model directory: mean score of each model's greedy completions.")
    prompts.add_argument("--baseline", default=None,
                         help="With --reward_model: the model (name or path among --model) the others' win rate "
                              "is measured against, prompt by prompt.")
    pairs = parser.add_argument_group("preference data")
    pairs.add_argument("--preference_dataset", default=None,
                       help="Preference rows (prompt/chosen/rejected): pairwise accuracy and mean margin of reward "
                            "models, and of policies' implicit reward against --ref_model.")
    pairs.add_argument("--ref_model", default=None, help="The reference a DPO policy was trained against.")
    pairs.add_argument("--beta", type=float, default=0.1, help="The beta of the implicit reward beta * log-ratio.")
    lm = parser.add_argument_group("language modeling")
    lm.add_argument("--lm_dataset", default=None,
                    help="SFT-format rows: per-token NLL and perplexity (completion tokens only when marked).")
    lm.add_argument("--max_length", type=int, default=1024, help="Longest tokenized row for preference and LM data.")
    parser.add_argument("--max_samples", type=int, default=None, help="Use at most this many rows of every dataset.")
    parser.add_argument("--batch_size", type=int, default=32, help="Prompts per generation batch.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampled completions.")
    parser.add_argument("--num_shown", type=int, default=3, help="Sample completions per model in eval.md.")
    return parser


def _task_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"task option {pair!r} is not KEY=VALUE", field="task_args", fix="write e.g. max_operand=20")
        value: Any = text
        for convert in (int, float):
            try:
                value = convert(text)
                break
            except ValueError:
                continue
        if key == "ops" and isinstance(value, str):
            value = tuple(op for op in value.split(",") if op)
        options[key] = value
    return options


def _problem_count(value: str, task, split: str) -> int:
    if str(value).lower() == "all":
        if not hasattr(task, "split_size"):
            raise ConfigError(f"task {task.name!r} cannot list every problem", field="num_problems", fix="pass a number")
        return task.split_size(split)
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 1:
        raise ConfigError(f"--num_problems must be a positive number or 'all', got {value!r}", field="num_problems",
                          fix="pass e.g. --num_problems 64")
    return count


def _load_rows(source: str, split: str, max_samples: int | None, flag: str):
    from posttrain.data import load_data

    dataset = load_data(source, split=split)
    if len(dataset) == 0:
        raise DataError("the dataset has no rows", source=source, fix=f"pass a non-empty dataset to --{flag}")
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset


def _prompt_rows(args) -> tuple[list[dict[str, Any]], list[Any]]:
    """The prompt rows to generate on and the reward functions that score them."""
    from posttrain.rewards import load_reward_funcs

    if args.task and args.dataset_name:
        raise ConfigError("--task and --dataset_name both give prompts", field="task", fix="pass one of them")
    funcs = load_reward_funcs(args.reward_funcs) if args.reward_funcs else []
    if args.task:
        from posttrain.eval.suite import task_reward
        from posttrain.tasks import get_task

        task = get_task(args.task, **_task_options(args.task_args))
        count = _problem_count(args.num_problems, task, args.split)
        count = count if args.max_samples is None else min(count, args.max_samples)
        dataset = task.as_prompt_only(count, split=args.split, conversational=not args.text_prompts, seed=args.seed)
        return list(dataset), funcs or [task_reward(task)]
    dataset = _load_rows(args.dataset_name, args.dataset_split, args.max_samples, "dataset_name")
    if "prompt" not in dataset.column_names:
        raise DataError("a prompt dataset needs a 'prompt' column", source=args.dataset_name, column="prompt",
                        found=f"columns {dataset.column_names}", fix="rename the prompt column to 'prompt'")
    if not funcs:
        if "answer" not in dataset.column_names:
            raise DataError("task accuracy needs reference answers and the dataset has no 'answer' column",
                            source=args.dataset_name, column="answer", found=f"columns {dataset.column_names}",
                            fix="add an 'answer' column, or pass --reward_funcs that need none")
        funcs = load_reward_funcs(["accuracy"])
    return list(dataset), funcs


def _unique_names(sources: list[str]) -> list[str]:
    names, seen = [], {}
    for source in sources:
        base = os.path.basename(source.rstrip("/")) or source
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def _progress(total: int, label: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return None, lambda n: None
    bar = tqdm(total=total, desc=label, leave=False, disable=None)
    return bar, bar.update


def run_eval(args) -> list[dict[str, Any]]:
    """Evaluate every model; return one result dict per model (see :mod:`posttrain.report.eval_report`)."""
    from posttrain.eval import suite

    if args.baseline and not args.reward_model:
        raise ConfigError("--baseline compares reward-model scores", field="baseline", fix="pass --reward_model DIR too")
    if args.num_samples < 0 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise ConfigError("--num_samples must be >= 0, --max_new_tokens and --batch_size >= 1",
                          field="num_samples", fix="pass e.g. --num_samples 8 --max_new_tokens 32")
    if not (args.task or args.dataset_name or args.preference_dataset or args.lm_dataset):
        args.task = "arithmetic"
    names = _unique_names(args.model)
    models = [suite.load_eval_model(source, name=name) for source, name in zip(args.model, names)]
    reference = suite.load_eval_model(args.ref_model, name="reference") if args.ref_model else None
    judge = None
    if args.reward_model:
        if not suite.is_sequence_classifier(args.reward_model):
            raise ConfigError(f"--reward_model {args.reward_model!r} is not a sequence classifier (a reward model)",
                              field="reward_model", fix="train one with `posttrain reward`, or pass its directory")
        from posttrain.rewards.model_scorer import RewardModelScorer

        judge = RewardModelScorer(args.reward_model, batch_size=args.batch_size, max_length=args.max_length)
    results = [{"model": m.name, "source": m.source, "kind": m.kind, "figures": {}, "samples": []} for m in models]
    policies = [(m, r) for m, r in zip(models, results) if m.kind == suite.POLICY]

    if args.task or args.dataset_name:
        rows, funcs = _prompt_rows(args)
        judged: dict[str, list[float]] = {}
        for candidate, result in policies:
            bar, update = _progress(len(rows), f"generating ({candidate.name})")
            generations = suite.generate(candidate, rows, max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
                                         temperature=args.temperature, batch_size=args.batch_size, seed=args.seed,
                                         progress=update)
            if bar is not None:
                bar.close()
            scored = suite.evaluate_generations(rows, generations, funcs, reward_model=judge)
            if judge is not None:
                judged[candidate.name] = scored.pop("reward_model_scores")
            for function, figures in scored.items():
                for variant, figure in figures.items():
                    result["figures"][f"{function}/{variant}"] = figure
            result["samples"] = [{"prompt": row["prompt"], "completion": completion,
                                  **({"answer": row["answer"]} if "answer" in row else {})}
                                 for row, completion in zip(rows[: args.num_shown], generations.greedy)]
        if args.baseline:
            baseline = _match(args.baseline, models)
            for name, figure in suite.win_rates(judged, baseline).items():
                next(r for r in results if r["model"] == name)["figures"][f"win_rate_vs_{baseline}"] = figure

    if args.preference_dataset:
        pairs = _load_rows(args.preference_dataset, "train", args.max_samples, "preference_dataset")
        for candidate, result in zip(models, results):
            if candidate.kind == suite.POLICY and reference is None:
                continue
            figures = suite.evaluate_preferences(candidate, pairs, reference=reference, beta=args.beta,
                                                 max_length=args.max_length)
            result["figures"]["preference_accuracy"] = figures["accuracy"]
            result["figures"]["preference_margin"] = figures["margin"]

    if args.lm_dataset:
        texts = _load_rows(args.lm_dataset, "train", args.max_samples, "lm_dataset")
        for candidate, result in policies:
            figures = suite.evaluate_language_modeling(candidate, texts, max_length=args.max_length)
            result["figures"]["nll"] = {"mean": figures["nll"], "low": float("nan"), "high": float("nan"), "n": figures["tokens"]}
            result["figures"]["perplexity"] = {"mean": figures["perplexity"], "low": float("nan"), "high": float("nan"),
                                               "n": figures["tokens"]}
    return results


def _match(baseline: str, models) -> str:
    for model in models:
        if baseline in (model.name, model.source, model.source.rstrip("/")):
            return model.name
    raise ConfigError(f"--baseline {baseline!r} is not one of the --model entries",
                      field="baseline", fix=f"use one of: {', '.join(m.name for m in models)}")


def main(argv: list[str]) -> int:
    from posttrain.report.eval_report import format_table, write_eval_outputs

    args = _parser().parse_args(argv)
    started = time.time()
    results = run_eval(args)
    settings = {key: value for key, value in vars(args).items()}
    settings["seconds"] = round(time.time() - started, 1)
    paths = write_eval_outputs(args.output_dir, results, settings)
    print(format_table(results))
    print(f"wrote {', '.join(paths.values())}")
    return 0
