"""Readers: every data source yields the element format of uda_tf/common.py.

    labeled:   {IMAGE: uint8 [H, W, 3], MASK: uint8 [H, W], FILENAME: string}
    unlabeled: {IMAGE: uint8 [H, W, 3], FILENAME: string}

`--data_source` (DataConfig.data_source) picks the reader:
  folder    the official Cityscapes tree (uda_tf/data/folder.py)
  tfrecord  records of `python -m uda_tf.data.preprocess` (tfrecord.py)
  tfds      TFDS cityscapes from the official zips (tfds_source.py)
  simple    {split}.txt, {split}/images, {split}/labels, unlabeled/ and a
            dataset.json declaring the classes (your own data)
  camvid    CamVid in the SegNet layout: the simple layout, built-in classes
  auto      the first that fits --data_dir (see `resolve_data_source`)

What label values mean follows --task_name: Cityscapes labelIds (mapped to
the 19 trainIds), CamVid ids (11 = void), or the dataset.json declaration.
The labeled subset (--sup_size) is chosen in base.py, the same way
for every source. Bad input raises a ValueError naming the file when the
dataset is built (see decode.py), before any training step.
"""

import dataclasses
import json
import os

import tensorflow as tf

from uda_tf import config as config_lib
from uda_tf.data import base, cityscapes, folder, tfds_source, tfrecord
from uda_tf.data import decode as rd
from uda_tf.data.base import Source, select_dev, select_labeled  # noqa: F401 (re-exported)

DATA_SOURCES = ("auto", "folder", "tfrecord", "tfds", "camvid", "simple")
DECLARATION_FILE = "dataset.json"

CAMVID_CLASS_NAMES = (
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign_symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)
# The SegNet tutorial's colours.
CAMVID_PALETTE = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)
CAMVID_VOID = 11


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """The classes of a dataset, for evaluation and colourised predictions.

    Attributes:
      num_classes: K; MASK values are 0..K-1 or ignore_label.
      class_names: K names (snake_case).
      palette: K (r, g, b) colours.
      ignore_label: the MASK value of ignored pixels.
    """

    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_label: int


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """The PASCAL VOC colour map: distinct colours for any number of classes."""
    colours = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


