"""Stage 2: mine RoI-path regressions (Ray Data) and fine-tune the decoder on them (Ray Train).

    python jobs/train_sft.py --config configs/train-sft-tiny.yaml
    python jobs/train_sft.py --config ... --skip-mining      # reuse mined rows in `mined`

Mining answers every question with the base path and the always-on RoI path of the stage-1
checkpoint and judges both (ground-truth metrics by default, an LLM judge optionally); training
rows = regressions (+ improvements at `mixing_ratio`).
"""


import argparse
import json
import logging
import os
from pathlib import Path

from pydantic import Field

from qzoom_ray.config import StrictModel
from qzoom_ray.train.sft import MineConfig, SftConfig


class SftJob(StrictModel):
    questions: str = Field(..., description="Parquet of questions with ground truth (mining input).")
    mined: str = Field(..., description="Folder for the mined rows (every question, with verdicts).")
    mixing_ratio: float = Field(0.0, ge=0, description="Improvements per regression added to training (authors: 0).")
    concurrency: int = Field(1, ge=1)
    rows_per_batch: int = Field(16, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0)
    limit: int | None = None
    mine: MineConfig
    train: SftConfig


def mine(job: SftJob) -> dict:
    from qzoom_ray.train.rayio import map_parquet

    n = map_parquet(job.questions, job.mined, "qzoom_ray.train.sft:miner_factory", job.mine.model_dump(mode="json"),
                    concurrency=job.concurrency, batch_size=job.rows_per_batch, num_gpus=job.gpus_per_actor,
                    limit=job.limit)
    return {"mined_rows": n}


def train(job: SftJob) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qzoom_ray.train.sft import select_training_rows, train_sft

    rows = pq.read_table(job.mined).to_pylist()
    picked = select_training_rows(rows, job.mixing_ratio, job.train.seed)
    kinds = [r["kind"] for r in rows]
    summary = {"mined": len(rows), "regressions": kinds.count("regression"),
               "improvements": kinds.count("improvement"), "training_rows": len(picked), "judge": job.mine.judge}
    if not picked:
        raise ValueError(f"no training rows were mined: {summary}")
    path = Path(job.mined) / "training" / "sft-train.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(picked), path)
    # `mined` holds Ray Data's part files; the training file lives in a sub-folder read on its own.
    return train_sft(job.train.model_copy(update={"data_path": str(path)}), summary)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="SftJob YAML")
    p.add_argument("--skip-mining", action="store_true")
    p.add_argument("--steps", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    import ray

    job = SftJob.from_yaml(args.config)
    if args.steps:
        job.train.steps = args.steps
    if args.workers:
        job.train.num_workers = args.workers
    if args.gpu:
        job.train.use_gpu = True
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    if not args.skip_mining:
        print(json.dumps(mine(job)))
    entry = train(job)
    print(json.dumps({k: v for k, v in entry.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
