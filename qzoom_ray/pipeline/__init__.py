"""The Q-Zoom batch job on Ray Data: config, readers/writer, stages, resume and summary.

Entry point: :func:`run_batch` (used by ``jobs/batch_infer.py``). config, io, resume and summary do
not import torch, so the driver can load a config and inspect outputs without it.
"""

from qzoom_ray.pipeline.config import BatchJobConfig

__all__ = ["BatchJobConfig", "run_batch"]


def __getattr__(name: str):
    # Lazy, so `from qzoom_ray.pipeline import BatchJobConfig` does not pull in Ray.
    if name == "run_batch":
        from qzoom_ray.pipeline.runner import run_batch

        return run_batch
    raise AttributeError(name)
