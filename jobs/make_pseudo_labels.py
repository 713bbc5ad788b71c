"""Stage-1 pseudo labels as a Ray Data job: questions (Parquet) -> denoised tri-state maps (Parquet).

    python jobs/make_pseudo_labels.py --config configs/train-pseudo-labels.yaml
    ray job submit -- python jobs/make_pseudo_labels.py --config ... --concurrency 8 --gpus-per-actor 0.5

Input columns: id, image (bytes), question, answer/answers [, evidence_box]. Output: the same plus
answer, grid_h, grid_w, attn_map, sink_map, labels (1/0/-100, row-major), valid, reason, fg_box, read_box (the
source-pixel region the map was read on: the whole image, or a tile with `labels.tile_fallback`).
"""


import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="PseudoLabelJob YAML")
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--gpus-per-actor", type=float)
    p.add_argument("--limit", type=int)
    args = p.parse_args()
    from qzoom_ray.train.cli import apply_overrides, init_ray
    from qzoom_ray.train.datajobs import PseudoLabelJob, run_pseudo_labels

    job = PseudoLabelJob.from_yaml(args.config)
    apply_overrides(job, args, ("input", "output", "concurrency", "gpus_per_actor", "limit"))
    init_ray()
    print(json.dumps(run_pseudo_labels(job), indent=2))


if __name__ == "__main__":
    main()
