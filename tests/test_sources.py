"""The offline sources on small fixtures written to tmp_path (no Debian package, no network)."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from ocd_hf import sources
from ocd_hf.episodes import EpisodeSampler, TaskDistribution
from ocd_hf.sources import (
    MissingSourceError,
    classification_items,
    image_features,
    load_debian_sections,
    load_fashion_mnist_items,
    load_hub_classification,
    load_wordnet_supersenses,
    matplotlib_fonts,
    render_glyphs,
    source_metadata,
    text_features,
)

# --- WordNet ------------------------------------------------------------------------------------

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by\n  2 Princeton University\n"
DATA_NOUN = LICENCE + (
    "00015388 03 n 01 animal 0 002 @ 00004475 n 0000 ~ 00016140 n 0000 | a living organism characterized by voluntary movement\n"
    "02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; occurs in many breeds; "
    '"the dog barked all night"\n'
    "03001627 06 n 01 chair 0 000 | a seat for one person, with a support for the back; \"he put his coat over the back of the chair\"\n"
)
DATA_VERB = LICENCE + (
    '00004032 29 v 02 sigh 0 suspire 4 000 | heave or utter a sigh; breathe deeply and heavily; "She sighed sadly"\n'
    "00005041 29 v 01 respire 1 000 | ; an empty first clause\n"
)


def write_wordnet(directory, noun=DATA_NOUN, verb=DATA_VERB):
    directory.mkdir(exist_ok=True)
    (directory / "data.noun").write_text(noun)
    (directory / "data.verb").write_text(verb)
    return directory


def test_wordnet_supersenses_from_data_files(tmp_path):
    dataset = load_wordnet_supersenses(write_wordnet(tmp_path / "wn"), parts_of_speech=("noun", "verb"))
    assert dataset.features == text_features()
    assert dataset["id"] == ["noun:00015388", "noun:02084071", "noun:03001627", "verb:00004032"]
    assert dataset["text"] == [
        "a living organism characterized by voluntary movement",
        "a member of the genus Canis",
        "a seat for one person, with a support for the back",
        "heave or utter a sigh",
    ]
    assert dataset["label"] == [3, 5, 6, 29]
    assert dataset["label_name"] == ["noun.Tops", "noun.animal", "noun.artifact", "verb.body"]
    metadata = source_metadata(dataset)
    assert metadata["skipped_empty_glosses"] == 1 and metadata["items"] == 4
    assert set(metadata["files"]) == {"data.noun", "data.verb"} and all(len(h) == 64 for h in metadata["files"].values())


def test_wordnet_errors_name_the_fix(tmp_path):
    with pytest.raises(MissingSourceError, match=r"missing data.noun, data.verb, data.adj, data.adv\): .*apt-get install -y wordnet-base"):
        load_wordnet_supersenses(tmp_path / "nowhere")
    assert issubclass(MissingSourceError, FileNotFoundError)
    write_wordnet(tmp_path / "wn", noun=LICENCE + "not a synset line\n")
    with pytest.raises(ValueError, match=r"data.noun:3 is not a WordNet data line"):
        load_wordnet_supersenses(tmp_path / "wn", parts_of_speech=("noun",))
    with pytest.raises(ValueError, match=r"unknown parts of speech \['nouns'\]"):
        load_wordnet_supersenses(tmp_path / "wn", parts_of_speech=("nouns",))


# --- Debian sections ----------------------------------------------------------------------------

DUMPAVAIL = """Package: python3-numpy
Version: 1:1.24.2-1
Section: python
Description: Fast array facility to the Python 3 language
 Numpy contains a powerful N-dimensional array object.
Description-md5: 0123

Package: nvidia-kernel-dkms
Section: non-free/kernel
Description: NVIDIA binary kernel module DKMS source

Package: python3-numpy
Section: python
Description: a second version of the same package

Package: zsh
Section: shells
Description: shell with lots of features

Package: orphan
Description: a package without a section

