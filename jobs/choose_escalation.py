"""Choose the escalation threshold (EngineConfig.escalation) from plain evaluation runs on validation sets.

    # one plain run per validation set: Q-Zoom at the budgets to escalate between, and the reference
    python jobs/evaluate.py --data data/val-a.parquet --config configs/engine.yaml --no-escalation \\
        --baseline-budgets 1024 --qzoom-budgets 128,256 --out runs/val-a
    python jobs/choose_escalation.py --runs runs/val-a,runs/val-b --rule accuracy --min-speedup 5 \\
        --config-in configs/engine.yaml --config-out configs/engine.yaml --report runs/escalation.json

Every single step from the lowest Q-Zoom budget, and every chain through all of them, is scored at each threshold
of --grid from the runs' own answers (accuracy exact; time = the model time of every answer a record gets), and
judged against the reference: by default each run's most accurate baseline budget. --rule accuracy takes the
highest worst-set margin over the reference among settings at least --min-speedup x as fast on every set;
--rule speed the fastest within --max-drop points of the reference on every set. Fix the rule before looking at
the test set.

Timings on a busy or small machine drift between runs; repeats of a set's run joined with + (--runs a+a2,b+b2)
count as one set whose model times are the repeats' means (their answers must be the same).

Runs made with --crop-rereads (every zoomed answer also asked again on its RoI crop alone) add each setting with
every crop re-read threshold of --grid (EscalationConfig.reread_crop_below):

    python jobs/evaluate.py ... --no-escalation --crop-rereads --out runs/val-a
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qzoom_ray.eval.escalation import Rung, Scored
    from qzoom_ray.eval.escalation_runs import Reference
    from qzoom_ray.eval.paired import PairedGap


def _grid(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds are log-probabilities <= 0, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from qzoom_ray.eval.escalation import DEFAULT_GRID

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, help="comma-separated jobs/evaluate.py output folders, one per set; "
                   "repeats of one set joined with + (a+a2,b+b2) have their model times averaged")
    p.add_argument("--reference-budget", type=int, help="baseline Max-N to judge against (default: each run's peak)")
    p.add_argument("--grid", type=_grid, default=list(DEFAULT_GRID), help="thresholds tried per step, comma-separated; write --grid=-0.1,-0.5 (a bare value starting with - reads as an option)")
    p.add_argument("--rule", choices=["accuracy", "speed"], default="accuracy")
    p.add_argument("--min-speedup", type=float, default=4.0, help="--rule accuracy: least speed-up on every set")
    p.add_argument("--max-drop", type=float, default=0.5, help="--rule speed: most points below the reference")
    p.add_argument("--top", type=int, default=12, help="settings shown, best first")
    p.add_argument("--no-losses", action="store_true", help="leave out the chosen setting's per-group table "
                   "(where it gains and loses against the reference, by the answer each record ends with)")
    p.add_argument("--config-in", help="YAML to copy the escalation into (default: --config-out)")
    p.add_argument("--config-out", help="write the chosen escalation here")
    p.add_argument("--report", help="write every setting's figures and the choice (JSON) here")
    return p.parse_args(argv)


def chosen_intervals(choice: Scored, read: list[tuple[dict[int, Rung], Reference]],
                     rereads: list[dict[int, Rung]]) -> list[PairedGap]:
    """The chosen setting against each set's reference, record by record (``eval.paired``)."""
    from qzoom_ray.eval.escalation import escalated_records
    from qzoom_ray.eval.paired import paired_gap

    out = []
    for (ladder, ref), rr in zip(read, rereads, strict=True):
        score, seconds, _ = escalated_records(ladder, choice.steps, choice.thresholds, rr, choice.reread_below)
        out.append(paired_gap(score, ref.record_scores, seconds, ref.record_seconds))
    return out


