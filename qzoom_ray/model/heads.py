"""The two Q-Zoom branches as plain modules: weights and static configuration only.

Both branches read the coarse hidden state after base layer K-1 (spec §1-§2):

* ``twig_layers`` (SD-RPN): T decoder layers of the backbone's own class. Layers 0..T-2 run in
  full; of layer T-1 only ``input_layernorm`` and the q/k projections are used, to score the last
  prompt token against every image token.
* ``high_res_layers`` + ``high_res_head`` (dynamic gate): T full decoder layers, then
  ``Linear(hidden, 1)`` on the last prompt token (no final norm), sigmoid.

Nothing here is per-request: the engine passes hidden states in and gets tensors out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

#: Prefixes of the extra tensors in the authors' (transformers 4.51) checkpoint layout.
HEAD_PREFIX = "model."
HEAD_MODULES = ("twig_layers.", "high_res_layers.", "high_res_head.")


@dataclass(frozen=True)
class QZoomHeadsSpec:
    """Branch geometry as written into the checkpoint's ``config.json`` by the authors' trainer."""

    enable_twig: bool
    twig_K: int
    twig_T: int
    enable_high_res: bool
    high_res_K: int
    high_res_T: int
    reuse_src_pos: bool = False

    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any]) -> QZoomHeadsSpec | None:
        """Read the branch fields of a config dict; None when the checkpoint has no Q-Zoom heads."""
        if not cfg.get("enable_twig", False):
            return None
        missing = [k for k in ("twig_K", "twig_T") if cfg.get(k) is None]
        if missing:
            raise ValueError(f"config.json has enable_twig=true but lacks {missing}")
        k, t = int(cfg["twig_K"]), int(cfg["twig_T"])
        if t < 2:
            raise ValueError(f"twig_T must be >= 2 (the last twig layer only contributes q/k), got {t}")
        # The authors' trainer never writes high_res_K/T: the model code defaults them to K/T.
        hk = cfg.get("high_res_K")
        ht = cfg.get("high_res_T")
        return cls(
            enable_twig=True,
            twig_K=k,
            twig_T=t,
            enable_high_res=bool(cfg.get("enable_high_res", False)),
            high_res_K=int(hk) if isinstance(hk, int) else k,
            high_res_T=int(ht) if isinstance(ht, int) else t,
            reuse_src_pos=bool(cfg.get("reuse_src_pos", False)),
        )

    #: Every config.json field that describes the branches (stripped from a plain backbone's config).
    CONFIG_FIELDS = (
        "enable_twig", "twig_K", "twig_T", "enable_high_res", "high_res_K", "high_res_T", "reuse_src_pos",
        "roi_source", "roi_multi_head",
    )

    def to_config_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roi_source"] = "qk"
        d["roi_multi_head"] = True
        return d


class QZoomHeads(nn.Module):
    """Twig (SD-RPN) and gate branches built from the backbone's decoder-layer class."""

    def __init__(self, spec: QZoomHeadsSpec, text_config: Any, decoder_layer_cls: type[nn.Module]):
        super().__init__()
        self.spec = spec
        self.twig_layers = nn.ModuleList(
            decoder_layer_cls(text_config, layer_idx=spec.twig_K + i) for i in range(spec.twig_T)
        )
        if spec.enable_high_res:
            self.high_res_layers = nn.ModuleList(
                decoder_layer_cls(text_config, layer_idx=spec.high_res_K + i) for i in range(spec.high_res_T)
            )
            self.high_res_head = nn.Linear(text_config.hidden_size, 1, bias=True)
        else:
            self.high_res_layers = None
            self.high_res_head = None

    @property
    def has_gate(self) -> bool:
        return self.high_res_head is not None

    def init_from_backbone(
        self, base_layers: nn.ModuleList, branches: tuple[str, ...] = ("twig", "gate")
    ) -> None:
        """Copy base layers K..K+T-1 into the named branches (the initialisation the paper describes)."""
        n = len(base_layers)
        chosen = {"twig": (self.twig_layers, self.spec.twig_K), "gate": (self.high_res_layers, self.spec.high_res_K)}
        for name in branches:
            branch, start = chosen[name]
            if branch is None:
                continue
            if start + len(branch) > n:
                raise ValueError(
                    f"cannot initialise {len(branch)} {name} layers from base layers {start}.. "
                    f"(the backbone has {n} layers)"
                )
            for i, layer in enumerate(branch):
                layer.load_state_dict(base_layers[start + i].state_dict())

    def gate_logits(self, hidden_k: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
        """Gate logit per row from ``hidden_k`` (batch, seq, hidden), left-padded: last column = last prompt token."""
        if self.high_res_layers is None or self.high_res_head is None:
            raise RuntimeError("this checkpoint has no gate branch")
        h = hidden_k
        for layer in self.high_res_layers:
            h = layer(h, cache=None, use_cache=False, **layer_kwargs)
        return self.high_res_head(h[:, -1, :]).squeeze(-1)

    def twig_hidden(self, hidden_k: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
        """Run the T-1 full twig layers; the last twig layer is left to the adapter's q/k scoring."""
        h = hidden_k
        for layer in self.twig_layers[:-1]:
            h = layer(h, cache=None, use_cache=False, **layer_kwargs)
        return h

    @property
    def twig_score_layer(self) -> nn.Module:
        return self.twig_layers[-1]
