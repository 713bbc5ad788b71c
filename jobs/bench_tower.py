"""How fast a tiny vision tower learns to read glyphs from dense per-token labels, aligned vs not.

    python jobs/bench_tower.py                      # 150 steps per arm, about 4 minutes on 2 CPU cores
    python jobs/bench_tower.py --steps 400 --lr 2.5e-3

Trains two fresh copies of the tiny Qwen2.5-VL tower of configs/train-base-tiny.yaml (same seed, same
data stream) on primer canvases (qzoom_ray.train.vision_source.render_canvas) with only the glyph head:
one with every glyph centred on a 28-px visual token, one with glyphs at random offsets, as text lies in
real images. Prints the token-level glyph accuracy of both as training goes and the ratio at the end,
measured in this one run (docs/benchmark.md, "What made the difference").
"""

from __future__ import annotations

import argparse


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/train-base-tiny.yaml", help="train_base config whose arch is used")
    p.add_argument("--steps", type=int, default=150, help="optimiser steps per arm")
    p.add_argument("--batch", type=int, default=16, help="canvases per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=25, help="print the running accuracy every this many steps")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p.parse_args()


def run_arm(args: argparse.Namespace, snap: bool) -> list[float]:
    import numpy as np
    import torch
    import yaml

    from qzoom_ray.train.base_config import TrainBaseConfig, build_untrained
    from qzoom_ray.train.vision_pretrain import VisionPretrainer, collate_dense, encode_dense_view
    from qzoom_ray.train.vision_source import HEAD_CLASSES, IGNORE, render_canvas

    with open(args.config) as f:
        cfg = TrainBaseConfig.model_validate(yaml.safe_load(f))
    _, processor, model = build_untrained(cfg)
    pre = VisionPretrainer(model.model.visual, model.config.text_config.hidden_size)
    opt = torch.optim.AdamW(pre.parameters(), lr=args.lr, betas=(0.9, cfg.adam_beta2), weight_decay=0.0)
    rng = np.random.default_rng(0)
    accuracy: list[float] = []
    window: list[float] = []
    for step in range(1, args.steps + 1):
        batch = collate_dense([encode_dense_view(processor, render_canvas(rng, snap=snap)) for _ in range(args.batch)])
        for head in HEAD_CLASSES:
            if head != "glyph":  # glyph reading only: the other heads' labels are masked out
                batch[f"labels_{head}"].fill_(IGNORE)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 20)
        loss = pre(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pre.parameters(), 1.0)
        opt.step()
        window.append(pre.last_accuracy.get("glyph", 0.0))
        if step % args.every == 0 or step == args.steps:
            accuracy.append(sum(window) / len(window))
            print(f"{'aligned' if snap else 'random offsets':>14}  step {step:4d}  glyph accuracy {accuracy[-1]:.3f}", flush=True)
            window = []
    return accuracy


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    aligned = run_arm(args, snap=True)
    shifted = run_arm(args, snap=False)
    print(f"final glyph accuracy: aligned {aligned[-1]:.3f}, random offsets {shifted[-1]:.3f}, "
          f"ratio {aligned[-1] / max(shifted[-1], 1e-6):.1f}x")


if __name__ == "__main__":
    main()
