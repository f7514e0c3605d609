"""Readers of image folders: the official Cityscapes layout and the simple one.

Cityscapes (`data_source=folder`), as the official zips unpack:
    leftImg8bit/{split}/{city}/{id}_leftImg8bit.png
    gtFine/{split}/{city}/{id}_gtFine_labelIds.png
    leftImg8bit/train_extra/{city}/{id}_leftImg8bit.png   (unlabeled, optional;
        also found under leftImg8bit_trainextra/leftImg8bit/train_extra/)

Simple (`data_source=simple`, your own data; CamVid in the SegNet layout):
    {split}.txt              one id per line (optional: else every image)
    {split}/images/{id}.png|jpg|jpeg
    {split}/labels/{id}.png  8-bit greyscale class ids
    unlabeled/**             unlabeled images (or --unlabeled_dir)

FILENAME, the element's name, is the image path relative to the data
directory (`leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png`,
`train/images/0001TP_006690.jpg`); the TFRecord and TFDS readers give the same.
"""

import os

import tensorflow as tf

from uda_tf.data import decode as rd
from uda_tf.data.base import Source

_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"
_MAX_LISTED = 5


def _require_dir(path: str, what: str) -> None:
    if not tf.io.gfile.isdir(path):
        raise ValueError(f"Missing {what}: {path} is not a directory.")


def _mismatch(paths: list[str], problem: str) -> ValueError:
    listed = ", ".join(paths[:_MAX_LISTED])
    more = f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
    return ValueError(f"{len(paths)} file(s) {problem}: {listed}{more}.")


def _city_files(root: str, suffix: str) -> dict[str, str]:
    """{relative path from root without suffix: absolute path} of `*{suffix}` files."""
    found = {}
    for city in sorted(tf.io.gfile.listdir(root)):
        city_dir = os.path.join(root, city.rstrip("/"))
        if not tf.io.gfile.isdir(city_dir):
            continue
        for name in tf.io.gfile.listdir(city_dir):
            if name.endswith(suffix):
                found[f"{city.rstrip('/')}/{name[: -len(suffix)]}"] = os.path.join(city_dir, name)
    return found


def cityscapes_pairs(data_dir: str, split: str) -> list[rd.Pair]:
    """Image/label pairs of one split of the official layout, sorted.

    Raises:
      ValueError: a missing root or split folder, an image without its label
        file or a label without its image (naming them).
    """
    _require_dir(data_dir, "data directory (--data_dir)")
    image_root = os.path.join(data_dir, "leftImg8bit", split)
    label_root = os.path.join(data_dir, "gtFine", split)
    _require_dir(os.path.join(data_dir, "leftImg8bit"), "Cityscapes image folder leftImg8bit/")
    _require_dir(os.path.join(data_dir, "gtFine"), "Cityscapes label folder gtFine/")
    _require_dir(image_root, f"{split} split of leftImg8bit/")
    _require_dir(label_root, f"{split} split of gtFine/")
    images = _city_files(image_root, _IMAGE_SUFFIX)
    labels = _city_files(label_root, _LABEL_SUFFIX)
    no_label = sorted(images[k] for k in images.keys() - labels.keys())
    if no_label:
        raise _mismatch(no_label, f"have no *{_LABEL_SUFFIX} under {label_root}")
    no_image = sorted(labels[k] for k in labels.keys() - images.keys())
    if no_image:
        raise _mismatch(no_image, f"have no *{_IMAGE_SUFFIX} under {image_root}")
    return [
        rd.Pair(images[k], labels[k], f"leftImg8bit/{split}/{k}{_IMAGE_SUFFIX}")
        for k in sorted(images)
    ]


def cityscapes_unlabeled(
    data_dir: str, use_train_extra: bool, unlabeled_dir: str | None = None
) -> list[tuple[str, str]]:
    """(path, FILENAME) of the unlabeled pool: train (+ train_extra) (+ a folder)."""
    root = os.path.join(data_dir, "leftImg8bit", "train")
    _require_dir(root, "train split of leftImg8bit/")
    pool = [
        (p, f"leftImg8bit/train/{k}{_IMAGE_SUFFIX}")
        for k, p in _city_files(root, _IMAGE_SUFFIX).items()
    ]
    if use_train_extra:
        candidates = [
            os.path.join(data_dir, "leftImg8bit", "train_extra"),
            os.path.join(data_dir, "leftImg8bit_trainextra", "leftImg8bit", "train_extra"),
        ]
        extra = [c for c in candidates if tf.io.gfile.isdir(c)]
        if not extra:
            raise ValueError(f"--use_train_extra: none of {candidates} is a directory.")
        files = _city_files(extra[0], _IMAGE_SUFFIX)
        pool += [(p, f"leftImg8bit/train_extra/{k}{_IMAGE_SUFFIX}") for k, p in files.items()]
    return sorted(pool, key=lambda x: x[1]) + folder_images(unlabeled_dir)


