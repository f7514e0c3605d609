r"""Converts a dataset folder to TFRecords, as the original image/preprocess.py.

    python -m uda_tf.data.preprocess --task_name=cityscapes --data_type=sup \
      --sup_size=372 --raw_data_dir=data/cityscapes --output_base_dir=data/proc/cityscapes
    python -m uda_tf.data.preprocess --task_name=cityscapes --data_type=unsup \
      --raw_data_dir=data/cityscapes --output_base_dir=data/proc/cityscapes

--data_type=sup writes the labeled subset (`train-size_{sup_size}`, or
`train-full` for -1) with the list of its files (`train-size_{N}.txt`: the
choice of base.select_labeled, the same as the folder reader's for
the same --sup_size/--seed/--use_equal_split), the dev split
(`dev-size_{dev_size}`) if asked, and `val`. --data_type=unsup writes the
unlabeled pool: `unsup` (every train image, labels dropped, plus
--unlabeled_dir) and, with --use_train_extra, `unsup_extra`. The files' bytes
are stored unchanged (lossless); augmentation runs online in training, so
there are no augmented copies (--aug_copy must stay 0). Train with
`--data_dir=<output_base_dir>` (data_source auto or tfrecord). The raw folder
is any layout the folder readers take (the unzipped Cityscapes zips, CamVid,
the simple layout); every file is checked first.
"""

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence

import tensorflow as tf
from absl import app, flags, logging

