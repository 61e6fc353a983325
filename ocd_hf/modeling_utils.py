"""Saving, loading and pushing shared by every generator: safetensors weights checked before anything
is built, a JSON config, the card, and one Hub commit per push.

A generator (a ``transformers.PreTrainedModel``) mixes in :class:`GeneratorHubMixin` and supplies
``save_files`` (through :func:`save_generator`, and its card); the mixin's ``save_pretrained`` writes them
(and pushes them with ``push_to_hub=True``), and ``push_to_hub`` uploads exactly those files in one
commit, keeping a card's user-written sections.

A head generator made of components (:meth:`HeadGeneratorHubMixin.component_configs`) is saved like a diffusers
pipeline: ``model_index.json`` names the components, each in its own folder with its own ``config.json`` (the
keyword arguments that build it) and ``model.safetensors``; the root ``config.json`` / ``model.safetensors`` keep the
model's config and the tensors outside the components.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from huggingface_hub import CommitInfo, HfApi
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

from .atomic import replace_atomically
from .cards import CARD_NAME, GeneratorCardData, write_card
from .hub import push_saved_directory, resolve_files, snapshot_revision
from .logging import get_logger

logger = get_logger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_INDEX_NAME = "model_index.json"  # diffusers' name for the file that names a pipeline's components
# The config key holding the sha256 of model.safetensors: a flipped bit or a file from another save is refused at load.
CHECKSUM_KEY = "weights_sha256"
SAVE_ADVICE = "save or push the model again (or pass force_download=True if it came from the Hub cache)"


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_config_dict(config_file: str | os.PathLike) -> dict[str, Any]:
    """The JSON of a saved config; ``ValueError`` naming the file if it is not valid JSON."""
    try:
        return json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"Cannot read the config {config_file}: {error}. The file is corrupt or truncated; {SAVE_ADVICE}.") from error


def read_config(config_class: type[PretrainedConfig], config_file: str | os.PathLike) -> PretrainedConfig:
    """The ``config_class`` config in ``config_file`` (without the weights' checksum, which describes the file, not the
    model); ``ValueError`` naming the file if it is not valid JSON."""
    data = read_config_dict(config_file)
    data.pop(CHECKSUM_KEY, None)
    return config_class(**data)  # what PretrainedConfig.from_json_file does with the parsed JSON


def verify_weights(weights_file: str | os.PathLike, config_file: str | os.PathLike) -> None:
    """Refuse ``weights_file`` if its sha256 differs from the one ``config_file`` records; warn if none is recorded
    (a model saved before checksums were written: it still loads)."""
    recorded = read_config_dict(config_file).get(CHECKSUM_KEY)
    if recorded is None:
        logger.warning(
            f"{config_file} records no {CHECKSUM_KEY} (saved by an older version of ocd-hf): {weights_file} cannot be verified. "
            "Save the model again to record it."
        )
        return
    actual = file_sha256(weights_file)
    if actual != recorded:
        raise ValueError(
            f"Weights {weights_file} have sha256 {actual}, but {config_file} records {recorded}: the file is corrupt (a flipped "
            f"byte keeps its size) or comes from another save; {SAVE_ADVICE}."
        )


def read_weights(weights_file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``model.safetensors``; ``ValueError`` if it is corrupt, truncated or not finite."""
    try:
        state = load_file(str(weights_file))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"Cannot read weights {weights_file}: {error}. The file is corrupt or truncated; {SAVE_ADVICE}.") from error
    not_finite = sorted(name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all())
    if not_finite:
        raise ValueError(
            f"Weights {weights_file} hold non-finite values in {not_finite[:5]}: the file is corrupt or the training "
            f"diverged; {SAVE_ADVICE}."
        )
    return state


