"""Accuracy vs throughput of the baseline and Q-Zoom over budget ladders, on any labelled dataset.

    python jobs/evaluate.py --data data/synth.parquet --out runs/eval
    python jobs/evaluate.py --data data/synth.parquet --model /path/ckpt --limit 200 \\
        --baseline-budgets 64,128,256,576,1024 --qzoom-budgets 64,128,256,576 --batch-size 4
    python jobs/evaluate.py --data d.parquet --config configs/engine.yaml --out runs/eval
    python jobs/evaluate.py --data d.parquet --config configs/eval-tiny-qzoom.yaml \
        --baseline-model embedded:tiny-base   # the paper's comparison: the untouched base model

Writes summary.csv, summary.md (table + speedups), tradeoff.json, pareto.png,
predictions.parquet (one row per record and setting; the gallery reads it) and confidence.json /
confidence.png (accuracy of the most confident records, ranked by answer_logprob) into --out.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _budgets(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="labelled .parquet or .jsonl")
    p.add_argument("--config", help="EngineConfig YAML (model, thresholds, generation)")
    p.add_argument("--model", help="checkpoint dir / hub id; overrides the config's model.path")
    p.add_argument(
        "--baseline-model",
        help="run the baseline ladder on this checkpoint instead (e.g. the base model the Q-Zoom one was trained "
        "from, as the paper compares); same engine settings otherwise",
    )
    p.add_argument("--baseline-budgets", type=_budgets, default=[64, 128, 256, 576, 1024])
    p.add_argument("--qzoom-budgets", type=_budgets, default=[64, 128, 256, 576, 1024])
    p.add_argument(
        "--oracle-budgets", type=_budgets, default=[],
        help="also answer every record from a crop of its ground-truth evidence box at these budgets (no gate, "
        "no twig): the RPN's upper bound",
    )
    p.add_argument("--min-tokens", type=int, default=None, help="fixed lower budget (default: the paper's rule)")
    p.add_argument("--limit", type=int, default=None, help="first N records only")
    p.add_argument("--batch-size", type=int, default=1, help="engine batch size for every setting")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--gate-thresh", type=float, default=None)
    p.add_argument("--roi-thresh", type=float, default=None)
    p.add_argument("--rate-basis", choices=["model", "wall"], default="model")
    p.add_argument("--paper-budget", type=int, default=None, help="Q-Zoom budget of the fixed-budget speedup")
    p.add_argument("--metric", default="exact_match", help="metric for rows without a 'metric' column")
    p.add_argument("--no-roi-maps", action="store_true", help="do not keep RoI maps in predictions.parquet")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--no-escalation", action="store_true",
                   help="answer every Q-Zoom budget once, whatever the config's escalation says: the plain runs "
                   "jobs/choose_escalation.py chooses a threshold from")
    p.add_argument("--crop-rereads", action="store_true",
                   help="with --no-escalation: also ask every zoomed record again on its RoI crop alone (method "
                   "qzoom_reread), so jobs/choose_escalation.py can score EscalationConfig.reread_crop_below")
    p.add_argument("--out", default="runs/eval")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    from qzoom_ray.config import EngineConfig

    cfg = EngineConfig.from_yaml(args.config) if args.config else EngineConfig()
    data = cfg.model_dump()
    if args.model:
        data["model"]["path"] = args.model
    if args.max_new_tokens:
        data["generation"]["max_new_tokens"] = args.max_new_tokens
    if args.gate_thresh is not None:
        data["zoom"]["gate_thresh"] = args.gate_thresh
    if args.roi_thresh is not None:
        data["zoom"]["roi_thresh"] = args.roi_thresh
    if args.threads:
        data["torch_threads"] = args.threads
    if args.no_escalation:
        data["escalation"] = None
    return EngineConfig.model_validate(data)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from qzoom_ray.eval.data import load_labelled
    from qzoom_ray.eval.evaluate import EvalSettings, run_evaluation
    from qzoom_ray.eval.report import write_report

    settings = EvalSettings(
        baseline_budgets=args.baseline_budgets,
        qzoom_budgets=args.qzoom_budgets,
        batch_size=args.batch_size,
        min_tokens=args.min_tokens,
        rate_basis=args.rate_basis,
        paper_qzoom_budget=args.paper_budget,
        save_roi_maps=not args.no_roi_maps,
        oracle_budgets=args.oracle_budgets,
        crop_rereads=args.crop_rereads,
    )
    if args.crop_rereads and not args.no_escalation:
        print("error: --crop-rereads scores re-reads of plain answers: add --no-escalation", file=sys.stderr)
        return 2
    rows = load_labelled(args.data, args.limit, args.metric)
    print(f"{len(rows)} records from {args.data}", flush=True)
    config = build_config(args)
    baseline_config = None
    title = f"{args.data} ({len(rows)} records)"
    if args.baseline_model:
        data = config.model_dump()
        data["model"].update(path=args.baseline_model, heads_path=None, require_heads=False, direct_route_path=None)
        baseline_config = type(config).model_validate(data)
        title += f"; baseline: {args.baseline_model}, Q-Zoom: {config.model.path}"
    runs = run_evaluation(rows, config, settings, progress=lambda m: print(m, flush=True),
                          baseline_config=baseline_config)
    report = write_report(runs, settings, args.out, title=title)
    print(report["markdown"])
    print(f"wrote {args.out}/summary.csv, summary.md, tradeoff.json, pareto.png, predictions.parquet, confidence.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
