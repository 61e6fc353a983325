"""Model and dataset cards (``README.md``) from the Jinja templates in ``model_cards/`` and a context dict.

Every generator's card and every weight dataset's card has one generated block between
:data:`GENERATED_START` and :data:`GENERATED_END`. Writing the card again (:func:`write_card`, on every
``save_pretrained`` / ``push_to_hub`` / harvest) replaces that block and the metadata keys ocd-hf sets,
and keeps everything else a user wrote: text before or after the block, other metadata keys, extra tags. A method supplies only
its template name and the context its template reads; this module never names a method.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from huggingface_hub import CardData, DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData, RepoCard
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

if TYPE_CHECKING:
    import jinja2

CARD_NAME = "README.md"
LIBRARY_NAME = "ocd-hf"
GENERATED_START = "<!-- ocd-hf:generated:start -->"
GENERATED_END = "<!-- ocd-hf:generated:end -->"
_PACKAGE_DIR = Path(__file__).resolve().parent
# Installed wheels carry the templates inside the package; a source tree has them at the top level.
TEMPLATE_DIRS = (_PACKAGE_DIR / "model_cards", _PACKAGE_DIR.parent / "model_cards")


def template_path(name: str) -> Path:
    """Path of the card template ``name`` from ``model_cards/``, in an installed package or a source tree."""
    for directory in TEMPLATE_DIRS:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"Card template {name!r} not found in {[str(d) for d in TEMPLATE_DIRS]}. ocd-hf ships it in model_cards/: "
        "reinstall ocd-hf (pip install --force-reinstall ocd-hf, or pip install -e . from its source tree)."
    )


@functools.lru_cache(maxsize=None)
def _compiled_template(path: str, modified_ns: int) -> "jinja2.Template":
    """The Jinja template in ``path`` compiled once per process (and again only if the file changes)."""
    import jinja2  # huggingface_hub's card dependency; imported when a card is first written

    return jinja2.Template(Path(path).read_text(encoding="utf-8"))


def card_from_template(card_type: type[RepoCard], card_data: CardData, template: str, **template_kwargs: Any) -> RepoCard:
    """``card_type.from_template(card_data, template_path=<template in model_cards/>, **template_kwargs)``, the same text,
    with the template compiled once per process. By hand because ``RepoCard.from_template`` compiles it on every call:
    ~30 ms of Jinja per card, a third of the fixed cost of a small harvest. It renders as that method does."""
    path = template_path(template)
    kwargs = {**card_data.to_dict(), **template_kwargs}  # the template's keyword arguments take priority, as there
    text = _compiled_template(str(path), path.stat().st_mtime_ns).render(card_data=card_data.to_yaml(), **kwargs)
    return card_type(text)


def hub_model_id(name: str | None) -> str | None:
    """``name`` if it can be a Hub model id (the Hub rejects a ``base_model`` that is a local path), else ``None``."""
    if not name or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


@dataclass
class GeneratorCardData:
    """What the caller knows about a generator beyond its config: where it lives, its data and results.

    Args:
        model_id: the Hub repo id (``"user/name"``) the card's usage snippet loads from.
        model_name: the card's title (default: chosen by the method from its config).
        language / license: card metadata, e.g. ``"en"``, ``"apache-2.0"``.
        datasets: Hub ids of the datasets the training weights were harvested from.
        tags: tags added to the method's own tags and the task.
        training_config: the training settings (e.g. ``training_history.json``'s ``settings``).
        eval_results: measured results, written to the ``model-index`` metadata.
        results_table: a markdown table of the results with their bounds (e.g.
            ``ocd_hf.ResultsTable.to_markdown()``), shown in the card.
        metrics: metric ids for the metadata (default: those of ``eval_results``).
    """

    model_id: str | None = None
    model_name: str | None = None
    language: str | list[str] | None = None
    license: str | None = None
    datasets: list[str] | None = None
    tags: list[str] = field(default_factory=list)
    training_config: Mapping[str, Any] | None = None
    eval_results: list[EvalResult] | None = None
    results_table: str | None = None
    metrics: list[str] | None = None

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any] | None) -> "GeneratorCardData":
        """Build from keyword arguments, naming any unknown key."""
        kwargs = dict(kwargs or {})
        known = set(inspect.signature(cls).parameters)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"Unknown model card arguments {unknown}; expected some of {sorted(known)}.")
        return cls(**kwargs)

    def to_card_data(
        self,
        model_name: str,
        base_model: str | None,
        task: str,
        base_tags: Sequence[str],
        base_model_relation: str | None = None,
    ) -> ModelCardData:
        """The card's YAML metadata. ``base_model_relation`` (the Hub's ``adapter``, ``finetune``, ``merge``
        or ``quantized``) says how the model relates to ``base_model``; it is written only with a ``base_model``."""
        metrics = self.metrics or sorted({result.metric_type for result in self.eval_results or []}) or None
        return ModelCardData(
            library_name=LIBRARY_NAME,
            base_model=base_model,
            base_model_relation=base_model_relation if base_model else None,
            tags=list(dict.fromkeys([*base_tags, task, *self.tags])),
            datasets=self.datasets,
            metrics=metrics,
            language=self.language,
            license=self.license,
            model_name=model_name if self.eval_results else None,
            eval_results=self.eval_results or None,
        )


def render_model_card(
    template: str,
    card_data: GeneratorCardData,
    *,
    model_name: str,
    base_model: str | None,
    task: str,
    base_tags: Sequence[str],
    context: Mapping[str, Any],
    base_model_relation: str | None = None,
) -> ModelCard:
    """The model card from ``template`` (a name in ``model_cards/``): metadata from ``card_data``, body from ``context``."""
    return card_from_template(
        ModelCard,
        card_data.to_card_data(model_name, hub_model_id(base_model), task, base_tags, base_model_relation),
        template,
        generated_start=GENERATED_START,
        generated_end=GENERATED_END,
        model_name=model_name,
        model_id=card_data.model_id or "path/to/this/directory",
        training_config=dict(card_data.training_config or {}),
        results_table=(card_data.results_table or "").strip(),
        **context,
    )


def eval_results_from_table(
    table: Any,
    *,
    dataset_type: str,
    dataset_name: str,
    task_type: str,
    kinds: tuple[str, ...],
    dataset_split: str | None = None,
) -> list[EvalResult]:
    """``EvalResult`` s (for the ``model-index``) from an :class:`ocd_hf.results.ResultsTable`.

    One result per metric of every row whose kind is in ``kinds`` (the method's generated rows, e.g.
    ``("OCD",)``; not the base model, baselines, ablations or bounds), valued at the row's mean over runs and named ``"<metric> (<row>)"``.
    """
    return [
        EvalResult(
            task_type=task_type, dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=dataset_split,
            metric_type=metric, metric_name=f"{metric} ({row.name})", metric_value=row.mean(metric),
        )
        for row in table.rows
        if row.kind in kinds
        for metric in row.values
    ]


def _generated_block(text: str) -> tuple[int, int] | None:
    """Start and end offsets of the generated block in ``text``, or ``None`` if it has no complete block."""
    start = text.find(GENERATED_START)
    end = text.find(GENERATED_END, start + 1)
    if start < 0 or end < 0:
        return None
    return start, end + len(GENERATED_END)


def merge_card(existing: ModelCard | DatasetCard, generated: ModelCard | DatasetCard) -> ModelCard | DatasetCard:
    """``existing`` with the generated block and the metadata ocd-hf sets taken from ``generated`` (a model
    card or a dataset card; the result is of ``generated``'s type).

    Text outside the block and metadata keys that ``generated`` leaves unset are kept; tags are the
    union of both. A card without a generated block (written by hand) gets it appended.
    """
    new_start, new_end = _generated_block(generated.text)
    block = generated.text[new_start:new_end]
    span = _generated_block(existing.text)
    if span is None:
        text = existing.text.rstrip() + "\n\n" + block + "\n"
    else:
        text = existing.text[: span[0]] + block + existing.text[span[1] :]
    metadata = existing.data.to_dict()
    new_metadata = generated.data.to_dict()
    tags = list(dict.fromkeys([*(metadata.get("tags") or []), *(new_metadata.get("tags") or [])]))
    metadata.update(new_metadata, tags=tags)
    return type(generated)(f"---\n{type(generated.data)(**metadata).to_yaml()}\n---\n{text}")


def write_card(card: ModelCard | DatasetCard, directory: str | os.PathLike) -> Path:
    """Write ``directory/README.md``, updating the card already there if any (see :func:`merge_card`)."""
    path = Path(directory) / CARD_NAME
    if path.is_file():
        card = merge_card(type(card).load(path), card)
    card.save(path)
    return path


def size_category(num_samples: int) -> str:
    """The Hub's ``size_categories`` bucket for ``num_samples`` rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if num_samples < limit:
            return name
    return "n>1M"


def bytes_text(num_bytes: float | None) -> str:
    """``"12,345 bytes (12.1 KiB)"``, or a note when there is nothing to measure."""
    if num_bytes is None:
        return "n/a (no samples)"
    text = f"{num_bytes:,.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        num_bytes /= 1024
        if num_bytes < 1024 or unit == "GiB":
            return text if num_bytes < 1 else f"{text} ({num_bytes:,.1f} {unit})"
    return text


def render_dataset_card(
    template: str,
    *,
    pretty_name: str,
    num_samples: int,
    tags: Sequence[str],
    data_files: str,
    split: str,
    context: Mapping[str, Any],
) -> DatasetCard:
    """A weight dataset's card from ``template`` (its body inside the generated block, see :func:`write_card`);
    the YAML header points ``datasets.load_dataset`` at ``data_files``, so the directory (or a Hub repo
    holding it) loads with ``load_dataset(path, split=split)``."""
    card_data = DatasetCardData(
        pretty_name=pretty_name,
        size_categories=size_category(num_samples),
        tags=[*tags, LIBRARY_NAME],
        configs=[{"config_name": "default", "data_files": [{"split": split, "path": data_files}]}],
    )
    return card_from_template(
        DatasetCard, card_data, template, generated_start=GENERATED_START, generated_end=GENERATED_END, **context
    )
