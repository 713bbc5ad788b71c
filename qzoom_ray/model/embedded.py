"""Models that come with the package, addressed as ``embedded:NAME`` wherever a model path is taken.

* ``tiny``: the tiny Q-Zoom model trained on the synthetic benchmark (base + stages 1-3, thresholds
  calibrated), the default of ``configs/local.yaml``; its model card is ``assets/tiny-qzoom/README.md``.
* ``tiny-base``: the tiny Qwen2.5-VL it was built on (no heads), trained by ``jobs/train_base.py``.
* ``tiny-random``: a random-init model of the same family with random heads, built offline on first
  use: every code path runs on it, its answers are noise.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = {"tiny": "tiny-qzoom", "tiny-base": "tiny-base"}
NAMES = (*SHIPPED, "tiny-random")


def embedded_checkpoint_dir(name: str) -> Path:
    if name == "tiny-random":
        from qzoom_ray.model.tiny import ensure_embedded_model

        return ensure_embedded_model()
    if name not in SHIPPED:
        raise ValueError(f"unknown embedded model 'embedded:{name}'; available: {', '.join(NAMES)}")
    folder = ASSETS / SHIPPED[name]
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"embedded:{name} should ship in {folder}, which holds no checkpoint: reinstall the package "
            "(its package data was left out) or use embedded:tiny-random"
        )
    return folder
