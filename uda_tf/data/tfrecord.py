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

Checks, naming the file: when a set is read, its shards are complete (every
`-{i}-of-{n}`), their records are counted from the record headers (12 bytes
read per record, no data: see `count_records`) and the counts must match
tfrecords.json and the `.txt` list; the first record must hold the schema's
features. While reading, a record that fails its CRC, a record without a
feature, or one that does not parse, stops the run with the shard and the
record's index in the message.
"""

import concurrent.futures
import dataclasses
import json
import os
import re
import struct
from collections.abc import Sequence

import tensorflow as tf
from google.protobuf import message

from uda_tf import config as config_lib
from uda_tf.data import base
from uda_tf.data import decode as rd
from uda_tf.data.base import Source

INFO_FILE = "tfrecords.json"
IMAGE_ENCODED = "image/encoded"
IMAGE_FILENAME = "image/filename"
LABEL_ENCODED = "label/encoded"
LABEL_FILENAME = "label/filename"
LABELED_KEYS = (IMAGE_ENCODED, IMAGE_FILENAME, LABEL_ENCODED, LABEL_FILENAME)
UNLABELED_KEYS = (IMAGE_ENCODED, IMAGE_FILENAME)
# Keys of the raw elements: a serialized record, its shard and index there.
RECORD, SHARD, INDEX = "record", "shard", "index"
_SHARD_NAME = re.compile(r"\.tfrecord-(\d+)-of-(\d+)$")
_COUNT_THREADS = 16
_UNREADABLE = (
    " could not be read (corrupt: the read error is logged above); write the set again "
    "with `python -m uda_tf.data.preprocess`."
)


def labeled_set_name(sup_size: int) -> str:
    return "train-full" if sup_size == -1 else f"train-size_{sup_size}"


def read_info(data_dir: str, missing_ok: bool = False) -> dict:
    """The parsed tfrecords.json of `data_dir` ({} if absent and missing_ok).

    Raises:
      ValueError: naming the file if it is absent (unless missing_ok), not
        JSON, or not {"task_name": ..., "sets": {name: {"num_examples": N}}}.
    """
    path = os.path.join(data_dir, INFO_FILE)
    if not tf.io.gfile.exists(path):
        if missing_ok:
            return {}
        raise ValueError(
            f"{path} not found: write the records with `python -m uda_tf.data.preprocess`."
        )
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        info = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from None
    sets = info.get("sets", {}) if isinstance(info, dict) else None
    if not isinstance(sets, dict) or not all(
        isinstance(m, dict) and isinstance(m.get("num_examples"), int) for m in sets.values()
    ):
        raise ValueError(
            f'{path}: expected {{"task_name": ..., "sets": {{name: {{"num_examples": N, '
            f"...}}}}}}, got {text[:200]!r}."
        )
    return info


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """The TFRecord checksum of `data`: CRC-32C, rotated and offset (pure Python, for headers)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _open(path: str):
    return open(path, "rb") if "://" not in path else tf.io.gfile.GFile(path, "rb")


def count_records(path: str) -> int:
    """The number of records in a TFRecord file, read from their headers alone.

    Each record is [length: 8 bytes][CRC of length: 4][data][CRC of data: 4];
    only the 12 header bytes of each are read (the data is skipped), so this
    costs one small read per record whatever the images' size.

    Raises:
      ValueError: naming the file and the record: a header cut short or
        failing its CRC (corrupt), or a record running past the end of the
        file (truncated).
    """
    with _open(path) as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        offset = count = 0
        while offset < size:
            f.seek(offset)
            header = f.read(12)
            where = f"{path}: record {count} (at byte {offset} of {size})"
            if len(header) < 12:
                raise ValueError(f"{where} is truncated: the file ends inside its header.")
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
                raise ValueError(f"{where} is corrupt: its length fails its CRC.")
            offset += 12 + length + 4
            if offset > size:
                raise ValueError(
                    f"{where} is truncated: it declares {length} bytes, the file ends "
                    f"{offset - size} bytes short."
                )
            count += 1
    return count


def _first_record(path: str) -> bytes:
    with _open(path) as f:
        (length,) = struct.unpack("<Q", f.read(8))
        f.seek(12)
        return f.read(length)


