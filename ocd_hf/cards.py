"""Dataset cards (``README.md``) for delta datasets, rendered from the Jinja templates in ``model_cards/``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from huggingface_hub import DatasetCard, DatasetCardData

from .deltas import DATA_FILES_PATTERN, SPLIT, delta_storage
from .model_card import template_path as find_template

DELTA_DATASET_CARD_TEMPLATE = "delta_dataset_card.md"


def size_category(num_samples: int) -> str:
    """The Hub's ``size_categories`` bucket for ``num_samples`` rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if num_samples < limit:
            return name
    return "n>1M"


def _bytes_text(num_bytes: float | None) -> str:
    if num_bytes is None:
        return "n/a (no samples)"
    text = f"{num_bytes:,.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        num_bytes /= 1024
        if num_bytes < 1024 or unit == "GiB":
            return text if num_bytes < 1 else f"{text} ({num_bytes:,.1f} {unit})"
    return text


def render_dataset_card(metadata: Mapping[str, Any], template_path: str | os.PathLike | None = None) -> DatasetCard:
    """The dataset card of a finished harvest, from its ``harvest.json`` metadata.

    The YAML header points ``datasets.load_dataset`` at the shard files, so the directory (or a Hub
    repo holding it) loads with ``load_dataset(path, split="train")``.
    """
    template_path = Path(template_path) if template_path else find_template(DELTA_DATASET_CARD_TEMPLATE)
    base_model = metadata.get("base_model_name_or_path") or metadata["base_model_class"]
    factorised = delta_storage(metadata) == "factorised"
    card_data = DatasetCardData(
        pretty_name=f"OCD deltas: {metadata['target_module']} of {base_model}",
        size_categories=size_category(metadata["num_samples"]),
        tags=["ocd", "weight-deltas", "hypernetwork", "ocd-hf"],
        configs=[{"config_name": "default", "data_files": [{"split": SPLIT, "path": DATA_FILES_PATTERN}]}],
    )
    return DatasetCard.from_template(
        card_data,
        template_path=str(template_path),
        **{
            **metadata,
            "base_model": base_model,
            "bytes_per_sample_text": _bytes_text(metadata.get("bytes_per_sample")),
            "delta_bytes_text": _bytes_text(metadata.get("delta_bytes_per_sample")),
            "full_delta_bytes_text": _bytes_text(metadata.get("full_delta_bytes_per_sample")),
            "factorised": factorised,
            "delta_column": "delta_factor" if factorised else "delta",
        },
    )


def write_dataset_card(output_dir: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
    """Render the dataset card of ``metadata`` and save it as ``output_dir/README.md``."""
    path = Path(output_dir) / "README.md"
    render_dataset_card(metadata).save(path)
    return path
