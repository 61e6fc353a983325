"""Backbones that are not plain ``transformers`` classes, made into OCD backbones.

An OCD backbone is an ``nn.Module`` whose forward takes tensors and returns an output with
``.logits``. :class:`SetFitBackbone` turns a trained ``setfit.SetFitModel`` with a differentiable
head (a sentence-transformers body, pooling, optional normalisation, ``SetFitHead``) into such a
module, saved and loaded like any ``transformers`` model (``config.json`` + safetensors).
:class:`LeNet5ForImageClassification` is the classic LeNet-5 of the OCD paper's Table 1 (target
``fc2``, 120 -> 84), registered with ``AutoModelForImageClassification``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers
from huggingface_hub import snapshot_download
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput, ModelOutput

from .checks import is_saved_dataset, only_local

POOLING_MODES = ("mean", "cls", "max")
# The base_model_class of a hypernetwork whose backbone is a SetFit model repo (converted on load).
SETFIT_MODEL_CLASS = "SetFitModel"
# sentence-transformers < 6 stores pooling as boolean flags rather than a ``pooling_mode`` string.
LEGACY_POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


class SetFitBackboneConfig(PretrainedConfig):
    """Configuration of a :class:`SetFitBackbone`.

    Args:
        body_config: config (or its dict) of the sentence-transformers body, a ``transformers`` model.
        pooling_mode: how token embeddings become the sentence embedding: ``"mean"`` (over the
            attention mask), ``"cls"`` or ``"max"``.
        normalize_embeddings: L2-normalise the sentence embedding (a ``Normalize`` module in the
            sentence-transformers pipeline, or ``SetFitModel(normalize_embeddings=True)``).
        max_seq_length: truncation length of the body's tokenizer in the sentence-transformers pipeline.
        head_bias: whether the classification head has a bias.
        head_temperature: the ``SetFitHead`` temperature. It is folded into the head's weights on
            conversion (``head`` outputs the logits directly); kept here as a record.
    """

    model_type = "ocd-setfit"

    def __init__(
        self,
        body_config: PretrainedConfig | dict[str, Any] | None = None,
        pooling_mode: str = "mean",
        normalize_embeddings: bool = True,
        max_seq_length: int | None = None,
        head_bias: bool = True,
        head_temperature: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if pooling_mode not in POOLING_MODES:
            raise ValueError(f"pooling_mode must be one of {POOLING_MODES}, got {pooling_mode!r}.")
        if isinstance(body_config, dict):
            if "model_type" not in body_config:
                raise ValueError("body_config needs a 'model_type' key (e.g. 'bert') to know which transformers config it is.")
            body_config = AutoConfig.for_model(**body_config)
        self.body_config = body_config
        self.pooling_mode = pooling_mode
        self.normalize_embeddings = bool(normalize_embeddings)
        self.max_seq_length = max_seq_length
        self.head_bias = bool(head_bias)
        self.head_temperature = float(head_temperature)
        super().__init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        """Size of the sentence embedding (the body's hidden size)."""
        return self.body_config.hidden_size

    @property
    def vocab_size(self) -> int:
        """The body's vocabulary size (lets ``OCDConfig.from_backbone`` build example inputs)."""
        return self.body_config.vocab_size


@dataclass
class SetFitBackboneOutput(ModelOutput):
    """Output of :class:`SetFitBackbone`: ``logits`` of the head, the sentence ``embeddings`` it saw, ``loss`` with labels."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None


def pool_sentence(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence embedding ``(batch, hidden)`` from token embeddings, as sentence-transformers' ``Pooling``."""
    if mode == "cls":
        return token_embeddings[:, 0]
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    if mode == "max":
        return token_embeddings.masked_fill(mask == 0, torch.finfo(token_embeddings.dtype).min).max(1).values
    return (token_embeddings * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class SetFitBackbone(PreTrainedModel):
    """A SetFit classifier as one differentiable ``transformers`` model.

    ``body`` (a ``transformers`` encoder, e.g. ``BertModel``) -> pooling -> optional L2
    normalisation -> ``head`` (``nn.Linear(hidden, num_labels)``) -> ``logits``. OCD targets are
    ``"head"`` (the SetFit head) or a body layer such as ``"body.encoder.layer.5.output.dense"``.
    Build one from a trained ``SetFitModel`` with :meth:`from_setfit`.
    """

    config_class = SetFitBackboneConfig
    base_model_prefix = "body"

    def __init__(self, config: SetFitBackboneConfig) -> None:
        super().__init__(config)
        if config.body_config is None:
            raise ValueError("SetFitBackboneConfig.body_config is not set: build the backbone with SetFitBackbone.from_setfit(model).")
        self.body = AutoModel.from_config(config.body_config)
        self.head = nn.Linear(config.hidden_size, config.num_labels, bias=config.head_bias)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise the head as ``SetFitHead`` does; the body initialises itself."""
        if module is self.head:
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.constant_(module.bias, 1e-2)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **body_inputs: Any,
    ) -> SetFitBackboneOutput:
        """Logits of the head over the pooled (and normalised) sentence embedding."""
        if input_ids is None:
            raise ValueError("SetFitBackbone needs input_ids: pass **backbone.tokenize(texts, tokenizer).")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is not None:
            body_inputs["token_type_ids"] = token_type_ids
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **body_inputs).last_hidden_state
        embeddings = pool_sentence(hidden, attention_mask, self.config.pooling_mode)
        if self.config.normalize_embeddings:
            embeddings = F.normalize(embeddings, p=2, dim=1)
        logits = self.head(embeddings)
        loss = F.cross_entropy(logits, labels.view(-1).long()) if labels is not None else None
        return SetFitBackboneOutput(loss=loss, logits=logits, embeddings=embeddings)

    def tokenize(self, texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
        """Tokenise ``texts`` as the sentence-transformers pipeline does (padding, truncation at ``max_seq_length``)."""
        encoded = tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.config.max_seq_length, return_tensors="pt"
        )
        return {key: value.to(self.device) for key, value in encoded.items()}

    @classmethod
    def from_setfit(cls, setfit_model: Any) -> "SetFitBackbone":
        """Convert a trained ``setfit.SetFitModel`` with a differentiable head (``use_differentiable_head=True``).

        The body must be a sentence-transformers ``Transformer -> Pooling [-> Normalize]`` pipeline.
        The head's temperature is folded into its weights, so ``head`` outputs exactly the logits
        ``SetFitHead`` computes. The weights are copied: the SetFit model is left untouched.
        """
        head = getattr(setfit_model, "model_head", None)
        linear = getattr(head, "linear", None)
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"The SetFit model's head is a {type(head).__name__}, not a differentiable SetFitHead: train it with "
                "SetFitModel.from_pretrained(..., use_differentiable_head=True, head_params={'out_features': num_classes})."
            )
        if getattr(head, "multitarget", False):
            raise ValueError("Multi-target SetFit heads (sigmoid outputs) are not supported; OCD needs one softmax over the classes.")
        transformer, pooling_mode, normalize = parse_sentence_transformer(setfit_model.model_body)
        body = transformer.auto_model
        scale = 1.0 / (head.temperature + head.eps)
        labels = getattr(setfit_model, "labels", None) or [str(i) for i in range(linear.out_features)]
        if len(labels) != linear.out_features:
            raise ValueError(f"The SetFit model has {len(labels)} labels but its head has {linear.out_features} outputs.")
        config = SetFitBackboneConfig(
            body_config=body.config.to_dict(),
            pooling_mode=pooling_mode,
            normalize_embeddings=normalize or bool(getattr(setfit_model, "normalize_embeddings", False)),
            max_seq_length=getattr(transformer, "max_seq_length", None),
            head_bias=linear.bias is not None,
            head_temperature=head.temperature,
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
        model = cls(config)
        model.body.load_state_dict(body.state_dict())
        with torch.no_grad():
            model.head.weight.copy_(linear.weight * scale)
            if linear.bias is not None:
                model.head.bias.copy_(linear.bias * scale)
        return model.to(linear.weight.device).eval()

    @classmethod
    def from_setfit_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        **setfit_kwargs: Any,
    ) -> "SetFitBackbone":
        """Load a SetFit model saved or pushed with ``SetFitModel.save_pretrained`` / ``push_to_hub`` and
        convert it (:meth:`from_setfit`; needs ``setfit``). A Hub repo is downloaded whole at ``revision``
        first, so body, head and tokenizer come from that one commit (SetFit itself loads the body at
        the default branch whatever the revision)."""
        try:
            from setfit import SetFitModel
        except ImportError as error:
            raise ImportError(f"Loading the SetFit model {name_or_path!r} needs setfit: pip install setfit.") from error
        path = str(name_or_path)
        if not Path(path).is_dir():
            path = snapshot_download(
                path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only,
                force_download=force_download,
            )
        return cls.from_setfit(SetFitModel.from_pretrained(path, **setfit_kwargs))


def parse_sentence_transformer(sentence_transformer: Any) -> tuple[Any, str, bool]:
    """``(transformer module, pooling mode, normalize)`` of a ``Transformer -> Pooling [-> Normalize]`` pipeline."""
    modules = list(sentence_transformer)
    names = [type(module).__name__ for module in modules]
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ValueError(
            f"SetFitBackbone supports sentence-transformers bodies Transformer -> Pooling [-> Normalize], got {names}. "
            "Other modules (Dense, ...) are not converted."
        )
    return modules[0], pooling_mode_of(modules[1]), len(modules) == 3


def pooling_mode_of(pooling: Any) -> str:
    """The single pooling mode of a sentence-transformers ``Pooling`` module, as a :data:`POOLING_MODES` name."""
    settings = pooling.get_config_dict()
    if "pooling_mode" in settings:
        mode = settings["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        modes = [name for flag, name in LEGACY_POOLING_FLAGS.items() if settings.get(flag)]
        modes += [flag for flag, on in settings.items() if flag.startswith("pooling_mode") and on and flag not in LEGACY_POOLING_FLAGS]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(f"SetFitBackbone supports exactly one pooling mode among {POOLING_MODES}; the body pools with {modes}.")
    return modes[0]


def tokenizer_from_setfit(setfit_model: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of a ``SetFitModel``'s sentence-transformers body."""
    return list(setfit_model.model_body)[0].tokenizer


class LeNet5Config(PretrainedConfig):
    """Configuration of a :class:`LeNet5ForImageClassification`.

    Args:
        num_channels: channels of the input images (1 for grey images such as Fashion-MNIST).
        image_size: side of the square input images (at least 12; 28 for (Fashion-)MNIST).
        num_labels: number of classes (default: the size of ``id2label`` if given, else 10).
    """

    model_type = "ocd-lenet5"

    def __init__(self, num_channels: int = 1, image_size: int = 28, num_labels: int | None = None, **kwargs: Any) -> None:
        id2label = kwargs.get("id2label")
        if num_labels is None:
            num_labels = len(id2label) if id2label else 10
        elif id2label and len(id2label) != num_labels:
            raise ValueError(f"num_labels={num_labels} but id2label names {len(id2label)} classes: {id2label}.")
        if num_labels < 2:
            raise ValueError(f"LeNet-5 is a classifier trained with cross-entropy: num_labels must be >= 2, got {num_labels}.")
        if not isinstance(image_size, int) or image_size < 12:
            raise ValueError(f"image_size must be an int >= 12 (the side of square images LeNet-5 can pool twice), got {image_size!r}.")
        if id2label and not kwargs.get("label2id"):
            kwargs["label2id"] = {name: int(index) for index, name in id2label.items()}
        self.num_channels = int(num_channels)
        self.image_size = image_size
        super().__init__(num_labels=num_labels, **kwargs)

    @property
    def feature_size(self) -> int:
        """Side of the 16-channel feature map that ``fc1`` sees (5 for 28×28 images: 16·5·5 = 400 inputs)."""
        return (self.image_size // 2 - 4) // 2


class LeNet5ForImageClassification(PreTrainedModel):
    """The classic LeNet-5 (the OCD paper's Table 1 backbone; OCD's target there is ``fc2``, 120 -> 84).

    ``conv1`` (6 channels, 5×5, padding 2) -> ReLU -> max-pool 2 -> ``conv2`` (16 channels, 5×5) ->
    ReLU -> max-pool 2 -> flatten -> ``fc1`` (-> 120) -> ReLU -> ``fc2`` (-> 84) -> ReLU -> ``fc3``
    (-> ``num_labels``). Weights start from PyTorch's default initialisation of each layer.
    """

    config_class = LeNet5Config
    main_input_name = "pixel_values"

    def __init__(self, config: LeNet5Config) -> None:
        super().__init__(config)
        self.conv1 = nn.Conv2d(config.num_channels, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * config.feature_size**2, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default init of ``Conv2d``/``Linear`` (Kaiming-uniform weights, fan-in-uniform biases);
        the ``transformers.initialization`` functions skip weights loaded from a checkpoint."""
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, return_dict: bool | None = None
    ) -> ImageClassifierOutput | tuple[torch.Tensor, ...]:
        """Class logits of ``pixel_values`` ``(batch, num_channels, image_size, image_size)``; the mean
        cross-entropy as ``loss`` when ``labels`` are given."""
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"LeNet5ForImageClassification expects pixel_values of shape (batch, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}."
            )
        hidden = F.max_pool2d(F.relu(self.conv1(pixel_values)), 2)
        hidden = F.max_pool2d(F.relu(self.conv2(hidden)), 2)
        hidden = F.relu(self.fc1(hidden.flatten(1)))
        logits = self.fc3(F.relu(self.fc2(hidden)))
        loss = F.cross_entropy(logits, labels.view(-1).long()) if labels is not None else None
        if not (return_dict if return_dict is not None else self.config.return_dict):
            return (logits,) if loss is None else (loss, logits)
        return ImageClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(SetFitBackboneConfig.model_type, SetFitBackboneConfig, exist_ok=True)
AutoModel.register(SetFitBackboneConfig, SetFitBackbone, exist_ok=True)
AutoConfig.register(LeNet5Config.model_type, LeNet5Config, exist_ok=True)
AutoModelForImageClassification.register(LeNet5Config, LeNet5ForImageClassification, exist_ok=True)


def check_model_source(name_or_path: str, argument: str = "model") -> None:
    """Refuse, before anything is loaded, a ``name_or_path`` that can only be a local path and is not a directory.

    Absolute paths, paths starting with ``.`` or ``~`` and paths with more than one ``/`` cannot be Hub ids
    (``namespace/name``), so a missing one would otherwise surface as a Hub lookup error.
    """
    path = Path(name_or_path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{argument}={name_or_path!r} is a file; pass the directory written by save_pretrained, or a Hub id.")
    if is_saved_dataset(path) and not (path / "config.json").is_file():
        raise ValueError(
            f"{argument}={name_or_path!r} is a dataset (written by save_to_disk), not a model; pass the model's directory "
            "(written by save_pretrained) or its Hub id."
        )
    if only_local(name_or_path) and not path.exists():
        raise FileNotFoundError(
            f"{argument}={name_or_path!r}: no such directory. Pass a directory written by save_pretrained, or a Hub model "
            "id ('namespace/name')."
        )


def load_pretrained_backbone(name_or_path: str, class_name: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a backbone with the class named ``class_name`` from ``transformers`` or :mod:`ocd_hf.backbones`
    (default: the first of its config's ``architectures``, else ``AutoModelForSequenceClassification``);
    ``"SetFitModel"`` loads a SetFit model repo as a :class:`SetFitBackbone`. A local path that does not
    exist is a ``FileNotFoundError`` (:func:`check_model_source`)."""
    check_model_source(str(name_or_path))
    if class_name == SETFIT_MODEL_CLASS:
        return SetFitBackbone.from_setfit_pretrained(name_or_path, **kwargs)
    if class_name is None:
        architectures = AutoConfig.from_pretrained(name_or_path, revision=kwargs.get("revision")).architectures or []
        class_name = architectures[0] if architectures else "AutoModelForSequenceClassification"
    model_class = getattr(transformers, class_name, None)
    if model_class is None and class_name:
        model_class = globals().get(class_name)
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        raise ValueError(
            f"Cannot load backbone class {class_name!r}: it is neither a transformers class nor one of ocd_hf.backbones. "
            "Load the backbone yourself and pass backbone=..."
        )
    return model_class.from_pretrained(name_or_path, **kwargs)
