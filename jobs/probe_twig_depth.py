"""Compare twig branch depths (K, T) on a backbone before committing to a stage-1 run: each candidate twig is
trained on the same stage-1 labels from cached inputs at one budget, and scored by how often its hottest
cell lands in the evidence box of held-out questions (per template when --questions gives them).

    python jobs/probe_twig_depth.py --model models/tiny-qzoom-s2 --labels data/stage1-labels-all \\
        --questions 'data/synth-train-questions*.parquet' --depths 1:2,0:2 --budget 128 \\
        --n-train 2000 --n-held-out 400 --epochs 8 --lr 3e-4 --out runs/depth-probe.json

Runs in one process (no Ray): the candidates share one cache, and each is minutes on a CPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
from pathlib import Path


def parse_depths(text: str) -> list[tuple[int, int]]:
    """'1:2,0:3' -> [(1, 2), (0, 3)]."""
    out = []
    for part in text.split(","):
        k, sep, t = part.strip().partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"depth {part!r} is not K:T")
        out.append((int(k), int(t)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint whose base layers the twigs are copied from")
    p.add_argument("--labels", required=True, help="stage-1 label Parquet (file or folder)")
    p.add_argument("--questions", help="glob of question Parquets: their 'template' (else 'question_type') "
                   "groups the hit rates; without it, one group")
    p.add_argument("--depths", type=parse_depths, default=[(1, 2), (0, 2)], help="K:T candidates, comma-separated")
    p.add_argument("--budget", type=int, default=128, help="image budget the twigs are trained and scored at")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-held-out", type=int, default=400)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the results (JSON) here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import numpy as np
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    import torch

    from qzoom_ray.config import ModelConfig
    from qzoom_ray.model.loader import load_model
    from qzoom_ray.train.depth_probe import cache_samples, probe_depths
    from qzoom_ray.train.rayio import plain

    torch.set_num_threads(args.threads)
    groups = None
    if args.questions:
        groups = {}
        for f in sorted(glob.glob(args.questions)):
            names = pq.read_schema(f).names
            col = "template" if "template" in names else "question_type"
            for r in pq.read_table(f, columns=["id", col]).to_pylist():
                groups[str(r["id"])] = str(r[col])
    table = ds.dataset(args.labels, format="parquet").to_table(filter=ds.field("valid"))
    n = min(table.num_rows, args.n_train + args.n_held_out)
    if n < 2:
        raise SystemExit(f"{args.labels} has {table.num_rows} valid label rows; the probe needs at least 2")
    pick = np.random.default_rng(args.seed).permutation(table.num_rows)[:n]
    n_train = n - min(args.n_held_out, n - 1)  # too few rows: the training share shrinks first
    loaded = load_model(ModelConfig(path=args.model, require_heads=False, device="cpu", dtype="float32"))
    rows = [plain(r) for r in table.take(pick).to_pylist()]
    train = cache_samples(loaded, rows[:n_train], args.budget, groups)
    held_out = cache_samples(loaded, rows[n_train:], args.budget, groups)
    results = probe_depths(loaded, train, held_out, args.depths, epochs=args.epochs, lr=args.lr,
                           batch_size=args.batch_size, seed=args.seed)
    for r in results:
        cells = "  ".join(f"{g} {v[0]:.1%} (n={v[1]})" for g, v in r["held_out_hit"].items())
        print(f"K={r['twig_K']} T={r['twig_T']}: held-out hit {cells}; loss {r['loss_by_epoch'][0]:.3f} -> "
              f"{r['loss_by_epoch'][-1]:.3f}; {r['seconds']:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                              "results": results}, indent=2))


if __name__ == "__main__":
    main()