Package: bash
Section: shells
Description: GNU Bourne Again SHell
"""


def test_debian_sections_snapshot_round_trip(tmp_path):
    dump, snapshot = tmp_path / "dumpavail.txt", tmp_path / "snapshots" / "sections.jsonl.gz"
    dump.write_text(DUMPAVAIL)
    dataset = load_debian_sections(snapshot, dumpavail_path=dump)
    assert dataset.features == text_features()
    assert dataset["id"] == ["bash", "nvidia-kernel-dkms", "python3-numpy", "zsh"]
    assert dataset["label_name"] == ["shells", "kernel", "python", "shells"]
    assert dataset["label"] == [2, 0, 1, 2]
    assert dataset["text"][2] == "Fast array facility to the Python 3 language"
    metadata = source_metadata(dataset)
    assert metadata["skipped"] == {"duplicates": 1, "without_section_or_description": 1}
    assert metadata["dumpavail_sha256"] == hashlib.sha256(DUMPAVAIL.encode()).hexdigest()
    assert metadata["created"][:2] == "20" and metadata["snapshot"] == str(snapshot)

    dump.unlink()  # the snapshot alone reproduces the dataset
    again = load_debian_sections(snapshot)
    assert again[:] == dataset[:] and source_metadata(again)["records_sha256"] == metadata["records_sha256"]
    assert source_metadata(again)["created"] == metadata["created"]

    with gzip.open(snapshot, "at", encoding="utf-8") as handle:
        handle.write('["extra", "misc", "slipped in"]\n')
    with pytest.raises(ValueError, match=r"was modified after it was written .*passing a new snapshot_path="):
        load_debian_sections(snapshot)


def test_debian_sections_errors_name_the_fix(tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("Package: orphan\nDescription: no section\n")
    with pytest.raises(MissingSourceError, match=r"run `apt-get update` first"):
        load_debian_sections(dumpavail_path=empty)
    not_a_snapshot = tmp_path / "notes.jsonl"
    not_a_snapshot.write_text('{"hello": 1}\n')
    with pytest.raises(ValueError, match="is not a snapshot written by load_debian_sections"):
        load_debian_sections(not_a_snapshot)
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    with pytest.raises(MissingSourceError, match=r"apt-cache not found: .*pass snapshot_path="):
        load_debian_sections()


# --- glyphs -------------------------------------------------------------------------------------


def test_glyphs_shape_drawers_and_seed():
    dataset = render_glyphs({"latin": "AG"}, instances_per_character=4, seed=0)
    assert dataset.features == image_features((28, 28))
    images = dataset.with_format("numpy")[:]["image"]
    assert images.shape == (8, 28, 28) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1 and (images.reshape(8, -1).sum(1) > 20).all()
    assert dataset["label_name"] == ["latin:A"] * 4 + ["latin:G"] * 4 and dataset["label"] == [0] * 4 + [1] * 4
    assert np.abs(images[0] - images[1]).max() > 0.5  # two drawers of one character differ
    same = render_glyphs({"latin": "AG"}, instances_per_character=4, seed=0).with_format("numpy")[:]["image"]
    assert np.array_equal(images, same)
    other = render_glyphs({"latin": "AG"}, instances_per_character=4, seed=1).with_format("numpy")[:]["image"]
    assert not np.array_equal(images, other)
    # a character's drawers depend only on the seed and the character
    more = render_glyphs({"latin": "AGK"}, instances_per_character=4, seed=0).with_format("numpy")[:]["image"]
    assert np.array_equal(more[:8], images)
    # every glyph font is used before one repeats
    fonts = [row.split(":")[3] for row in render_glyphs({"latin": "A"}, instances_per_character=16)["id"]]
    assert sorted(fonts) == sorted(Path(f).stem for f in matplotlib_fonts())


def test_glyphs_remove_homoglyphs_and_case_pairs_differing_in_size():
    dataset = render_glyphs({"latin": "AOoe", "greek": "ΑΓ", "cyrillic": "ГЖ"}, instances_per_character=2)
    assert sorted(set(dataset["label_name"])) == ["cyrillic:Ж", "greek:Γ", "latin:A", "latin:O", "latin:e"]
    removed = source_metadata(dataset)["removed"]
    assert removed["greek:Α"].startswith("homoglyph of latin:A")
    assert removed["cyrillic:Г"].startswith("homoglyph of greek:Γ")
    assert removed["latin:o"].startswith("case pair of latin:O differing in size only")
    assert set(removed) == {"greek:Α", "cyrillic:Г", "latin:o"}
    assert source_metadata(dataset)["kept_per_script"] == {"latin": 3, "greek": 1, "cyrillic": 1}


def test_glyph_errors_name_the_fix(tmp_path):
    one_font = matplotlib_fonts()[:1]
    with pytest.raises(ValueError, match=r"every character was removed .*only 1 of the fonts have it \(min_fonts=6\)"):
        render_glyphs({"latin": "A"}, fonts=one_font)
    assert len(render_glyphs({"latin": "A"}, instances_per_character=2, fonts=one_font, min_fonts=1)) == 2
    with pytest.raises(MissingSourceError, match="font files not found"):
        render_glyphs({"latin": "A"}, fonts=[tmp_path / "missing.ttf"])


def test_glyph_episodes_have_image_tensors():
    distribution = TaskDistribution(render_glyphs({"latin": "ABDE"}, instances_per_character=5))
    episode = EpisodeSampler(distribution, n_way=3, k_shot=1, q_queries=2, seed=0).sample(4, column="image")
    assert episode.support.shape == (4, 3, 28, 28) and episode.query.shape == (4, 6, 28, 28)


# --- Fashion-MNIST ------------------------------------------------------------------------------


def write_idx(path, array: np.ndarray):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_items_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 256, (2, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([9, 0, 3]))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 8]))
    dataset = load_fashion_mnist_items(tmp_path, split="test")
    assert dataset.features == image_features((28, 28))
    assert dataset["id"] == ["test/0", "test/1"] and dataset["label"] == [1, 8] and dataset["label_name"] == ["Trouser", "Bag"]
    assert np.allclose(dataset.with_format("numpy")[:]["image"], test / 255)
    everything = load_fashion_mnist_items(tmp_path, split="all")
    assert everything["id"] == ["train/0", "train/1", "train/2", "test/0", "test/1"]
    assert everything["label_name"][:3] == ["Ankle boot", "T-shirt/top", "Dress"]
    assert set(source_metadata(everything)["files"]) == {p.name for p in tmp_path.iterdir()}


def test_fashion_mnist_errors_name_the_fix(tmp_path):
    with pytest.raises(MissingSourceError, match=r"t10k-images-idx3-ubyte.gz not found .*apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist_items(tmp_path)
    with pytest.raises(ValueError, match=r"unknown split 'validation'; choose from \['train', 'test', 'all'\]"):
        load_fashion_mnist_items(tmp_path, split="validation")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03garbage")
    with pytest.raises(ValueError, match="is not an unsigned-byte IDX file"):
        load_fashion_mnist_items(tmp_path)


# --- any classification dataset -----------------------------------------------------------------


def test_hub_classification_from_a_local_folder(tmp_path):
    folder = tmp_path / "reviews"
    folder.mkdir()
    (folder / "train.csv").write_text("sentence,topic\ngreat phone,tech\nlovely soup,food\nfast laptop,tech\n")
    dataset = load_hub_classification(str(folder), "sentence", "topic", split="train")
    assert dataset.features == text_features()
    assert dataset["id"] == ["train/0", "train/1", "train/2"]
    assert dataset["text"] == ["great phone", "lovely soup", "fast laptop"]
    assert dataset["label"] == [1, 0, 1] and dataset["label_name"] == ["tech", "food", "tech"]
    assert source_metadata(dataset)["dataset_id"] == str(folder)
    with pytest.raises(ValueError, match=r"Unknown split \"test\". Should be one of \['train'\]"):
        load_hub_classification(str(folder), "sentence", "topic", split="test")


def test_classification_items_images_and_class_labels():
    pictures = [Image.new("RGB", (10 + i, 6), color=(255, 0, 0) if i % 2 else (0, 0, 255)) for i in range(4)]
    dataset = Dataset.from_dict(
        {"picture": pictures, "kind": [0, 1, 0, 1]}, features=Features({"picture": ImageFeature(), "kind": ClassLabel(names=["blue", "red"])})
    )
    gray = classification_items(dataset, "picture", "kind")
    assert gray.features == image_features((28, 28)) and gray["label_name"] == ["blue", "red", "blue", "red"]
    images = gray.with_format("numpy")[:]["image"]
    assert np.allclose(images[1], 76 / 255) and np.allclose(images[0], 29 / 255)  # ITU-R 601 luma of red / blue
    rgb = classification_items(dataset, "picture", "kind", image_size=(4, 5), grayscale=False)
    assert rgb.with_format("numpy")[:]["image"].shape == (4, 4, 5, 3)
    assert np.allclose(rgb.with_format("numpy")[:]["image"][1], [1, 0, 0])


def test_classification_items_errors_name_the_fix():
    texts = Dataset.from_dict({"text": ["a", "b"], "label": [0, -1], "score": [0.5, 1.5]})
    with pytest.raises(ValueError, match=r"1 rows have a negative label .*use a labelled split such as 'train'"):
        classification_items(texts, "text", "label")
    with pytest.raises(ValueError, match=r"label column 'score' is Value\('float64'\); it must be a ClassLabel, an integer or a string"):
        classification_items(texts, "text", "score")
    with pytest.raises(ValueError, match=r"column 'score' is Value\('float64'\); pass a text \(string\) or an Image column"):
        classification_items(texts.filter(lambda row: row["label"] >= 0), "score", "label")
    with pytest.raises(ValueError, match=r"no column 'sentence'; the dataset has \['text', 'label', 'score'\]"):
        classification_items(texts, "sentence", "label")
    with pytest.raises(ValueError, match="was not made by an ocd_hf.sources loader"):
        source_metadata(texts)
    labelled = classification_items(texts.select([0]), "text", "label")
    assert source_metadata(labelled)["column"] == "text" and labelled.features["label"] == Value("int64")
