"""Stage 1: train the twig (SD-RPN) on pseudo-label maps with Ray Train.

    python jobs/train_rpn.py --config configs/train-rpn-tiny.yaml
    ray job submit -- python jobs/train_rpn.py --config ... --workers 4 --gpu
"""

from __future__ import annotations


def main() -> None:
    from qzoom_ray.train.cli import run_training_job

    run_training_job(__doc__, "qzoom_ray.train.rpn:RpnConfig", "qzoom_ray.train.rpn:train_rpn")


if __name__ == "__main__":
    main()
