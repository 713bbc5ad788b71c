"""Training history and model card of a Q-Zoom checkpoint.

Every stage appends an entry to ``qzoom_training.json`` (carried over from the checkpoint it started
from), saves its loss curve, and re-renders ``README.md``: so a checkpoint always says which data,
stages and settings produced it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qzoom_ray.train.common import HISTORY_FILE

STAGE_TITLES = {
    "rpn": "Stage 1: self-distilled RoI predictor (twig layers, selective BCE on pseudo-label maps)",
    "sft": "Stage 2: targeted post-SFT (decoder layers + lm_head on mined regressions, {positions})",
    "gate": "Stage 3: consistency-aware gate (gate layers + head, BCE on budget-ladder labels)",
    "calibration": "Threshold calibration (tau_gate, tau_roi on a validation set)",
}


def stage_title(entry: dict[str, Any]) -> str:
    """The card's heading for one history entry (stage 2 says which rows it learned from)."""
    data = entry.get("data") or {}
    cfg = entry.get("config") or {}
    positions = "aligned RoI positions" if cfg.get("reuse_src_pos", True) else "fresh-grid RoI positions"
    if entry["stage"] == "sft" and data.get("source") == "pseudo_labels":
        direct = " and direct rows of the base's own answers" if data.get("direct_rows") else ""
        return f"Stage 2: post-SFT (decoder layers + lm_head on crops of the stage-1 pseudo-RoI{direct}, {positions})"
    if entry["stage"] == "sft" and data.get("select") == "zoomed":
        return (f"Stage 2c: zoom decoder post-SFT (decoder layers + lm_head on every crop its own twig served, "
                f"taught the ground truth; {positions})")
    if entry["stage"] == "sft":
        return STAGE_TITLES["sft"].format(positions=positions)
    if entry["stage"] == "rpn" and cfg.get("new_heads"):
        return (f"Stage 1b: twig and gate rebuilt at K={cfg.get('twig_K')}, T={cfg.get('twig_T')} from this model's "
                "base layers (selective BCE on pseudo-label maps)")
    if entry["stage"] == "rpn" and not cfg.get("twig_init", True):
        return "Stage 1b: twig refit from its own weights (selective BCE on pseudo-label maps)"
    return STAGE_TITLES.get(entry["stage"], entry["stage"])


def read_history(ckpt: Path) -> list[dict[str, Any]]:
    path = ckpt / HISTORY_FILE
    return json.loads(path.read_text()) if path.exists() else []


def append_history(out: Path, init_from: Path, entry: dict[str, Any], losses: list[float]) -> None:
    history = read_history(init_from) + [entry]
    for old in init_from.glob("loss-*.png") if init_from.is_dir() else []:
        target = out / old.name
        if not target.exists():
            target.write_bytes(old.read_bytes())
    idx = len(history)
    if losses:
        fig = out / f"loss-{idx}-{entry['stage']}.png"
        if _plot_losses(losses, fig, stage_title(entry)):
            entry["figure"] = fig.name
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=2))


def _plot_losses(losses: list[float], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title[:70], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):  # e.g. several label runs as one data_path
        return " + ".join(_fmt(x) for x in v)
    return "-" if v is None else str(v)


def write_model_card(out: Path) -> Path:
    history = read_history(out)
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    lines = [
        "# Q-Zoom checkpoint (qzoom-ray)",
        "",
        "A Qwen2.5-VL checkpoint with Q-Zoom heads in the authors' released layout: the stock model's weights "
        "plus `model.twig_layers.*` (RoI predictor), `model.high_res_layers.*` + `model.high_res_head.*` (gate), "
        "and the branch fields in `config.json`. Load it with `qzoom_ray.model.loader.load_model`.",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for k in ("twig_K", "twig_T", "enable_high_res", "high_res_K", "high_res_T", "reuse_src_pos"):
        lines.append(f"| `{k}` | {_fmt(cfg.get(k))} |")
    lines += ["", "## Stages", ""]
    if not history:
        lines.append("No training history (heads as initialised).")
    for i, e in enumerate(history, 1):
        lines += [f"### {i}. {stage_title(e)}", ""]
        data = e.get("data") or {}
        lines.append(f"- started from: `{e.get('init_from')}`")
        lines.append("- data: " + ", ".join(f"{k}={_fmt(v)}" for k, v in data.items()))
        if e.get("steps") is not None:
            lines.append(f"- steps: {e['steps']}, samples seen: {_fmt(e.get('samples_seen'))}, "
                         f"loss {_fmt(e.get('first_loss'))} -> {_fmt(e.get('final_loss'))}, "
                         f"train time {_fmt(e.get('train_seconds'))} s")
        for k, v in (e.get("result") or {}).items():
            lines.append(f"- {k}: {_fmt(v)}")
        c = e.get("config") or {}
        keys = ("twig_K", "twig_T", "lr", "batch_size", "num_workers", "seed", "budget_tokens", "zoom_budgets")
        lines.append("- settings: " + ", ".join(f"{k}={_fmt(c[k])}" for k in keys if c.get(k) is not None))
        if e.get("figure"):
            lines += ["", f"![loss curve]({e['figure']})"]
        lines.append("")
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
