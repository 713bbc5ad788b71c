"""Stage 2: mine RoI-path regressions (Ray Data) and fine-tune the decoder on them (Ray Train).

    python jobs/train_sft.py --config configs/train-sft-tiny.yaml
    python jobs/train_sft.py --config ... --skip-mining      # reuse mined rows in `mined`

Mining answers every question with the base path and the always-on RoI path of the stage-1
checkpoint and judges both (ground-truth metrics by default, an LLM judge optionally); training
rows = regressions (+ improvements at `mixing_ratio`). With `source: pseudo_labels` there is no mining:
every valid stage-1 row is cropped at its pseudo-RoI box and taught the base model's own high-res answer.
"""


import argparse
import json
import logging


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="SftJob YAML")
    p.add_argument("--skip-mining", action="store_true")
    p.add_argument("--steps", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--gpu", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    from qzoom_ray.train.cli import init_ray
    from qzoom_ray.train.datajobs import SftJob, mine_regressions, train_on_mined

    job = SftJob.from_yaml(args.config)
    if args.steps:
        job.train.steps = args.steps
    if args.workers:
        job.train.num_workers = args.workers
    if args.gpu:
        job.train.use_gpu = True
    init_ray()
    if not args.skip_mining and job.source == "mined":
        print(json.dumps(mine_regressions(job)))
    entry = train_on_mined(job)
    print(json.dumps({k: v for k, v in entry.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
