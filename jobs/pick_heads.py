"""Rank (layer, head) pairs of a backbone by how well their answer->image attention hits a labelled
evidence box, to choose ``grounding_heads`` for stage-1 pseudo labels on a new backbone.

    python jobs/pick_heads.py --model models/tiny-base --data data/synth-val.parquet --limit 64 --top 4
"""

from __future__ import annotations

import argparse
import json

import yaml


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (heads optional)")
    p.add_argument("--data", required=True, help="Parquet with image, question, answer(s), evidence_box")
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--budget", type=int, default=576, help="image budget in tokens (min = max)")
    p.add_argument("--pad-to-square", action="store_true")
    p.add_argument("--answers", choices=["ground_truth", "model"], default="ground_truth")
    p.add_argument("--top", type=int, default=4, help="heads in the suggested grounding set")
    p.add_argument("--query-rows", choices=["answer", "with_last_prompt"], default="answer",
                   help="rows whose attention is read (PseudoLabelConfig.query_rows)")
    p.add_argument("--out", help="write the full ranking (JSON) here")
    args = p.parse_args()

    import pyarrow.parquet as pq

    from qzoom_ray.config import ModelConfig
    from qzoom_ray.train.pseudo import AttentionReader, rank_heads, top_heads
    from qzoom_ray.train.rayio import plain

    rows = [plain(r) for r in pq.read_table(args.data).slice(0, args.limit).to_pylist()]
    reader = AttentionReader(ModelConfig(path=args.model, require_heads=False), args.budget, args.pad_to_square,
                             query_rows=args.query_rows)
    ranked = rank_heads(reader, rows, answer_source=args.answers)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(ranked, fh, indent=2)
    for d in ranked[:10]:
        print(f"layer {d['layer']:>3} head {d['head']:>3}  peak_hit {d['peak_hit']:.2f}  mass {d['mass']:.3f}  "
              f"area {d['area']:.3f}  lift {d['lift']:.2f}")
    print(yaml.safe_dump({"grounding_heads": top_heads(ranked, args.top)}, sort_keys=False))


if __name__ == "__main__":
    main()
