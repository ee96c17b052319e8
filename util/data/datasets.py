"""Datasets: fMoW-style CSV, ImageFolder trees, unlabelled image folders, packed uint8 / uint16 arrays and shards
(``util.data.shards``).

Every sample is decoded to 8-bit RGB, or with ``RasterOptions`` to float32 bands of any count in the file's units
(``util.data.images``), then transformed (``util.data.transforms``).
Randomness per sample comes from a seed the sampler hands over (``util.data.loaders.SeededSampler``), so the
augmentations of an epoch are the same whatever the number of workers, and a resumed run sees
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from util.config import DATASET_TYPES, MAX_IMAGE_PIXELS, Bands
from util.data import shards
from util.data.images import (
    IMAGE_EXTENSIONS,
    RASTER_EXTENSIONS,
    BadImageError,
    NotEightBitError,
    is_image,
    is_junk,
    load_image,
)
from util.data.loaders import SampleDataset
from util.data.packed import PackedDataset
from util.data.raster_options import RasterOptions, raster_options
from util.errors import DataError, first_line
from util.files import file_problem
from util.run.rng import seeded


class ImageDataset(SampleDataset):
    """(image path, label) samples with a transform; label -1 for unlabelled images.

    Args:
        samples: (path, label) pairs.
        transform: Applied to the decoded RGB PIL image.
        classes: Class names, index = label (ImageFolder trees).
        label_names: Names of the labels present, label -> name (sparse: a CSV's labels need not be dense);
            defaults to ``classes``.
        describe: Names a sample in error messages (e.g. its CSV row).
        draft_size: JPEG draft decoding target (smallest side needed by the transform).
        skip_bad: Replace an unreadable image by the next readable one (with a warning) instead of stopping.
        raster: Multispectral / high-bit-depth reading (``RasterOptions``): samples are float32 [C, H, W] tensors in
            the file's units, no-data pixels filled with the band mean, given to ``transform`` as tensors.
        max_pixels: ``--max_image_pixels`` of the 8-bit RGB path (rasters: ``raster.max_pixels``).
        stretch: ``--stretch``: the 8-bit RGB path stretches 16-bit / float images instead of refusing them.
        stretch_bands: ``--bands`` on the 8-bit RGB path (with ``--stretch``): the 3 bands shown as R G B.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable | None = None,
        classes: Sequence[str] = (),
        describe: Callable[[int], str] | None = None,
        draft_size: int | None = None,
        skip_bad: bool = False,
        label_names: dict[int, str] | None = None,
        raster: RasterOptions | None = None,
        max_pixels: int = MAX_IMAGE_PIXELS,
        stretch: bool = False,
        stretch_bands: Sequence[int] | None = None,
    ) -> None:
        self.raster = raster
        self.samples = list(samples)
        self.skip_bad = skip_bad
        self.skipped = 0  # per process: every DataLoader worker counts its own
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.classes = list(classes)
        self.label_names = dict(label_names) if label_names is not None else dict(enumerate(self.classes))
        self.source = ""  # the file or folder it was read from (set by build_dataset)
        self.describe = describe or (lambda index: self.samples[index][0])
        self.draft_size = draft_size
        # they travel into DataLoader workers with the dataset
        self.max_pixels, self.stretch, self.stretch_bands = max_pixels, stretch, stretch_bands

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        for _ in range(len(self.samples)):
            path, label = self.samples[index]
            try:
                img = (
                    self.raster.load(path, self.describe(index))
                    if self.raster is not None
                    else load_image(path, self.draft_size, self.max_pixels, self.stretch, self.stretch_bands)
                )
                break
            except NotEightBitError:
                raise
            except BadImageError as e:
                problem = f"{self.describe(index)}: cannot read image ({e.reason})"
                if not self.skip_bad:
                    raise DataError(problem + "; --skip_bad_images skips such files") from None
                self.skipped += 1
                print(
                    f"warning: skipped {problem} [{self.skipped} skipped by this process]", file=sys.stderr, flush=True
                )
                index = (index + 1) % len(self.samples)
        else:
            raise DataError("every image of the dataset is unreadable")
        if self.transform is None:
            return img, label
        with seeded(seed) if seed is not None else nullcontext():
            return self.transform(img), label