def chosen_losses(choice: Scored, ladder: dict[int, Rung], ref: Reference, rereads: dict[int, Rung],
                  run_dir: Path) -> str:
    """The chosen setting against the reference per record group, by the answer each record ends with."""
    from qzoom_ray.eval.escalation import path_names, walk
    from qzoom_ray.eval.escalation_runs import record_groups
    from qzoom_ray.eval.losses import losses_by_group, losses_text

    score, _, _, source = walk(ladder, choice.steps, choice.thresholds, rereads, choice.reread_below)
    losses = losses_by_group(score, ref.record_scores, source, path_names(choice.steps), record_groups(run_dir))
    return losses_text(losses, ref.name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qzoom_ray.eval.escalation import candidate_outcomes, choose, escalation_config, rank, score_settings
    from qzoom_ray.eval.escalation_runs import averaged_repeats, read_rereads, read_run, write_escalation

    sets = [[Path(r) for r in spec.split("+") if r.strip()] for spec in args.runs.split(",") if spec.strip()]
    runs = [group[0] for group in sets]
    merged = [averaged_repeats([(*read_run(r, args.reference_budget), read_rereads(r)) for r in group],
                               [str(r) for r in group]) for group in sets]
    read = [(ladder, ref) for ladder, ref, _ in merged]
    rereads = [rr for _, _, rr in merged]
    for group in sets:
        if len(group) > 1:
            print(f"{group[0]}: model times averaged over {len(group)} repeats ({', '.join(map(str, group))})")
    if any(rereads) and not all(rereads):
        print("warning: only some runs have crop re-reads (--crop-rereads); re-read settings are not scored",
              file=sys.stderr)
    for r, (ladder, ref), rr in zip(runs, read, rereads, strict=True):
        extra = f"; crop re-reads at Max-{'/'.join(map(str, sorted(rr)))}" if rr else ""
        print(f"{r}: Q-Zoom Max-{'/'.join(map(str, sorted(ladder)))}, reference {ref.name} {ref.accuracy:.1f} %{extra}")
    scored = score_settings([candidate_outcomes(ladder, args.grid, rr) for (ladder, _), rr in zip(read, rereads,
                                                                                                  strict=True)],
                            [(ref.accuracy, ref.seconds) for _, ref in read])
    ranked = rank(scored, args.rule, args.min_speedup, args.max_drop)  # the settings the rule may pick first
    choice = choose(scored, args.rule, args.min_speedup, args.max_drop)
    print("\n| setting | rule may pick | " + " | ".join(f"{r.name}: points, speed-up, re-answered" for r in runs) + " |")
    print("|---|---|" + "---|" * len(runs))
    for s, ok in ranked[: args.top]:
        cells = [f"{m:+.1f}, {x:.2f}x, {e:.0%}" for m, x, e in zip(s.margins, s.speedups, s.escalated, strict=True)]
        print(f"| {s.name} | {'yes' if ok else 'no'} | " + " | ".join(cells) + " |")
    if choice is None:
        print(f"\nno setting meets --rule {args.rule} on every set", file=sys.stderr)
        return 1
    print(f"\nchosen ({args.rule}): {choice.name}; worst set {min(choice.margins):+.1f} points at "
          f"{min(choice.speedups):.2f}x")
    intervals = chosen_intervals(choice, read, rereads)
    for r, gap in zip(runs, intervals, strict=True):
        lo, hi = gap.gap_interval
        print(f"  {r.name}: {gap.gap_points:+.1f} points [{lo:+.1f}, {hi:+.1f}], {gap.discordant} of {gap.n} "
              f"records differ from the reference (95 % paired bootstrap; the choice itself was made on these sets)")
    if not args.no_losses:
        for r, ((ladder, ref), rr) in zip(runs, zip(read, rereads, strict=True), strict=True):
            print(f"\nwhere the choice gains and loses on {r.name}:\n" + chosen_losses(choice, ladder, ref, rr, r))
    block = escalation_config(choice) if len(choice.steps) > 1 else None
    if args.config_out:
        if block is None:
            print("the choice is a plain budget: no escalation to write", file=sys.stderr)
            return 1
        note = (f"jobs/choose_escalation.py --rule {args.rule} on {', '.join(r.name for r in runs)}: worst set "
                f"{min(choice.margins):+.1f} points at {min(choice.speedups):.2f}x the reference")
        write_escalation(args.config_in or args.config_out, args.config_out, block, note)
        print(f"wrote escalation {block} into {args.config_out}")
    if args.report:
        Path(args.report).write_text(json.dumps({
            "rule": args.rule, "min_speedup": args.min_speedup, "max_drop": args.max_drop,
            "runs": [str(r) for r in runs], "references": [ref.name for _, ref in read],
            "choice": choice.__dict__ | {"escalation": block, "intervals": [g.as_dict() for g in intervals]},
            "settings": [s.__dict__ | {"qualifies": ok} for s, ok in ranked],
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
