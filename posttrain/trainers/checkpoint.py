"""Checkpoints that are either complete or absent, and resuming from the newest complete one.

``transformers.Trainer._save_checkpoint`` writes ``output_dir/checkpoint-N`` file by file; a run
killed during a save leaves a partial directory that a later ``resume_from_checkpoint=True`` would
pick (it takes the highest number) and crash on. Here every save goes to
``output_dir/.incomplete-checkpoint-N/checkpoint-N`` first -- model, optimizer, scheduler, scaler,
RNG states, trainer state and whatever a method adds (PPO's value model and sampling state) -- and
only when every process has finished is it renamed to ``output_dir/checkpoint-N``. A rename within
one file system is atomic, so a ``checkpoint-N`` directory is complete by construction.

On resume, ``True`` (or ``"true"``) means the newest ``checkpoint-N`` that is complete; an
incomplete one (left by an older version, or copied partially) is skipped with one warning.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from posttrain.errors import ConfigError
from posttrain.trainers.guard import NonFiniteTrainingError, parameters_finite

logger = logging.getLogger("posttrain")

STAGING_PREFIX = ".incomplete-"
TRAINER_STATE_FILE = "trainer_state.json"
# any one of these holds a checkpoint's weights (full model, sharded, adapter; DeepSpeed and FSDP write their own)
_WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
_ENGINE_WEIGHTS_PREFIXES = ("global_step", "pytorch_model_fsdp")
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


# ----------------------------------------------------------------------------- saving


def install_atomic_checkpoints(trainer) -> None:
    """Route every ``trainer._save_checkpoint`` call, a subclass's override included, through :func:`save_atomically`.

    The wrapper is set on the instance so that it runs before the most derived override (PPO writes
    its extra state there, into the directory ``_get_output_dir`` names), whoever calls it.
    """
    save = trainer._save_checkpoint

    @functools.wraps(save)
    def atomic_save_checkpoint(model, trial=None):
        return save_atomically(trainer, save, model, trial)

    trainer._save_checkpoint = atomic_save_checkpoint


def save_atomically(trainer, save, model, trial) -> None:
    """Run ``save(model, trial)`` into a staging directory, then rename it to ``checkpoint-N``."""
    args, state, accelerator = trainer.args, trainer.state, trainer.accelerator
    run_dir = trainer._get_output_dir(trial=trial)
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    final, staging_root = os.path.join(run_dir, name), os.path.join(run_dir, STAGING_PREFIX + name)
    staged = os.path.join(staging_root, name)
    if not parameters_finite(trainer.model):
        raise NonFiniteTrainingError(
            f"step {state.global_step}: the model holds NaN/inf weights; {name} was not written. Fix: lower "
            "--learning_rate and resume from the last checkpoint"
        )
    if args.should_save:
        shutil.rmtree(staging_root, ignore_errors=True)  # a save killed earlier at this step
        os.makedirs(staging_root)
    accelerator.wait_for_everyone()

    trainer._get_output_dir = lambda trial=None: staging_root
    try:
        save(model, trial)
    finally:
        del trainer._get_output_dir
    _point_best_checkpoint_at(state, run_dir, staging_root)
    if args.should_save and os.path.isfile(os.path.join(staged, TRAINER_STATE_FILE)):
        state.save_to_json(os.path.join(staged, TRAINER_STATE_FILE))  # with the corrected best path

    accelerator.wait_for_everyone()
    if args.should_save:
        _sync_tree(staged)
        if os.path.isdir(final):  # saved twice at one step (e.g. the last step and the end of an epoch)
            os.rename(final, os.path.join(staging_root, "replaced"))
        os.rename(staged, final)
        _sync_dir(run_dir)
        shutil.rmtree(staging_root, ignore_errors=True)
        rotate_checkpoints(run_dir, args.save_total_limit, state.best_model_checkpoint, use_mtime=True)
    accelerator.wait_for_everyone()


def _point_best_checkpoint_at(state, run_dir: str, staging_root: str) -> None:
    """The Trainer notes the best checkpoint by the path it wrote (or finds none there); use the final path."""
    if not state.best_global_step:
        return
    best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}")
    if state.best_global_step == state.global_step or os.path.isdir(best):
        state.best_model_checkpoint = best
    elif state.best_model_checkpoint and state.best_model_checkpoint.startswith(staging_root):
        state.best_model_checkpoint = None


def _sync_tree(directory: str) -> None:
    """Flush every file of ``directory`` to disk, so that the rename never publishes unwritten data."""
    for root, _, files in os.walk(directory):
        for file in files:
            try:
                fd = os.open(os.path.join(root, file), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _sync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- resuming


def missing_checkpoint_files(checkpoint: str) -> list[str]:
    """What ``checkpoint`` lacks to resume from: ``trainer_state.json`` (written last) and the weights."""
    names = set(os.listdir(checkpoint)) if os.path.isdir(checkpoint) else set()
    missing = [] if TRAINER_STATE_FILE in names else [TRAINER_STATE_FILE]
    has_weights = any(n in names for n in _WEIGHTS_FILES) or any(
        n.startswith(_ENGINE_WEIGHTS_PREFIXES) for n in names
    )
    if not has_weights:
        missing.append(" or ".join(_WEIGHTS_FILES[:2]))
    return missing


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-numbered complete ``checkpoint-N`` in ``output_dir``; incomplete ones are skipped with a warning."""
    if not os.path.isdir(output_dir):
        return None
    numbered = []
    for entry in os.listdir(output_dir):
        match = _CHECKPOINT_NAME.match(entry)
        if match and os.path.isdir(os.path.join(output_dir, entry)):
            numbered.append((int(match.group(1)), os.path.join(output_dir, entry)))
    for _, path in sorted(numbered, reverse=True):
        missing = missing_checkpoint_files(path)
        if not missing:
            return path
        logger.warning("skipping %s: it is incomplete (no %s; a save was interrupted)", path, ", ".join(missing))
    return None


