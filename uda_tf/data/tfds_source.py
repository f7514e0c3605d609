"""Cityscapes through TensorFlow Datasets, from the official zips (`data_source=tfds`).

--data_dir holds the zips (TFDS' manual_dir) and receives TFDS' prepared
copy (its data_dir); nothing is downloaded. Labeled examples come from
`cityscapes/semantic_segmentation` (its label feature holds labelIds, mapped
to trainIds as for the folder reader); the unlabeled train_extra images from
`cityscapes/semantic_segmentation_extra` (its coarse labels are dropped).
FILENAMEs are rebuilt from TFDS' image ids in the folder reader's form.
"""

import os

import tensorflow as tf
import tensorflow_datasets as tfds

from uda_tf import config as config_lib
from uda_tf.data import base
from uda_tf.data import decode as rd
from uda_tf.data.base import Source

LABELED = "semantic_segmentation"
EXTRA = "semantic_segmentation_extra"
ZIPS = {
    LABELED: ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"),
    EXTRA: ("leftImg8bit_trainvaltest.zip", "leftImg8bit_trainextra.zip", "gtCoarse.zip"),
}
_SPLITS = {"train": "train", "dev": "train", "val": "validation", "test": "test"}


def builder(cfg: config_lib.DataConfig, config_name: str) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder; prepares it from the zips in --data_dir if needed.

    Raises:
      ValueError: if it is not prepared and a zip is missing, naming the
        directory and the zips expected there.
    """
    data_dir = cfg.data_dir
    b = tfds.builder(f"cityscapes/{config_name}", data_dir=data_dir)
    if b.is_prepared():
        return b
    missing = [z for z in ZIPS[config_name] if not tf.io.gfile.exists(os.path.join(data_dir, z))]
    if missing:
        raise ValueError(
            f"TFDS cityscapes/{config_name} is not prepared in {data_dir} and cannot be built: "
            f"missing {missing} there (expected {list(ZIPS[config_name])}, from "
            "https://www.cityscapes-dataset.com, which needs a login)."
        )
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=data_dir))
    return b


def _filename(image_id: tf.Tensor, split_dir: str) -> tf.Tensor:
    city = tf.strings.split(image_id, "_")[0]
    return tf.strings.join([f"leftImg8bit/{split_dir}/", city, "/", image_id, "_leftImg8bit.png"])


def _raw(b: tfds.core.DatasetBuilder, split: str, labeled: bool) -> tf.data.Dataset:
    decoders = {"image_left": tfds.decode.SkipDecoding()}
    if labeled:
        decoders["segmentation_label"] = tfds.decode.SkipDecoding()
    return b.as_dataset(split=split, decoders=decoders, shuffle_files=False)


def labeled_source(cfg: config_lib.DataConfig, split: str, label_map: rd.LabelMap) -> Source:
    """The labeled Source of `split` (train = the labeled subset, dev, val).

    With sup_size or dev_size the TFDS split is read once to list its ids,
    then filtered to the shared selection (base.py); otherwise
    `filenames` stays empty (listing would read the whole split).
    """
    if split not in _SPLITS:
        raise ValueError(f"TFDS cityscapes has no split {split!r}; expected {sorted(_SPLITS)}.")
    b = builder(cfg, LABELED)
    split_dir = "val" if split == "val" else ("train" if split == "dev" else split)
    raw = _raw(b, _SPLITS[split], labeled=True)
    where = f" (TFDS cityscapes in {cfg.data_dir})"

    def make_decode(map_labels: bool):
        def decode(x):
            filename = _filename(x["image_id"], split_dir)
            return rd.labeled_element(
                x["image_left"],
                x["segmentation_label"],
                filename=filename,
                image_path=filename + where,
                label_path=filename + where + " label",
                label_map=label_map,
                map_labels=map_labels,
            )

        return decode

    num, names = b.info.splits[_SPLITS[split]].num_examples, ()
    whole = split not in ("train", "dev") or (cfg.sup_size == -1 and cfg.dev_size <= 0)
    if not whole:  # Lists the split's ids once (reads the split).
        ids = raw.map(lambda x: _filename(x["image_id"], split_dir)).as_numpy_iterator()
        all_names = [n.decode() for n in ids]
        keep = base.split_subset(all_names, split, cfg, f"TFDS cityscapes {split}")
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keep, tf.ones([len(keep)], tf.int32)), 0
        )
        raw = raw.filter(lambda x: table.lookup(_filename(x["image_id"], split_dir)) > 0)
        kept = set(keep)
        names = tuple(n for n in all_names if n in kept)
        num = len(names)
    return Source(
        raw,
        make_decode(True),
        num,
        min(cfg.shuffle_buffer, max(num, 1)),
        names,
        decode_raw=make_decode(False),
        label_table=label_map.table,
    )


def unlabeled_source(cfg: config_lib.DataConfig) -> Source:
    """Unlabeled train images (+ train_extra with use_train_extra), labels dropped."""
    parts = [(_raw(builder(cfg, LABELED), "train", labeled=False), "train")]
    if cfg.use_train_extra:
        parts.append((_raw(builder(cfg, EXTRA), "train_extra", labeled=False), "train_extra"))
    where = f" (TFDS cityscapes in {cfg.data_dir})"
    raw = None
    num = 0
    for ds, split_dir in parts:
        num += int(ds.cardinality())
        ds = ds.map(
            lambda x, d=split_dir: {"image": x["image_left"], "name": _filename(x["image_id"], d)}
        )
        raw = ds if raw is None else raw.concatenate(ds)

    def decode(x):
        return rd.unlabeled_element(x["image"], filename=x["name"], image_path=x["name"] + where)

    return Source(raw, decode, num, min(cfg.shuffle_buffer, max(num, 1)))