def _shards(data_dir: str, name: str) -> list[str]:
    """The shards of set `name`, checked to be complete (0..n-1 of n)."""
    shards = sorted(tf.io.gfile.glob(os.path.join(data_dir, f"{name}.tfrecord-*")))
    if not shards:
        raise ValueError(f"No shards {name}.tfrecord-* in {data_dir}.")
    numbers = [_SHARD_NAME.search(s) for s in shards]
    if all(numbers):  # The names preprocess.write_set gives (others are taken as they are).
        totals = {int(m.group(2)) for m in numbers}
        found = {int(m.group(1)) for m in numbers}
        total = max(totals)
        missing = [
            os.path.join(data_dir, f"{name}.tfrecord-{i:05d}-of-{total:05d}")
            for i in range(total)
            if i not in found
        ]
        if missing or len(totals) > 1:
            raise ValueError(
                f"Set {name!r} in {data_dir} is incomplete: missing {missing or 'none'}, "
                f"found {[os.path.basename(s) for s in shards]}. Copy the missing shards, or "
                "re-run `python -m uda_tf.data.preprocess`."
            )
    return shards


def _check_counts(
    data_dir: str, name: str, shards: list[str], counts: list[int], meta: dict, listed: int
) -> None:
    """Raises ValueError naming the shard or file whose record count is wrong."""
    info = os.path.join(data_dir, INFO_FILE)
    expected = meta["num_examples"]
    per_shard = meta.get("examples_per_shard")
    if isinstance(per_shard, int) and per_shard > 0:
        for i, (shard, count) in enumerate(zip(shards, counts)):
            want = max(0, min(per_shard, expected - i * per_shard))
            if count != want:
                raise ValueError(
                    f"{shard} holds {count} records, but {info} says {want} (set {name!r}: "
                    f"{expected} examples, {per_shard} per shard): a shard cut short at a record "
                    "boundary, or written again. Re-run `python -m uda_tf.data.preprocess`."
                )
    if sum(counts) != expected:
        found = ", ".join(f"{os.path.basename(s)}: {c}" for s, c in zip(shards, counts))
        raise ValueError(
            f"Set {name!r} in {data_dir} holds {sum(counts)} records ({found}), but {info} "
            f"says {expected}. Re-run `python -m uda_tf.data.preprocess`."
        )
    if listed != expected:
        raise ValueError(
            f"{os.path.join(data_dir, name + '.txt')} lists {listed} files, but set {name!r} "
            f"holds {expected} records."
        )


def _check_schema(shard: str, keys: Sequence[str]) -> None:
    """Raises ValueError naming the shard if its first record lacks one of `keys`."""
    try:
        example = tf.train.Example.FromString(_first_record(shard))
    except (message.DecodeError, struct.error) as e:
        raise ValueError(f"{shard}: record 0 is not a tf.train.Example ({e}).") from None
    features = example.features.feature
    missing = [k for k in keys if not (k in features and features[k].bytes_list.value)]
    if missing:
        raise ValueError(
            f"{shard}: record 0 has no bytes feature {missing} (it has {sorted(features)}); "
            f"records of this set need {list(keys)}."
        )


def _records(shards: list[str], counts: list[int]) -> tf.data.Dataset:
    """{RECORD, SHARD, INDEX} of every record, in order.

    A record that cannot be read (a CRC failure inside its data, a file that
    changed since it was counted) stops the stream with an InvalidArgumentError
    naming the shard and the record: the reader's error is logged, then the
    shard's count falls short of the one checked when the set was opened.
    """

    def shard_records(shard, count):
        records = tf.data.TFRecordDataset(shard, buffer_size=8 << 20)
        rows = records.ignore_errors(log_warning=True).enumerate()
        rows = rows.map(lambda i, record: (i, record, False))
        rows = rows.concatenate(tf.data.Dataset.from_tensors((count, tf.constant(""), True)))

        def step(num_read, row):
            index, record, is_end = row
            check = tf.debugging.Assert(
                tf.logical_or(tf.logical_not(is_end), tf.equal(num_read, count)),
                [
                    tf.strings.join(
                        [shard, ": record ", tf.strings.as_string(num_read), " of "]
                        + [tf.strings.as_string(count), _UNREADABLE]
                    )
                ],
            )
            with tf.control_dependencies([check]):
                element = {RECORD: tf.identity(record), SHARD: shard, INDEX: index}
            return num_read + 1, (element, is_end)

        rows = rows.scan(tf.constant(0, tf.int64), step)
        return rows.filter(lambda element, is_end: tf.logical_not(is_end)).map(
            lambda element, is_end: element
        )

    table = tf.data.Dataset.from_tensor_slices(
        (tf.constant(shards, tf.string), tf.constant(counts, tf.int64))
    )
    return table.flat_map(shard_records)


