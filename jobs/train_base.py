"""Train the tiny synthetic base model (stock Qwen2.5-VL classes) as a Ray Train job.

    python jobs/train_base.py --config configs/train-base-tiny.yaml
    ray job submit -- python jobs/train_base.py --config configs/train-base-tiny.yaml --workers 4 --gpu
"""

from __future__ import annotations

import argparse
import json
import logging
import os


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="TrainBaseConfig YAML")
    p.add_argument("--out", help="override out_dir")
    p.add_argument("--steps", type=int, help="override steps")
    p.add_argument("--minutes", type=float, help="override max_minutes (the schedule decays by then)")
    p.add_argument("--workers", type=int, help="override num_workers")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument(
        "--address",
        default=None,
        help="Ray address; default: $RAY_ADDRESS (set by `ray job submit`), else a new local Ray",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")

    import ray

    from qzoom_ray.train.base import TrainBaseConfig, train_base

    cfg = TrainBaseConfig.from_yaml(args.config)
    for field, value in (("out_dir", args.out), ("steps", args.steps), ("max_minutes", args.minutes),
                         ("num_workers", args.workers)):
        if value is not None:
            setattr(cfg, field, value)
    if args.gpu:
        cfg.use_gpu = True
    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local")
    recipe = train_base(cfg)
    print(json.dumps({k: v for k, v in recipe.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
