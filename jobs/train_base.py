"""Train the tiny synthetic base model (stock Qwen2.5-VL classes) as a Ray Train job.

    python jobs/train_base.py --config configs/train-base-tiny.yaml
    ray job submit -- python jobs/train_base.py --config configs/train-base-tiny.yaml --workers 4 --gpu
"""

from __future__ import annotations


def main() -> None:
    from qzoom_ray.train.cli import run_training_job

    run_training_job(__doc__, "qzoom_ray.train.base_config:TrainBaseConfig", "qzoom_ray.train.base_launch:train_base")


if __name__ == "__main__":
    main()
