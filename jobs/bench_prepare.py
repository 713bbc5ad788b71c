"""Per-record CPU and vision-tower costs, with and without the engine's two shortcuts, in one run.

    python jobs/bench_prepare.py                                   # synthetic JPEG pages, embedded tiny model
    python jobs/bench_prepare.py --data data/val-400.parquet --budgets 256,1024

* ``prepare``: decode + processor on the full-resolution image (the stock path) against decode +
  ``presize_image`` + processor (the engine's path); the patches are compared for equality too.
* vision tower: ms per image with the stock patch Conv3d against ``LinearPatchEmbed``, on the same
  batch of prepared records.

Prints ms per record and the ratio for each budget, all measured in this run on this machine.
"""

from __future__ import annotations

import argparse
import logging
import time
from functools import partial


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:tiny", help="checkpoint dir or hub id (default: embedded tiny)")
    p.add_argument("--data", default=None, help="a labelled Parquet (jobs/make_synth.py); default: synthetic pages")
    p.add_argument("--records", type=int, default=48, help="records per measurement")
    p.add_argument("--budgets", default="256,1024", help="visual-token budgets (max_pixels / 28^2)")
    p.add_argument("--min-tokens", type=int, default=16, help="lower visual-token budget")
    p.add_argument("--batch", type=int, default=8, help="images per vision-tower call")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (best is reported)")
    return p.parse_args()


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    import numpy as np
    import torch

    from qzoom_ray.bench import bench_records
    from qzoom_ray.config import EngineConfig
    from qzoom_ray.images import load_image
    from qzoom_ray.model.engine import QZoomEngine
    from qzoom_ray.model.patch_embed import LinearPatchEmbed
    from qzoom_ray.model.preprocess import presize_image
    from qzoom_ray.model.processor import image_size_kwargs

    engine = QZoomEngine(EngineConfig.model_validate({"model": {"path": args.model}, "zoom": {"mode": "baseline"}}))
    if args.data:
        from qzoom_ray.eval.data import load_labelled

        images = [row.image for row in load_labelled(args.data, limit=args.records)]
    else:
        images = [r.image for r in bench_records(args.records)]
    ip = engine.processor.image_processor
    visual = engine.adapter.model.model.visual
    fast = visual.patch_embed
    if not isinstance(fast, LinearPatchEmbed):
        raise SystemExit("this model's vision tower has no plain patch Conv3d to compare")
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

    stock = Qwen2_5_VisionPatchEmbed(ip.patch_size, ip.temporal_patch_size, 3, fast.proj.out_channels)
    stock.proj = fast.proj  # same weight, stock forward
    px = engine.adapter.token_px**2
    print(f"model: {engine.loaded.source}  images: {len(images)}  torch threads: {torch.get_num_threads()}")
    for budget in (int(b) for b in args.budgets.split(",")):
        lo, hi = min(args.min_tokens, budget) * px, budget * px
        size = image_size_kwargs(lo, hi)

        def stock_prep(size=size):
            return [ip(images=[load_image(b)], return_tensors="np", **size) for b in images]

        def engine_prep(lo=lo, hi=hi, size=size):
            return [
                ip(images=[presize_image(load_image(b), ip, lo, hi, 200.0)], return_tensors="np", **size)
                for b in images
            ]

        same = all(
            np.array_equal(a["pixel_values"], b["pixel_values"])
            for a, b in zip(stock_prep(), engine_prep(), strict=True)
        )
        t_stock = best_seconds(stock_prep, args.repeats) / len(images)
        t_fast = best_seconds(engine_prep, args.repeats) / len(images)
        print(
            f"Max-{budget:<5} prepare: stock {1000 * t_stock:7.1f} ms/rec  pre-resized {1000 * t_fast:7.1f} ms/rec  "
            f"speedup {t_stock / t_fast:.2f}x  identical patches: {same}"
        )
        outs = engine_prep()[: args.batch]
        grid = torch.tensor(np.concatenate([o["image_grid_thw"] for o in outs]))
        pixels = torch.from_numpy(np.concatenate([o["pixel_values"] for o in outs])).to(engine.device)
        tower = {}
        with torch.inference_mode():
            for name, module in (("conv", stock), ("linear", fast)):
                visual.patch_embed = module
                engine.adapter.encode_images(pixels, grid)  # warm-up
                run = partial(engine.adapter.encode_images, pixels, grid)
                tower[name] = best_seconds(run, args.repeats) / len(outs)
        visual.patch_embed = fast
        print(
            f"Max-{budget:<5} vision tower: Conv3d {1000 * tower['conv']:7.2f} ms/img  linear "
            f"{1000 * tower['linear']:7.2f} ms/img  speedup {tower['conv'] / tower['linear']:.2f}x"
        )


if __name__ == "__main__":
    main()