def load_declaration(data_dir: str) -> tuple[DatasetInfo, int]:
    """Reads `{data_dir}/dataset.json`: the DatasetInfo and the stored ignore value.

    The file: {"class_names": [...], "ignore_label": 255, "palette": [[r,g,b], ...]}
    (ignore_label defaults to 255, palette to the PASCAL VOC colours).

    Raises:
      ValueError: naming the file and the key that is missing or wrong.
    """
    path = os.path.join(data_dir, DECLARATION_FILE)
    if not tf.io.gfile.exists(path):
        raise ValueError(
            f"{path} not found: --task_name=custom needs it to declare the classes, e.g. "
            '{"class_names": ["background", "crack"], "ignore_label": 255}.'
        )
    try:
        with tf.io.gfile.GFile(path) as f:
            decl = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from None
    names = decl.get("class_names")
    if (
        not isinstance(names, list)
        or len(names) < 2
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise ValueError(f"{path}: 'class_names' must list >= 2 distinct names, got {names!r}.")
    k = len(names)
    stored_ignore = decl.get("ignore_label", 255)
    if not isinstance(stored_ignore, int) or not k <= stored_ignore <= 255:
        raise ValueError(
            f"{path}: 'ignore_label' must be an int in [{k}, 255] (not a class id), "
            f"got {stored_ignore!r}."
        )
    palette = decl.get("palette", default_palette(k))
    if len(palette) != k or not all(
        len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in palette
    ):
        raise ValueError(f"{path}: 'palette' must hold {k} [r, g, b] triples of 0..255.")
    palette = tuple(tuple(c) for c in palette)
    return DatasetInfo(k, tuple(names), palette, 255), stored_ignore


def dataset_info(cfg: config_lib.DataConfig) -> DatasetInfo:
    """The classes of --task_name (custom: from dataset.json in --data_dir)."""
    if cfg.task_name == "cityscapes":
        info = DatasetInfo(19, cityscapes.CLASS_NAMES, cityscapes.PALETTE, 255)
    elif cfg.task_name == "camvid":
        info = DatasetInfo(11, CAMVID_CLASS_NAMES, CAMVID_PALETTE, 255)
    elif cfg.task_name == "custom":
        info = load_declaration(_data_dir(cfg))[0]
    else:
        raise ValueError(
            f"--task_name={cfg.task_name!r} is invalid: expected cityscapes, camvid or custom."
        )
    return dataclasses.replace(info, ignore_label=cfg.ignore_label)


def _class_id_map(num_classes: int, stored_ignore: int, ignore_label: int) -> rd.LabelMap:
    table = tuple(v if v < num_classes else ignore_label for v in range(256))
    expected = f"class ids 0..{num_classes - 1} or the ignore value {stored_ignore}"
    return rd.LabelMap(table, num_classes, stored_ignore, expected)


def label_map(cfg: config_lib.DataConfig) -> rd.LabelMap:
    """How the stored label values of --task_name become MASK values."""
    if cfg.task_name == "cityscapes":
        table = tuple(int(t) if t != 255 else cfg.ignore_label for t in cityscapes.train_id_table())
        return rd.LabelMap(table, 34, 255, "Cityscapes labelIds 0..33 (or 255 for -1)")
    if cfg.task_name == "camvid":
        return _class_id_map(11, CAMVID_VOID, cfg.ignore_label)
    info, stored_ignore = load_declaration(_data_dir(cfg))
    return _class_id_map(info.num_classes, stored_ignore, cfg.ignore_label)


def _data_dir(cfg: config_lib.DataConfig) -> str:
    if not cfg.data_dir:
        raise ValueError("--data_dir is required.")
    if not tf.io.gfile.isdir(cfg.data_dir):
        raise ValueError(f"--data_dir={cfg.data_dir}: not a directory.")
    return cfg.data_dir


def resolve_data_source(cfg: config_lib.DataConfig) -> str:
    """--data_source, or for auto the first of tfrecord, folder, simple/camvid, tfds that fits.

    Raises:
      ValueError: an unknown source, a source that does not fit --task_name,
        or nothing recognisable in --data_dir.
    """
    if cfg.data_source not in DATA_SOURCES:
        raise ValueError(f"--data_source={cfg.data_source!r} is invalid: expected {DATA_SOURCES}.")
    data_dir = _data_dir(cfg)
    source = cfg.data_source
    if source == "auto":

        def has(*names):
            return all(tf.io.gfile.exists(os.path.join(data_dir, n)) for n in names)

        if has(tfrecord.INFO_FILE):
            source = "tfrecord"
        elif has("leftImg8bit", "gtFine"):
            source = "folder"
        elif has(DECLARATION_FILE) or has("train", "train.txt") or has("train/images"):
            source = "camvid" if cfg.task_name == "camvid" else "simple"
        elif has(tfds_source.ZIPS[tfds_source.LABELED][0]) or has("cityscapes"):
            source = "tfds"
        else:
            raise ValueError(
                f"--data_dir={data_dir}: found no {tfrecord.INFO_FILE}, no "
                "leftImg8bit/ + gtFine/, no train/images/ and no Cityscapes zips; set "
                "--data_source or see the README's 'Your own data'."
            )
    needs_cityscapes = source in ("folder", "tfds")
    if (needs_cityscapes and cfg.task_name != "cityscapes") or (
        source == "camvid" and cfg.task_name != "camvid"
    ):
        raise ValueError(f"--data_source={source} does not fit --task_name={cfg.task_name}.")
    return source


def labeled_pairs(cfg: config_lib.DataConfig, split: str) -> list[rd.Pair]:
    """Every image/label pair of a folder-type split (train for train and dev)."""
    source = resolve_data_source(cfg)
    listing = "train" if split == "dev" else split
    if source == "folder":
        return folder.cityscapes_pairs(cfg.data_dir, listing)
    if source in ("simple", "camvid"):
        return folder.simple_pairs(cfg.data_dir, listing)
    raise ValueError(f"--data_source={source} has no image folders to list.")


def unlabeled_images(cfg: config_lib.DataConfig) -> list[tuple[str, str]]:
    """(path, FILENAME) of the unlabeled pool of a folder-type source."""
    source = resolve_data_source(cfg)
    if source == "folder":
        return folder.cityscapes_unlabeled(cfg.data_dir, cfg.use_train_extra, cfg.unlabeled_dir)
    if source in ("simple", "camvid"):
        if cfg.use_train_extra:
            raise ValueError(
                f"--use_train_extra is for Cityscapes; with --data_source={source} put extra "
                "images in --unlabeled_dir."
            )
        return folder.simple_unlabeled(cfg.data_dir, cfg.unlabeled_dir)
    raise ValueError(f"--data_source={source} has no image folders to list.")


def check_num_classes(cfg: config_lib.DataConfig) -> DatasetInfo:
    """dataset_info(cfg), after checking that --num_classes agrees with it."""
    info = dataset_info(cfg)
    if cfg.num_classes != info.num_classes:
        raise ValueError(
            f"--num_classes={cfg.num_classes} but --task_name={cfg.task_name} has "
            f"{info.num_classes} classes {info.class_names}."
        )
    return info


def labeled_source(cfg: config_lib.DataConfig, split: str = "train") -> Source:
    """The labeled examples of `split`, checked, not yet shuffled or decoded.

    Args:
      cfg: the data config.
      split: "train" (the --sup_size subset), "dev" (--dev_size held out of
        train), or a split read whole ("val", ...).

    Raises:
      ValueError: naming the folder, file, flag or value that is wrong.
    """
    source = resolve_data_source(cfg)
    lmap = label_map(cfg)
    if source == "tfrecord":
        return tfrecord.labeled_source(cfg, split, lmap)
    if source == "tfds":
        return tfds_source.labeled_source(cfg, split, lmap)
    pairs = labeled_pairs(cfg, split)
    what = f"{cfg.data_dir} ({'train' if split == 'dev' else split})"
    if not pairs:
        raise ValueError(f"No labeled images in {what}.")
    keep = set(base.split_subset([p.filename for p in pairs], split, cfg, what))
    pairs = [p for p in pairs if p.filename in keep]
    rd.scan_pairs(pairs, lmap)
    return folder.pairs_source(pairs, lmap)


def unlabeled_source(cfg: config_lib.DataConfig) -> Source:
    """The unlabeled pool (train images, labels dropped, + extra images), checked.

    Raises:
      ValueError: if it is empty, or naming a file that is not a usable image.
    """
    source = resolve_data_source(cfg)
    if source == "tfrecord":
        return tfrecord.unlabeled_source(cfg)
    if source == "tfds":
        return tfds_source.unlabeled_source(cfg)
    images = unlabeled_images(cfg)
    if not images:
        raise ValueError(
            f"--unsup_ratio={cfg.unsup_ratio} needs unlabeled images; none in {cfg.data_dir}."
        )
    rd.scan_images([p for p, _ in images])
    return folder.images_source(images)


def labeled_filenames(cfg: config_lib.DataConfig) -> list[str]:
    """FILENAMEs of the labeled subset, sorted: write them to model_dir (write_file_list).

    Empty for TFDS with --sup_size=-1 (all train images; not listed, as that
    would read the whole split).
    """
    return sorted(labeled_source(cfg, "train").filenames)


write_file_list = base.write_file_list