from uda_tf import config as config_lib
from uda_tf.data import base, sources
from uda_tf.data import decode as rd
from uda_tf.data import tfrecord as rt


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _read(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def labeled_example(pair: rd.Pair, label_filename: str) -> bytes:
    """The serialized Example of one image/label pair (file bytes unchanged)."""
    feature = {
        rt.IMAGE_ENCODED: _bytes(_read(pair.image_path)),
        rt.IMAGE_FILENAME: _bytes(pair.filename.encode()),
        rt.LABEL_ENCODED: _bytes(_read(pair.label_path)),
        rt.LABEL_FILENAME: _bytes(label_filename.encode()),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def unlabeled_example(path: str, filename: str) -> bytes:
    """The serialized Example of one unlabeled image."""
    feature = {rt.IMAGE_ENCODED: _bytes(_read(path)), rt.IMAGE_FILENAME: _bytes(filename.encode())}
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
    info = rt.read_info(output_dir, missing_ok=True)
    info.setdefault("sets", {})[name] = {
        **meta,
        "num_examples": len(filenames),
        "examples_per_shard": examples_per_shard,
    }
    with tf.io.gfile.GFile(os.path.join(output_dir, rt.INFO_FILE), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    return paths


def _meta(cfg: config_lib.DataConfig) -> dict:
    return {
        "sup_size": cfg.sup_size,
        "dev_size": cfg.dev_size,
        "seed": cfg.seed,
        "use_equal_split": cfg.use_equal_split,
    }


def _write_labeled(cfg, name: str, pairs: list[rd.Pair], output_dir: str, per_shard: int) -> None:
    records = (labeled_example(p, os.path.relpath(p.label_path, cfg.data_dir)) for p in pairs)
    write_set(output_dir, name, records, [p.filename for p in pairs], per_shard, _meta(cfg))
    logging.info("Wrote %d labeled examples to %s/%s.tfrecord-*.", len(pairs), output_dir, name)


def _write_unlabeled(name: str, images, output_dir: str, per_shard: int, meta: dict) -> None:
    records = (unlabeled_example(p, n) for p, n in images)
    write_set(output_dir, name, records, [n for _, n in images], per_shard, meta)
    logging.info("Wrote %d unlabeled images to %s/%s.tfrecord-*.", len(images), output_dir, name)


def _check_task(output_dir: str, task_name: str) -> None:
    info = rt.read_info(output_dir, missing_ok=True)
    if info.get("task_name", task_name) != task_name:
        raise ValueError(
            f"{output_dir} holds records of --task_name={info['task_name']}, not {task_name}."
        )


def preprocess_sup(cfg: config_lib.DataConfig, output_dir: str, per_shard: int = 128) -> None:
    """Writes the labeled subset, the dev split (dev_size > 0) and val.

    Raises:
      ValueError: on bad input files or sizes, before writing anything.
    """
    train = sources.labeled_pairs(cfg, "train")
    what = f"{cfg.data_dir} (train)"
    by_name = {p.filename: p for p in train}
    chosen = base.split_subset(list(by_name), "train", cfg, what)
    sets = [(rt.labeled_set_name(cfg.sup_size), [by_name[n] for n in chosen])]
    if cfg.dev_size > 0:
        dev = base.split_subset(list(by_name), "dev", cfg, what)
        sets.append((f"dev-size_{cfg.dev_size}", [by_name[n] for n in dev]))
    sets.append(("val", sources.labeled_pairs(cfg, "val")))
    for _, pairs in sets:  # Check (decode) every file before writing any record.
        rd.scan_pairs(pairs, sources.label_map(cfg))
    _check_task(output_dir, cfg.task_name)
    _copy_declaration(cfg, output_dir)
    for name, pairs in sets:
        _write_labeled(cfg, name, pairs, output_dir, per_shard)
    _set_task(output_dir, cfg.task_name)


def preprocess_unsup(cfg: config_lib.DataConfig, output_dir: str, per_shard: int = 128) -> None:
    """Writes `unsup` (train images + unlabeled_dir) and, with use_train_extra, `unsup_extra`.

    Raises:
      ValueError: on bad input files, before writing anything.
    """
    meta = {"use_train_extra": cfg.use_train_extra}
    base = sources.unlabeled_images(dataclasses.replace(cfg, use_train_extra=False))
    sets = [("unsup", base)]
    if cfg.use_train_extra:
        known = {n for _, n in base}
        extra = [(p, n) for p, n in sources.unlabeled_images(cfg) if n not in known]
        sets.append(("unsup_extra", extra))
    for _, images in sets:
        rd.scan_images([p for p, _ in images])
    _check_task(output_dir, cfg.task_name)
    _copy_declaration(cfg, output_dir)
    for name, images in sets:
        _write_unlabeled(name, images, output_dir, per_shard, meta)
    _set_task(output_dir, cfg.task_name)


def _copy_declaration(cfg: config_lib.DataConfig, output_dir: str) -> None:
    source = os.path.join(cfg.data_dir, sources.DECLARATION_FILE)
    if cfg.task_name == "custom":
        sources.load_declaration(cfg.data_dir)  # Validates it.
        tf.io.gfile.makedirs(output_dir)
        tf.io.gfile.copy(source, os.path.join(output_dir, sources.DECLARATION_FILE), True)


def _set_task(output_dir: str, task_name: str) -> None:
    info = rt.read_info(output_dir, missing_ok=True)
    info["task_name"] = task_name
    with tf.io.gfile.GFile(os.path.join(output_dir, rt.INFO_FILE), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)


def run(f) -> None:
    """Runs the conversion for parsed flags `f` (absl FlagValues or any namespace).

    Raises:
      ValueError: --aug_copy/--aug_copy_start not 0, no --output_base_dir, or
        bad input (naming the file), before any record is written.
    """
    if f.aug_copy != 0 or f.aug_copy_start != 0:
        raise ValueError(
            f"--aug_copy={f.aug_copy} --aug_copy_start={f.aug_copy_start}: augmented copies are "
            "not written; RandAugment runs online in training (a fresh draw per read)."
        )
    if not f.output_base_dir:
        raise ValueError("--output_base_dir is required.")
    cfg = config_lib.DataConfig(
        task_name=f.task_name,
        data_dir=f.raw_data_dir,
        data_source=f.data_source,
        sup_size=f.sup_size,
        dev_size=f.dev_size,
        use_equal_split=f.use_equal_split,
        seed=f.seed,
        use_train_extra=f.use_train_extra,
        unlabeled_dir=f.unlabeled_dir,
    )
    if f.data_type == "sup":
        preprocess_sup(cfg, f.output_base_dir, f.examples_per_shard)
    else:
        preprocess_unsup(cfg, f.output_base_dir, f.examples_per_shard)


def main(argv: list[str]) -> None:
    del argv
    run(flags.FLAGS)


def define_flags() -> None:
    """The original preprocess.py's flags, plus the segmentation ones."""
    flags.DEFINE_enum("task_name", "cityscapes", list(config_lib.TASK_NAMES), "Dataset.")
    flags.DEFINE_enum("data_type", "sup", ["sup", "unsup"], "Labeled or unlabeled data.")
    flags.DEFINE_string("raw_data_dir", None, "The dataset folder.", required=True)
    flags.DEFINE_string("output_base_dir", "", "Where to write the records.")
    flags.DEFINE_bool(
        "use_equal_split", False, "Balance the labeled subset over cities (sequences)."
    )
    flags.DEFINE_integer("sup_size", -1, "Number of labeled images; -1 = all.")
    flags.DEFINE_integer("dev_size", -1, "Also write a dev split of this size; -1 = none.")
    flags.DEFINE_integer("seed", 0, "Seed of the labeled subset (the training --seed).")
    flags.DEFINE_integer("aug_copy", 0, "Must be 0: augmentation runs online.")
    flags.DEFINE_integer("aug_copy_start", 0, "Must be 0: augmentation runs online.")
    flags.DEFINE_string(
        "data_source", "auto", "Layout of --raw_data_dir: auto, folder, camvid or simple."
    )
    flags.DEFINE_bool("use_train_extra", False, "unsup: also write train_extra (Cityscapes).")
    flags.DEFINE_string("unlabeled_dir", None, "unsup: extra folder of unlabeled images.")
    flags.DEFINE_integer("examples_per_shard", 128, "Examples per TFRecord shard.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
