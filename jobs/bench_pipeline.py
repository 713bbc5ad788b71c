"""Records/s of the Ray Data job vs the engine's in-process loop on the same records and model.

Also measures, per zoomed record, shipping the coarse pass's prefix KV to the zoom pool vs
recomputing layers 0..K-1 there. Prints one table; ratios are job / in-process.

  python jobs/bench_pipeline.py --records 96
  python jobs/bench_pipeline.py --config configs/cluster-gpu.yaml --records 2000 --modes recompute colocated
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "local.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="job YAML (default: %(default)s)")
    p.add_argument("--records", type=int, default=64, help="synthetic records (default: %(default)s)")
    p.add_argument("--modes", nargs="+", default=["recompute", "kv", "colocated"],
                   choices=["recompute", "kv", "colocated"], help="job variants to time")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from qzoom_ray.pipeline.bench import run_benchmark
    from qzoom_ray.pipeline.config import BatchJobConfig

    run_benchmark(BatchJobConfig.from_yaml(args.config), args.records, args.modes)  # prints as it goes
    return 0


if __name__ == "__main__":
    sys.exit(main())
