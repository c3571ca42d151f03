"""What a DPO step on one long pair of uneven length costs: peak RSS and the attention masks built.

    python -m benchmarks.dpo_mask_probe --length 8192 --per-sequence-forward false
    python -m benchmarks.dpo_mask_probe --length 8192 --per-sequence-forward true

The ``long-<length>`` model (big vocabulary, hidden 256, 4 layers), posttrain's DPOTrainer with
``activation_offloading`` and ``tiled_mlp``, one pair whose chosen row is ``length`` tokens and
whose rejected row is ``--rejected-share`` of it, so the padded batch needs padding. One loss
forward and backward (no optimizer). Prints one ``RESULT {json}`` line: peak RSS, and the shape
and bytes of every attention mask transformers' SDPA path built (``None``: SDPA's own causal mask).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192, help="tokens of the chosen row (prompt + completion)")
    parser.add_argument("--rejected-share", type=float, default=0.75, help="rejected row length / chosen row length")
    parser.add_argument("--per-sequence-forward", choices=("true", "false"), required=True)
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from benchmarks.workloads import long_workload, model_dir
    from posttrain import DPOConfig, DPOTrainer

    path = model_dir(long_workload(args.length))
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    words = [f"w{i}" for i in range(args.length * 2)]
    prompt_words = 64
    # the chat template adds 6 tokens around the two turns
    chosen_words = args.length - prompt_words - 6
    rejected_words = int(args.length * args.rejected_share) - prompt_words - 6
    data = Dataset.from_list([{
        "prompt": [{"role": "user", "content": " ".join(words[:prompt_words])}],
        "chosen": [{"role": "assistant", "content": " ".join(words[:chosen_words])}],
        "rejected": [{"role": "assistant", "content": " ".join(words[-rejected_words:])}],
    }])
    masks = []
    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

    def recording_mask(*mask_args, **mask_kwargs):
        mask = sdpa_mask(*mask_args, **mask_kwargs)
        masks.append(None if mask is None else [list(mask.shape), mask.numel() * mask.element_size()])
        return mask

    ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] = recording_mask
    with tempfile.TemporaryDirectory() as out:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
        config = DPOConfig(output_dir=out, max_length=args.length, per_device_train_batch_size=1, report_to="none",
                           activation_offloading=True, tiled_mlp=True,
                           per_sequence_forward=args.per_sequence_forward == "true")
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
        batch = trainer.data_collator([trainer.train_dataset[0]])
        masks.clear()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        seconds = time.perf_counter() - started
    result = {
        "length": args.length, "row_lengths": batch["attention_mask"].sum(-1).tolist(),
        "per_sequence_forward": args.per_sequence_forward == "true", "loss": loss.item(),
        "seconds": seconds, "rss_before_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "masks": masks, "mask_mb": sum(m[1] for m in masks if m) / 2**20,
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
