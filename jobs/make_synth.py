"""Generate the synthetic fine-detail VQA benchmark (documents + scenes) in the batch job's input format.

    python jobs/make_synth.py --n 400 --seed 0 --out data/synth.parquet              # 25% ultra-hr
    python jobs/make_synth.py --n 200 --seed 1 --split ultra_hr --out data/hr.parquet
    python jobs/make_synth.py --n 100 --seed 0 --out data/synth.jsonl                  # + data/images/
    python jobs/make_synth.py --vocab                                                  # tokenizer words

Same seed -> byte-identical images and rows. Record i uses seed [seed, i], so --start lets several
processes write disjoint shards of one dataset. Columns: docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="number of records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="index of the first record (for shards)")
    p.add_argument("--out", help="output .parquet or .jsonl (JSONL writes images/ next to it)")
    p.add_argument("--split", choices=["mixed", "ordinary", "ultra_hr"], default="mixed")
    p.add_argument("--ultra-frac", type=float, default=0.25, help="ultra-hr share when --split mixed")
    p.add_argument("--fine-frac", type=float, default=0.5, help="share of fine (small-text) questions")
    p.add_argument("--image-format", choices=["auto", "png", "jpeg"], default="auto",
                   help="auto: PNG for documents, JPEG (q95, 4:4:4) for scenes")
    p.add_argument("--vocab", action="store_true", help="print the vocabulary as JSON and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qzoom_ray.synth.generator import generate_records
    from qzoom_ray.synth.vocab import vocabulary
    from qzoom_ray.synth.writer import write_jsonl, write_parquet

    if args.vocab:
        v = vocabulary()
        json.dump({"words": v.words, "characters": v.characters, "answers": v.answers}, sys.stdout)
        print()
        return 0
    if not args.out:
        print("--out is required", file=sys.stderr)
        return 2
    records = generate_records(args.n, args.seed, args.split, args.ultra_frac, args.fine_frac, args.start)
    t0 = time.perf_counter()
    writer = write_jsonl if Path(args.out).suffix in (".jsonl", ".json") else write_parquet
    n = writer(records, args.out, args.image_format)
    print(f"wrote {n} records to {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
