"""Linear probes on a model's visual tokens: is the shape, the colour, the side of the image there?

    python jobs/probe_tower.py --model embedded:tiny-base                     # 200 scenes at Max-64, ~1 min on 2 CPUs
    python jobs/probe_tower.py --model models/tiny-base --budget 128 --decoder --json runs/probe.json

Renders benchmark scenes (qzoom_ray.synth, ordinary split), takes the merger's output at one budget
(the vectors the decoder receives) and fits a linear classifier per fact on the tokens that lie on an
object, training on 70 % of the images and testing on the rest; --decoder probes the same tokens after
each decoder layer too. High probe accuracy with low question accuracy means the decoder, not the
tower, is what falls short (docs/benchmark.md).
"""

from __future__ import annotations

import argparse


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:tiny-base", help="checkpoint: folder, embedded:NAME or hub id")
    p.add_argument("--n", type=int, default=200, help="images rendered (30 %% are the test set)")
    p.add_argument("--budget", type=int, default=64, help="visual-token budget (Max-N) of the whole image")
    p.add_argument("--template", default="scene_colour", help="benchmark template the images are drawn for")
    p.add_argument("--seed", type=int, default=555, help="render seed (records [seed, i])")
    p.add_argument("--decoder", action="store_true", help="also probe the image tokens after each decoder layer")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import json
    from pathlib import Path

    import torch

    from qzoom_ray.config import ModelConfig
    from qzoom_ray.model.loader import load_model
    from qzoom_ray.train.tower_probe import probe_tower

    torch.set_num_threads(args.threads)
    loaded = load_model(ModelConfig(path=args.model, require_heads=False, device="cpu", dtype="float32"))
    results = probe_tower(loaded.adapter.model, loaded.processor, n_images=args.n, budget=args.budget,
                          seed=args.seed, template=args.template, decoder=args.decoder, progress=True)
    print(f"\nlinear probes on {args.model}'s visual tokens, Max-{args.budget}, {args.n} images "
          "(test accuracy; in brackets: always the most common class)")
    print(f"{'hidden state':<12} " + " ".join(f"{h:>16}" for h in results["merger"]))
    for name, probes in results.items():
        print(f"{name:<12} " + " ".join(f"{r.test_accuracy:7.3f} ({r.majority_accuracy:.3f})" for r in probes.values()))
    tokens = {h: f"{r.n_train}/{r.n_test}" for h, r in results["merger"].items()}
    print(f"tokens (train/test): {tokens}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": args.model, "budget": args.budget, "n_images": args.n, "template": args.template,
                   "seed": args.seed, "probes": {name: {h: r.as_dict() for h, r in probes.items()} for name, probes in results.items()}}
        Path(args.json).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