_FALSE = ("", "false", "no", "0", "none")
_TRUE = ("true", "yes", "1", "latest")


def resolve_resume(value: str | os.PathLike | bool | None, output_dir: str) -> str | None:
    """The checkpoint directory ``train(resume_from_checkpoint=value)`` resumes from, or None for a new run.

    ``True``/``"true"``: the newest complete checkpoint in ``output_dir``; ``False``/``"false"``/None: none;
    anything else: a checkpoint directory, which must exist and be complete. Problems are a
    :class:`ConfigError` naming the flag.
    """
    if value is None or value is False:
        return None
    text = os.fspath(value) if not isinstance(value, bool) else ("true" if value else "false")
    if text.strip().lower() in _FALSE and not os.path.isdir(text):
        return None
    if value is True or (text.strip().lower() in _TRUE and not os.path.isdir(text)):
        latest = latest_complete_checkpoint(output_dir)
        if latest is None:
            raise ConfigError(
                f"resume_from_checkpoint=true, but output_dir '{output_dir}' holds no checkpoint-N directory that is complete",
                field="resume_from_checkpoint",
                fix="pass the checkpoint directory itself (--resume_from_checkpoint RUN/checkpoint-N), set "
                    "--output_dir to the run that saved it, or train without resuming",
            )
        return latest
    if not os.path.isdir(text):
        raise ConfigError(
            f"checkpoint directory '{text}' does not exist", field="resume_from_checkpoint",
            fix="pass an existing checkpoint-N directory, or true for the newest one in --output_dir",
        )
    missing = missing_checkpoint_files(text)
    if missing:
        raise ConfigError(
            f"checkpoint '{text}' is incomplete: it lacks {', '.join(missing)}", field="resume_from_checkpoint",
            fix="resume from another checkpoint-N of the run (true picks the newest complete one)",
        )
    return text


def checkpoint_step(checkpoint: str | None) -> int | None:
    """The global step a ``checkpoint-N`` directory was saved at (from its name)."""
    if checkpoint is None:
        return None
    match = _CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(checkpoint)))
    if match:
        return int(match.group(1))
    import json

    with open(os.path.join(checkpoint, TRAINER_STATE_FILE), encoding="utf-8") as handle:
        return int(json.load(handle).get("global_step", 0))
