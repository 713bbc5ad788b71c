"""RoI gallery: an HTML page with image, RoI heatmap, RoI box, evidence box, question and both answers.

    # from an evaluation run (reads <run>/predictions.parquet)
    python jobs/visualize.py --data data/synth.parquet --run runs/eval --out runs/eval/gallery.html
    python jobs/visualize.py --data data/synth.parquet --run runs/eval --qzoom-budget 576 --only wrong
    # or run the engine here on the first --limit records
    python jobs/visualize.py --data data/synth.parquet --model /path/ckpt --budget 576 --limit 16
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the labelled .parquet/.jsonl that was evaluated")
    p.add_argument("--run", help="evaluation output dir (predictions.parquet) or the parquet file itself")
    p.add_argument("--model", help="run the engine instead of reading --run (checkpoint dir / hub id)")
    p.add_argument("--config", help="EngineConfig YAML for --model")
    p.add_argument("--budget", type=int, default=576, help="with --model: budget of both methods")
    p.add_argument("--baseline-budget", type=int, default=None, help="with --run: default the largest")
    p.add_argument("--qzoom-budget", type=int, default=None, help="with --run: default the largest")
    p.add_argument("--only", choices=["all", "zoomed", "wrong", "disagree"], default="all")
    p.add_argument("--limit", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--out", default="gallery.html")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from qzoom_ray.eval.data import load_labelled
    from qzoom_ray.eval.gallery import build_gallery

    if bool(args.run) == bool(args.model):
        print("give exactly one of --run or --model", file=sys.stderr)
        return 2
    if args.run:
        import pyarrow.parquet as pq

        path = Path(args.run)
        preds = pq.read_table(path / "predictions.parquet" if path.is_dir() else path).to_pylist()
        rows = load_labelled(args.data, ids={p["id"] for p in preds})
        b_budget, q_budget = args.baseline_budget, args.qzoom_budget
    else:
        from qzoom_ray.config import EngineConfig
        from qzoom_ray.eval.evaluate import EvalSettings, run_evaluation

        cfg = EngineConfig.from_yaml(args.config) if args.config else EngineConfig()
        data = cfg.model_dump()
        data["model"]["path"] = args.model
        if args.max_new_tokens:
            data["generation"]["max_new_tokens"] = args.max_new_tokens
        settings = EvalSettings(baseline_budgets=[args.budget], qzoom_budgets=[args.budget], warmup=0)
        rows = load_labelled(args.data, args.limit)
        runs = run_evaluation(rows, EngineConfig.model_validate(data), settings)
        preds = [p for r in runs for p in r.predictions]
        b_budget = q_budget = args.budget
    out = build_gallery(rows, preds, args.out, b_budget, q_budget, limit=args.limit, only=args.only)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
