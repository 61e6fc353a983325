"""Offline labelled sources for few-shot task distributions, one loader each.

Every loader returns a ``datasets.Dataset`` with the same schema: ``id`` (string), ``text`` (string) or
``image`` (a fixed-shape float32 ``Array2D``/``Array3D`` in [0, 1]), ``label`` (int64, ``0..C-1`` or
the source's own class numbers) and ``label_name`` (string). What was read (paths, hashes, dates,
parameters) is recorded as JSON in ``dataset.info.description``; :func:`source_metadata` reads it.

- :func:`load_wordnet_supersenses`: WordNet glosses -> the 45 lexicographer files (Debian ``wordnet-base``).
- :func:`load_debian_sections`: Debian package short descriptions -> Section (``apt-cache dumpavail``),
  snapshotted with its date and sha256 so that a result can be reproduced after the archive changes.
- :func:`render_glyphs`: Latin, Greek and Cyrillic characters rendered from matplotlib's DejaVu/STIX fonts
  with random affine "drawers" (Omniglot-like).
- :func:`load_fashion_mnist_items`: Fashion-MNIST IDX files (Debian ``dataset-fashion-mnist``).
- :func:`load_hub_classification` / :func:`classification_items`: any dataset with a text or image column
  and a label column.
"""

from __future__ import annotations

import datetime
import glob
import gzip
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from datasets import Array2D, Array3D, ClassLabel, Dataset, DatasetInfo, Features, Value, load_dataset
from datasets import Image as ImageFeature
from matplotlib import font_manager
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.font_manager import FontProperties
from matplotlib.path import Path as MplPath
from matplotlib.textpath import TextPath
from matplotlib.transforms import Affine2D

WORDNET_DIR = "/usr/share/wordnet"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SNAPSHOT_FORMAT = "ocd_hf.debian_sections/1"

# WordNet 3.0's lexicographer files (lexnames(5WN)): file number -> name.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption",
    "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

ALPHABETS = {
    "latin": "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    "greek": "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩαβγδεζηθικλμνξοπρσςτυφχψω",
    "cyrillic": "АБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯабвгдеёжзийклмнопрстуфхцчшщъыьэюя",
}
GLYPH_FAMILIES = ("DejaVu Sans", "DejaVu Sans Mono", "DejaVu Serif", "STIXGeneral")


class MissingSourceError(FileNotFoundError):
    """System data a loader needs is not installed; the message says which package provides it."""


def text_features() -> Features:
    """The schema of a text source."""
    return Features({"id": Value("string"), "text": Value("string"), "label": Value("int64"), "label_name": Value("string")})


def image_features(shape: Sequence[int]) -> Features:
    """The schema of an image source with images of ``shape`` (``(H, W)`` or ``(H, W, C)``)."""
    array = Array2D(tuple(shape), "float32") if len(shape) == 2 else Array3D(tuple(shape), "float32")
    return Features({"id": Value("string"), "image": array, "label": Value("int64"), "label_name": Value("string")})


def source_metadata(dataset: Dataset) -> dict[str, Any]:
    """What a loader of this module recorded about its source (paths, hashes, dates, parameters)."""
    try:
        return json.loads(dataset.info.description or "")
    except json.JSONDecodeError as error:
        raise ValueError("source_metadata: this dataset was not made by an ocd_hf.sources loader.") from error


def _items(columns: dict[str, Any], features: Features, metadata: dict[str, Any]) -> Dataset:
    info = DatasetInfo(description=json.dumps(metadata, ensure_ascii=False, sort_keys=True), features=features)
    return Dataset.from_dict(columns, features=features, info=info)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- WordNet ------------------------------------------------------------------------------------


