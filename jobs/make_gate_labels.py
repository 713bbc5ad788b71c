"""Stage-3 data as a Ray Data job: answers at a ladder of budgets per question (Parquet -> Parquet).

    python jobs/make_gate_labels.py --config configs/train-gate-labels.yaml

Output columns: id, image, question, answers, budgets, ms_answers, ms_correct, kind (hard / easy /
unstable / hallucinated / non_monotonic, spec §2.3), wrong. ``jobs/train_gate.py`` re-applies the
consistency filter and the seeded 1:1 hard/easy mix.
"""


import argparse
import json

from pydantic import Field

from qzoom_ray.config import StrictModel
from qzoom_ray.train.gate import LadderConfig


class LadderJob(StrictModel):
    input: str = Field(..., description="Parquet file/folder of questions with ground truth.")
    output: str = Field(..., description="Output folder (Parquet files).")
    concurrency: int = Field(1, ge=1)
    rows_per_batch: int = Field(16, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    limit: int | None = None
    ladder: LadderConfig = Field(default_factory=LadderConfig)


def run(job: LadderJob) -> dict:
    import pyarrow.parquet as pq

    from qzoom_ray.train.rayio import map_parquet

    n = map_parquet(job.input, job.output, "qzoom_ray.train.gate:ladder_factory", job.ladder.model_dump(mode="json"),
                    concurrency=job.concurrency, batch_size=job.rows_per_batch, num_gpus=job.gpus_per_actor,
                    num_cpus=job.cpus_per_actor, limit=job.limit)
    kinds = pq.read_table(job.output, columns=["kind"]).column("kind").to_pylist()
    return {"rows": n, "kinds": {k: kinds.count(k) for k in sorted(set(kinds))}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="LadderJob YAML")
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--limit", type=int)
    args = p.parse_args()
    from qzoom_ray.train.cli import apply_overrides, init_ray

    job = LadderJob.from_yaml(args.config)
    apply_overrides(job, args, ("input", "output", "concurrency", "limit"))
    init_ray()
    print(json.dumps(run(job), indent=2))


if __name__ == "__main__":
    main()
