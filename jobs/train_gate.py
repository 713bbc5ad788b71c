"""Stage 3: train the gate on consistency-filtered budget-ladder labels with Ray Train.

    python jobs/train_gate.py --config configs/train-gate-tiny.yaml
    ray job submit -- python jobs/train_gate.py --config ... --workers 4 --gpu
"""

from __future__ import annotations


def main() -> None:
    from qzoom_ray.train.cli import run_training_job

    run_training_job(__doc__, "qzoom_ray.train.gate:GateConfig", "qzoom_ray.train.gate:train_gate")


if __name__ == "__main__":
    main()
