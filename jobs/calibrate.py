"""Choose tau_gate and tau_roi on a validation set and write them into a config YAML.

    python jobs/calibrate.py --model models/tiny-qzoom --data data/synth-val.parquet \
        --min-tokens 64 --max-tokens 256 --reference-budget 1024 --max-drop 0.01 \
        --config-in configs/local.yaml --config-out configs/local-calibrated.yaml

Targets: ``--target accuracy`` (default): fewest zooms whose accuracy stays within --max-drop of the
baseline at --reference-budget (or of the best pair); ``--target zoom_rate``: best accuracy with at
most --max-zoom-rate of the records zoomed. ``--by-budget`` files the pair under the --max-tokens budget
(``zoom.thresholds_by_budget``), so one config can carry a pair per serving budget. Runs in-process (a validation set is small); in a
cluster, submit it as a Ray job on a GPU node.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="labelled Parquet/JSONL (qzoom_ray.eval.data format)")
    p.add_argument("--limit", type=int)
    p.add_argument("--min-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=576)
    p.add_argument("--roi-grid", default="0.05,0.1,0.15,0.2,0.3", help="candidate tau_roi values")
    p.add_argument("--roi-thresh-mode", choices=["absolute", "peak_relative"], default="absolute",
                   help="how --roi-grid values are read (ZoomConfig.roi_thresh_mode); written into the config")
    p.add_argument("--roi-margin", type=float, default=0.0,
                   help="grow every box by this share of the image side (ZoomConfig.roi_margin); written into the config")
    p.add_argument("--roi-max-downscale", type=float, default=None,
                   help="cap every box so its crop is read at >= 1/this of source resolution "
                   "(ZoomConfig.roi_max_downscale); written into the config")
    p.add_argument("--by-budget", action="store_true",
                   help="write the pair under zoom.thresholds_by_budget[--max-tokens] (used by records at that budget) "
                   "instead of the global zoom.gate_thresh / roi_thresh")
    p.add_argument("--direct-route-path", default=None,
                   help="checkpoint whose decoder answers the records the gate does not zoom (ModelConfig."
                   "direct_route_path), as served; default: --config-in's model.direct_route_path; 'none': no direct route")
    p.add_argument("--reference-budget", type=int, help="baseline Max-N whose accuracy is the reference")
    p.add_argument("--target", choices=["accuracy", "zoom_rate"], default="accuracy")
    p.add_argument("--max-drop", type=float, default=0.01, help="accuracy (fraction) allowed below the reference")
    p.add_argument("--max-zoom-rate", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--config-in", help="YAML to copy (default: a new file with only zoom thresholds)")
    p.add_argument("--config-out", required=True)
    p.add_argument("--report", help="write the choice and the frontier (JSON) here")
    args = p.parse_args()

    from qzoom_ray.config import ModelConfig
    from qzoom_ray.eval.data import load_labelled
    from qzoom_ray.model.loader import load_model
    from qzoom_ray.train.calibrate import choose_thresholds, collect_table, direct_route_of, write_thresholds

    rows = load_labelled(args.data, limit=args.limit)
    direct_route = direct_route_of(args.direct_route_path, args.config_in)
    loaded = load_model(ModelConfig(path=args.model, direct_route_path=direct_route))
    grid = [float(v) for v in args.roi_grid.split(",")]
    table = collect_table(loaded, rows, args.min_tokens, args.max_tokens, grid, args.reference_budget, args.batch_size,
                          roi_thresh_mode=args.roi_thresh_mode, roi_margin=args.roi_margin,
                          roi_max_downscale=args.roi_max_downscale)
    choice = choose_thresholds(table, args.target, args.max_drop, args.max_zoom_rate)
    note = (f"{args.target} target on {len(rows)} records of {Path(args.data).name} at Max-{args.max_tokens}: accuracy "
            f"{choice['accuracy']:.3f}, zoom rate {choice['zoom_rate']:.3f}")
    write_thresholds(args.config_in or args.config_out, args.config_out, choice["tau_gate"], choice["tau_roi"], note,
                     roi_thresh_mode=args.roi_thresh_mode, roi_margin=args.roi_margin,
                     budget=args.max_tokens if args.by_budget else None, roi_max_downscale=args.roi_max_downscale)
    choice["direct_route_path"] = direct_route
    choice["roi_thresh_mode"] = args.roi_thresh_mode
    choice["roi_margin"] = args.roi_margin
    choice["roi_max_downscale"] = args.roi_max_downscale
    if args.report:
        Path(args.report).write_text(json.dumps(choice, indent=2))
    print(json.dumps({k: v for k, v in choice.items() if k != "frontier"}, indent=2))


if __name__ == "__main__":
    main()
