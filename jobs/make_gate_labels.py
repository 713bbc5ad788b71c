"""Stage-3 data as a Ray Data job: answers at a ladder of budgets per question (Parquet -> Parquet).

    python jobs/make_gate_labels.py --config configs/train-gate-labels.yaml

Output columns: id, image, question, answers, budgets, ms_answers, ms_correct, kind (hard / easy /
unstable / hallucinated / non_monotonic, spec §2.3), wrong. ``jobs/train_gate.py`` re-applies the
consistency filter and the seeded 1:1 hard/easy mix.
"""


import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="LadderJob YAML")
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--limit", type=int)
    args = p.parse_args()
    from qzoom_ray.train.cli import apply_overrides, init_ray
    from qzoom_ray.train.datajobs import LadderJob, run_ladder

    job = LadderJob.from_yaml(args.config)
    apply_overrides(job, args, ("input", "output", "concurrency", "limit"))
    init_ray()
    print(json.dumps(run_ladder(job), indent=2))


if __name__ == "__main__":
    main()
