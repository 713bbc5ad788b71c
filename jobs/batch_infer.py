"""Q-Zoom batch inference on Ray Data: Parquet/JSONL (local or s3://) in, one Parquet row per record out.

  python jobs/batch_infer.py --input records.parquet --output out/          # local Ray, configs/local.yaml
  ray job submit --working-dir . -- python jobs/batch_infer.py --config configs/cluster-gpu.yaml

Rerunning with the same --output resumes (skips ids already written; refuses if the config changed).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "local.yaml"
POOLS = ("prepare", "coarse", "crop", "zoom")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="job YAML (default: %(default)s)")
    p.add_argument("--input", help="Parquet file/folder or JSONL manifest, local or s3:// (input.path)")
    p.add_argument("--output", help="output folder, local or s3:// (output.path)")
    p.add_argument("--limit", type=int, help="only the first N input rows")
    p.add_argument("--colocated", action="store_true", help="one GPU pool runs coarse + zoom")
    p.add_argument("--zoom-transfer", choices=["recompute", "kv"], help="how the zoom pool gets the prefix")
    p.add_argument("--num-gpus", type=float, help="GPUs per coarse and zoom actor")
    for pool in POOLS:
        p.add_argument(f"--{pool}-actors", type=int, help=f"size of the {pool} actor pool")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from qzoom_ray.pipeline import BatchJobConfig, run_batch

    cfg = BatchJobConfig.from_yaml(args.config)
    data = cfg.model_dump()
    data["input"]["path"] = args.input or data["input"]["path"]
    data["output"]["path"] = args.output or data["output"]["path"]
    data["limit"] = args.limit or data["limit"]
    data["colocated"] = args.colocated or data["colocated"]
    data["zoom_transfer"] = args.zoom_transfer or data["zoom_transfer"]
    for pool in POOLS:
        size = getattr(args, f"{pool}_actors")
        data["pools"][pool]["size"] = size or data["pools"][pool]["size"]
        if args.num_gpus is not None and pool in ("coarse", "zoom"):
            data["pools"][pool]["num_gpus"] = args.num_gpus
    summary = run_batch(BatchJobConfig.model_validate(data))
    print(summary.to_text(), flush=True)
    return 0 if summary.records else 1


if __name__ == "__main__":
    sys.exit(main())