def read_csv_samples(
    csv_path: Path, names: dict[int, str] | None = None, lines: list[int] | None = None
) -> list[tuple[str, int]]:
    """fMoW-RGB CSV: a header row, column 0 = integer label, column 1 = image path (relative to the CSV), and an
    optional column headed ``class_name``; each label's name goes into ``names`` (one name per label), each sample's
    row number (1-based) into ``lines``.

    A first row whose column 0 is an integer and whose column 1 names an existing file is an image, not a header:
    it is read as the first sample, with a note (a header-less CSV would otherwise lose its first image).

    Raises:
        DataError: unreadable file, too few columns, a label that is not an integer, paths that are not files.
    """
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise DataError(f"{csv_path}: cannot read ({e.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{csv_path}: not a CSV file ({e})") from None
    samples, missing = [], []
    resolve = lambda cell: (lambda p: p if p.is_absolute() else csv_path.parent / p)(Path(cell.strip()))
    first = rows[0] if rows else []
    headerless = len(first) >= 2 and first[0].strip().lstrip("-").isdigit() and resolve(first[1]).is_file()
    if headerless:
        print(
            f"note: {csv_path}: row 1 ({first[0].strip()}, {first[1].strip()}) is an image, not a header: read as "
            "the first sample",
            flush=True,
        )
    header = [] if headerless else [cell.strip().lower() for cell in first]
    name_column = header.index("class_name") if "class_name" in header[2:] else None
    for line, row in enumerate(rows[0 if headerless else 1 :], start=1 if headerless else 2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise DataError(f"{csv_path} row {line}: needs 2 columns (label, image path), found {len(row)}")
        try:
            label = int(row[0])
        except ValueError:
            raise DataError(f"{csv_path} row {line}: label {row[0]!r} in column 0 is not an integer") from None
        if names is not None and name_column is not None and name_column < len(row) and row[name_column].strip():
            name = row[name_column].strip()
            if names.setdefault(label, name) != name:
                raise DataError(
                    f"{csv_path} row {line}: label {label} is named {name!r} here, {names[label]!r} in an earlier row"
                )
        path = Path(row[1])
        path = path if path.is_absolute() else csv_path.parent / path
        problem = file_problem(path)
        if problem:
            missing.append((problem, f"row {line}: {path}"))
        samples.append((str(path), label))
        if lines is not None:
            lines.append(line)
    if missing:
        absent = [where for problem, where in missing if problem.startswith("does not exist")]
        if len(absent) == len(missing):
            raise DataError(f"{csv_path}: {len(missing)} image path(s) do not exist, first {missing[0][1]}")
        problem, where = next((p, w) for p, w in missing if not p.startswith("does not exist"))
        raise DataError(f"{csv_path}: {len(missing)} image path(s) are not readable files, first {where} {problem}")
    return samples


def scan_image_folder(
    root: Path,
    classes: Sequence[str] | None = None,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    exclude: Path | None = None,
) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageFolder layout (root/class_name/*.jpg, as RESISC45, UC Merced, EuroSAT): samples and class names.

    Hidden files and folders (``.DS_Store``, macOS ``._*`` resource forks), ``__MACOSX`` folders, ``exclude`` and, in a
    training tree, folders without images are no classes and no samples (``images_under``), with a note.

    Args:
        classes: The class names of the training split, index = label: the folders are matched to them by NAME
            (an evaluation tree may lack some of them); None: the sorted folder names of ``root`` that hold images.
        exclude: A folder left out (``tools/preprocess.py``'s ``--output`` inside its ``--input``).

    Raises:
        DataError: a class folder whose name is not in ``classes``.
    """
    skipped: list[str] = []
    folders = sorted(d for d in _list_folder(root) if d.is_dir())
    found = {}
    for folder in folders:
        if is_junk(folder.name) or exclude is not None and folder.resolve() == exclude.resolve():
            skipped.append(folder.name + "/")
            continue
        _list_folder(folder)  # an unreadable class folder is an error, not silently fewer images
        found[folder.name] = images_under(folder, extensions, skipped, exclude)
    empty = sorted(name for name, images in found.items() if not images)
    if classes is None:
        classes = [name for name in found if found[name]]
        skipped += [f"{name}/ (no images)" for name in empty]
    if skipped:
        print(f"note: {root}: left out {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", flush=True)
    index = {name: label for label, name in enumerate(classes)}
    unknown = [name for name, images in found.items() if name not in index and images]
    if unknown:
        raise DataError(
            f"{root}: class folder(s) {', '.join(unknown)} are not among the training classes "
            f"({', '.join(classes)}): a class present only in evaluation cannot be predicted"
        )
    samples = [(str(p), index[name]) for name, images in found.items() if name in index for p in images]
    return samples, list(classes)


def images_under(
    folder: Path, extensions: tuple[str, ...], skipped: list[str] | None = None, exclude: Path | None = None
) -> list[Path]:
    """The image files under ``folder`` (recursive, sorted by path), without junk (``is_junk``), the folder ``exclude``
    and names of images that are no regular files (a link to /dev/zero); each file or folder left out is added to
    ``skipped`` (relative to ``folder``'s parent)."""
    excluded = exclude.resolve() if exclude is not None else None
    images = []
    for top, dirs, files in os.walk(folder):  # as rglob did: symbolic links to folders are not followed
        left_out = [d for d in dirs if is_junk(d) or excluded is not None and Path(top, d).resolve() == excluded]
        left_out += [f for f in files if is_junk(f) and is_image(Path(top, f), extensions)]
        special = [f for f in files if Path(f).suffix.lower() in extensions and not Path(top, f).is_file()]
        if skipped is not None:
            skipped += [str(Path(top, name).relative_to(folder.parent)) for name in sorted(left_out)]
            skipped += [  # a link to /dev/zero or a pipe named like an image: never read
                f"{Path(top, name).relative_to(folder.parent)} ({file_problem(Path(top, name))})" for name in special
            ]
        dirs[:] = [d for d in dirs if d not in left_out]  # not walked into
        images += [Path(top, f) for f in files if not is_junk(f) and is_image(Path(top, f), extensions)]
    return sorted(images)


def _list_folder(folder: Path) -> list[Path]:
    """The entries of ``folder``.

    Raises:
        DataError: the folder cannot be listed (permissions, I/O error), naming it and the reason.
    """
    try:
        return list(folder.iterdir())
    except OSError as e:
        raise DataError(
            f"{folder}: cannot list the folder ({e.strerror or first_line(e)}); "
            "its images would be left out of the dataset"
        ) from None


def scan_unlabelled(
    root: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, exclude: Path | None = None
) -> list[tuple[str, int]]:
    """The images under ``root`` (recursive), without hidden files, ``__MACOSX`` and ``exclude``, unlabelled (-1)."""
    skipped: list[str] = []
    samples = [(str(p), -1) for p in images_under(root, extensions, skipped, exclude)]
    if skipped:
        print(f"note: {root}: left out {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", flush=True)
    return samples


def detect_dataset_type(path: Path) -> str:
    if path.is_file():
        if path.name.endswith(shards.MANIFEST_SUFFIX):
            return "shards"
        return "packed" if path.suffix == ".json" else "fmow_rgb"
    if path.is_dir():
        has_class_dirs = any(
            d.is_dir() and not is_junk(d.name) and images_under(d, IMAGE_EXTENSIONS) for d in path.iterdir()
        )
        has_top_images = any(is_image(p) for p in path.iterdir())
        return "imagefolder" if has_class_dirs and not has_top_images else "folder"
    raise DataError(f"{path}: no such file or folder")


def build_dataset(
    path: str | os.PathLike,
    dataset_type: str = "auto",
    transform: Callable | None = None,
    *,
    bands: Bands | None = None,
    valid_channel: bool = False,
    draft_size: int | None = None,
    skip_bad: bool = False,
    classes: Sequence[str] | None = None,
    list_rasters: bool = False,
    exclude: str | os.PathLike | None = None,
) -> SampleDataset:
    """A dataset from a CSV file, an ImageFolder tree, a folder of images, a packed array or shards.

    Args:
        path: CSV file, folder, packed ``.json`` or shard manifest (``NAME.shards.json``).
        dataset_type: ``fmow_rgb``/``csv`` (CSV), ``imagefolder``, ``folder``/``coco`` (unlabelled, recursive),
            ``packed``, ``shards`` or ``auto``.
        transform: Applied to each decoded image (a PIL image on the 8-bit RGB path, else a float32 tensor).
        bands: How files become inputs (``util.config.Bands``: raster reading of multispectral / high-bit-depth
            files, ``.npy`` too; ``--stretch``, ``--max_image_pixels``); None: 8-bit RGB with the defaults.
        valid_channel: Rasters carry each pixel's validity as a last band (``RasterOptions``; pretraining).
        draft_size: Smallest JPEG decode size the transform needs.
        skip_bad: Skip unreadable images with a warning instead of stopping.
        classes: Class names of the training split (index = label): an ImageFolder tree's folders are matched
            to them by name (see ``check_labels``).
        list_rasters: Only list raster files (tools that read the files themselves: ``band_stats.py``,
            ``preprocess.py --raster``); pre-decoded data is refused.
        exclude: A folder inside ``path`` whose images are left out (``tools/preprocess.py``'s ``--output``).

    Raises:
        DataError: unknown type, unreadable or malformed CSV, missing images, or no images at all.
    """
    path = Path(path)
    if dataset_type not in DATASET_TYPES:
        raise DataError(f"--dataset_type {dataset_type!r} is not supported; choose one of {', '.join(DATASET_TYPES)}")
    kind = detect_dataset_type(path) if dataset_type == "auto" else dataset_type
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    bands = bands or Bands()
    raster = raster_options(bands, valid_channel)
    names: dict[int, str] | None = None
    describe = None
    extensions = RASTER_EXTENSIONS if raster or list_rasters else IMAGE_EXTENSIONS
    if kind in ("packed", "shards") and list_rasters:
        raise DataError(
            f"{path}: a pre-decoded dataset (packed array or shards); this tool reads image files: give "
            "the CSV or folder they were made from"
        )
    if kind in ("packed", "shards") and bands.bands and raster is None:  # --stretch --bands: the 8-bit path
        raise DataError(
            f"{path}: --bands cannot choose the bands of a pre-decoded dataset (chosen when it was written)"
        )
    if kind == "packed":
        return PackedDataset(path, transform, raster)
    if kind == "shards":
        return shards.ShardDataset(path, transform, raster)
    if kind in ("fmow_rgb", "csv"):
        if not path.is_file():
            raise DataError(f"{path}: --dataset_type {kind} needs a CSV file, got a folder")
        given: dict[int, str] = {}
        lines: list[int] = []
        samples = read_csv_samples(path, given, lines)
        describe = lambda index: f"{samples[index][0]} (row {lines[index]} of {path})"
        # only the labels present, never range(max + 1): a label of 10**9 must not build 10**9 names
        names = {label: given.get(label, str(label)) for label in sorted({label for _, label in samples})}
        classes = []
    elif kind == "imagefolder":
        samples, classes = scan_image_folder(path, classes, extensions, Path(exclude) if exclude else None)
        names = dict(enumerate(classes))
    else:
        samples, classes = scan_unlabelled(path, extensions, Path(exclude) if exclude else None), []
    if not samples:
        raise DataError(f"{path}: no images found ({kind} dataset)")
    dataset = ImageDataset(
        samples,
        transform,
        classes or (),
        describe,
        draft_size,
        skip_bad,
        label_names=names,
        raster=raster,
        max_pixels=bands.max_pixels,
        stretch=bands.stretch,
        stretch_bands=None if raster else bands.bands,
    )
    dataset.source = str(path)
    return dataset


MAX_SPARSE_CLASSES = 1000  # a head / vote table larger than this needs labels that are (mostly) used


def check_labels(
    train: SampleDataset | None,
    evaluation: Sequence[SampleDataset],
    nb_classes: int | None = None,
    known_names: Sequence[str] | None = None,
    what: str = "classifier",
) -> list[str]:
    """The one place where the labels of every split are checked; returns the class names (index = label).

    Training and evaluation splits share one numbering: ImageFolder trees are matched by class NAME when built
    (``build_dataset(classes=...)``), CSV labels are the integers of column 0 (their ``class_name`` column, if
    any, must agree across splits). A class missing from an evaluation split is reported; a class present only
    in evaluation, a label outside 0..nb_classes-1, an unlabelled split and a training set of fewer than 2
    classes are refused, naming the file (and row).

    Args:
        train: The training (kNN: memory) split; None when only evaluating a checkpoint.
        evaluation: The evaluation splits.
        nb_classes: ``--nb_classes`` (or the checkpoint's head); None: the highest training label + 1.
        known_names: Class names the checkpoint holds (``--eval``); labels are checked against them.
        what: Names the consumer in messages.

    Raises:
        DataError: as above.
    """
    splits = ([train] if train is not None else []) + list(evaluation)
    for split in splits:
        if not split.targets or max(split.targets) < 0:
            raise DataError(
                f"{split.source or 'dataset'}: unlabelled images: a {what} needs a labelled CSV or ImageFolder tree"
            )
        negative = next((i for i, label in enumerate(split.targets) if label < 0), None)
        if negative is not None:
            raise DataError(
                f"{split.describe(negative)}: label {split.targets[negative]} is no class index (0..K-1), so this "
                f"image cannot train or score a {what} ({sum(label < 0 for label in split.targets)} such label(s) in "
                f"{split.source or 'the dataset'})"
            )
    if train is not None:
        train_labels = sorted(set(train.targets))
        if len(train_labels) < 2:
            raise DataError(
                f"{train.source}: only 1 class ({train.label_names.get(train_labels[0], train_labels[0])}) in the "
                f"training set; a {what} needs at least 2 (a wrapper folder around the class folders?)"
            )
    names: dict[int, str] = dict(enumerate(known_names)) if known_names else {}
    for split in splits:
        for label, name in split.label_names.items():
            if label in names and name != names[label] and name != str(label) and names[label] != str(label):
                raise DataError(
                    f"{split.source}: label {label} is class {name!r} here but {names[label]!r} "
                    f"{'in the checkpoint' if known_names else 'in ' + splits[0].source}"
                )
            if label not in names or names[label] == str(label):
                names[label] = name
    if train is not None:
        count = nb_classes or train_labels[-1] + 1
        if nb_classes is None and count > max(MAX_SPARSE_CLASSES, 10 * len(train_labels)):
            raise DataError(
                f"{train.source}: highest label {train_labels[-1]} but only {len(train_labels)} distinct labels; "
                "labels must be class indices 0..K-1 (renumber them, or give --nb_classes)"
            )
        trained = set(train_labels)
    else:
        count = nb_classes if nb_classes is not None else len(names)
        trained = set(range(count))
    for split in splits:
        bad = next((i for i, label in enumerate(split.targets) if not 0 <= label < count), None)
        if bad is not None:
            raise DataError(
                f"{split.describe(bad)}: label {split.targets[bad]} outside 0..{count - 1} (--nb_classes {count})"
            )
    for split in evaluation:
        present = set(split.targets)
        unseen = sorted(present - trained)
        if unseen:
            row = split.targets.index(unseen[0])
            raise DataError(
                f"{split.describe(row)}: class {names.get(unseen[0], unseen[0])} is in the evaluation set "
                f"but not in the training set {train.source if train is not None else ''}".rstrip()
            )
        absent = [names.get(label, str(label)) for label in sorted(trained - present)]
        if absent:
            print(
                f"note: {split.source}: no images of class(es) {', '.join(absent)} (evaluated on the others)",
                flush=True,
            )
    return [names.get(label, str(label)) for label in range(count)]


def split_dataset(dataset: SampleDataset, fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """A deterministic seeded split into (1 - fraction, fraction) of the samples (at least one each); the same seed,
    the same split on every machine and rank. Each part keeps the dataset's reading options and row descriptions.

    Raises:
        DataError: fewer than 2 images, or a pre-decoded dataset (packed arrays, shards) that has no file list.
    """
    if not isinstance(dataset, ImageDataset):
        raise DataError(
            f"{dataset.source or 'dataset'}: --test_path split needs a CSV, ImageFolder or image folder (pre-decoded "
            "packed arrays and shards cannot be split): give --test_path PATH"
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = len(order) - max(1, round(fraction * len(order)))
    if cut < 1:
        raise DataError(f"cannot split {len(dataset)} image(s) into two non-empty parts")
    parts = (sorted(order[:cut]), sorted(order[cut:]))
    names = (f"without the {fraction:.0%} held out, seed {seed}", f"{fraction:.0%} held out, seed {seed}")
    return tuple(
        _with_source(
            ImageDataset(
                [dataset.samples[i] for i in part],
                dataset.transform,
                dataset.classes,
                lambda index, part=part: dataset.describe(part[index]),
                draft_size=dataset.draft_size,
                skip_bad=dataset.skip_bad,
                label_names=dataset.label_names,
                raster=dataset.raster,
                max_pixels=dataset.max_pixels,
                stretch=dataset.stretch,
                stretch_bands=dataset.stretch_bands,
            ),
            f"{dataset.source} ({which})",
        )
        for part, which in zip(parts, names)
    )


def held_out(
    train: SampleDataset,
    test_path: str,
    fraction: float,
    seed: int,
    transform: Callable | None,
    *,
    dataset_type: str = "auto",
    **reading,
) -> tuple[SampleDataset, SampleDataset, str]:
    """(training set, evaluation set, where they come from) of fine-tuning, linear probing and kNN: the images of
    ``test_path`` (its ImageFolder classes matched to ``train``'s by name), or with ``test_path`` "split" a seeded
    ``fraction`` of ``train`` (``split_dataset``), the rest of which trains.

    Args:
        transform: The evaluation transform; ``reading``: ``build_dataset``'s options of the evaluation set
            (``bands``, ``draft_size``, ``skip_bad``).

    Raises:
        DataError: as ``build_dataset`` and ``split_dataset``.
    """
    source = train.source or "the training set"
    if test_path == "split":
        train, val = split_dataset(train, fraction, seed)
        val.transform = transform
        val.draft_size = reading.get("draft_size", val.draft_size)
        return train, val, f"seeded split (seed {seed}) of {source}: {fraction:.0%} evaluated"
    val = build_dataset(test_path, dataset_type, transform, **reading, classes=train.classes or None)
    return train, val, f"train {source}, evaluation {test_path}"


def _with_source(dataset: ImageDataset, source: str) -> ImageDataset:
    dataset.source = source
    return dataset
