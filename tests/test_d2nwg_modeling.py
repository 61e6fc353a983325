"""The D2NWG head generator: batched, seeded generation equal to per-task calls, both samplers, exact save/load and
AutoModel, the encoder check, the input checks it shares with Mc-Di, and sample selection."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.d2nwg import DIM, TINY, tiny_d2nwg
from helpers.mcdi import support_set
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel

from ocd_hf.fewshot import encoder_fingerprint
from ocd_hf.methods.d2nwg import (
    D2NWGConfig,
    D2NWGHeadGenerator,
    LatentDenoiser,
    RowAlignedEncoder,
    WeightVAE,
    make_scheduler,
    sample_latents,
    select_heads,
)
from ocd_hf.modeling_utils import save_generator

LATENT = TINY["vae_config"]["latent_size"]


@pytest.mark.parametrize("settings", [{}, {"encoder_type": "set_transformer", "vectorization": "model"},
                                      {"encoder_type": "mlp", "vectorization": "layer", "chunk_size": 10}], ids=["row", "model", "layer"])
def test_generation_is_batched_over_tasks_and_draws_and_seeded(settings):
    model = tiny_d2nwg(**settings)
    support, labels = support_set(num_tasks=3, n_way=4, k_shot=2)
    heads = model.generate_heads(support, labels, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert heads.shape == (3, 2, 4, DIM + 1) and heads.isfinite().all()
    assert torch.equal(model.generate_heads(support, labels, num_samples=2, generator=torch.Generator().manual_seed(0)), heads)
    assert not torch.equal(heads[:, 0], heads[:, 1])  # every draw has its own noise
    model, support = model.double(), support.double()
    tokens = model.config.vectorizer.num_tokens(4)
    noise = torch.randn(3, 2, tokens, LATENT, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    batched = model.generate_heads(support, labels, num_samples=2, noise=noise)
    for task in range(3):
        alone = model.generate_heads(support[task], labels[task], num_samples=2, noise=noise[task])
        assert alone.shape == (2, 4, DIM + 1)
        torch.testing.assert_close(alone, batched[task], rtol=1e-10, atol=1e-10)


def test_the_ancestral_sampler_is_seeded_and_differs_from_ddim():
    model = tiny_d2nwg(sampler="ddpm", num_inference_steps=8)
    support, labels = support_set(num_tasks=1, n_way=3, k_shot=2)
    noise = torch.randn(1, 3, LATENT, generator=torch.Generator().manual_seed(2))
    first = model.generate_heads(support[0], labels[0], noise=noise, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate_heads(support[0], labels[0], noise=noise, generator=torch.Generator().manual_seed(0)), first)
    # Same start, other per-step noise: another head (DDPM adds σ_t ξ at every step, DDIM with η = 0 none).
    assert not torch.equal(model.generate_heads(support[0], labels[0], noise=noise, generator=torch.Generator().manual_seed(1)), first)
    assert D2NWGConfig().inference_steps == 20 and D2NWGConfig(sampler="ddpm").inference_steps == 1024


def test_save_load_round_trip_is_exact_and_automodel_loads_it(tmp_path):
    model = tiny_d2nwg(vae_loss="code", harvest_config={"n_way": 4, "k_shot": 2})
    with torch.no_grad():
        model.weight_mean.normal_()
        model.weight_std.uniform_(0.5, 2.0)
    model.config.latent_scale = 0.37
    model.save_pretrained(tmp_path, model_card_kwargs={"training_config": {"num_steps": 3}})
    # diffusers-style: model_index.json names the components, each in its own folder with its own config and weights
    components = ["dataset_encoder", "denoiser", "vae"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["README.md", *components, "config.json", "model.safetensors", "model_index.json"])
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index == {"_class_name": "D2NWGHeadGenerator", "vae": [WeightVAE.__module__, "WeightVAE"],
                     "dataset_encoder": [RowAlignedEncoder.__module__, "RowAlignedEncoder"],
                     "denoiser": [LatentDenoiser.__module__, "LatentDenoiser"]}
    for name in components:
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["config.json", "model.safetensors"]
        assert set(load_file(tmp_path / name / "model.safetensors")) == {k.split(".", 1)[1] for k in model.state_dict() if k.startswith(f"{name}.")}
    assert set(load_file(tmp_path / "model.safetensors")) == {"weight_mean", "weight_std"}
    vae = json.loads((tmp_path / "vae" / "config.json").read_text())
    rebuilt = WeightVAE(**{key: value for key, value in vae.items() if not key.startswith("_") and key != "weights_sha256"})
    rebuilt.load_state_dict(load_file(tmp_path / "vae" / "model.safetensors"))  # a component's folder builds and loads it alone
    assert vae["_class_name"] == "WeightVAE" and vae["width"] == DIM + 1 and vae["latent_size"] == LATENT
    for loaded in (D2NWGHeadGenerator.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        # AutoModel records the path; the saved config also carries the checksum of the weights file
        saved = {key: value for key, value in loaded.config.to_dict().items() if key not in ("_name_or_path", "weights_sha256")}
        assert type(loaded) is D2NWGHeadGenerator and saved == {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
    support, labels = support_set(n_way=4)
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(loaded.generate_heads(support[0], labels[0], 2, generator()), model.generate_heads(support[0], labels[0], 2, generator()))
    card = (tmp_path / "README.md").read_text()
    for text in ("tiny-encoder", "0123abcd", "row-aligned", "loss `code`", "`ddim` sampler, 4 steps", "`num_steps` | 3", "best 3 of 50",
                 "`vae/`, `dataset_encoder/`, `denoiser/`"):
        assert text in card, text
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "d2nwg"


def test_the_single_file_format_of_earlier_saves_still_loads_and_a_subfolder_loads(tmp_path):
    model = tiny_d2nwg()
    save_generator(tmp_path / "old", model.config, model.state_dict())  # what save_pretrained wrote before the components had folders
    model.save_pretrained(tmp_path / "repo" / "sub")
    for loaded in (D2NWGHeadGenerator.from_pretrained(tmp_path / "old"), D2NWGHeadGenerator.from_pretrained(tmp_path / "repo", subfolder="sub")):
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name


def test_components_from_another_save_or_with_a_flipped_byte_are_refused(tmp_path):
    tiny_d2nwg().save_pretrained(tmp_path / "a")
    tiny_d2nwg(denoiser_config={"hidden_size": 8}).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "denoiser").rename(tmp_path / "a-denoiser")
    (tmp_path / "b" / "denoiser").rename(tmp_path / "a" / "denoiser")
    with pytest.raises(ValueError, match=r"Component 'denoiser' in .*'hidden_size': 8.* builds .*'hidden_size': 16.*different saves; save or push"):
        D2NWGHeadGenerator.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "denoiser").rename(tmp_path / "b" / "denoiser")
    (tmp_path / "a-denoiser").rename(tmp_path / "a" / "denoiser")
    state = load_file(tmp_path / "a" / "vae" / "model.safetensors")
    state["logvar"] = state["logvar"] + 1.0
    save_file(state, tmp_path / "a" / "vae" / "model.safetensors")
    with pytest.raises(ValueError, match=r"vae/model.safetensors have sha256 .* but .*vae/config.json records"):
        D2NWGHeadGenerator.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "vae" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no vae/model.safetensors"):
        D2NWGHeadGenerator.from_pretrained(tmp_path / "a")


def test_without_a_vae_the_tokens_are_diffused_and_it_saves_without_a_vae_folder(tmp_path):
    model = tiny_d2nwg(use_vae=False)
    assert model.vae is None and model.config.latent_size == DIM + 1 and model.denoiser.token_out.out_features == DIM + 1
    with torch.no_grad():
        model.weight_mean.normal_()
        model.weight_std.uniform_(0.5, 2.0)
    model.config.latent_scale = 0.5
    heads = torch.randn(2, 3, DIM + 1)
    torch.testing.assert_close(model.encode_heads(heads), (heads - model.weight_mean) / model.weight_std)
    torch.testing.assert_close(model.reconstruct_heads(heads), heads)
    support, labels = support_set(num_tasks=2, n_way=3, k_shot=2)
    noise = torch.randn(2, 4, 3, DIM + 1, generator=torch.Generator().manual_seed(1))
    generated = model.generate_heads(support, labels, num_samples=4, noise=noise)
    assert generated.shape == (2, 4, 3, DIM + 1) and generated.isfinite().all()
    # the reference: DDIM over the tokens with the denoiser, then un-standardised (no decoder in between)
    code = model.encode_support(torch.stack([support[t][labels[t].argsort(stable=True)].view(3, 2, DIM) for t in range(2)])).repeat_interleave(4, 0)
    scheduler = make_scheduler(model.config.scheduler_config, "ddim")
    tokens = sample_latents(lambda x, t: model.denoiser(x, t, code), noise.flatten(0, 1), scheduler, model.config.inference_steps)
    torch.testing.assert_close(generated, (tokens / 0.5 * model.weight_std + model.weight_mean).view(2, 4, 3, DIM + 1))
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "vae").exists() and set(json.loads((tmp_path / "model_index.json").read_text())) == {"_class_name", "dataset_encoder", "denoiser"}
    assert "no-VAE ablation" in (tmp_path / "README.md").read_text()
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.vae is None and torch.equal(loaded.generate_heads(support, labels, num_samples=4, noise=noise), generated)


def test_push_to_hub_uploads_the_component_folders_and_loads_them_back(loopback_hub):
    model = tiny_d2nwg()
    model.push_to_hub("d2nwg-components")
    repo = f"{loopback_hub.user}/d2nwg-components"
    files = HfApi().list_repo_files(repo)
    assert sorted(files) == sorted(["README.md", "config.json", "model.safetensors", "model_index.json",
                                    *(f"{name}/{file}" for name in ("vae", "dataset_encoder", "denoiser") for file in ("config.json", "model.safetensors"))])
    loaded = D2NWGHeadGenerator.from_pretrained(repo)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_the_encoder_check_refuses_another_encoder(tmp_path):
    torch.manual_seed(1)  # else `encoder` and `other` can be drawn equal: from the global state an earlier test left and its replay below
    encoder = nn.Linear(3, DIM)
    model = tiny_d2nwg(encoder_fingerprint=encoder_fingerprint(encoder))
    model.save_pretrained(tmp_path)
    D2NWGHeadGenerator.from_pretrained(tmp_path, encoder=encoder)
    other = nn.Linear(3, DIM)
    with pytest.raises(ValueError, match="fingerprint .* differ.*'tiny-encoder'.*or train a generator"):
        D2NWGHeadGenerator.from_pretrained(tmp_path, encoder=other)
    with pytest.raises(ValueError, match=f"makes 16-d embeddings but .* {DIM}-d embeddings of 'tiny-encoder'"):
        model.check_encoder(embedding_dim=16)


@pytest.mark.parametrize("support, labels, match", [
    (torch.randn(6, DIM), torch.tensor([0, 0, 1, 1, 3, 3]), r"every label 0..N-1 .* no item labelled 2\. Relabel"),
    (torch.randn(6, DIM), torch.tensor([0.0, 0, 1, 1, 2, 2]), "integer class indices"),
    (torch.randn(7, DIM), torch.arange(7), r"at most 6 classes, or train a generator with D2NWGConfig\(max_num_classes=7\)"),
    (torch.randn(6, DIM + 1), torch.arange(6), f"size {DIM + 1} but this generator was trained on {DIM}-d embeddings"),
    (torch.randn(5, DIM), torch.tensor([0, 0, 1, 1, 1]), r"same number K of support items, got \[\[2, 3\]\]"),
], ids=["missing-label", "float-labels", "too-many-classes", "wrong-dim", "unequal-shots"])
def test_bad_support_is_refused_with_the_fix(support, labels, match):
    with pytest.raises(ValueError, match=match):
        tiny_d2nwg().generate_heads(support, labels)


def test_bad_settings_are_refused_with_the_fix():
    model = tiny_d2nwg()
    support, labels = support_set()
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        model.generate_heads(support, labels, num_samples=0)
    with pytest.raises(ValueError, match=rf"noise must have the shape of the latents, \(1, 2, 4, {LATENT}\)"):
        model.generate_heads(support, labels, num_samples=2, noise=torch.randn(2, 4, LATENT))
    with pytest.raises(ValueError, match="row_aligned.*needs vectorization='row'"):
        D2NWGConfig(vectorization="model")
    with pytest.raises(ValueError, match="vae_loss must be one of"):
        D2NWGConfig(vae_loss="lpips")
    with pytest.raises(ValueError, match=r"unknown keys \['width'\]"):
        D2NWGConfig(vae_config={"width": 3})
    with pytest.raises(ValueError, match="num_inference_steps must be in 1..1024"):
        D2NWGConfig(num_inference_steps=2000)


def test_sample_selection():
    generator = torch.Generator().manual_seed(0)
    heads = torch.randn(2, 5, 3, DIM + 1, generator=generator)
    support, labels = torch.randn(2, 6, DIM, generator=generator), torch.arange(3).repeat(2).repeat(2, 1)
    query, query_labels = torch.randn(2, 30, DIM, generator=generator), torch.arange(3).repeat(10).repeat(2, 1)
    assert torch.equal(select_heads(heads, support, labels), heads[:, :1])
    chosen = select_heads(heads, support, labels, "support_loss")
    for task in range(2):  # reference: one cross-entropy per draw
        losses = [nn.functional.cross_entropy(support[task] @ h[:, :-1].T + h[:, -1], labels[task]) for h in heads[task]]
        assert torch.equal(chosen[task, 0], heads[task, int(torch.stack(losses).argmin())])
    top = select_heads(heads, support, labels, "query_topk", query=query, query_labels=query_labels, top_k=3)
    accuracy = ((torch.einsum("bqd,bsnd->bsqn", query, heads[..., :-1]) + heads[..., -1].unsqueeze(2)).argmax(-1) == query_labels.unsqueeze(1)).float().mean(-1)
    for task in range(2):
        picked = [int((heads[task] == h).all(-1).all(-1).nonzero()) for h in top[task]]
        assert sorted(accuracy[task, picked].tolist(), reverse=True) == sorted(accuracy[task].tolist(), reverse=True)[:3]
    with pytest.raises(ValueError, match="uses the test labels"):
        select_heads(heads, support, labels, "query_topk")
    with pytest.raises(ValueError, match="method must be one of"):
        select_heads(heads, support, labels, "best")
