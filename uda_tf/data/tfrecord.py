"""TFRecords written by `python -m uda_tf.data.preprocess`, and their reader.

Output directory (the reader's --data_dir):
    {set}.tfrecord-{i:05d}-of-{n:05d}   shards of tf.train.Example
    {set}.txt                           the FILENAMEs of the set, in order
    tfrecords.json                      task_name and, per set, its size and
                                        how it was chosen (sup_size, seed, ...)
    dataset.json                        the class declaration (custom task)
with the sets of the original's names: `train-full` (sup_size = -1) or
`train-size_{N}`, `dev-size_{N}`, `val`; and `unsup`, `unsup_extra`.

Example schema: `image/encoded` (the file's bytes, PNG or JPEG, unchanged),
`image/filename` (FILENAME); labeled sets also `label/encoded` (the label
PNG's bytes, unchanged: Cityscapes labelIds or class ids) and
`label/filename`. Storing the files' bytes keeps the conversion lossless.
"""

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence

import tensorflow as tf

from uda_tf import config as config_lib
from uda_tf.data import base
from uda_tf.data import decode as rd
from uda_tf.data.base import Source

INFO_FILE = "tfrecords.json"
IMAGE_ENCODED = "image/encoded"
IMAGE_FILENAME = "image/filename"
LABEL_ENCODED = "label/encoded"
LABEL_FILENAME = "label/filename"