def load_wordnet_supersenses(path: str | os.PathLike = WORDNET_DIR, parts_of_speech: Sequence[str] = ("noun", "verb", "adj", "adv")) -> Dataset:
    """WordNet synsets as ``text`` = the first clause of the gloss (up to the first ``;``), ``label`` = the
    lexicographer file number (``label_name`` e.g. ``noun.animal``; 45 classes), ``id`` = ``"<pos>:<offset>"``.

    Reads ``data.<pos>`` from ``path`` (Debian: ``apt-get install -y wordnet-base``); synsets with an
    empty first clause are skipped (counted in the metadata).
    """
    directory = Path(path)
    unknown = [pos for pos in parts_of_speech if pos not in ("noun", "verb", "adj", "adv")]
    if unknown:
        raise ValueError(f"load_wordnet_supersenses: unknown parts of speech {unknown}; choose from noun, verb, adj, adv.")
    files = [directory / f"data.{pos}" for pos in parts_of_speech]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MissingSourceError(
            f"WordNet data files not found in {directory} (missing {', '.join(missing)}): install them with "
            "`apt-get install -y wordnet-base`, or pass path= to a directory holding WordNet 3.0's data.noun, data.verb, "
            "data.adj and data.adv."
        )
    ids, texts, labels, skipped = [], [], [], 0
    for pos, file in zip(parts_of_speech, files):
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.startswith("  "):  # the licence header
                    continue
                head, bar, gloss = line.partition(" | ")
                fields = head.split()
                if not bar or len(fields) < 3 or not fields[1].isdigit() or int(fields[1]) >= len(LEXNAMES):
                    raise ValueError(
                        f"load_wordnet_supersenses: {file}:{number} is not a WordNet data line "
                        "('offset lex_filenum ss_type ... | gloss' with lex_filenum 00-44); is this WordNet 3.0?"
                    )
                text = gloss.split(";")[0].strip()
                if not text:
                    skipped += 1
                    continue
                ids.append(f"{pos}:{fields[0]}")
                texts.append(text)
                labels.append(int(fields[1]))
    metadata = {
        "source": "wordnet",
        "path": str(directory),
        "files": {file.name: _sha256(file) for file in files},
        "items": len(ids),
        "skipped_empty_glosses": skipped,
        "text": "first gloss clause",
    }
    names = [LEXNAMES[label] for label in labels]
    return _items({"id": ids, "text": texts, "label": labels, "label_name": names}, text_features(), metadata)


# --- Debian package sections --------------------------------------------------------------------


def _parse_dumpavail(text: str) -> tuple[list[tuple[str, str, str]], dict[str, int]]:
    """(package, section, short description) per package, sorted by name; and what was skipped."""
    records: dict[str, tuple[str, str, str]] = {}
    skipped = {"duplicates": 0, "without_section_or_description": 0}
    for stanza in text.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" not in fields:
            continue
        description = fields.get("Description", fields.get("Description-en", ""))
        if not fields.get("Section") or not description:
            skipped["without_section_or_description"] += 1
        elif fields["Package"] in records:
            skipped["duplicates"] += 1
        else:  # "contrib/net", "universe/python": keep the section, drop the archive area
            records[fields["Package"]] = (fields["Package"], fields["Section"].rpartition("/")[2], description)
    return [records[name] for name in sorted(records)], skipped


def _apt_release_dates() -> dict[str, str]:
    dates = {}
    for release in sorted(glob.glob("/var/lib/apt/lists/*Release")):
        with open(release, encoding="utf-8", errors="replace") as handle:
            date = next((line[5:].strip() for line in handle if line.startswith("Date:")), None)
        if date:
            dates[os.path.basename(release)] = date
    return dates


def _record_lines(records: Sequence[Sequence[str]]) -> bytes:
    return b"".join(json.dumps(list(record), ensure_ascii=False).encode() + b"\n" for record in records)


def _open_text(path: Path, mode: str, gzipped: bool):
    return gzip.open(path, mode + "t", encoding="utf-8") if gzipped else open(path, mode, encoding="utf-8")


