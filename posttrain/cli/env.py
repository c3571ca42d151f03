"""`posttrain env`: versions and devices, for bug reports."""

from __future__ import annotations

import importlib
import platform


def environment_report() -> dict[str, str]:
    import torch

    report = {"posttrain": importlib.import_module("posttrain").__version__, "python": platform.python_version(),
              "platform": platform.platform()}
    for name in ("torch", "transformers", "datasets", "peft", "accelerate", "safetensors", "tokenizers",
                 "vllm", "bitsandbytes", "flash_attn", "deepspeed", "trl"):
        try:
            report[name] = getattr(importlib.import_module(name), "__version__", "installed")
        except Exception:  # not installed, or broken: both are worth reporting as such
            report[name] = "not installed"
    report["cpu threads"] = str(torch.get_num_threads())
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        report["cuda"] = f"{torch.version.cuda}; {len(names)} GPU(s): {', '.join(names)}"
        report["bf16"] = str(torch.cuda.is_bf16_supported())
    else:
        report["cuda"] = "no GPU (training runs on CPU in float32)"
    return report


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print("usage: posttrain env\n\nPrint library versions and available devices.")
        return 0
    for key, value in environment_report().items():
        print(f"{key:>14}: {value}")
    return 0