def read_generator_files(
    config_class: type[PretrainedConfig],
    path_or_repo: str | os.PathLike,
    *,
    config: PretrainedConfig | None = None,
    subfolder: str | None = None,
    **hub_kwargs: Any,
) -> tuple[PretrainedConfig, dict[str, torch.Tensor], str]:
    """The config (``config`` if given), the checked weights and the weights' path of a saved generator, both files
    from one commit (:func:`ocd_hf.hub.resolve_files`); nothing is built, so a corrupt file fails first."""
    config_file, weights_file = resolve_files(path_or_repo, [CONFIG_NAME, WEIGHTS_NAME], subfolder=subfolder, **hub_kwargs)
    config = config or read_config(config_class, config_file)
    state = read_weights(weights_file)  # a truncated file is named as such first
    verify_weights(weights_file, config_file)
    return config, state, weights_file


def load_checked_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Load ``state`` into ``module``, refusing missing, unexpected or misshapen tensors (nothing is loaded then)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or misshapen:
        raise ValueError(
            f"Weights in {source} do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {misshapen[:5]}. Were {CONFIG_NAME} and {WEIGHTS_NAME} saved together?"
        )
    module.load_state_dict(state)


def save_weights(save_directory: str | os.PathLike, config_data: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Write ``model.safetensors`` (``state`` made contiguous on CPU), then ``config.json`` (``config_data`` plus the
    weights' sha256, ``weights_sha256``), each through a temporary file renamed into place, into ``save_directory``."""
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file; pass a directory.")
    os.makedirs(save_directory, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    weights_file = os.path.join(save_directory, WEIGHTS_NAME)
    replace_atomically(weights_file, lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
    data = {**config_data, CHECKSUM_KEY: file_sha256(weights_file)}
    replace_atomically(os.path.join(save_directory, CONFIG_NAME), lambda path: path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def save_generator(save_directory: str | os.PathLike, config: PretrainedConfig, state: Mapping[str, torch.Tensor]) -> None:
    """:func:`save_weights` of ``state`` with the JSON ``config.save_pretrained`` writes."""
    save_weights(save_directory, json.loads(config.to_json_string(use_diff=True)), state)


def read_components(
    path_or_repo: str | os.PathLike,
    expected: Mapping[str, Mapping[str, Any]],
    root_weights: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    **hub_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """The checked tensors of the component folders ``expected`` names (``{name: its saved config}``), as one state with
    ``name.`` prefixes, from the commit of ``root_weights`` (the root ``model.safetensors`` already resolved).

    Refuses a ``model_index.json`` naming other components, a component config other than the one the root config
    implies (folders from different saves), and weights whose sha256 differs from their config's."""
    files = [MODEL_INDEX_NAME] + [f"{name}/{filename}" for name in expected for filename in (CONFIG_NAME, WEIGHTS_NAME)]
    pinned = snapshot_revision(root_weights, f"{subfolder.strip('/')}/{WEIGHTS_NAME}" if subfolder else WEIGHTS_NAME) or revision
    index_file, *paths = resolve_files(path_or_repo, files, subfolder=subfolder, revision=pinned, **hub_kwargs)
    named = sorted(key for key in read_config_dict(index_file) if not key.startswith("_"))
    if named != sorted(expected):
        raise ValueError(f"{index_file} names the components {named}, but the root {CONFIG_NAME} builds {sorted(expected)}: the files come "
                         f"from different saves; {SAVE_ADVICE}.")
    state: dict[str, torch.Tensor] = {}
    for (name, settings), config_file, weights_file in zip(expected.items(), paths[::2], paths[1::2]):
        saved = {key: value for key, value in read_config_dict(config_file).items() if key != CHECKSUM_KEY}
        wanted = json.loads(json.dumps(dict(settings)))  # as JSON stores it (tuples become lists)
        if saved != wanted:
            raise ValueError(f"Component {name!r} in {config_file} is {saved}, but the root {CONFIG_NAME} builds {wanted}: the folders come from "
                             f"different saves; {SAVE_ADVICE}.")
        component = read_weights(weights_file)
        verify_weights(weights_file, config_file)
        state.update({f"{name}.{key}": tensor for key, tensor in component.items()})
    return state


# The keyword arguments of push_to_hub that save_pretrained(..., push_to_hub=True) passes on.
PUSH_KWARGS = ("revision", "private", "token", "commit_message", "create_pr")
CARD_KWARGS = ("eval_results", "results_table")


class GeneratorHubMixin:
    """``save_pretrained`` and ``push_to_hub`` for a generator whose ``save_files(directory, model_card_kwargs)``
    writes :attr:`hub_files`; the card is rendered with the repo id so its usage snippet loads from the Hub."""

    hub_files: tuple[str, ...] = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)

    def default_commit_message(self) -> str:
        return f"Upload {type(self).__name__}"

    def save_files(self, save_directory: str | os.PathLike, model_card_kwargs: Mapping[str, Any]) -> None:
        """Write :attr:`hub_files` into ``save_directory``; ``model_card_kwargs`` describe the card."""
        raise NotImplementedError(f"{type(self).__name__} must implement save_files(save_directory, model_card_kwargs).")

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        model_card_kwargs: Mapping[str, Any] | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> CommitInfo | None:
        """Write the generator's files (``config.json``, ``model.safetensors``, ``README.md``) into ``save_directory``.

        The model card is created, or updated when the directory already has one (sections written
        outside its generated block are kept); ``model_card_kwargs`` are fields of
        :class:`~ocd_hf.GeneratorCardData`, and ``eval_results`` / ``results_table`` may be passed
        directly. With ``push_to_hub=True`` the same model is then pushed, as transformers does, to
        ``repo_id`` (default: the directory's name, in your namespace) with :meth:`push_to_hub` and
        its keyword arguments (``revision``, ``private``, ``token``, ``commit_message``,
        ``create_pr``); the repo is created first, so the local card's usage snippet names it. Returns
        the push's ``CommitInfo``, else ``None``. Other keyword arguments of
        ``PreTrainedModel.save_pretrained`` (``safe_serialization``, ``max_shard_size``, ...) are
        accepted and ignored; on a process that is not the main one nothing is written.
        """
        card_kwargs = dict(model_card_kwargs or {})
        card_kwargs.update({name: kwargs.pop(name) for name in CARD_KWARGS if kwargs.get(name) is not None})
        push_kwargs = {name: kwargs.pop(name) for name in PUSH_KWARGS if name in kwargs}
        if not is_main_process:
            return None
        GeneratorCardData.from_kwargs(card_kwargs)  # an unknown card field fails before any repo is created
        if push_to_hub:
            repo_id = repo_id or Path(save_directory).resolve().name
            repo_id = HfApi(token=push_kwargs.get("token")).create_repo(repo_id, private=push_kwargs.get("private"), exist_ok=True).repo_id
            card_kwargs.setdefault("model_id", repo_id)
        self.save_files(save_directory, card_kwargs)
        if not push_to_hub:
            return None
        return self.push_to_hub(repo_id, model_card_kwargs=card_kwargs, **push_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        model_card_kwargs: Mapping[str, Any] | None = None,
        eval_results: list[Any] | None = None,
        results_table: str | None = None,
    ) -> CommitInfo:
        """Upload the saved files to ``repo_id`` in one commit.

        Creates the repo (and branch ``revision``) if missing; an existing card keeps its
        user-written sections. ``eval_results`` (``huggingface_hub.EvalResult`` list, the card's
        ``model-index``) and ``results_table`` (markdown) describe measured results; other card
        fields go in ``model_card_kwargs``. Returns the commit's ``CommitInfo``.
        """
        card_kwargs = dict(model_card_kwargs or {})
        if eval_results is not None:
            card_kwargs["eval_results"] = eval_results
        if results_table is not None:
            card_kwargs["results_table"] = results_table

        def save(directory: str, full_repo_id: str) -> None:
            self.save_files(directory, {**card_kwargs, "model_id": full_repo_id})

        return push_saved_directory(
            save, repo_id, allow_patterns=self.hub_files, commit_message=commit_message or self.default_commit_message(),
            revision=revision, private=private, token=token, create_pr=create_pr,
        )


class HeadGeneratorHubMixin(GeneratorHubMixin):
    """Saving and loading shared by the task-conditioned head generators (Mc-Di, D2NWG): ``config.json``,
    ``model.safetensors`` and the card of :meth:`model_card`; ``from_pretrained`` refuses another encoder through
    the model's ``check_encoder``. A subclass sets ``config_class`` and ``method_name``.

    A subclass whose :meth:`component_configs` names components (submodules, e.g. D2NWG's VAE, dataset encoder and
    denoiser) is saved diffusers-style: ``model_index.json`` names the components, each is in its own
    folder with its ``config.json`` (its class and the keyword arguments that build it) and ``model.safetensors``, and the
    root ``model.safetensors`` holds the rest of the state. A directory saved before components existed (everything in the
    root ``model.safetensors``) still loads."""

    method_name: str = "head"

    def model_card(self, **model_card_kwargs: Any) -> Any:
        """The model card; keyword arguments are fields of :class:`~ocd_hf.GeneratorCardData`."""
        raise NotImplementedError(f"{type(self).__name__} must implement model_card(**model_card_kwargs).")

    @classmethod
    def component_configs(cls, config: PretrainedConfig) -> dict[str, dict[str, Any]]:
        """``{name: saved config}`` of the submodules that ``config`` builds and that are saved as components: the component's
        class (``_class_name``) and the keyword arguments that build it. None by default: the whole state is one file."""
        return {}

    @property
    def hub_files(self) -> tuple[str, ...]:  # type: ignore[override]  # a component folder's files are named per instance
        """The files :meth:`save_files` writes (and :meth:`push_to_hub` uploads)."""
        names = list(self.component_configs(self.config))
        index = [MODEL_INDEX_NAME] if names else []
        return (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, *index, *(f"{name}/{filename}" for name in names for filename in (CONFIG_NAME, WEIGHTS_NAME)))

    def save_files(self, save_directory: str | os.PathLike, model_card_kwargs: Mapping[str, Any] | None = None) -> None:
        """Write ``config.json``, ``model.safetensors``, the component folders with ``model_index.json`` (if any) and
        ``README.md`` (sections written outside its generated block survive). :meth:`save_pretrained` (which can also
        push) and :meth:`push_to_hub` call this."""
        card = self.model_card(**dict(model_card_kwargs or {}))  # unknown card fields fail before anything is written
        state = self.state_dict()
        components = self.component_configs(self.config)
        save_generator(save_directory, self.config, {key: value for key, value in state.items() if key.split(".", 1)[0] not in components})
        for name, settings in components.items():
            prefix = f"{name}."
            save_weights(os.path.join(save_directory, name), settings, {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)})
        if components:
            # diffusers' model_index.json: each component as [the module of its class, the class]
            index = {"_class_name": type(self).__name__, **{name: [type(getattr(self, name)).__module__, settings["_class_name"]]
                                                            for name, settings in components.items()}}
            replace_atomically(os.path.join(save_directory, MODEL_INDEX_NAME),
                               lambda path: path.write_text(json.dumps(index, indent=2) + "\n"))
        write_card(card, save_directory)

    def default_commit_message(self) -> str:
        return f"Upload {self.method_name} head generator for {self.config.encoder_id or 'its encoder'}"

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        encoder: torch.nn.Module | None = None,
        config: PretrainedConfig | None = None,
        revision: str | None = None,
        subfolder: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Load a saved generator from a directory (its ``subfolder``, if given) or a Hub repo, every file from one
        commit, the weights checked before anything is built.

        With ``encoder``, refuses it if its embedding size or fingerprint differs from the config's
        (``check_encoder``). Keyword arguments ``transformers`` passes along (e.g. ``trust_remote_code``) are ignored.
        """
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no positional arguments besides the path.")
        hub_kwargs = {"cache_dir": cache_dir, "token": token, "local_files_only": local_files_only, "force_download": force_download}
        config, state, weights_file = read_generator_files(
            cls.config_class, pretrained_model_name_or_path, config=config, subfolder=subfolder, revision=revision, **hub_kwargs
        )
        components = cls.component_configs(config)
        # Saved before components existed: the root model.safetensors holds every tensor and loads as it is.
        if components and not any(key.split(".", 1)[0] in components for key in state):
            state.update(read_components(pretrained_model_name_or_path, components, weights_file, subfolder=subfolder, revision=revision,
                                         **hub_kwargs))
        model = cls(config)
        load_checked_state(model, state, weights_file)
        if encoder is not None:
            model.check_encoder(encoder)
        return model.eval()