def _strip_id(line: str) -> str:
    """An id from a `{split}.txt` line: the first token, without folder or extension."""
    token = line.split()[0]
    return os.path.splitext(os.path.basename(token))[0]


def simple_pairs(data_dir: str, split: str) -> list[rd.Pair]:
    """Image/label pairs of one split of the simple layout, in list order.

    Raises:
      ValueError: a missing folder, an id without image or label, a label
        without its image.
    """
    _require_dir(data_dir, "data directory (--data_dir)")
    image_dir = os.path.join(data_dir, split, "images")
    label_dir = os.path.join(data_dir, split, "labels")
    _require_dir(image_dir, f"{split} image folder")
    _require_dir(label_dir, f"{split} label folder")
    images = {}
    for name in tf.io.gfile.listdir(image_dir):
        stem, ext = os.path.splitext(name)
        if ext.lower() in rd.IMAGE_EXTENSIONS:
            images[stem] = name
    labels = {
        os.path.splitext(n)[0]: n for n in tf.io.gfile.listdir(label_dir) if n.endswith(".png")
    }
    list_file = os.path.join(data_dir, f"{split}.txt")
    if tf.io.gfile.exists(list_file):
        with tf.io.gfile.GFile(list_file) as f:
            ids = [_strip_id(line) for line in f if line.strip() and not line.startswith("#")]
        missing = [os.path.join(image_dir, i + ".*") for i in ids if i not in images]
        if missing:
            raise _mismatch(missing, f"listed in {list_file} do not exist")
    else:
        ids = sorted(images)
        no_image = sorted(os.path.join(label_dir, labels[k]) for k in labels.keys() - images.keys())
        if no_image:
            raise _mismatch(no_image, f"have no image in {image_dir}")
    no_label = [os.path.join(image_dir, images[i]) for i in ids if i not in labels]
    if no_label:
        raise _mismatch(no_label, f"have no label {label_dir}/<id>.png")
    return [
        rd.Pair(
            os.path.join(image_dir, images[i]),
            os.path.join(label_dir, labels[i]),
            f"{split}/images/{images[i]}",
        )
        for i in ids
    ]


def folder_images(folder: str | None) -> list[tuple[str, str]]:
    """(path, FILENAME) of every image under `folder` (None: none)."""
    if not folder:
        return []
    _require_dir(folder, "unlabeled image folder (--unlabeled_dir)")
    base = os.path.basename(os.path.normpath(folder))
    images = [(p, f"{base}/{os.path.relpath(p, folder)}") for p in rd.list_images(folder)]
    if not images:
        raise ValueError(f"The unlabeled image folder {folder} holds no .png/.jpg/.jpeg file.")
    return images


def simple_unlabeled(data_dir: str, unlabeled_dir: str | None) -> list[tuple[str, str]]:
    """(path, FILENAME): train images (labels dropped) + the unlabeled folder."""
    pool = [(p.image_path, p.filename) for p in simple_pairs(data_dir, "train")]
    default_dir = os.path.join(data_dir, "unlabeled")
    if unlabeled_dir is None and tf.io.gfile.isdir(default_dir):
        unlabeled_dir = default_dir
    return pool + folder_images(unlabeled_dir)


def pairs_source(pairs: list[rd.Pair], label_map: rd.LabelMap) -> Source:
    """A labeled Source reading `pairs` from disk."""
    raw = tf.data.Dataset.from_tensor_slices(
        {
            "image_path": [p.image_path for p in pairs],
            "label_path": [p.label_path for p in pairs],
            "filename": [p.filename for p in pairs],
        }
    )

    def make_decode(map_labels: bool):
        def decode(x):
            return rd.labeled_element(
                tf.io.read_file(x["image_path"]),
                tf.io.read_file(x["label_path"]),
                filename=x["filename"],
                image_path=x["image_path"],
                label_path=x["label_path"],
                label_map=label_map,
                map_labels=map_labels,
            )

        return decode

    names = tuple(p.filename for p in pairs)
    return Source(
        raw,
        make_decode(True),
        len(pairs),
        max(len(pairs), 1),
        names,
        decode_raw=make_decode(False),
        label_table=label_map.table,
    )


def images_source(images: list[tuple[str, str]]) -> Source:
    """An unlabeled Source of (path, FILENAME) pairs."""
    raw = tf.data.Dataset.from_tensor_slices(
        {"image_path": [p for p, _ in images], "filename": [n for _, n in images]}
    )

    def decode(x):
        return rd.unlabeled_element(
            tf.io.read_file(x["image_path"]), filename=x["filename"], image_path=x["image_path"]
        )

    names = tuple(n for _, n in images)
    return Source(raw, decode, len(images), max(len(images), 1), names)
