"""One datamodule for the multi-class (unified) setting: all categories of a dataset at once.

anomalib's image datamodules load one category at a time. :class:`MultiClassDataModule`
builds each requested category with anomalib's own datamodule (so file layouts, splits and
masks are read exactly as anomalib reads them), then concatenates them into one training
set and one test set. Every item and batch carries its category name and index
(:class:`~anomalib_mcad.data.dataclasses.CategoryImageBatch`), for class-aware models and
per-category metrics.

Also expressible: a cross-class split (``test_categories`` differ from ``categories``), a
few-shot training set (``k_shot`` normal images per category) and a k-shot normal support
set per test category (``support_shots``), as PMAD's and INP-Former's settings need.
"""

from __future__ import annotations

import copy
import importlib
import zlib
from dataclasses import dataclass, field, fields
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
import torch
from anomalib.data import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import ValSplitMode
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchvision.transforms.v2 import Transform

from anomalib_mcad.data.dataclasses import CategoryImageBatch, CategoryImageItem

logger = logging.getLogger(__name__)

#: Short names for anomalib's per-category image datamodules. ``mvtec_layout`` is any folder of
#: MVTec-AD-layout categories (``<cat>/train/good``, ``<cat>/test/<defect>``,
#: ``<cat>/ground_truth/<defect>``), read with anomalib's MVTecAD reader; a category without a
#: ``ground_truth`` folder is read with image labels only. ``anomalib_folder`` is anomalib's
#: ``Folder`` datamodule, one per category folder (:class:`DataSource`).
DATASETS: dict[str, str] = {
    "mvtec_ad": "anomalib.data.MVTecAD",
    "visa": "anomalib.data.Visa",
    "real_iad": "anomalib.data.RealIAD",
    "mpdd": "anomalib.data.MPDD",
    "btech": "anomalib.data.BTech",
    "mvtec_layout": "anomalib.data.MVTecAD",
    "anomalib_folder": "anomalib.data.Folder",
}
#: Datasets read by this package itself rather than by an anomalib datamodule.
OWN_READERS = frozenset({"elpv"})
_ALIASES = {
    "mvtec": "mvtec_ad",
    "mvtecad": "mvtec_ad",
    "realiad": "real_iad",
    "folder": "mvtec_layout",
    "anomalib.data.Folder": "anomalib_folder",
    "anomalib.data.datamodules.image.folder.Folder": "anomalib_folder",
}
#: ``Folder`` arguments a category may set in ``dataset_kwargs`` (paths relative to its category folder).
FOLDER_KEYS = frozenset({"normal_dir", "abnormal_dir", "normal_test_dir", "mask_dir", "extensions", "test_split_mode", "test_split_ratio", "seed"})
_MVTEC_EXTENSIONS = (".png", ".PNG")
_CATEGORY_MODULES = {
    "mvtec_ad": "anomalib.data.datasets.image.mvtecad",
    "visa": "anomalib.data.datasets.image.visa",
    "real_iad": "anomalib.data.datasets.image.realiad",
    "mpdd": "anomalib.data.datasets.image.mpdd",
    "btech": "anomalib.data.datasets.image.btech",
}


