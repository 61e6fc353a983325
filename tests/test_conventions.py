"""The conventions transformers, PEFT and SetFit users expect: a frozen backbone and PEFT's parameter
report, the card's ``base_model_relation``, ``save_pretrained(push_to_hub=True)``, one commit per
``from_pretrained``, PEFT-wrapped backbones, pipelines, ``Trainer.predict``, the library logger, typing
and version metadata, and SetFit models (predict on texts, pushed with their hypernetwork)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_DENOISER, tabular_batch, text_batch, tiny_bert, tiny_mlp
from datasets import Dataset
from huggingface_hub import HfApi, ModelCard, file_download, hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    Trainer,
    TrainingArguments,
    pipeline,
)

import ocd_hf
from ocd_hf import OCDConfig, OCDWrapper, SetFitBackbone, push_setfit_pair, tokenizer_from_setfit
from ocd_hf import logging as ocd_logging
from ocd_hf.hub import resolve_files
from ocd_hf.methods.ocd.configuration import BACKBONE_FIELDS

TINY_OCD = {"denoiser_config": TINY_DENOISER, "condition_hidden_dim": 16}

# ----- the library logger -------------------------------------------------------------------------


@pytest.fixture
def library_logger(monkeypatch):
    """The ``ocd_hf`` logger, propagating to the root logger (where ``caplog`` listens) for the test."""
    logger = ocd_logging.get_logger()
    monkeypatch.setattr(logger, "propagate", True)
    level = logger.level
    yield logger
    logger.setLevel(level)


def test_logger_is_a_child_of_the_library_logger_with_its_own_handler():
    logger = ocd_logging.get_logger("ocd_hf.methods.ocd.harvest")
    root = logging.getLogger("ocd_hf")
    assert logger.parent is root or logger.parent.name.startswith("ocd_hf")
    assert not root.propagate and root.handlers  # transformers-style: own stderr handler, no duplicates at the root


def test_set_verbosity_controls_what_is_logged(library_logger, caplog):
    logger = ocd_logging.get_logger("ocd_hf.test")
    with caplog.at_level(logging.NOTSET):
        ocd_logging.set_verbosity_info()
        assert ocd_logging.get_verbosity() == logging.INFO
        logger.info("shown at info")
        ocd_logging.set_verbosity_error()
        logger.warning("hidden at error")
        ocd_logging.set_verbosity("warning")
        logger.warning("shown at warning")
    assert "shown at info" in caplog.text and "shown at warning" in caplog.text
    assert "hidden at error" not in caplog.text
    with pytest.raises(ValueError, match="Unknown verbosity"):
        ocd_logging.set_verbosity("loud")


@pytest.mark.parametrize("value, level", [("info", logging.INFO), ("ERROR", logging.ERROR), ("", logging.WARNING), ("loud", logging.WARNING)])
def test_verbosity_environment_variable_is_parsed(monkeypatch, value, level):
    monkeypatch.setenv("OCD_HF_VERBOSITY", value)
    assert ocd_logging._env_level() == level


def test_verbosity_environment_variable_sets_the_level_of_a_fresh_interpreter():
    env = {**os.environ, "OCD_HF_VERBOSITY": "info"}
    code = "import ocd_hf.logging as l; print(l.get_verbosity())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(result.stdout.strip()) == logging.INFO


def test_library_has_no_informational_warnings_warn():
    """Information goes through the logger; ``warnings.warn`` is left for deprecations and user errors."""
    import pathlib

    package = pathlib.Path(ocd_hf.__file__).parent
    offenders = [
        f"{path.relative_to(package)}:{number}"
        for path in package.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if "warnings.warn(" in line and not ("FutureWarning" in line or "DeprecationWarning" in line)
    ]
    assert offenders == []


# ----- typing and version metadata ----------------------------------------------------------------


def pyproject() -> dict:
    import pathlib

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())


def test_package_is_typed():
    import pathlib

    assert (pathlib.Path(ocd_hf.__file__).parent / "py.typed").is_file()
    assert "py.typed" in pyproject()["tool"]["setuptools"]["package-data"]["ocd_hf"]


def test_one_version_string():
    from importlib.metadata import version

    project = pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ocd_hf.__version__"}
    assert version("ocd-hf") == ocd_hf.__version__


# ----- PEFT conventions ---------------------------------------------------------------------------


def test_attach_freezes_the_backbone_and_reports_trainable_parameters(capsys, tmp_path):
    backbone = tiny_bert()
    ocd = OCDWrapper.attach(backbone, "classifier", **TINY_OCD)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert all(p.requires_grad for p in ocd.hypernetwork.parameters())
    hypernetwork = sum(p.numel() for p in ocd.hypernetwork.parameters())
    total = hypernetwork + sum(p.numel() for p in backbone.parameters())
    assert ocd.get_nb_trainable_parameters() == (hypernetwork, total)
    ocd.print_trainable_parameters()
    expected = f"trainable params: {hypernetwork:,d} || all params: {total:,d} || trainable%: {100 * hypernetwork / total:.4f}"
    assert capsys.readouterr().out.strip() == expected
    ocd.save_pretrained(tmp_path)
    other = tiny_bert()  # a backbone that was never attached: from_pretrained freezes it too
    loaded = OCDWrapper.from_pretrained(tmp_path, backbone=other)
    assert not any(p.requires_grad for p in other.parameters()) and loaded.get_nb_trainable_parameters() == (hypernetwork, total)


def test_card_declares_the_hypernetwork_an_adapter_of_its_base_model(tmp_path):
    ocd = OCDWrapper.attach(tiny_bert(), "classifier", base_model_name_or_path="user/tiny-bert", **TINY_OCD)
    ocd.save_pretrained(tmp_path / "hub-base")
    card = ModelCard.load(tmp_path / "hub-base" / "README.md")
    assert card.data.base_model == "user/tiny-bert" and card.data.base_model_relation == "adapter"
    assert "base_model_relation: adapter" in (tmp_path / "hub-base" / "README.md").read_text()
    # A local base model is no Hub id: neither base_model nor a relation to it is written.
    local = OCDWrapper.attach(tiny_bert(), "classifier", base_model_name_or_path=str(tmp_path), **TINY_OCD)
    local.save_pretrained(tmp_path / "local-base")
    metadata = ModelCard.load(tmp_path / "local-base" / "README.md").data.to_dict()
    assert "base_model" not in metadata and "base_model_relation" not in metadata


# ----- from_pretrained: one commit, subfolders ----------------------------------------------------


def test_from_pretrained_reads_config_and_weights_from_one_commit(loopback_hub, monkeypatch):
    """A push landing between the download of config.json and of model.safetensors must not pair them."""
    backbone = tiny_bert()
    first = OCDWrapper.attach(backbone, "classifier", **TINY_OCD)
    second = OCDWrapper.attach(backbone, "classifier", **{**TINY_OCD, "condition_hidden_dim": 8})  # other tensor shapes
    first.push_to_hub("ocd-race")
    repo = f"{loopback_hub.user}/ocd-race"
    original, pushed = file_download.get_hf_file_metadata, []

    def metadata_then_push(*args, **kwargs):
        metadata = original(*args, **kwargs)
        if not pushed:  # after the first file's metadata: someone pushes another model to main
            pushed.append(None)
            pushed[0] = second.push_to_hub("ocd-race").oid
        return metadata

    monkeypatch.setattr(file_download, "get_hf_file_metadata", metadata_then_push)
    loaded = OCDWrapper.from_pretrained(repo, backbone=backbone)
    assert pushed, "the race was not staged"
    assert loaded.config.condition_hidden_dim == 16
    for name, tensor in first.hypernetwork.state_dict().items():
        assert torch.equal(tensor, loaded.hypernetwork.state_dict()[name]), name
    config_file, weights_file = resolve_files(repo, ["config.json", "model.safetensors"])
    assert Path(config_file).parent == Path(weights_file).parent and Path(config_file).parent.name == pushed[0]


def test_from_pretrained_subfolder_on_the_hub_and_locally(loopback_hub, tmp_path):
    backbone = tiny_bert()
    ocd = OCDWrapper.attach(backbone, "classifier", **TINY_OCD)
    ocd.save_pretrained(tmp_path / "repo" / "ocd")
    api = HfApi()
    repo = api.create_repo("ocd-sub").repo_id
    api.upload_folder(repo_id=repo, folder_path=tmp_path / "repo")
    inputs, generator = text_batch(), lambda: torch.Generator().manual_seed(0)
    expected = ocd(**inputs, generator=generator()).logits
    for source in (repo, tmp_path / "repo"):
        loaded = OCDWrapper.from_pretrained(source, subfolder="ocd", backbone=backbone)
        torch.testing.assert_close(loaded(**inputs, generator=generator()).logits, expected, atol=0, rtol=0)
    via_auto = AutoModel.from_pretrained(repo, subfolder="ocd", backbone=backbone)
    assert isinstance(via_auto, OCDWrapper)
    api.delete_file("ocd/model.safetensors", repo)
    with pytest.raises(RemoteEntryNotFoundError, match="has no file 'ocd/model.safetensors'"):
        OCDWrapper.from_pretrained(repo, subfolder="ocd", backbone=backbone)
    with pytest.raises(FileNotFoundError, match="config.json"):
        OCDWrapper.from_pretrained(tmp_path / "repo", subfolder="elsewhere", backbone=backbone)


# ----- save_pretrained(push_to_hub=True) ----------------------------------------------------------


def test_save_pretrained_push_to_hub_pushes_to_the_directory_name_by_default(loopback_hub, tmp_path):
    backbone = tiny_bert()
    ocd = OCDWrapper.attach(backbone, "classifier", base_model_name_or_path="user/tiny-bert", **TINY_OCD)
    commit = ocd.save_pretrained(tmp_path / "ocd-saved", push_to_hub=True, commit_message="saved and pushed", results_table="| a |")
    repo = f"{loopback_hub.user}/ocd-saved"
    assert HfApi().model_info(repo).sha == commit.oid
    assert sorted(HfApi().list_repo_files(repo)) == ["README.md", "config.json", "model.safetensors"]
    assert [c["title"] for c in loopback_hub.server.load("models", repo)["commits"].values()] == ["initial commit", "saved and pushed"]
    assert sorted(p.name for p in (tmp_path / "ocd-saved").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert f'OCDWrapper.from_pretrained("{repo}")' in (tmp_path / "ocd-saved" / "README.md").read_text()  # the local card names the repo
    assert "| a |" in ModelCard.load(repo).text
    loaded = OCDWrapper.from_pretrained(repo, backbone=backbone)
    for name, tensor in ocd.hypernetwork.state_dict().items():
        assert torch.equal(tensor, loaded.hypernetwork.state_dict()[name]), name

    # repo_id= and push_to_hub's own arguments (a branch here) are honoured; without push_to_hub nothing is pushed.
    ocd.save_pretrained(tmp_path / "elsewhere", push_to_hub=True, repo_id="ocd-named", revision="dev")
    assert HfApi().list_repo_files(f"{loopback_hub.user}/ocd-named") == []
    assert "config.json" in HfApi().list_repo_files(f"{loopback_hub.user}/ocd-named", revision="dev")
    assert ocd.save_pretrained(tmp_path / "ocd-local-only") is None
    assert not HfApi().repo_exists(f"{loopback_hub.user}/ocd-local-only")


# ----- PEFT-wrapped backbones ---------------------------------------------------------------------


def lora_bert():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
    return peft.get_peft_model(tiny_bert(), config)


@pytest.mark.parametrize(
    "target, adapter",
    [
        ("layer.0.attention.self.query", "attention.self.query"),  # a LoRA layer
        ("attention.self.query.base_layer", "attention.self.query"),  # its base layer, whose output misses the adapter's
        ("attention.self.query.lora_A.default", "attention.self.query"),
        ("classifier", "classifier"),  # the head, a modules_to_save copy in a sequence-classification PeftModel
    ],
)
def test_a_layer_with_a_peft_adapter_is_refused_with_the_fix(target, adapter):
    with pytest.raises(ValueError, match=r"PEFT adapter layer .*" + adapter.replace(".", r"\.") + r".*merge_and_unload\(\)"):
        OCDWrapper.attach(lora_bert(), target, **TINY_OCD)


def test_a_merged_peft_model_is_an_ordinary_backbone():
    peft_model = lora_bert().eval()
    inputs = text_batch()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    merged = peft_model.merge_and_unload()
    ocd = OCDWrapper.attach(merged, "layer.0.attention.self.query", example_inputs=inputs, **TINY_OCD)
    assert type(ocd.target_layer) is torch.nn.Linear
    cond = ocd.conditioning(**inputs)
    torch.testing.assert_close(cond.outputs.logits, expected, atol=1e-5, rtol=1e-5)  # the adapter's effect is kept
    zero = torch.zeros(4, *ocd.config.weight_shape)
    torch.testing.assert_close(ocd.forward_with_deltas(zero, **inputs).logits, expected, atol=1e-5, rtol=1e-5)


# ----- transformers: pipelines and Trainer --------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(45)]]  # tiny_bert's 50 ids
TEXTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10", "w11"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def named_bert():
    backbone = tiny_bert()
    backbone.config.id2label, backbone.config.label2id = LABELS, {name: index for index, name in LABELS.items()}
    return backbone


def tokenizer_in(directory: Path):
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))


def test_from_backbone_copies_the_label_names():
    config = OCDConfig.from_backbone(named_bert(), "classifier")
    assert config.id2label == LABELS and config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    assert config.num_labels == 3 and config.problem_type == "single_label_classification"
    regression = OCDConfig.from_backbone(tiny_mlp(), "head", example_inputs=tabular_batch())
    assert regression.problem_type == "regression" and regression.num_labels == 1
    # A config built elsewhere (e.g. by train_hypernetwork from harvest metadata) takes them from the backbone on attach.
    bare = OCDConfig(**{k: v for k, v in config.to_dict().items() if k in BACKBONE_FIELDS}, denoiser_config=TINY_DENOISER)
    assert bare.id2label != LABELS
    assert OCDWrapper(bare, named_bert()).config.id2label == LABELS


def test_text_classification_pipeline(tmp_path):
    ocd = OCDWrapper.attach(named_bert(), "classifier", generator_type="regression", **TINY_OCD)  # deterministic draws
    tokenizer = tokenizer_in(tmp_path)
    classifier = pipeline("text-classification", model=ocd, tokenizer=tokenizer, top_k=None)
    assert AutoModelForSequenceClassification._model_mapping[OCDConfig] is OCDWrapper
    results = classifier(TEXTS)
    with torch.no_grad():
        expected = ocd(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1)
    for scores, probabilities in zip(results, expected):
        by_label = {entry["label"]: entry["score"] for entry in scores}
        assert set(by_label) == set(LABELS.values())
        for index, name in LABELS.items():
            assert by_label[name] == pytest.approx(float(probabilities[index]), abs=1e-5)


def test_image_classification_pipeline():
    from PIL import Image
    from transformers import DeiTConfig, DeiTForImageClassification, DeiTImageProcessor

    torch.manual_seed(0)
    config = DeiTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=2, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1},
    )
    ocd = OCDWrapper.attach(DeiTForImageClassification(config).eval(), "classifier", generator_type="regression", **TINY_OCD)
    processor = DeiTImageProcessor(size={"height": 8, "width": 8}, crop_size={"height": 8, "width": 8})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(3)]
    classify = pipeline("image-classification", model=ocd, image_processor=processor)
    assert AutoModelForImageClassification._model_mapping[OCDConfig] is OCDWrapper
    results = classify(images, top_k=2)
    with torch.no_grad():
        expected = ocd(**processor(images, return_tensors="pt")).logits.softmax(-1)
    for scores, probabilities in zip(results, expected):
        by_label = {entry["label"]: entry["score"] for entry in scores}
        assert by_label == pytest.approx({"cat": float(probabilities[0]), "dog": float(probabilities[1])}, abs=1e-5)


def test_trainer_predict_with_default_arguments(tmp_path):
    ocd = OCDWrapper.attach(named_bert(), "classifier", generator_type="regression", **TINY_OCD)
    tokenizer = tokenizer_in(tmp_path / "tokenizer")
    encoded = tokenizer(TEXTS, padding="max_length", max_length=8)
    dataset = Dataset.from_dict({"text": TEXTS, "label": [0, 2, 1, 2], **encoded})  # "text" is not a model input
    trainer = Trainer(model=ocd, args=TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to=[], use_cpu=True))
    prediction = trainer.predict(dataset)
    inputs = {name: torch.tensor(encoded[name]) for name in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        expected = ocd(**inputs, labels=torch.tensor([0, 2, 1, 2]))
    np.testing.assert_allclose(prediction.predictions, expected.logits.numpy(), atol=1e-5)
    assert prediction.label_ids.tolist() == [0, 2, 1, 2]
    assert prediction.metrics["test_loss"] == pytest.approx(float(expected.loss), abs=1e-5)
    assert ocd.main_input_name == "input_ids"


# ----- SetFit -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setfit_bert(tmp_path_factory) -> Path:
    pytest.importorskip("setfit")
    from test_backbones import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("setfit_bert"))


def setfit_model(bert_dir: Path, seed: int = 1):
    from test_backbones import tiny_setfit_model

    model = tiny_setfit_model(bert_dir)
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.model_head.linear.weight)
    return model


SETFIT_TEXTS = ["the food was good", "awful taste", "not very sweet tea , but fine coffee", "great"]


def test_from_setfit_predicts_labels_and_ensemble_probabilities_of_raw_texts(setfit_bert):
    model = setfit_model(setfit_bert)
    ocd = OCDWrapper.from_setfit(model, generator_type="regression", **TINY_OCD)
    assert isinstance(ocd.backbone, SetFitBackbone) and ocd.target_name == "head" and ocd.tokenizer is not None
    assert ocd.config.id2label == {0: "class_0", 1: "class_1", 2: "class_2"}
    probabilities = ocd.predict_proba(SETFIT_TEXTS, batch_size=3)
    with torch.no_grad():
        expected = ocd(**ocd.backbone.tokenize(SETFIT_TEXTS, tokenizer_from_setfit(model))).logits.softmax(-1)
        base = model.predict_proba(SETFIT_TEXTS)
    torch.testing.assert_close(probabilities, expected, atol=1e-6, rtol=0)  # the OCD ensemble, batched
    assert not torch.allclose(probabilities, base.float(), atol=1e-4)  # not the SetFit model's own probabilities
    classes = probabilities.argmax(-1).tolist()
    assert ocd.predict(SETFIT_TEXTS) == [f"class_{index}" for index in classes]  # SetFit's labels, as SetFit returns
    assert ocd.predict(SETFIT_TEXTS, use_labels=False).tolist() == classes
    assert ocd.predict(SETFIT_TEXTS[1]) == f"class_{classes[1]}"
    assert ocd.predict_proba(SETFIT_TEXTS[1], as_numpy=True).shape == (3,)

    model.labels = None  # SetFit returns class ids when its model has no labels
    unnamed = OCDWrapper.from_setfit(model, generator_type="regression", **TINY_OCD)
    assert torch.equal(unnamed.predict(SETFIT_TEXTS), unnamed.predict_proba(SETFIT_TEXTS).argmax(-1))
    body = OCDWrapper.from_setfit(model, target_module="body.encoder.layer.0.output.dense", **TINY_OCD)
    assert body.config.per_token and body.predict_proba(SETFIT_TEXTS, num_samples=2).shape == (4, 3)


def test_push_setfit_pair_pins_the_setfit_model_it_pushed(setfit_bert, loopback_hub):
    from setfit import SetFitModel

    model = setfit_model(setfit_bert)
    ocd = OCDWrapper.from_setfit(model, generator_type="regression", **TINY_OCD)
    expected = ocd.predict_proba(SETFIT_TEXTS)
    commits = push_setfit_pair(ocd, model, "ocd-pair", results_table="| row |")
    setfit_repo, repo = f"{loopback_hub.user}/ocd-pair-setfit", f"{loopback_hub.user}/ocd-pair"
    assert commits.setfit.repo_url.repo_id == setfit_repo and commits.ocd.repo_url.repo_id == repo

    pulled_setfit = SetFitModel.from_pretrained(setfit_repo)  # SetFit users load it as usual
    torch.testing.assert_close(pulled_setfit.predict_proba(SETFIT_TEXTS), model.predict_proba(SETFIT_TEXTS))
    config = json.loads(Path(hf_hub_download(repo, "config.json")).read_text())
    assert config["base_model_name_or_path"] == setfit_repo and config["base_model_class"] == "SetFitModel"
    assert config["base_model_revision"] == commits.setfit.oid == HfApi().model_info(setfit_repo).sha
    card = ModelCard.load(repo)
    assert card.data.base_model == setfit_repo and card.data.base_model_relation == "adapter"

    # The SetFit repo moves on; the hypernetwork still loads the SetFit model it was trained on (and its tokenizer).
    setfit_model(setfit_bert, seed=2).push_to_hub(setfit_repo)
    loaded = OCDWrapper.from_pretrained(repo)
    assert isinstance(loaded.backbone, SetFitBackbone)
    torch.testing.assert_close(loaded.predict_proba(SETFIT_TEXTS), expected, atol=1e-6, rtol=0)
    assert loaded.predict(SETFIT_TEXTS) == ocd.predict(SETFIT_TEXTS)

    with pytest.raises(ValueError, match="holds other weights"):
        push_setfit_pair(ocd, setfit_model(setfit_bert, seed=3), "ocd-other")
    assert not HfApi().repo_exists(f"{loopback_hub.user}/ocd-other-setfit")
