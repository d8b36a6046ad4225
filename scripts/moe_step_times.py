"""Print the step times of the MoE-PHDS stages for a preset (pretrain step, fine-tune step, MC scoring per item).

Usage: python scripts/moe_step_times.py [PRESET] [THREADS]   (defaults: default 1)
Multiply by the preset's steps for a stage-time estimate (docs/moe.md). A script, not a test: timings are noisy.
"""

from __future__ import annotations

import sys
import time

import torch


def main(argv: list[str]) -> int:
    """Time 20 pretraining steps, 20 PHDS fine-tune steps (multi-k, per-k norms) and the scoring of 200 items."""
    preset = argv[0] if argv else "default"
    torch.set_num_threads(int(argv[1]) if len(argv) > 1 else 1)
    from lopkit.moe.finetune import MoEFinetune
    from lopkit.moe.pretrain import MoEPretrain
    from lopkit.moe.training import cached_items, mc_scores

    pretrain = MoEPretrain(MoEPretrain.make_config(preset, {"val_items": 0}), 0)
    pretrain.run(3)  # warm-up
    start = time.perf_counter()
    pretrain.run(20)
    pre = (time.perf_counter() - start) / 20
    config = MoEFinetune.make_config(preset, {"init_store": "x", "init_run_id": "x", "k_schedule": "multi",
                                              "anchor_k": pretrain.config.k_pre - 1, "per_k_norms": True,
                                              "k_train": tuple(range(max(1, pretrain.config.k_pre // 2),
                                                                     pretrain.config.k_pre + 1)),
                                              "variant": "phds_anchor"})
    finetune = MoEFinetune(config, 0, initial_state=pretrain.state_dict())
    finetune.run(2)
    start = time.perf_counter()
    finetune.run(20)
    ft = (time.perf_counter() - start) / 20
    items = cached_items("definition", 200, 0, "val", pretrain.config.context)
    start = time.perf_counter()
    mc_scores(pretrain.model, items, pretrain.config.k_pre, pretrain.config.context, 64)
    score = (time.perf_counter() - start) / len(items)
    print(f"{preset} preset, {torch.get_num_threads()} thread(s): pretrain {pre:.3f} s/step, "
          f"fine-tune {ft:.3f} s/step, MC scoring {1000 * score:.1f} ms/item")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
