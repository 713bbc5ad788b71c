"""Stage 1: train the twig (SD-RPN) on pseudo-label maps with Ray Train.

    python jobs/train_rpn.py --config configs/train-rpn-tiny.yaml
    ray job submit -- python jobs/train_rpn.py --config ... --workers 4 --gpu
"""

from __future__ import annotations

import argparse
import json
import logging
import os


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="RpnConfig YAML")
    p.add_argument("--init-from", help="override init_from")
    p.add_argument("--data", help="override data_path")
    p.add_argument("--out", help="override out_dir")
    p.add_argument("--steps", type=int)
    p.add_argument("--minutes", type=float)
    p.add_argument("--workers", type=int)
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    import ray

    from qzoom_ray.train.rpn import RpnConfig, train_rpn

    cfg = RpnConfig.from_yaml(args.config)
    for field, value in (("init_from", args.init_from), ("data_path", args.data), ("out_dir", args.out),
                         ("steps", args.steps), ("max_minutes", args.minutes), ("num_workers", args.workers)):
        if value is not None:
            setattr(cfg, field, value)
    if args.gpu:
        cfg.use_gpu = True
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    entry = train_rpn(cfg)
    print(json.dumps({k: v for k, v in entry.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
