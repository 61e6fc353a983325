"""Model cards (``README.md``) of OCD hypernetworks, rendered from ``model_cards/ocd_model_card.md``.

The card's body is one generated block between :data:`GENERATED_START` and :data:`GENERATED_END`.
Writing the card again (:func:`write_model_card`, on every ``save_pretrained`` / ``push_to_hub``)
replaces that block and the metadata keys ocd-hf sets, and keeps everything else a user wrote: text
before or after the block, other metadata keys, extra tags.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

if TYPE_CHECKING:
    from .modeling_ocd import OCDWrapper

MODEL_CARD_NAME = "README.md"
MODEL_CARD_TEMPLATE = "ocd_model_card.md"
LIBRARY_NAME = "ocd-hf"
BASE_TAGS = ("ocd", "hypernetwork", "diffusion")
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
class OCDModelCardData:
    """What the caller knows about a hypernetwork beyond its config: where it lives, its data and results.

    Args:
        model_id: the Hub repo id (``"user/name"``) the card's usage snippet loads from.
        model_name: the card's title (default: "OCD hypernetwork for <layer> of <backbone>").
        language / license: card metadata, e.g. ``"en"``, ``"apache-2.0"``.
        datasets: Hub ids of the datasets the deltas were harvested from.
        tags: tags added to ``ocd``, ``hypernetwork``, ``diffusion`` and the task.
        training_config: the training settings (e.g. ``training_history.json``'s ``settings``).
        eval_results: measured results, written to the ``model-index`` metadata.
        results_table: a markdown table of the results with their bounds (e.g.
            ``ocd_hf.evaluation.ResultsTable.to_markdown()``), shown in the card.
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
    def from_kwargs(cls, kwargs: Mapping[str, Any] | None) -> "OCDModelCardData":
        """Build from keyword arguments, naming any unknown key."""
        kwargs = dict(kwargs or {})
        known = set(inspect.signature(cls).parameters)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"Unknown model card arguments {unknown}; expected some of {sorted(known)}.")
        return cls(**kwargs)

    def to_card_data(self, model_name: str, base_model: str | None, task: str) -> ModelCardData:
        """The card's YAML metadata."""
        metrics = self.metrics or sorted({result.metric_type for result in self.eval_results or []}) or None
        return ModelCardData(
            library_name=LIBRARY_NAME,
            base_model=base_model,
            tags=list(dict.fromkeys([*BASE_TAGS, task, *self.tags])),
            datasets=self.datasets,
            metrics=metrics,
            language=self.language,
            license=self.license,
            model_name=model_name if self.eval_results else None,
            eval_results=self.eval_results or None,
        )


def backbone_inputs(backbone: Any) -> tuple[str, list[str]]:
    """The kind of input the backbone takes (``"text"``, ``"image"`` or ``"tensors"``) and its forward's input names."""
    parameters = inspect.signature(backbone.forward).parameters
    names = [
        name for name, parameter in parameters.items()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY) and name != "labels"
    ]
    if "input_ids" in names:
        return "text", ["input_ids"]
    if "pixel_values" in names:
        return "image", ["pixel_values"]
    return "tensors", names[:1]


def render_model_card(model: "OCDWrapper", card_data: OCDModelCardData | None = None) -> ModelCard:
    """The model card of ``model`` (its config, backbone and hypernetwork) with what ``card_data`` adds."""
    card_data = card_data or OCDModelCardData()
    config = model.config
    base_model = config.base_model_name_or_path
    model_name = card_data.model_name or f"OCD hypernetwork for {config.target_module} of {base_model or config.base_model_class}"
    input_kind, input_names = backbone_inputs(model.backbone)
    if input_kind != "tensors" and not base_model:
        input_kind = "tensors"  # no name to load a tokenizer or image processor from
    return ModelCard.from_template(
        card_data.to_card_data(model_name, hub_model_id(base_model), config.task),
        template_path=str(template_path(MODEL_CARD_TEMPLATE)),
        generated_start=GENERATED_START,
        generated_end=GENERATED_END,
        model_name=model_name,
        model_id=card_data.model_id or "path/to/this/directory",
        base_model=base_model,
        base_model_name_or_path=base_model,
        base_model_class=config.base_model_class,
        base_model_revision=config.base_model_revision,
        target_module=config.target_module,
        in_features=config.in_features,
        out_features=config.out_features,
        per_token=config.per_token,
        task=config.task,
        base_layer_fingerprint=config.base_layer_fingerprint,
        delta_mode=config.delta_mode,
        factor_rule=config.factor_rule,
        sample_size=config.sample_size if config.delta_mode == "full" else None,
        condition_components=config.condition_components,
        num_inference_steps=config.num_inference_steps,
        scheduler_config=config.scheduler_config,
        delta_normalization=config.delta_normalization,
        log_rho_mean=config.log_rho_mean,
        log_rho_std=config.log_rho_std,
        num_parameters=sum(p.numel() for p in model.hypernetwork.parameters()),
        harvest_config=config.harvest_config,
        training_config=dict(card_data.training_config or {}),
        results_table=(card_data.results_table or "").strip(),
        input_kind=input_kind,
        input_names=input_names,
    )


def default_task_type(model: "OCDWrapper") -> str:
    """A Hub task id for ``model``'s results: ``text-``, ``image-`` or ``tabular-`` + the config's task."""
    kind = {"text": "text", "image": "image"}.get(backbone_inputs(model.backbone)[0], "tabular")
    return f"{kind}-{model.config.task}"


def eval_results_from_table(
    table: Any,
    *,
    dataset_type: str,
    dataset_name: str,
    task_type: str,
    dataset_split: str | None = None,
    kinds: tuple[str, ...] = ("OCD",),
) -> list[EvalResult]:
    """``EvalResult`` s (for the ``model-index``) from an ``ocd_hf.evaluation.ResultsTable``.

    One result per metric of every row whose kind is in ``kinds`` (by default the OCD rows, not the
    base model, ablations or bounds), valued at the row's mean over runs and named ``"<metric> (<row>)"``.
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


def merge_model_card(existing: ModelCard, generated: ModelCard) -> ModelCard:
    """``existing`` with the generated block and the metadata ocd-hf sets taken from ``generated``.

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
    return ModelCard(f"---\n{ModelCardData(**metadata).to_yaml()}\n---\n{text}")


def write_model_card(model: "OCDWrapper", directory: str | os.PathLike, card_data: OCDModelCardData | None = None) -> Path:
    """Write ``directory/README.md`` for ``model``, updating the card already there if any (see :func:`merge_model_card`)."""
    path = Path(directory) / MODEL_CARD_NAME
    card = render_model_card(model, card_data)
    if path.is_file():
        card = merge_model_card(ModelCard.load(path), card)
    card.save(path)
    return path
