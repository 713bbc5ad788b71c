"""Stage-1 pseudo labels as a Ray Data job: questions (Parquet) -> denoised tri-state maps (Parquet).

    python jobs/make_pseudo_labels.py --config configs/train-pseudo-labels.yaml
    ray job submit -- python jobs/make_pseudo_labels.py --config ... --concurrency 8 --gpus-per-actor 0.5

Input columns: id, image (bytes), question, answer/answers [, evidence_box]. Output: the same plus
answer, grid_h, grid_w, attn_map, sink_map, labels (1/0/-100, row-major), valid, reason, fg_box.
"""


import argparse
import json

from pydantic import Field

from qzoom_ray.config import StrictModel
from qzoom_ray.train.pseudo import PseudoLabelConfig


class PseudoLabelJob(StrictModel):
    input: str = Field(..., description="Parquet file/folder of questions.")
    output: str = Field(..., description="Output folder (Parquet files).")
    concurrency: int = Field(1, ge=1, description="Labeller actors (one model each).")
    rows_per_batch: int = Field(16, ge=1, description="Rows handed to an actor at a time.")
    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    limit: int | None = None
    labels: PseudoLabelConfig


def run(job: PseudoLabelJob) -> dict:
    import pyarrow.parquet as pq

    from qzoom_ray.train.rayio import map_parquet

    n = map_parquet(job.input, job.output, "qzoom_ray.train.pseudo:labeler_factory", job.labels.model_dump(mode="json"),
                    concurrency=job.concurrency, batch_size=job.rows_per_batch, num_gpus=job.gpus_per_actor,
                    num_cpus=job.cpus_per_actor, limit=job.limit)
    t = pq.read_table(job.output, columns=["valid", "reason"])
    reasons = t.column("reason").to_pylist()
    return {"rows": n, "valid": int(sum(t.column("valid").to_pylist())),
            "reasons": {r: reasons.count(r) for r in sorted(set(reasons))}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="PseudoLabelJob YAML")
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--gpus-per-actor", type=float)
    p.add_argument("--limit", type=int)
    args = p.parse_args()
    from qzoom_ray.train.cli import apply_overrides, init_ray

    job = PseudoLabelJob.from_yaml(args.config)
    apply_overrides(job, args, ("input", "output", "concurrency", "gpus_per_actor", "limit"))
    init_ray()
    print(json.dumps(run(job), indent=2))


if __name__ == "__main__":
    main()
