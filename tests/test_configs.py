"""Every shipped YAML validates against its model, and every config field documents itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from qzoom_ray.config import EngineConfig, StrictModel

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def config_models() -> dict[str, type[StrictModel]]:
    from qzoom_ray.pipeline.config import BatchJobConfig
    from qzoom_ray.serve.config import ServeArgs
    from qzoom_ray.train.base_config import TrainBaseConfig

    return {"batch": BatchJobConfig, "serve": ServeArgs, "train-base": TrainBaseConfig, "engine": EngineConfig}


def model_for(path: Path) -> tuple[type[StrictModel] | None, dict]:
    data = yaml.safe_load(path.read_text())
    models = config_models()
    if "applications" in data:  # `serve deploy` schema: validate each app's args
        return models["serve"], data["applications"][0]["args"]
    if data.get("kind") == "RayJob":
        return None, data
    if path.name.startswith("train-base"):
        return models["train-base"], data
    if path.name.startswith("eval-"):
        return models["engine"], data
    if path.name.startswith("train-"):
        return None, data  # head-training configs are checked by their own tests
    return models["batch"], data


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_validates(path: Path):
    model, data = model_for(path)
    if model is None:
        assert data
        return
    model.model_validate(data)


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        EngineConfig.model_validate({"zoom": {"gate_treshold": 0.1}})


def _walk(model: type[BaseModel], seen: set) -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        if not field.description and not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            missing.append(f"{model.__name__}.{name}")
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and ann not in seen:
            seen.add(ann)
            missing += _walk(ann, seen)
    return missing


@pytest.mark.parametrize("name", ["batch", "serve", "engine", "train-base"])
def test_every_field_has_a_description(name):
    assert _walk(config_models()[name], set()) == []
