"""Is a fact in the visual tokens, or does the decoder fail to use it? Linear probes on the merger's output.

The tiny base model answers "What colour is the hexagon?" barely above picking any colour in the
image. Either the vision tower does not tell the hexagon apart at that budget, or the decoder does
not look it up. A linear probe on the merger's output (the vectors the decoder receives, tower
frozen) separates the two: if a linear map recovers the shape from a token, the information reaches
the decoder in a form its first attention layer can use.

Probed per token of whole benchmark images at one budget, on tokens that lie on an object:

* ``object``: which shape (or stamp, header bar) the token lies on;
* ``colour``: the palette colour under its centre;
* ``half``: whether the token is in the left or the right half of the image (what the side question
  needs; the decoder sees only rotary, i.e. relative, positions).

Train and test tokens come from different images, so a probe cannot memorise a picture. With
``decoder=True`` the same tokens are also probed in the decoder's hidden state after each layer
(image tokens come before the question, so under causal attention they do not depend on it): a fact
that appears there was computed by the decoder itself, e.g. the side of the image, which rotary
positions make available only relative to the ``<|vision_start|>`` token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from qzoom_ray.train.vision_source import IGNORE, DenseView, whole_image_view

PROBE_HEADS: tuple[str, ...] = ("object", "colour", "half")


@dataclass(frozen=True)
class ProbeResult:
    test_accuracy: float
    train_accuracy: float
    majority_accuracy: float  # always answering the most common training class, on the test tokens
    n_train: int
    n_test: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def half_labels(objects: np.ndarray) -> np.ndarray:
    """1 (left) / 2 (right) for object tokens by the side of the image their centre is on; the middle
    column of an odd grid and background tokens are ``IGNORE``."""
    rows, cols = objects.shape
    centre_x = np.arange(cols) + 0.5
    side = np.where(centre_x < cols / 2, 1, np.where(centre_x > cols / 2, 2, IGNORE))
    out = np.broadcast_to(side, (rows, cols)).copy()
    out[objects <= 0] = IGNORE
    return out


def probe_targets(view: DenseView) -> dict[str, np.ndarray]:
    """Per-token class of each probe head, ``IGNORE`` wherever there is no object."""
    objects = view.labels["object"]
    colour = np.where(objects > 0, view.labels["colour"], IGNORE)
    colour[colour == 0] = IGNORE
    return {"object": np.where(objects > 0, objects, IGNORE), "colour": colour, "half": half_labels(objects)}


@torch.no_grad()
def merged_token_features(model: Any, processor: Any, view: DenseView) -> np.ndarray:
    """The merger's output for ``view`` as a ``(rows, cols, hidden)`` array (the view is already at its
    processed size, so the processor does not resize it again)."""
    from qzoom_ray.train.vision_pretrain import encode_dense_view

    enc = encode_dense_view(processor, view)
    visual = model.model.visual
    dtype = next(visual.parameters()).dtype
    out = visual(torch.from_numpy(enc["pixel_values"]).to(dtype), grid_thw=torch.from_numpy(enc["image_grid_thw"][None]))
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    rows, cols = view.labels["object"].shape
    return feats.float().reshape(rows, cols, -1).cpu().numpy()


@torch.no_grad()
def decoder_token_features(model: Any, processor: Any, view: DenseView, question: str) -> list[np.ndarray]:
    """The image tokens' hidden states, ``(rows, cols, hidden)`` each: the decoder's input (the merger's
    output) and the output of every decoder layer, for ``view`` followed by ``question``."""
    from qzoom_ray.train.data import TrainSample, collate, encode_sample

    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    rows, cols = view.labels["object"].shape
    sample = TrainSample(view.image, question, "", rows * cols)  # one token per 28 x 28 px: no resize
    batch = collate([encode_sample(processor, sample)], int(tok.pad_token_id), image_token_id)
    batch.pop("labels")
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True)
    where = (batch["input_ids"][0] == image_token_id).nonzero()[:, 0].to(device)
    if len(where) != rows * cols:
        raise ValueError(f"{len(where)} image tokens for a {rows}x{cols} label grid")
    return [h[0, where].float().reshape(rows, cols, -1).cpu().numpy() for h in out.hidden_states]


def fit_linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                     steps: int = 400, lr: float = 1e-2, weight_decay: float = 1e-3, seed: int = 0) -> ProbeResult:
    """Multinomial logistic regression (full batch, Adam) on standardised features."""
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError("a probe needs tokens in both the training and the test images")
    gen = torch.Generator().manual_seed(seed)
    xt, xe = torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(x_test, dtype=torch.float32)
    mu, sd = xt.mean(0), xt.std(0, unbiased=False) + 1e-6
    xt, xe = (xt - mu) / sd, (xe - mu) / sd
    classes = int(max(y_train.max(), y_test.max())) + 1
    yt, ye = torch.as_tensor(y_train, dtype=torch.long), torch.as_tensor(y_test, dtype=torch.long)
    weight = (torch.randn(xt.shape[1], classes, generator=gen) * 0.01).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(xt @ weight + bias, yt).backward()
        opt.step()
    with torch.no_grad():
        train_acc = float(((xt @ weight + bias).argmax(1) == yt).float().mean())
        test_acc = float(((xe @ weight + bias).argmax(1) == ye).float().mean())
    majority = int(np.bincount(y_train).argmax())
    return ProbeResult(test_acc, train_acc, float(np.mean(y_test == majority)), len(y_train), len(y_test))


def probe_tower(model: Any, processor: Any, n_images: int = 200, budget: int = 64, seed: int = 555,
                template: str = "scene_colour", test_share: float = 0.3, decoder: bool = False,
                progress: bool = False) -> dict[str, dict[str, ProbeResult]]:
    """Render ``n_images`` benchmark images of ``template`` (ordinary split) at ``budget`` tokens and fit
    one probe per head of :data:`PROBE_HEADS` on the merger's output (``"merger"``) and, with
    ``decoder``, on the image tokens after each decoder layer (``"decoder 1"``, ...). The last
    ``test_share`` of the images are the test set."""
    from qzoom_ray.synth.generator import render_record

    if n_images < 2:
        raise ValueError("need at least two images: one to train on, one to test on")
    n_test = max(1, round(n_images * test_share))
    feats: dict[str, list[np.ndarray]] = {}
    targets: dict[str, list[np.ndarray]] = {h: [] for h in PROBE_HEADS}
    is_test: list[np.ndarray] = []
    items = range(n_images)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="visual tokens", unit="image")
    for i in items:
        rec = render_record([seed, i], split="ordinary", template=template)
        view = whole_image_view(rec, budget)
        if decoder:
            states = decoder_token_features(model, processor, view, rec.question)
            names = ["merger"] + [f"decoder {k}" for k in range(1, len(states))]
        else:
            states, names = [merged_token_features(model, processor, view)], ["merger"]
        for name, f in zip(names, states, strict=True):
            feats.setdefault(name, []).append(f.reshape(-1, f.shape[-1]))
        for head, y in probe_targets(view).items():
            targets[head].append(y.reshape(-1))
        rows, cols = view.labels["object"].shape
        is_test.append(np.full(rows * cols, i >= n_images - n_test))
    test = np.concatenate(is_test)
    results: dict[str, dict[str, ProbeResult]] = {}
    for name, chunks in feats.items():
        x = np.concatenate(chunks)
        results[name] = {}
        for head in PROBE_HEADS:
            y = np.concatenate(targets[head])
            keep = y != IGNORE
            results[name][head] = fit_linear_probe(x[keep & ~test], y[keep & ~test], x[keep & test], y[keep & test])
    return results