def load_debian_sections(snapshot_path: str | os.PathLike | None = None, *, dumpavail_path: str | os.PathLike | None = None) -> Dataset:
    """Debian packages as ``text`` = short description, ``label_name`` = Section (archive area dropped),
    ``id`` = package name; ``label`` numbers the sections in sorted order.

    If ``snapshot_path`` exists it is read (and its sha256 checked), so results do not move with the
    archive. Otherwise the index is read from ``dumpavail_path`` (a saved ``apt-cache dumpavail``
    output) or by running ``apt-cache dumpavail``; with ``snapshot_path`` the parsed records are then
    written there (JSON lines, gzipped if it ends in ``.gz``) with their creation date, the apt
    release dates and sha256 hashes. The metadata records the same.
    """
    snapshot = Path(snapshot_path) if snapshot_path is not None else None
    if snapshot is not None and snapshot.exists():
        header, records = _read_snapshot(snapshot)
    else:
        if dumpavail_path is not None:
            raw = Path(dumpavail_path).read_text(encoding="utf-8")
            origin = {"source": f"file {dumpavail_path}"}
        else:
            raw = _run_dumpavail()
            origin = {"source": "apt-cache dumpavail", "apt_release_dates": _apt_release_dates()}
        records, skipped = _parse_dumpavail(raw)
        if not records:
            raise MissingSourceError(
                "the apt package index lists no packages with a Section and a Description: run `apt-get update` first"
                + (f" (or check {dumpavail_path}: it should hold `apt-cache dumpavail` output)." if dumpavail_path else ".")
            )
        header = {
            "format": SNAPSHOT_FORMAT,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **origin,
            "dumpavail_sha256": hashlib.sha256(raw.encode()).hexdigest(),
            "records_sha256": hashlib.sha256(_record_lines(records)).hexdigest(),
            "skipped": skipped,
        }
        if snapshot is not None:
            _write_snapshot(snapshot, header, records)
    sections = sorted({section for _, section, _ in records})
    index = {section: number for number, section in enumerate(sections)}
    metadata = {"source": "debian_sections", "snapshot": str(snapshot) if snapshot else None, **header, "items": len(records)}
    columns = {
        "id": [package for package, _, _ in records],
        "text": [description for _, _, description in records],
        "label": [index[section] for _, section, _ in records],
        "label_name": [section for _, section, _ in records],
    }
    return _items(columns, text_features(), metadata)


def _run_dumpavail() -> str:
    if shutil.which("apt-cache") is None:
        raise MissingSourceError(
            "apt-cache not found: load_debian_sections reads the package index of a Debian/Ubuntu system; run it there, "
            "or pass snapshot_path= to a snapshot it wrote (or dumpavail_path= to saved `apt-cache dumpavail` output)."
        )
    result = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"`apt-cache dumpavail` failed ({result.stderr.strip()}); try `apt-get update` first.")
    return result.stdout