def _import(path: str) -> Any:  # noqa: ANN401
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class DataSource:
    """One dataset read by :class:`MultiClassDataModule`: its root, reader and optional name prefix.

    In a union of datasets every category is named ``<name>/<category>`` (``"visa/pcb1"``), so
    equal folder names of two datasets cannot collide and the metrics can average per dataset.
    """

    root: Path | None
    dataset: str = "mvtec_layout"
    name: str = ""
    categories: tuple[str, ...] | None = None
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict[str, Any] | DataSource) -> DataSource:
        """Build from a ``{root, dataset, name, categories, dataset_kwargs}`` mapping (a YAML entry)."""
        if isinstance(config, DataSource):
            return config
        unknown = set(config) - {"root", "dataset", "name", "categories", "dataset_kwargs"}
        dataset = config.get("dataset", "mvtec_layout")
        dataset = _ALIASES.get(dataset, dataset)
        if unknown or ("root" not in config and dataset not in OWN_READERS):
            msg = f"A source needs 'root' and may have 'dataset', 'name', 'categories', 'dataset_kwargs'; got {sorted(config)}"
            raise ValueError(msg)
        categories = config.get("categories")
        root = config.get("root")
        return cls(
            root=Path(root).expanduser() if root is not None else None,
            dataset=dataset,
            name=str(config.get("name") or dataset),
            categories=tuple(categories) if categories is not None else None,
            dataset_kwargs=dict(config.get("dataset_kwargs") or {}),
        )

    def qualified(self, category: str) -> str:
        """The category's name in the datamodule (prefixed by the source name in a union)."""
        return f"{self.name}/{category}" if self.name else category

    def __post_init__(self) -> None:
        """Resolve ELPV's default root (the installed package); check ``dataset_kwargs``."""
        if self.dataset == "elpv":
            from anomalib_mcad.data.elpv import ElpvSplit, elpv_root  # noqa: PLC0415

            if self.root is None:
                object.__setattr__(self, "root", elpv_root())
            try:
                ElpvSplit(**self.dataset_kwargs)
            except TypeError as err:
                msg = f"dataset='elpv': bad dataset_kwargs {self.dataset_kwargs}: {err}. Allowed: include_uncertain, n_train_normal, n_test_normal, n_test_anomalous, split_seed"
                raise ValueError(msg) from err
        elif self.root is None:
            msg = f"dataset '{self.dataset}' needs a root folder"
            raise ValueError(msg)
        if self.dataset == "anomalib_folder":
            shared = set(self.dataset_kwargs) - FOLDER_KEYS - {"per_category"}
            per_category = self.dataset_kwargs.get("per_category") or {}
            bad = sorted(shared | {k for kwargs in per_category.values() for k in set(kwargs) - FOLDER_KEYS})
            if bad or ("normal_dir" not in self.dataset_kwargs and not per_category):
                problem = f"unknown keys {bad}" if bad else "normal_dir missing"
                msg = (
                    f"anomalib's Folder as a multi-class dataset: {problem}. dataset_kwargs take {sorted(FOLDER_KEYS)} "
                    "(applied to every category folder under root, paths relative to it; normal_dir required) and "
                    "'per_category': {<category>: {the same keys}}"
                )
                raise ValueError(msg)

    def _folder_kwargs(self, category: str) -> dict[str, Any]:
        """``Folder`` arguments of one category: the shared ones, then the category's own."""
        shared = {k: v for k, v in self.dataset_kwargs.items() if k != "per_category"}
        return {"seed": 0, **shared, **dict((self.dataset_kwargs.get("per_category") or {}).get(category, {}))}

    def available_categories(self) -> list[str]:
        """Categories of this dataset that exist under ``root`` (unprefixed)."""
        if self.dataset == "elpv":
            from anomalib_mcad.data.elpv import ELPV_CATEGORIES, read_elpv_labels  # noqa: PLC0415

            present = set(read_elpv_labels(self.root)["category"])
            found = [c for c in ELPV_CATEGORIES if c in present]
            return self._check_requested(found)
        if not self.root.is_dir():
            msg = f"Dataset root not found: {self.root}"
            raise FileNotFoundError(msg)
        on_disk = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if self.dataset == "visa" and (self.root / "visa_pytorch").is_dir():
            on_disk = sorted(p.name for p in (self.root / "visa_pytorch").iterdir() if p.is_dir())
        if self.dataset in _CATEGORY_MODULES:
            known = list(_import(f"{_CATEGORY_MODULES[self.dataset]}.CATEGORIES"))
            found = [c for c in known if c in on_disk]
        elif self.dataset == "mvtec_layout":
            found = [c for c in on_disk if (self.root / c / "train").is_dir()]
        elif self.dataset == "anomalib_folder":
            found = [c for c in on_disk if (self.root / c / str(self._folder_kwargs(c).get("normal_dir", ""))).is_dir()]
        else:
            found = on_disk
        return self._check_requested(found)

    def _check_requested(self, found: list[str]) -> list[str]:
        """``found``, or the requested categories if all of them are among it."""
        if self.categories is not None:
            missing = [c for c in self.categories if c not in found]
            if missing:
                msg = f"Source '{self.name}': categories {missing} not found under {self.root}. Available: {found}"
                raise ValueError(msg)
            found = list(self.categories)
        return found

    def category_datamodule(self, category: str) -> AnomalibDataModule:
        """anomalib's own datamodule for one (unprefixed) category, prepared but not downloaded."""
        if self.dataset in OWN_READERS:
            msg = f"dataset '{self.dataset}' is read by anomalib_mcad itself, not by an anomalib datamodule"
            raise ValueError(msg)
        cls = _import(DATASETS.get(self.dataset, self.dataset))
        if self.dataset == "anomalib_folder":
            return cls(name=category, root=self.root / category, num_workers=0, **self._folder_kwargs(category))
        dm = cls(root=self.root, category=category, num_workers=0, **self.dataset_kwargs)
        if self.dataset == "visa":
            dm.prepare_data()  # splits the raw VisA folders into visa_pytorch/ once; the root was checked to exist
        return dm

    def frames(self, category: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Training and test sample frames of one (unprefixed) category, as anomalib's readers write them.

        Raises:
            ValueError: the category cannot be read (e.g. an empty folder).
        """
        if self.dataset == "elpv":
            from anomalib_mcad.data.elpv import ElpvSplit, elpv_frames  # noqa: PLC0415

            return elpv_frames(self.root, category, ElpvSplit(**self.dataset_kwargs))
        if self.dataset == "mvtec_layout" and not (self.root / category / "ground_truth").is_dir():
            return _mvtec_layout_frames_without_masks(self.root / category)
        dm = self.category_datamodule(category)
        try:
            dm._setup()  # noqa: SLF001 - anomalib's documented hook that builds train_data / test_data only
            if self.dataset == "anomalib_folder":
                dm._create_test_split()  # noqa: SLF001 - Folder's normal test images (from normal_test_dir, or split off the normal ones)
        except RuntimeError as err:  # anomalib's readers: "Found 0 images in <folder>"
            msg = f"Category '{self.qualified(category)}' cannot be read: {err} (an empty category folder?)"
            raise ValueError(msg) from err
        return dm.train_data.samples.copy(), dm.test_data.samples.copy()


def _mvtec_layout_frames_without_masks(category_root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Samples of an MVTec-layout category that has no ``ground_truth`` folder: image labels only.

    ``train/good`` and ``test/good`` are normal, every other ``test/<defect>`` folder anomalous;
    ``mask_path`` is empty, so the pixel metrics of such a category are n/a.
    """
    frames = []
    for split in ("train", "test"):
        rows = []
        for folder in sorted(p for p in (category_root / split).glob("*") if p.is_dir()):
            for image in sorted(f for f in folder.iterdir() if f.suffix in _MVTEC_EXTENSIONS):
                rows.append({"path": str(category_root), "split": split, "label": folder.name, "image_path": str(image), "mask_path": "", "label_index": int(folder.name != "good")})
        frame = pd.DataFrame(rows, columns=["path", "split", "label", "image_path", "mask_path", "label_index"])
        frame.attrs["task"] = "classification"
        frames.append(frame)
    return frames[0], frames[1]


class EpochSeededSampler(Sampler[int]):
    """Shuffles like ``RandomSampler``, but epoch ``e``'s order depends only on ``(seed, e)``.

    Lightning calls :meth:`set_epoch` at the start of every epoch, so a run resumed from a
    checkpoint draws the batches the uninterrupted run drew (as ``DistributedSampler`` does under
    DDP), and shuffling never consumes the global RNG that dropout and noise draw from.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch``."""
        self.epoch = epoch

    def __iter__(self):  # noqa: ANN204
        """A permutation of the indices, fixed by seed and epoch."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        """Number of indices per epoch."""
        return self.size


class ImageReadError(OSError):
    """An image or mask file of the dataset that cannot be used; the message names the file."""


class MultiClassDataset(AnomalibDataset):
    """Images of several categories in one dataset; items are :class:`CategoryImageItem`.

    Its ``samples`` frame is the per-category frames stacked, with ``category`` and
    ``category_index`` columns added, so anomalib's split utilities (``subsample``,
    ``split_by_label``, ``random_split``) work on it unchanged.
    """

    def __init__(self, samples: pd.DataFrame, augmentations: Transform | None = None) -> None:
        super().__init__(augmentations=augmentations)
        self.samples = samples.reset_index(drop=True)

    @property
    def categories(self) -> list[str]:
        """Category names present, in order of first appearance."""
        return list(dict.fromkeys(self.samples["category"]))

    def __getitem__(self, index: int) -> CategoryImageItem:
        """Read the image (and mask) as anomalib does, then attach its category.

        Raises:
            ImageReadError: the image or mask file is unreadable, truncated or not an image
                (the message names the file), or the mask's size differs from the image's.
        """
        row = self.samples.iloc[index]
        mask_path = row.get("mask_path")
        has_mask = isinstance(mask_path, str) and mask_path != ""
        try:
            if has_mask:
                with Image.open(row["image_path"]) as image, Image.open(mask_path) as mask:
                    if image.size != mask.size:
                        msg = (
                            f"Mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {row['image_path']} is "
                            f"{image.size[0]}x{image.size[1]}: ground truth must have the image's size"
                        )
                        raise ImageReadError(msg)
            item = super().__getitem__(index)
        except ImageReadError:
            raise
        except (OSError, ValueError, SyntaxError) as err:  # PIL: UnidentifiedImageError, truncated files, bad headers
            culprit = mask_path if has_mask and str(mask_path) in str(err) else row["image_path"]
            msg = f"Cannot read {culprit} (sample {index} of category '{row['category']}'): {err}"
            raise ImageReadError(msg) from err
        values = {f.name: getattr(item, f.name) for f in fields(item)}
        return CategoryImageItem(**values, category=str(row["category"]), category_index=torch.tensor(int(row["category_index"])))

    @property
    def collate_fn(self) -> Callable:
        """Collate into :class:`CategoryImageBatch`, keeping the category fields."""
        return CategoryImageBatch.collate


class MultiClassDataModule(AnomalibDataModule):
    """Train one model on several categories; test on the same or on other categories.

    Args:
        root: dataset root (the folder that holds the category folders; for VisA the folder
            with ``VisA_20220922.tar``'s content or the prepared ``visa_pytorch``).
        dataset: ``mvtec_ad``, ``visa``, ``real_iad``, ``mpdd``, ``btech``, ``mvtec_layout``
            (any MVTec-layout folder, e.g. the synthetic dataset) or the class path of an
            anomalib image datamodule that takes ``root`` and ``category``.
        categories: training categories; ``None`` = all (the dataset's list, or every
            sub-folder with a ``train`` folder for ``mvtec_layout``).
        test_categories: test categories; ``None`` = same as ``categories``. Different lists
            give a cross-class split.
        k_shot: keep only this many normal training images per training category (few-shot).
        support_shots: build a support set of this many normal *training* images of each test
            category (``support_data`` / ``support_dataloader``), e.g. for unseen categories.
        dataset_kwargs: extra arguments for the wrapped datamodule (e.g. RealIAD's ``resolution``).
        sources: instead of ``root``/``dataset``/``dataset_kwargs``, a union of datasets: a list of
            ``{root, dataset, name, categories, dataset_kwargs}`` (:class:`DataSource`), each read
            with its own anomalib reader. Categories are then named ``<name>/<category>``
            (``name`` defaults to the dataset name) in ``categories``, ``test_categories``,
            batches and the per-category table, which also averages per dataset.
        val_split_mode, val_split_ratio: the validation set, from which anomalib's
            post-processor learns its score normalisation and threshold. Default: 10 % of the
            normal *training* images, so nothing at test time depends on test images or
            labels (anomalib's own default, ``same_as_test``, uses the test set).
        Other arguments as anomalib's datamodules.

    Raises:
        FileNotFoundError: the root or a category folder is missing (lists what exists).
        ValueError: an unknown category or dataset name, or an empty training set.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        dataset: str = "mvtec_layout",
        categories: Sequence[str] | None = None,
        test_categories: Sequence[str] | None = None,
        k_shot: int | None = None,
        support_shots: int | None = None,
        train_batch_size: int = 16,
        eval_batch_size: int = 16,
        num_workers: int = 4,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: str = "from_dir",
        test_split_ratio: float = 0.2,
        val_split_mode: str = "from_train",
        val_split_ratio: float = 0.1,
        seed: int | None = 0,
        dataset_kwargs: dict[str, Any] | None = None,
        sources: Sequence[dict[str, Any] | DataSource] | None = None,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        dataset = _ALIASES.get(dataset, dataset)
        if (root is None and dataset not in OWN_READERS) == (sources is None) or (root is not None and sources is not None):
            msg = "Give either 'root' (one dataset) or 'sources' (a union of datasets), not both or neither"
            raise ValueError(msg)
        if sources is not None:
            self.sources = [DataSource.from_config(source) for source in sources]
            names = [source.name for source in self.sources]
            if not self.sources or len(set(names)) != len(names):
                msg = f"'sources' must be a non-empty list with distinct names, got {names}"
                raise ValueError(msg)
        else:
            self.sources = [DataSource(Path(root).expanduser() if root is not None else None, dataset, "", None, dict(dataset_kwargs or {}))]
        self.root = self.sources[0].root
        self.dataset = self.sources[0].dataset if sources is None else "union"
        self.dataset_kwargs = self.sources[0].dataset_kwargs
        if k_shot is not None and k_shot < 1:
            msg = f"k_shot must be >= 1, got {k_shot}"
            raise ValueError(msg)
        if support_shots is not None and support_shots < 1:
            msg = f"support_shots must be >= 1, got {support_shots}"
            raise ValueError(msg)
        self.k_shot = k_shot
        self.support_shots = support_shots
        self._requested_train = list(categories) if categories is not None else None
        self._requested_test = list(test_categories) if test_categories is not None else None
        self.support_data: MultiClassDataset | None = None
        train, test = self._resolve_categories()
        self.train_categories = train
        self.test_categories = test
        #: Every category this datamodule knows, training ones first; ``category_index`` indexes it.
        self.category_names = train + [c for c in test if c not in train]
        self.category = "multiclass" if train == test else "crossclass"

    # ----------------------------------------------------------------- categories
    @property
    def name(self) -> str:
        """Name used in anomalib's result folders, e.g. ``MultiClass_mvtec_ad``."""
        return f"MultiClass_{self.dataset.rsplit('.', 1)[-1]}"

    @property
    def num_train_categories(self) -> int:
        """Number of training categories (indices ``0 .. n-1`` in ``category_index``)."""
        return len(self.train_categories)

    def available_categories(self) -> list[str]:
        """Categories of the dataset(s) that exist under the root(s), as the datamodule names them."""
        self._source_of = {source.qualified(c): (source, c) for source in self.sources for c in source.available_categories()}
        return list(self._source_of)

    def _resolve_categories(self) -> tuple[list[str], list[str]]:
        available = self.available_categories()
        if not available:
            msg = f"No categories found under {[str(src.root) for src in self.sources]} for dataset '{self.dataset}'"
            raise FileNotFoundError(msg)

        def check(requested: list[str] | None) -> list[str]:
            if requested is None:
                return available
            unknown = [c for c in requested if c not in available]
            if unknown:
                where = self.root if len(self.sources) == 1 else [str(src.root) for src in self.sources]
                msg = f"Unknown or missing categor{'y' if len(unknown) == 1 else 'ies'} {unknown} under {where}. Available: {available}"
                raise ValueError(msg)
            if len(set(requested)) != len(requested):
                msg = f"Categories listed twice: {requested}"
                raise ValueError(msg)
            return requested

        train = check(self._requested_train)
        test = check(self._requested_test) if self._requested_test is not None else list(train)
        return train, test

    # ----------------------------------------------------------------- building
    def _category_datamodule(self, category: str) -> AnomalibDataModule:
        """anomalib's own datamodule for one category (its source's reader and root)."""
        source, name = self._source_of[category]
        return source.category_datamodule(name)

    def _frames(self, categories: list[str]) -> tuple[list[pd.DataFrame], list[pd.DataFrame]]:
        train_frames, test_frames = [], []
        for category in categories:
            source, name = self._source_of[category]
            index = self.category_names.index(category)
            for frames, frame in zip((train_frames, test_frames), source.frames(name), strict=True):
                frame = frame.copy()  # noqa: PLW2901
                frame["category"] = category
                frame["category_index"] = index
                frames.append(frame)
        return train_frames, test_frames

    def _task(self, categories: list[str], frames: list[pd.DataFrame]) -> str:
        """``segmentation`` when every category has masks, ``classification`` when none has.

        Raises:
            ValueError: some categories have masks and others have none (one batch cannot mix them).
        """
        tasks = {category: str(frame.attrs.get("task", "segmentation")) for category, frame in zip(categories, frames, strict=True)}
        if len(set(tasks.values())) > 1:
            with_masks = [c for c, t in tasks.items() if t == "segmentation"]
            without = [c for c, t in tasks.items() if t != "segmentation"]
            msg = f"Categories {with_masks} have pixel masks but {without} have none; train or test them in separate datamodules"
            raise ValueError(msg)
        return next(iter(tasks.values()))

    def _setup(self, _stage: str | None = None) -> None:
        """Build the concatenated train and test sets (and the support set)."""
        needed = list(dict.fromkeys(self.train_categories + self.test_categories))
        train_frames, test_frames = self._frames(needed)
        by_cat_train = dict(zip(needed, train_frames, strict=True))
        by_cat_test = dict(zip(needed, test_frames, strict=True))
        rng = np.random.default_rng(self.seed)

        train = []
        for category in self.train_categories:
            frame = by_cat_train[category]
            frame = frame[frame["label_index"] == 0]
            if len(frame) == 0:
                source, name = self._source_of[category]
                msg = f"Category '{category}' has no normal training images under {source.root / name}"
                raise ValueError(msg)
            if self.k_shot is not None:
                frame = self._pick(frame, self.k_shot, rng, category)
            train.append(frame)
        # after the per-category checks, so an empty category is named as such, not as one without masks
        task = self._task(needed, test_frames)
        train_samples = pd.concat(train, ignore_index=True)
        if len(train_samples) == 0:
            msg = "The training set is empty"
            raise ValueError(msg)
        test_samples = pd.concat([by_cat_test[c] for c in self.test_categories], ignore_index=True)
        train_samples.attrs["task"] = test_samples.attrs["task"] = task
        self.train_data = MultiClassDataset(train_samples)
        self.test_data = MultiClassDataset(test_samples)
        if self.support_shots is not None:
            support = [
                self._pick(by_cat_train[c][by_cat_train[c]["label_index"] == 0], self.support_shots, rng, c)
                for c in self.test_categories
            ]
            support_samples = pd.concat(support, ignore_index=True)
            support_samples.attrs["task"] = task
            self.support_data = MultiClassDataset(support_samples)
        logger.info(
            "Multi-class data: %d training images from %s; %d test images from %s",
            len(self.train_data),
            self.train_categories,
            len(self.test_data),
            self.test_categories,
        )

    def _create_val_split(self) -> None:
        """Validation split; ``from_train`` takes the same share of every category's normal training images.

        anomalib's ``from_train`` draws ``val_split_ratio`` of the pooled training set, so small
        categories can get no validation image at all. Here each category gives
        ``round(n * val_split_ratio)`` of its ``n`` training images (at least one stays for
        training), drawn with a generator seeded by ``(seed, category)``; both parts keep file
        order. Other modes are anomalib's.
        """
        if ValSplitMode(self.val_split_mode) != ValSplitMode.FROM_TRAIN:
            super()._create_val_split()
            return
        samples = self.train_data.samples
        train_rows: list[int] = []
        val_rows: list[int] = []
        for category in self.train_data.categories:
            rows = np.flatnonzero((samples["category"] == category).to_numpy())
            n_val = min(int(np.floor(len(rows) * self.val_split_ratio + 0.5)), len(rows) - 1)
            seed = None if self.seed is None else [int(self.seed), zlib.crc32(category.encode())]
            chosen = np.zeros(len(rows), dtype=bool)
            chosen[np.random.default_rng(seed).permutation(len(rows))[: max(n_val, 0)]] = True
            train_rows.extend(rows[~chosen].tolist())
            val_rows.extend(rows[chosen].tolist())
        self.val_data = self.train_data.subsample(sorted(val_rows))
        self.train_data = self.train_data.subsample(sorted(train_rows))

    @staticmethod
    def _pick(frame: pd.DataFrame, k: int, rng: np.random.Generator, category: str) -> pd.DataFrame:
        if len(frame) < k:
            msg = f"Category '{category}' has {len(frame)} normal training images, fewer than the {k} shots asked for"
            raise ValueError(msg)
        rows = np.sort(rng.choice(len(frame), size=k, replace=False))
        return frame.iloc[rows]

    def _update_augmentations(self) -> None:
        super()._update_augmentations()
        if self.support_data is not None:
            self.support_data.augmentations = copy.copy(self.train_augmentations)

    def _world(self) -> tuple[int, int]:
        """(world size, rank) of the DDP run this datamodule's trainer is in; (1, 0) otherwise."""
        trainer = getattr(self, "trainer", None)
        world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        if world <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 1, 0
        return world, int(trainer.global_rank)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; with a ``seed`` the order is a function of seed and epoch (resumable).

        Under DDP each rank gets ``DistributedSampler(shuffle=True, seed=seed)``: the same
        permutation as :class:`EpochSeededSampler` (``randperm`` seeded with ``seed + epoch``),
        rank ``r`` taking positions ``r, r + W, ...``. So the ``W`` per-rank batches of size ``b``
        of step ``s`` together hold exactly the single-process batch ``s`` of size ``W b``, and
        Lightning's ``set_epoch`` reaches the sampler (it does not reach a sampler Lightning wraps
        itself, which would repeat epoch 0's order).
        """
        if self.seed is None:
            return super().train_dataloader()
        world, rank = self._world()
        sampler: Sampler[int] = (
            DistributedSampler(self.train_data, num_replicas=world, rank=rank, shuffle=True, seed=int(self.seed))
            if world > 1
            else EpochSeededSampler(len(self.train_data), int(self.seed))
        )
        return DataLoader(
            dataset=self.train_data,
            sampler=sampler,
            batch_size=self.train_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or self.train_data.collate_fn,
            generator=torch.Generator().manual_seed(int(self.seed)),  # worker base seeds: not from the global RNG
        )

    def support_dataloader(self) -> DataLoader:
        """The k-shot normal support set of the test categories (requires ``support_shots``)."""
        if self.support_data is None:
            msg = "No support set: create the datamodule with support_shots=k and call setup() first"
            raise RuntimeError(msg)
        return DataLoader(
            self.support_data,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.support_data.collate_fn,
        )