def labeled_set_name(sup_size: int) -> str:
    return "train-full" if sup_size == -1 else f"train-size_{sup_size}"


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _read(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def labeled_example(pair: rd.Pair, label_filename: str) -> bytes:
    """The serialized Example of one image/label pair (file bytes unchanged)."""
    feature = {
        IMAGE_ENCODED: _bytes(_read(pair.image_path)),
        IMAGE_FILENAME: _bytes(pair.filename.encode()),
        LABEL_ENCODED: _bytes(_read(pair.label_path)),
        LABEL_FILENAME: _bytes(label_filename.encode()),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def unlabeled_example(path: str, filename: str) -> bytes:
    """The serialized Example of one unlabeled image."""
    feature = {IMAGE_ENCODED: _bytes(_read(path)), IMAGE_FILENAME: _bytes(filename.encode())}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_set(
    output_dir: str,
    name: str,
    records: Iterable[bytes],
    filenames: Sequence[str],
    examples_per_shard: int,
    meta: dict,
) -> list[str]:
    """Writes one set's shards, its `.txt` list, and its entry in tfrecords.json.

    Args:
      output_dir: where to write.
      name: the set's name (`train-size_186`, `val`, `unsup`, ...).
      records: serialized Examples, as many as `filenames`, in their order.
      filenames: their FILENAMEs.
      examples_per_shard: shard size.
      meta: how the set was chosen, stored in tfrecords.json.

    Returns:
      The shard paths.
    """
    tf.io.gfile.makedirs(output_dir)
    for old in tf.io.gfile.glob(os.path.join(output_dir, f"{name}.tfrecord-*")):
        tf.io.gfile.remove(old)
    num_shards = max(1, math.ceil(len(filenames) / examples_per_shard))
    paths = [
        os.path.join(output_dir, f"{name}.tfrecord-{i:05d}-of-{num_shards:05d}")
        for i in range(num_shards)
    ]
    records = iter(records)
    for i, path in enumerate(paths):
        with tf.io.TFRecordWriter(path) as writer:
            for _ in range(min(examples_per_shard, len(filenames) - i * examples_per_shard)):
                writer.write(next(records))
    base.write_file_list(os.path.join(output_dir, f"{name}.txt"), filenames)
    info = read_info(output_dir, missing_ok=True)
    info.setdefault("sets", {})[name] = {**meta, "num_examples": len(filenames)}
    with tf.io.gfile.GFile(os.path.join(output_dir, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    return paths


def read_info(data_dir: str, missing_ok: bool = False) -> dict:
    """The parsed tfrecords.json of `data_dir` ({} if absent and missing_ok)."""
    path = os.path.join(data_dir, INFO_FILE)
    if not tf.io.gfile.exists(path):
        if missing_ok:
            return {}
        raise ValueError(
            f"{path} not found: write the records with `python -m uda_tf.data.preprocess`."
        )
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def _shards(data_dir: str, name: str) -> list[str]:
    shards = sorted(tf.io.gfile.glob(os.path.join(data_dir, f"{name}.tfrecord-*")))
    if not shards:
        raise ValueError(f"No shards {name}.tfrecord-* in {data_dir}.")
    return shards


def _set_source(data_dir: str, name: str, decode, buffer: int) -> Source:
    filenames = base.read_file_list(os.path.join(data_dir, f"{name}.txt"))
    raw = tf.data.TFRecordDataset(_shards(data_dir, name), buffer_size=8 << 20)
    return Source(
        raw, decode, len(filenames), min(buffer, max(len(filenames), 1)), tuple(filenames)
    )


def _labeled_decode(data_dir: str, label_map: rd.LabelMap, map_labels: bool = True):
    spec = {
        k: tf.io.FixedLenFeature([], tf.string)
        for k in (IMAGE_ENCODED, IMAGE_FILENAME, LABEL_ENCODED, LABEL_FILENAME)
    }
    where = f" (TFRecord in {data_dir})"

    def decode(serialized):
        x = tf.io.parse_single_example(serialized, spec)
        return rd.labeled_element(
            x[IMAGE_ENCODED],
            x[LABEL_ENCODED],
            filename=x[IMAGE_FILENAME],
            image_path=x[IMAGE_FILENAME] + where,
            label_path=x[LABEL_FILENAME] + where,
            label_map=label_map,
            map_labels=map_labels,
        )

    return decode


def _unlabeled_decode(data_dir: str):
    spec = {k: tf.io.FixedLenFeature([], tf.string) for k in (IMAGE_ENCODED, IMAGE_FILENAME)}
    where = f" (TFRecord in {data_dir})"

    def decode(serialized):
        x = tf.io.parse_single_example(serialized, spec)
        return rd.unlabeled_element(
            x[IMAGE_ENCODED], filename=x[IMAGE_FILENAME], image_path=x[IMAGE_FILENAME] + where
        )

    return decode


def _filtered(source: Source, keep: Sequence[str]) -> Source:
    """`source` restricted to the FILENAMEs in `keep`."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(keep), tf.string), tf.ones([len(keep)], tf.int32)
        ),
        default_value=0,
    )
    spec = {IMAGE_FILENAME: tf.io.FixedLenFeature([], tf.string)}

    def wanted(serialized):
        return table.lookup(tf.io.parse_single_example(serialized, spec)[IMAGE_FILENAME]) > 0

    kept = set(keep)
    names = tuple(n for n in source.filenames if n in kept)
    buffer = min(source.shuffle_buffer, max(len(names), 1))
    return dataclasses.replace(
        source,
        raw=source.raw.filter(wanted),
        num_examples=len(names),
        shuffle_buffer=buffer,
        filenames=names,
    )


def _matches(meta: dict, cfg: config_lib.DataConfig) -> bool:
    return meta.get("seed") == cfg.seed and meta.get("use_equal_split") == cfg.use_equal_split


def labeled_source(cfg: config_lib.DataConfig, split: str, label_map: rd.LabelMap) -> Source:
    """The labeled Source of `split` (train = the labeled subset, dev, val, ...).

    Uses `train-size_{sup_size}` / `dev-size_{dev_size}` when they were written
    with the same seed and split mode, else filters `train-full` with the
    shared selection (base.py), so every reader picks the same images.

    Raises:
      ValueError: the records' task differs from --task_name, or no set holds
        the requested examples (naming the sets found).
    """
    data_dir = cfg.data_dir
    info = read_info(data_dir)
    if info.get("task_name") != cfg.task_name:
        raise ValueError(
            f"{os.path.join(data_dir, INFO_FILE)} holds task {info.get('task_name')!r}, "
            f"but --task_name={cfg.task_name}."
        )
    sets = info.get("sets", {})
    decode = _labeled_decode(data_dir, label_map)
    buffer = cfg.shuffle_buffer
    if split == "train":
        exact = labeled_set_name(cfg.sup_size)
        usable = exact in sets and (
            _matches(sets[exact], cfg) if cfg.sup_size != -1 else cfg.dev_size <= 0
        )
    elif split == "dev":
        exact = f"dev-size_{cfg.dev_size}"
        usable = exact in sets and _matches(sets[exact], cfg)
    else:
        exact = split
        usable = exact in sets
    raw_decode = _labeled_decode(data_dir, label_map, map_labels=False)
    extras = {"decode_raw": raw_decode, "label_table": label_map.table}
    if usable:
        return dataclasses.replace(_set_source(data_dir, exact, decode, buffer), **extras)
    if split in ("train", "dev") and "train-full" in sets:
        full = dataclasses.replace(_set_source(data_dir, "train-full", decode, buffer), **extras)
        what = f"{data_dir}/train-full"
        return _filtered(full, base.split_subset(full.filenames, split, cfg, what))
    raise ValueError(
        f"No TFRecord set for split {split!r} in {data_dir} (wanted {exact!r} written with "
        f"--seed={cfg.seed} --use_equal_split={cfg.use_equal_split}, or 'train-full'); "
        f"found {sorted(sets)}. Run `python -m uda_tf.data.preprocess` with these flags."
    )


def unlabeled_source(cfg: config_lib.DataConfig) -> Source:
    """The unlabeled Source: the `unsup` set (+ `unsup_extra` with use_train_extra).

    Raises:
      ValueError: if the sets are missing.
    """
    data_dir = cfg.data_dir
    sets = read_info(data_dir).get("sets", {})
    names = ["unsup"] + (["unsup_extra"] if cfg.use_train_extra else [])
    missing = [n for n in names if n not in sets]
    if missing:
        raise ValueError(
            f"No TFRecord set {missing} in {data_dir} for the unlabeled stream: run "
            "`python -m uda_tf.data.preprocess --data_type=unsup` (with --use_train_extra for "
            "unsup_extra)."
        )
    decode = _unlabeled_decode(data_dir)
    parts = [_set_source(data_dir, n, decode, cfg.shuffle_buffer) for n in names]
    raw = parts[0].raw
    for p in parts[1:]:
        raw = raw.concatenate(p.raw)
    names_all = tuple(n for p in parts for n in p.filenames)
    buffer = min(cfg.shuffle_buffer, max(len(names_all), 1))
    return Source(raw, decode, len(names_all), buffer, names_all)