def _write_snapshot(path: Path, header: dict[str, Any], records: Sequence[tuple[str, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with _open_text(partial, "w", gzipped=path.suffix == ".gz") as handle:
        handle.write(json.dumps(header, ensure_ascii=False) + "\n")
        handle.write(_record_lines(records).decode())
    os.replace(partial, path)


def _read_snapshot(path: Path) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    with _open_text(path, "r", gzipped=path.suffix == ".gz") as handle:
        first = handle.readline()
        body = handle.read()
    try:
        header = json.loads(first)
    except json.JSONDecodeError:
        header = {}
    if not isinstance(header, dict) or header.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"load_debian_sections: {path} is not a snapshot written by load_debian_sections ({SNAPSHOT_FORMAT}).")
    digest = hashlib.sha256(body.encode()).hexdigest()
    if digest != header["records_sha256"]:
        raise ValueError(
            f"load_debian_sections: snapshot {path} was modified after it was written (sha256 {digest} != recorded "
            f"{header['records_sha256']}); restore it, or write a new one by passing a new snapshot_path=."
        )
    return header, [tuple(json.loads(line)) for line in body.splitlines()]


# --- glyphs ---------------------------------------------------------------------------------------


def matplotlib_fonts(families: Sequence[str] = GLYPH_FAMILIES) -> list[str]:
    """The font files of ``families`` that ship with matplotlib (not the system's), sorted."""
    data = os.path.realpath(matplotlib.get_data_path())
    return sorted(
        {font.fname for font in font_manager.fontManager.ttflist if font.name in families and os.path.realpath(font.fname).startswith(data)}
    )


def _render(outline: MplPath, size: int, angle: float = 0.0, scale: float = 1.0, shift: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """The outline fitted into a box of 0.65·size (largest side), scaled, rotated about its centre and shifted (px)."""
    extents = outline.get_extents()
    fit = 0.65 * size / max(extents.width, extents.height) * scale
    transform = (
        Affine2D()
        .translate(-(extents.x0 + extents.x1) / 2, -(extents.y0 + extents.y1) / 2)
        .scale(fit)
        .rotate_deg(angle)
        .translate(size / 2 + shift[0], size / 2 + shift[1])
    )
    renderer = RendererAgg(size, size, 72)
    gc = renderer.new_gc()
    gc.set_linewidth(0)
    renderer.draw_path(gc, outline, transform, (0, 0, 0, 1))
    return np.asarray(renderer.buffer_rgba())[:, :, 3].astype(np.float32) / 255  # coverage: ink 1, background 0


def _blur(images: np.ndarray, sigma: float = 1.2) -> np.ndarray:
    """A Gaussian blur of ``(..., H, W)`` images (zero padding) as two matrix products."""
    size = images.shape[-1]
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum(axis=1, keepdims=True)
    return kernel @ images @ kernel.T


def _shape_distances(canonical: np.ndarray, available: np.ndarray) -> np.ndarray:
    """``(C, C)``: median over the fonts having both characters of 1 - Σmin/Σmax of their blurred renderings."""
    blurred = torch.from_numpy(_blur(canonical).reshape(*canonical.shape[:2], -1))  # (C, F, H·W)
    per_font = []
    for font in range(canonical.shape[1]):
        images = blurred[:, font]
        l1 = torch.cdist(images[None].double(), images[None].double(), p=1)[0]
        ink = images.double().sum(dim=1)
        distance = 2 * l1 / (ink[:, None] + ink[None, :] + l1).clamp_min(1e-12)  # = 1 - Σmin/Σmax
        both = torch.from_numpy(available[:, font, None] & available[None, :, font])
        per_font.append(torch.where(both, distance, torch.nan).numpy())
    with np.errstate(all="ignore"):
        return np.nanmedian(np.stack(per_font), axis=0)


def render_glyphs(
    alphabets: Mapping[str, str] | None = None,
    instances_per_character: int = 20,
    seed: int = 0,
    *,
    size: int = 28,
    fonts: Sequence[str | os.PathLike] | None = None,
    min_fonts: int = 6,
    rotation: float = 15.0,
    scale: tuple[float, float] = (0.85, 1.1),
    shift: float = 2.0,
    homoglyph_threshold: float = 0.08,
    case_threshold: float = 0.3,
) -> Dataset:
    """Characters rendered ``size``×``size`` (float32, ink 1 on 0), one class per character (Omniglot-like).

    ``alphabets`` maps a script name to its characters (default :data:`ALPHABETS`: Latin, Greek and
    Cyrillic, upper then lower case). ``fonts`` defaults to matplotlib's own DejaVu Sans / Sans Mono /
    Serif and STIXGeneral files (16 faces); a character is kept only if at least ``min_fonts`` of them
    have a glyph for it. Each glyph is fitted to a box of 0.65·``size`` (its larger side), so the size
    of a character carries no information. Instance ``i`` of a character is one "drawer": font number
    ``i`` of a seeded shuffle of its fonts (cycled), rotated by U(±``rotation``)°, scaled by U(``scale``)
    and shifted by U(±``shift``) px in x and y. Its random stream depends only on ``seed`` and the
    character, so a character's instances do not change when other characters are added.

    Removal rule. Two characters are compared on their canonical renderings (no distortion) by the
    median, over the fonts that have both, of ``1 - Σmin(a, b) / Σmax(a, b)`` after a Gaussian blur of
    1.2 px (the blur makes the measure tolerant to stroke weight). Going through the scripts in order:
    a character is dropped as a **homoglyph** if it is closer than ``homoglyph_threshold`` to a character
    of an earlier script (Greek Α and Cyrillic А after Latin A, also ρ after p at 0.07, Г after Γ); a
    lowercase letter is dropped as a **case pair that differs only in size** if it is closer than
    ``case_threshold`` to its own uppercase. With the defaults, of 162 characters 100 stay (Latin 44,
    Greek 30, Cyrillic 26): Latin loses c o p s v w x z (0.19-0.26), Greek ε κ ψ besides its
    homoglyphs, Cyrillic the small-capital lowercase в г д ж з и й к л м т ц ч ш щ ъ ы ь э ю я (0.22-0.30).
    Letters that differ by a stroke stay (A/Λ, O/Θ, E/F: 0.10-0.18; i/I 0.32), and so do the borderline
    Cyrillic н and п (0.30, 0.31). The removed characters and the reason are in the metadata.
    """
    alphabets = dict(ALPHABETS if alphabets is None else alphabets)
    font_files = [str(f) for f in fonts] if fonts is not None else matplotlib_fonts()
    missing = [f for f in font_files if not os.path.isfile(f)]
    if missing or not font_files:
        raise MissingSourceError(f"render_glyphs: font files not found: {missing or 'none given'}; pass fonts= existing .ttf/.otf files.")
    if instances_per_character < 1 or min_fonts < 1:
        raise ValueError("render_glyphs: instances_per_character and min_fonts must be >= 1.")
    characters = [(script, char) for script, chars in alphabets.items() for char in dict.fromkeys(chars)]
    faces = [font_manager.get_font(f) for f in font_files]
    available = np.array([[face.get_char_index(ord(char)) != 0 for face in faces] for _, char in characters])
    outlines: dict[tuple[int, int], MplPath] = {}
    canonical = np.zeros((len(characters), len(faces), size, size), dtype=np.float32)
    for c, f in zip(*np.nonzero(available)):
        outlines[c, f] = TextPath((0, 0), characters[c][1], size=100, prop=FontProperties(fname=font_files[f]))
        canonical[c, f] = _render(outlines[c, f], size)
    distance = _shape_distances(canonical, available)
    position = {char: c for c, (_, char) in enumerate(characters)}
    removed: dict[str, str] = {}
    kept: list[int] = []
    for c, (script, char) in enumerate(characters):
        earlier = [d for d, (other, _) in enumerate(characters[:c]) if other != script and distance[c, d] < homoglyph_threshold]
        upper = position.get(char.upper()) if char.islower() and char.upper() in alphabets[script] else None
        if available[c].sum() < min_fonts:
            removed[f"{script}:{char}"] = f"only {int(available[c].sum())} of the fonts have it (min_fonts={min_fonts})"
        elif earlier:
            other_script, other = characters[earlier[0]]
            removed[f"{script}:{char}"] = f"homoglyph of {other_script}:{other} (distance {distance[c, earlier[0]]:.3f})"
        elif upper is not None and distance[c, upper] < case_threshold:
            removed[f"{script}:{char}"] = f"case pair of {script}:{char.upper()} differing in size only (distance {distance[c, upper]:.3f})"
        else:
            kept.append(c)
    if not kept:
        raise ValueError(f"render_glyphs: every character was removed ({removed}); pass other alphabets or fonts.")
    ids, images, labels, names = [], [], [], []
    for label, c in enumerate(kept):
        script, char = characters[c]
        rng = np.random.default_rng([seed, ord(char)])
        order = rng.permutation(np.flatnonzero(available[c]))
        for i in range(instances_per_character):
            f = int(order[i % len(order)])
            angle, factor, dx, dy = rng.uniform(-rotation, rotation), rng.uniform(*scale), *rng.uniform(-shift, shift, 2)
            images.append(_render(outlines[c, f], size, angle, factor, (dx, dy)))
            ids.append(f"{script}:{char}:{i}:{Path(font_files[f]).stem}")
            labels.append(label)
            names.append(f"{script}:{char}")
    metadata = {
        "source": "glyphs",
        "matplotlib": matplotlib.__version__,
        "fonts": {Path(f).name: _sha256(Path(f)) for f in font_files},
        "parameters": {
            "seed": seed, "size": size, "instances_per_character": instances_per_character, "min_fonts": min_fonts,
            "rotation": rotation, "scale": list(scale), "shift": shift,
            "homoglyph_threshold": homoglyph_threshold, "case_threshold": case_threshold,
        },
        "kept_per_script": {script: sum(characters[c][0] == script for c in kept) for script in alphabets},
        "removed": removed,
    }  # fmt: skip
    columns = {"id": ids, "image": np.stack(images), "label": labels, "label_name": names}
    return _items(columns, image_features((size, size)), metadata)


# --- Fashion-MNIST ------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"load_fashion_mnist_items: {path} is not an unsigned-byte IDX file.")
    dims = np.frombuffer(data, dtype=">i4", count=data[3], offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * data[3]).reshape(dims)


def load_fashion_mnist_items(directory: str | os.PathLike = FASHION_MNIST_DIR, split: str = "test") -> Dataset:
    """Fashion-MNIST as 28×28 float32 images in [0, 1] (``split``: ``"train"`` 60k, ``"test"`` 10k or ``"all"``).

    Reads the IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``directory``
    (Debian: ``apt-get install -y dataset-fashion-mnist``).
    """
    prefixes = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}
    if split not in prefixes:
        raise ValueError(f"load_fashion_mnist_items: unknown split {split!r}; choose from {list(prefixes)}.")
    directory = Path(directory)
    columns: dict[str, list] = {"id": [], "image": [], "label": []}
    files = {}
    for prefix in prefixes[split]:
        arrays = []
        for kind in ("images-idx3", "labels-idx1"):
            candidates = [directory / f"{prefix}-{kind}-ubyte{suffix}" for suffix in (".gz", "")]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise MissingSourceError(
                    f"Fashion-MNIST file {candidates[0].name} not found in {directory}: install it with "
                    "`apt-get install -y dataset-fashion-mnist`, or pass directory= to a folder holding the IDX files."
                )
            files[found.name] = _sha256(found)
            arrays.append(_read_idx(found))
        images, labels = arrays
        columns["id"] += [f"{'test' if prefix == 't10k' else prefix}/{i}" for i in range(len(labels))]
        columns["image"].append(images.astype(np.float32) / 255)
        columns["label"].append(labels.astype(np.int64))
    labels = np.concatenate(columns["label"])
    columns = {
        "id": columns["id"],
        "image": np.concatenate(columns["image"]),
        "label": labels,
        "label_name": [FASHION_MNIST_CLASSES[label] for label in labels],
    }
    metadata = {"source": "fashion_mnist", "directory": str(directory), "split": split, "files": files, "items": len(labels)}
    return _items(columns, image_features((28, 28)), metadata)


# --- any dataset with a text or image column and a label column ---------------------------------


def classification_items(
    dataset: Dataset,
    column: str,
    label_column: str,
    *,
    image_size: tuple[int, int] = (28, 28),
    grayscale: bool = True,
    id_prefix: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> Dataset:
    """``dataset`` converted to the common schema: a text column kept as ``text``, an ``Image`` column
    resized to ``image_size`` (H, W) as float32 ``image`` in [0, 1] (grayscale ``(H, W)`` or RGB ``(H, W, 3)``).

    ``label`` comes from a ``ClassLabel`` (its names become ``label_name``), an integer column, or a
    string column (its sorted distinct values, numbered).
    """
    for name in (column, label_column):
        if name not in dataset.column_names:
            raise ValueError(f"classification_items: no column {name!r}; the dataset has {dataset.column_names}.")
    label_feature, raw_labels = dataset.features[label_column], dataset[label_column]
    if isinstance(label_feature, ClassLabel):
        labels, names = list(raw_labels), label_feature.names
    elif isinstance(label_feature, Value) and label_feature.dtype in ("string", "large_string"):
        names = sorted(set(raw_labels))
        number = {name: i for i, name in enumerate(names)}
        labels = [number[value] for value in raw_labels]
    elif isinstance(label_feature, Value) and label_feature.dtype.startswith(("int", "uint")):
        labels, names = list(raw_labels), None
    else:
        raise ValueError(
            f"classification_items: label column {label_column!r} is {label_feature}; it must be a ClassLabel, "
            "an integer or a string column."
        )
    unlabelled = sum(label < 0 for label in labels)
    if unlabelled:
        raise ValueError(
            f"classification_items: {unlabelled} rows have a negative label (e.g. -1: unlabelled test rows); "
            "use a labelled split such as 'train' or 'validation', or filter them out first."
        )
    feature = dataset.features[column]
    columns: dict[str, Any] = {
        "id": [f"{id_prefix}{i}" for i in range(len(dataset))],
        "label": labels,
        "label_name": [names[label] if names is not None else str(label) for label in labels],
    }
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        columns["text"] = dataset[column]
        features = text_features()
    elif isinstance(feature, ImageFeature):
        mode, (height, width) = ("L" if grayscale else "RGB"), image_size
        columns["image"] = np.stack(
            [np.asarray(image.convert(mode).resize((width, height)), dtype=np.float32) / 255 for image in dataset[column]]
        )
        features = image_features(columns["image"].shape[1:])
    else:
        raise ValueError(f"classification_items: column {column!r} is {feature}; pass a text (string) or an Image column.")
    record = {"source": "classification", "column": column, "label_column": label_column, "fingerprint": dataset._fingerprint}
    return _items(columns, features, {**record, **(metadata or {})})


def load_hub_classification(
    dataset_id: str,
    text_or_image_column: str,
    label_column: str,
    split: str = "train",
    *,
    image_size: tuple[int, int] = (28, 28),
    grayscale: bool = True,
    **load_dataset_kwargs: Any,
) -> Dataset:
    """``datasets.load_dataset(dataset_id, split=split, **load_dataset_kwargs)`` in the common schema (see
    :func:`classification_items`); ``dataset_id`` may also be a local folder or a builder such as ``"csv"``."""
    dataset = load_dataset(dataset_id, split=split, **load_dataset_kwargs)
    metadata = {"source": "hub", "dataset_id": dataset_id, "split": split}
    return classification_items(
        dataset, text_or_image_column, label_column, image_size=image_size, grayscale=grayscale, id_prefix=f"{split}/", metadata=metadata
    )
