"""Engine throughput at batch 1 vs batch N, and visual tokens per record of baseline vs Q-Zoom.

    python jobs/bench_engine.py                      # embedded tiny model, CPU
    python jobs/bench_engine.py --model /path/ckpt --records 64 --batch 8 --max-tokens 576

Prints records/s for each setting, ``batch speedup: N.Nx`` and the visual-token table, all measured
in this one run on this machine.
"""

from __future__ import annotations

import argparse
import logging
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:tiny", help="checkpoint dir or hub id (default: embedded tiny)")
    p.add_argument("--records", type=int, default=32, help="records per measurement")
    p.add_argument("--batch", type=int, default=8, help="the batched setting's max_batch_size")
    p.add_argument("--min-tokens", type=int, default=64, help="lower visual-token budget of the global view")
    p.add_argument("--max-tokens", type=int, default=256, help="upper visual-token budget of the global view")
    p.add_argument("--full-tokens", type=int, default=1024, help="the high-budget baseline Q-Zoom competes with")
    p.add_argument("--new-tokens", type=int, default=8, help="max_new_tokens")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per setting (best is reported)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    from qzoom_ray.bench import bench_records, measure, model_seconds, token_table
    from qzoom_ray.config import EngineConfig
    from qzoom_ray.model.engine import QZoomEngine

    px = 28 * 28
    base = {
        "model": {"path": args.model},
        "zoom": {"min_pixels": args.min_tokens * px, "max_pixels": args.max_tokens * px},
        "generation": {"max_new_tokens": args.new_tokens},
    }
    engine = QZoomEngine(EngineConfig.model_validate({**base, "max_batch_size": 1}))
    print(f"model: {engine.loaded.source}  device: {engine.device}  dtype: {engine.adapter.dtype}")
    records = bench_records(args.records)
    engine.generate(records[:2])  # warm-up: kernels, allocator, tokenizer caches

    rows = []
    for batch in (1, args.batch):
        engine.config.max_batch_size = batch
        rate, results = measure(engine, records, args.repeats)
        zoom_rate = sum(r.zoomed for r in results) / len(results)
        model_rate = len(results) / model_seconds(results)
        rows.append((batch, rate, model_rate))
        print(
            f"qzoom batch {batch:>3}: {rate:8.2f} records/s end to end, {model_rate:8.2f} records/s model-only "
            f"(excl. CPU image prep)   zoom rate {zoom_rate:.0%}"
        )
    print(f"batch speedup: {rows[1][1] / rows[0][1]:.1f}x (model-only {rows[1][2] / rows[0][2]:.1f}x)")

    baselines = {}
    for label, tokens in (("baseline max", args.max_tokens), ("baseline full", args.full_tokens)):
        cfg = EngineConfig.model_validate(
            {**base, "zoom": {"mode": "baseline", "min_pixels": args.min_tokens * px, "max_pixels": tokens * px},
             "max_batch_size": args.batch}
        )
        baselines[f"{label}-{tokens}"] = measure(QZoomEngine(cfg, loaded=engine.loaded), records, args.repeats)
    engine.config.max_batch_size = args.batch
    baselines[f"qzoom max-{args.max_tokens}"] = measure(engine, records, args.repeats)
    print(token_table(baselines))
    t = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"({len(records)} records, {args.repeats} repeats, best of repeats, {t})")


if __name__ == "__main__":
    main()
