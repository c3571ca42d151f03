"""The record every run leaves: ``report.md`` with plots in ``output_dir``, and a model card
(``README.md``) in every saved model directory.

The report is written when training ends, from ``metrics.jsonl`` alone (so it also describes a run
that resumed): curves of the method's key metrics and of evaluation, the final figures, the settings
that differ from the defaults, wall time and peak memory.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time
from typing import Any

from transformers import TrainerCallback

from posttrain.report.metrics import read_metrics, series
from posttrain.report.plots import plot_curves

# the curves worth a reader's look, per method, in the order they are drawn
METHOD_METRICS: dict[str, list[str]] = {
    "sft": ["loss", "mean_token_accuracy", "grad_norm"],
    "reward": ["loss", "accuracy", "margin"],
    "dpo": ["loss", "rewards/accuracies", "rewards/margins"],
    "grpo": ["reward", "reward_std", "kl", "completions/mean_length"],
    "rloo": ["reward", "kl", "completions/mean_length"],
    "ppo": ["objective/scores", "objective/kl", "loss/policy", "loss/value"],
    "online_dpo": ["reward", "loss", "kl"],
}
FALLBACK_METRICS = ["loss", "grad_norm", "learning_rate"]
# settings no reader needs in a diff: paths and values every run has
_SKIPPED_SETTINGS = {"output_dir", "logging_dir", "run_name", "hub_token", "push_to_hub_token", "_n_gpu",
                     "accelerator_config", "dataloader_pin_memory"}
_FINAL_SKIPPED = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second",
                  "train_steps_per_second", "learning_rate"}


def _posttrain_version() -> str:
    from posttrain import __version__

    return __version__


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _comparable(value: Any) -> str:
    """A value as text, with the empty forms that ``__post_init__`` fills in (None -> False, "none" -> []) alike."""
    value = getattr(value, "value", value)
    if value in (None, False, "", "none", "no") or (isinstance(value, (list, tuple, dict)) and not value):
        return ""
    return str(value)


def changed_settings(args: Any) -> dict[str, Any]:
    """The config fields whose value differs from the field's default (paths, secrets and fields the
    config fills in for the machine left out). A default config is not built for the comparison: a
    second ``TrainingArguments`` resets accelerate's state in the middle of a run."""
    changed = {}
    for field in dataclasses.fields(args):
        if (field.name in _SKIPPED_SETTINGS or field.name.startswith("_") or not field.init
                or "token" in field.name):
            continue
        default = _field_default(field)
        value = getattr(args, field.name, None)
        if default is not dataclasses.MISSING and _comparable(value) != _comparable(default):
            changed[field.name] = getattr(value, "value", value)
    return changed


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MB (ru_maxrss is KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def final_figures(records: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of every numeric metric (training and evaluation)."""
    last: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            if key not in _FINAL_SKIPPED and isinstance(value, (int, float)) and not isinstance(value, bool):
                last[key] = float(value)
    return last


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _pairwise_loss_chance(method: str) -> dict[str, float]:
    """A Bradley-Terry or sigmoid-DPO loss starts at ln 2 = 0.693, where chosen and rejected tie."""
    if method not in ("reward", "dpo"):
        return {}
    return {"loss": 0.6931, "eval_loss": 0.6931}


def write_run_report(output_dir: str, *, method: str, model_name: str, dataset: str | None, args: Any,
                     seconds: float | None, peak_mb: float | None) -> str:
    """Write ``<output_dir>/report.md`` and its plots from ``<output_dir>/metrics.jsonl``; return the path."""
    records = read_metrics(output_dir)
    keys = [k for k in METHOD_METRICS.get(method, FALLBACK_METRICS) if series(records, k)[0]]
    eval_keys = sorted({k for r in records for k in r if k.startswith("eval_") and k not in
                        ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")})
    lines = [f"# {method} run: {os.path.basename(os.path.abspath(output_dir))}", "",
             f"- base model: `{model_name}`", f"- data: {dataset or 'not recorded'}",
             f"- posttrain {_posttrain_version()}"]
    if seconds is not None:
        lines.append(f"- wall time: {seconds:.1f} s")
    if peak_mb is not None:
        lines.append(f"- peak memory (resident): {peak_mb:,.0f} MB")
    lines += ["", "## Curves", ""]
    for name, panel_keys in (("training", keys), ("evaluation", eval_keys)):
        png = plot_curves(records, panel_keys, os.path.join(output_dir, f"{name}.png"), title=f"{method}: {name}",
                          chance=_pairwise_loss_chance(method))
        if png:
            lines += [f"![{name} curves]({os.path.basename(png)})", ""]
        elif panel_keys:
            lines += [f"({name} plots need matplotlib: pip install posttrain[plots])", ""]
    if not keys and not eval_keys:
        lines += ["No metrics were logged (logging_steps larger than the run?).", ""]
    final = final_figures(records)
    if final:
        lines += ["## Final figures", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_format(value)} |" for key, value in sorted(final.items())]
        lines.append("")
    changed = changed_settings(args)
    lines += ["## Settings that differ from the defaults", ""]
    if changed:
        lines += ["| setting | value |", "|---|---|"] + [f"| {k} | {_format(v)} |" for k, v in sorted(changed.items())]
    else:
        lines.append("None.")
    path = os.path.join(output_dir, "report.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


_LOAD_SNIPPETS = {
    "reward": ("from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
               "model = AutoModelForSequenceClassification.from_pretrained(\"{path}\")\n"
               "tokenizer = AutoTokenizer.from_pretrained(\"{path}\")"),
    "peft": ("from peft import AutoPeftModelForCausalLM\n"
             "model = AutoPeftModelForCausalLM.from_pretrained(\"{path}\")"),
    "default": ("from transformers import pipeline\n"
                "generator = pipeline(\"text-generation\", model=\"{path}\")"),
}


def write_model_card(model_dir: str, *, method: str, model_name: str, dataset: str | None, args: Any,
                     records: list[dict[str, Any]], is_peft: bool) -> str:
    """Write ``<model_dir>/README.md``: method, base model, data, key settings, final metrics, how to load."""
    snippet = _LOAD_SNIPPETS["peft" if is_peft else method if method in _LOAD_SNIPPETS else "default"]
    changed = changed_settings(args)
    final = final_figures(records)
    lines = ["---", "library_name: " + ("peft" if is_peft else "transformers"), f"base_model: {model_name}",
             "tags:", "- posttrain", f"- {method}", "---", "",
             f"# {os.path.basename(os.path.abspath(model_dir))}", "",
             f"Trained with posttrain {_posttrain_version()} ({method}) from `{model_name}`"
             + (f" on {dataset}." if dataset else "."), "", "## Load it", "", "```python",
             snippet.format(path=os.path.abspath(model_dir)), "```", ""]
    if changed:
        lines += ["## Settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_format(v)} |" for k, v in sorted(changed.items())] + [""]
    if final:
        lines += ["## Last logged metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_format(v)} |" for k, v in sorted(final.items())] + [""]
    path = os.path.join(model_dir, "README.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    return path


class RunReportCallback(TrainerCallback):
    """Writes ``report.md`` and the plots into ``output_dir`` when training ends (main process only)."""

    def __init__(self, describe) -> None:
        # describe() -> (method, base model name, data description); called when the report is written
        self._describe = describe
        self._started: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.time()

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not args.output_dir:
            return
        method, model_name, dataset = self._describe()
        os.makedirs(args.output_dir, exist_ok=True)
        seconds = time.time() - self._started if self._started is not None else None
        write_run_report(args.output_dir, method=method, model_name=model_name, dataset=dataset, args=args,
                         seconds=seconds, peak_mb=peak_memory_mb())
