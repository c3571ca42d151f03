"""`python -m posttrain.scripts.ppo --model_name_or_path SFT_DIR --reward_model_path RM_DIR --dataset_name D ...`

The same command as `posttrain ppo ...`, kept under the script path older tutorials use.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from posttrain.cli.main import main as posttrain_main

    return posttrain_main(["ppo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
