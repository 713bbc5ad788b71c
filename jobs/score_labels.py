"""Score stage-1 pseudo labels against the benchmark's evidence boxes, per question template and split.

    python jobs/score_labels.py data/stage1-labels-s14-a data/stage1-labels-s15-d \
        --questions 'data/synth-train-questions*.parquet' --out runs/label-quality.json

``peak_in_evidence``: the attention map's hottest cell overlaps the evidence box; ``fg_holds_evidence``:
some foreground cell does; ``fg_share``: foreground cells among the labelled (non-ignored) ones;
``answer_right``: the label-time answer matches the ground truth. Groups come from the question rows
(joined on ``id``) when ``--questions`` is given.
"""

from __future__ import annotations

import argparse
import glob
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("labels", nargs="+", help="label Parquet folders or files (jobs/make_pseudo_labels.py output)")
    p.add_argument("--questions", help="glob of the question Parquet files, for template / split groups")
    p.add_argument("--group-by", default="split,template", help="question columns that name a group")
    p.add_argument("--out", help="write the summary as JSON here")
    args = p.parse_args()

    import pyarrow.parquet as pq

    from qzoom_ray.train.common import read_rows
    from qzoom_ray.train.label_quality import LABEL_QUALITY_COLUMNS, summarise_label_quality

    rows = read_rows(args.labels, columns=LABEL_QUALITY_COLUMNS)
    keys = [k.strip() for k in args.group_by.split(",") if k.strip()]
    groups: dict[str, str] = {}
    if args.questions:
        for path in sorted(glob.glob(args.questions)):
            for q in pq.read_table(path, columns=["id", *keys]).to_pylist():
                groups[str(q["id"])] = "/".join(str(q[k]) for k in keys)
    summary = summarise_label_quality(rows, lambda r: groups.get(str(r["id"]), "unknown") if groups else "all")
    print(f"{'group':<28}{'rows':>6}{'valid':>7}{'peak_in_ev':>11}{'fg_holds_ev':>12}{'fg_share':>9}{'ans_right':>10}")
    for name, s in summary.items():
        print(f"{name:<28}{s['rows']:>6}{s['valid']:>7.3f}{s['peak_in_evidence']:>11.3f}"
              f"{s['fg_holds_evidence']:>12.3f}{s['fg_share']:>9.4f}{s['answer_right']:>10.3f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
