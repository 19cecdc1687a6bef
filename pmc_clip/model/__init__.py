"""PMC-CLIP model: `create_model("RN50_fusion4")`, `list_models()`, `PMCClip`, `ModelConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pmc_clip.model.config import ModelConfig
from pmc_clip.model.pmc_clip import PMCClip
from pmc_clip.model.text import PUBMEDBERT

CONFIG_DIR = Path(__file__).parent / "configs"

__all__ = ["PUBMEDBERT", "ModelConfig", "PMCClip", "create_model", "list_models", "load_config"]


def list_models() -> list[str]:
    """Names of the bundled model configs."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | Path) -> ModelConfig:
    """A bundled config by name (e.g. "RN50_fusion4") or a JSON file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"model config file {str(path)!r} does not exist")
        return ModelConfig.from_json(path)
    if str(name_or_path) not in list_models():
        raise ValueError(
            f"unknown model {str(name_or_path)!r}; bundled models: {list_models()} "
            "(or pass a path to a .json config)"
        )
    return ModelConfig.from_json(CONFIG_DIR / f"{name_or_path}.json")


def create_model(
    name_or_config: str | Path | ModelConfig, text_encoder: str | None = None, **overrides: Any
) -> PMCClip:
    """Build a PMCClip.

    name_or_config: a bundled config name, a path to a JSON config, or a ModelConfig.
    text_encoder: hub id or local directory of a pretrained BERT (e.g. PUBMEDBERT) to
        initialise the text tower from; None builds it with random weights from the
        config's text_config (tests, or before loading a PMC-CLIP checkpoint).
    overrides: ModelConfig fields replacing the config's values (text_config replaces the
        whole dict).
    """
    config = (
        name_or_config if isinstance(name_or_config, ModelConfig) else load_config(name_or_config)
    )
    if overrides:
        config = config.replace(**overrides)
    return PMCClip(config, text_encoder=text_encoder)
