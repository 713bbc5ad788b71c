"""The Ray Data halves of the training stages, as configs and functions the job scripts call.

Stage 1 labels (questions -> pseudo-RoI maps), stage 2 mining (+ the SFT run on what was mined)
and stage 3 ladders (answers at a ladder of budgets) each map a Parquet dataset through one model
per actor with :func:`qzoom_ray.train.rayio.map_parquet`. Keeping them here, not in ``jobs/``,
lets tests and notebooks run a stage without going through a command line.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from qzoom_ray.config import StrictModel
from qzoom_ray.train.common import DataPaths, read_rows
from qzoom_ray.train.gate import LadderConfig
from qzoom_ray.train.pseudo import PseudoLabelConfig
from qzoom_ray.train.sft import MineConfig, SftConfig


class MapJob(StrictModel):
    """How a labelling dataset is read, spread over actors and written."""

    input: str = Field(..., description="Parquet file/folder of questions with ground truth.")
    output: str = Field(..., description="Output folder (Parquet files).")
    concurrency: int = Field(1, ge=1, description="Actors (one model each).")
    rows_per_batch: int = Field(16, ge=1, description="Rows handed to an actor at a time.")
    gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    limit: int | None = Field(None, description="First N input rows only.")
    no_progress_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Fail when no block moves for this long; None: never. Ray Data's default (30 min) is shorter than "
        "one actor can take over a block of large images on a CPU, where no block is emitted until it fills.",
    )


def _map(job: MapJob, factory: str, actor_cfg: dict[str, Any]) -> int:
    from qzoom_ray.train.rayio import map_parquet

    return map_parquet(job.input, job.output, factory, actor_cfg, concurrency=job.concurrency,
                       batch_size=job.rows_per_batch, num_gpus=job.gpus_per_actor, num_cpus=job.cpus_per_actor,
                       limit=job.limit, no_progress_timeout_s=job.no_progress_timeout_s)


class PseudoLabelJob(MapJob):
    labels: PseudoLabelConfig


def run_pseudo_labels(job: PseudoLabelJob) -> dict[str, Any]:
    import pyarrow.parquet as pq

    n = _map(job, "qzoom_ray.train.pseudo:labeler_factory", job.labels.model_dump(mode="json"))
    t = pq.read_table(job.output, columns=["valid", "reason"])
    reasons = t.column("reason").to_pylist()
    return {"rows": n, "valid": int(sum(t.column("valid").to_pylist())),
            "reasons": {r: reasons.count(r) for r in sorted(set(reasons))}}


class LadderJob(MapJob):
    ladder: LadderConfig = Field(default_factory=LadderConfig)


def run_ladder(job: LadderJob) -> dict[str, Any]:
    import pyarrow.parquet as pq

    n = _map(job, "qzoom_ray.train.gate:ladder_factory", job.ladder.model_dump(mode="json"))
    kinds = pq.read_table(job.output, columns=["kind"]).column("kind").to_pylist()
    return {"rows": n, "kinds": {k: kinds.count(k) for k in sorted(set(kinds))}}


class SftJob(StrictModel):
    questions: str = Field(..., description="Parquet of questions with ground truth (mining input).")
    mined: str = Field(..., description="Folder for the mined rows (every question, with verdicts).")
    mixing_ratio: float = Field(0.0, ge=0, description="Improvements per regression added to training (authors: 0).")
    concurrency: int = Field(1, ge=1)
    rows_per_batch: int = Field(16, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0)
    limit: int | None = None
    source: Literal["mined", "pseudo_labels"] = Field(
        "mined",
        description="mined: the paper's stage 2 (regressions of the twig's RoI path). pseudo_labels: every valid "
        "stage-1 row, cropped at its pseudo-RoI box, taught the base model's own high-resolution answer; for a "
        "base model that never saw a second image block and a twig too weak to give readable crops yet.",
    )
    pseudo_labels: DataPaths | None = Field(
        None, description="Stage-1 label Parquet file or folder, or a list of them (source: pseudo_labels)."
    )
    roi_pad_cells: int = Field(2, ge=0, description="Margin added around each pseudo-RoI box, in label-grid cells.")
    direct_replay: float = Field(
        0.0, ge=0,
        description="Direct rows (global view, no crop) per zoomed row, each taught the starting checkpoint's own "
        "answer at the training budget (pseudo_labels: computed first, with mine.model; mined: the miner's "
        "direct answers that the judge passed). Stage 2 trains every decoder layer, and with zoomed rows alone "
        "the ungated path drifts; the authors' stage 2 has none.",
    )
    select: Literal["regressions", "zoomed"] = Field(
        "regressions",
        description="Which mined rows are trained on (source: mined). regressions: the paper's (+ improvements at "
        "mixing_ratio). zoomed: every row the RoI path zoomed, taught the ground truth (mine.target: "
        "ground_truth), for a model served with a direct route, whose decoder answers zoomed records only.",
    )
    mine: MineConfig
    train: SftConfig

    @model_validator(mode="after")
    def _zoomed_rows_learn_the_ground_truth(self) -> SftJob:
        if self.select == "zoomed" and (self.source != "mined" or self.mine.target != "ground_truth"):
            # A row wrong on both paths has no correct base answer to teach; only the ground truth is a target.
            raise ValueError("select: zoomed needs source: mined and mine.target: ground_truth")
        return self


def mine_regressions(job: SftJob) -> dict[str, Any]:
    from qzoom_ray.train.rayio import map_parquet

    n = map_parquet(job.questions, job.mined, "qzoom_ray.train.sft:miner_factory", job.mine.model_dump(mode="json"),
                    concurrency=job.concurrency, batch_size=job.rows_per_batch, num_gpus=job.gpus_per_actor,
                    limit=job.limit)
    return {"mined_rows": n}


def direct_replay_rows(job: SftJob, label_rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` seeded questions of the label set, answered plainly by ``job.mine.model`` at its budget (Ray Data)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qzoom_ray.train.rayio import map_parquet

    n = min(n, len(label_rows))
    if n <= 0:
        return []
    pick = np.random.default_rng(job.train.seed).choice(len(label_rows), size=n, replace=False)
    src, out = Path(job.mined) / "direct-questions", Path(job.mined) / "direct"
    for d in (src, out):  # a rerun must not append to the last run's part files
        shutil.rmtree(d, ignore_errors=True)
    src.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{k: label_rows[int(i)][k] for k in ("id", "image", "question")}
                                         for i in sorted(pick)]), src / "part-0.parquet")
    map_parquet(str(src), str(out), "qzoom_ray.train.sft:direct_answerer_factory", job.mine.model_dump(mode="json"),
                concurrency=job.concurrency, batch_size=job.rows_per_batch, num_gpus=job.gpus_per_actor)
    # A record the model could not answer (bad image) teaches nothing.
    return [r for r in pq.read_table(out).to_pylist() if str(r["target"]).strip()]


def train_on_mined(job: SftJob) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from qzoom_ray.train.sft import (
        mined_direct_rows,
        pseudo_roi_rows,
        select_training_rows,
        select_zoomed_rows,
        sft_training_table,
        train_sft,
    )

    if job.source == "pseudo_labels":
        if not job.pseudo_labels:
            raise ValueError("source: pseudo_labels needs `pseudo_labels` (the stage-1 label Parquet)")
        # Not the maps themselves: only what a training row needs.
        cols = ["id", "image", "question", "answer", "grid_h", "grid_w", "valid", "fg_box"]
        labels = read_rows(job.pseudo_labels, cols)
        picked = pseudo_roi_rows(labels, job.roi_pad_cells)
        direct = direct_replay_rows(job, labels, round(job.direct_replay * len(picked))) if picked else []
        summary = {"source": "pseudo_labels", "label_rows": len(labels), "zoomed_rows": len(picked),
                   "direct_rows": len(direct), "training_rows": len(picked) + len(direct)}
        picked = picked + direct
    else:
        # Only the miner's part files: earlier runs left training/ and direct*/ sub-folders beside them.
        rows = read_rows(sorted(str(p) for p in Path(job.mined).glob("*.parquet")))
        picked = (select_zoomed_rows(rows) if job.select == "zoomed"
                  else select_training_rows(rows, job.mixing_ratio, job.train.seed))
        direct = mined_direct_rows(rows, round(job.direct_replay * len(picked)), job.train.seed) if picked else []
        kinds = [r["kind"] for r in rows]
        summary = {"mined": len(rows), "regressions": kinds.count("regression"),
                   "improvements": kinds.count("improvement"), "select": job.select,
                   "zoomed_wrong": sum(1 for r in picked if not r.get("roi_ok")), "direct_rows": len(direct),
                   "training_rows": len(picked) + len(direct), "judge": job.mine.judge}
        picked = picked + direct
    if not picked:
        raise ValueError(f"no stage-2 training rows: {summary}")
    # The shard reader shuffles only locally: interleave the kinds here.
    picked = [picked[int(i)] for i in np.random.default_rng(job.train.seed).permutation(len(picked))]
    path = Path(job.mined) / "training" / "sft-train.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(sft_training_table(picked), path)
    # `mined` holds Ray Data's part files; the training file lives in a sub-folder read on its own.
    return train_sft(job.train.model_copy(update={"data_path": str(path)}), summary)