def _set_source(
    data_dir: str, name: str, meta: dict, decode, buffer: int, keys: Sequence[str]
) -> Source:
    """The Source of set `name` (`meta`: its tfrecords.json entry), its files checked."""
    list_file = os.path.join(data_dir, f"{name}.txt")
    if not tf.io.gfile.exists(list_file):
        raise ValueError(f"{list_file} not found: every set needs its list of FILENAMEs.")
    filenames = base.read_file_list(list_file)
    shards = _shards(data_dir, name)
    with concurrent.futures.ThreadPoolExecutor(_COUNT_THREADS) as pool:
        counts = list(pool.map(count_records, shards))
    _check_counts(data_dir, name, shards, counts, meta, len(filenames))
    if counts[0]:
        _check_schema(shards[0], keys)
    raw = _records(shards, counts)
    return Source(
        raw, decode, len(filenames), min(buffer, max(len(filenames), 1)), tuple(filenames)
    )


def _parse(x: dict[str, tf.Tensor], keys: Sequence[str]) -> dict[str, tf.Tensor]:
    """The string features `keys` of the raw element `x`, checked to be present."""
    where = tf.strings.join([x[SHARD], ", record ", tf.strings.as_string(x[INDEX])])
    spec = {k: tf.io.FixedLenFeature([], tf.string, default_value="") for k in keys}
    features = rd.call_or_fail(
        lambda record: tf.io.parse_single_example(record, spec),
        x[RECORD],
        where,
        f": not a tf.train.Example with the string features {', '.join(keys)} (the parse "
        "error is logged above).",
    )
    checks = [
        tf.debugging.Assert(
            tf.strings.length(features[k]) > 0,
            [tf.strings.join([where, f": no {k} feature (or an empty one)."])],
        )
        for k in keys
    ]
    with tf.control_dependencies(checks):
        features = {k: tf.identity(v) for k, v in features.items()}
    features["where"] = tf.strings.join([" (", where, ")"])
    return features


def _labeled_decode(label_map: rd.LabelMap, map_labels: bool = True):
    def decode(x):
        f = _parse(x, LABELED_KEYS)
        return rd.labeled_element(
            f[IMAGE_ENCODED],
            f[LABEL_ENCODED],
            filename=f[IMAGE_FILENAME],
            image_path=f[IMAGE_FILENAME] + f["where"],
            label_path=f[LABEL_FILENAME] + f["where"],
            label_map=label_map,
            map_labels=map_labels,
        )

    return decode


def _unlabeled_decode(x):
    f = _parse(x, UNLABELED_KEYS)
    return rd.unlabeled_element(
        f[IMAGE_ENCODED], filename=f[IMAGE_FILENAME], image_path=f[IMAGE_FILENAME] + f["where"]
    )


def _filtered(source: Source, keep: Sequence[str]) -> Source:
    """`source` restricted to the FILENAMEs in `keep`."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(keep), tf.string), tf.ones([len(keep)], tf.int32)
        ),
        default_value=0,
    )

    def wanted(x):
        return table.lookup(_parse(x, [IMAGE_FILENAME])[IMAGE_FILENAME]) > 0

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
    decode = _labeled_decode(label_map)
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
    raw_decode = _labeled_decode(label_map, map_labels=False)
    extras = {"decode_raw": raw_decode, "label_table": label_map.table}
    if usable:
        source = _set_source(data_dir, exact, sets[exact], decode, buffer, LABELED_KEYS)
        return dataclasses.replace(source, **extras)
    if split in ("train", "dev") and "train-full" in sets:
        full = _set_source(data_dir, "train-full", sets["train-full"], decode, buffer, LABELED_KEYS)
        full = dataclasses.replace(full, **extras)
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
    decode = _unlabeled_decode
    parts = [
        _set_source(data_dir, n, sets[n], decode, cfg.shuffle_buffer, UNLABELED_KEYS) for n in names
    ]
    raw = parts[0].raw
    for p in parts[1:]:
        raw = raw.concatenate(p.raw)
    names_all = tuple(n for p in parts for n in p.filenames)
    buffer = min(cfg.shuffle_buffer, max(len(names_all), 1))
    return Source(raw, decode, len(names_all), buffer, names_all)
