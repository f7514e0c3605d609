"""What every reader shares: the Source of a stream and the labeled-subset choice.

The labeled subset (`--sup_size`) and the dev split (`--dev_size`) are chosen
here, once, for every reader (folder, TFRecord, TFDS, simple), so that the
same flags give the same images whatever the data source:

- every example has an id (`example_id`: its file name without folders,
  extension or the `_leftImg8bit` suffix, e.g. `aachen_000000_000019`);
- the ids are ordered by SHA-256 of `"{seed}:{id}"`, a seeded permutation that
  depends neither on the listing order nor on the machine or TF version;
- with `use_equal_split`, the order takes one id per group in turn (the
  group is the id's prefix before the first `_`: the city for Cityscapes,
  the sequence for CamVid), so every prefix of it is balanced over groups;
- dev = the last `dev_size` ids of the order; labeled = the first `sup_size`
  of the others (all of them for -1). A larger sup_size therefore contains a
  smaller one, and the dev split never overlaps the labeled subset.
"""

import collections
import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from uda_tf import config as config_lib


@dataclasses.dataclass(frozen=True)
class Source:
    """One stream of examples, before shuffling and decoding.

    Attributes:
      raw: cheap elements to shuffle: file paths, or serialized records with
        their shard and index (for the error messages).
      decode: maps one raw element to the common element format
        (uda_tf/common.py): {IMAGE, MASK, FILENAME} or {IMAGE, FILENAME}.
      num_examples: how many raw elements there are.
      shuffle_buffer: a full shuffle for paths, bounded for records.
      filenames: the FILENAMEs of the examples in raw order (TFDS: only for
        a --sup_size/--dev_size subset, else empty).
      decode_raw: labeled sources: as `decode`, but MASK keeps the stored
        label values (checked), for streams that map them after cropping.
      label_table: labeled sources: 256 ints, stored value -> MASK value.
    """

    raw: tf.data.Dataset
    decode: Callable[[Any], dict[str, tf.Tensor]]
    num_examples: int
    shuffle_buffer: int
    filenames: tuple[str, ...] = ()
    decode_raw: Callable[[Any], dict[str, tf.Tensor]] | None = None
    label_table: tuple[int, ...] | None = None

    def elements(self) -> tf.data.Dataset:
        """The decoded elements, in order (deterministic parallel map)."""
        return self.raw.map(self.decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def example_id(filename: str) -> str:
    """`leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png` -> `aachen_000000_000019`."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    for suffix in ("_leftImg8bit", "_gtFine_labelIds"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _order(filenames: Sequence[str], seed: int, equal_split: bool) -> list[str]:
    """The seeded permutation of `filenames` (see the module docstring)."""
    ids = {f: example_id(f) for f in filenames}
    if len(set(ids.values())) != len(ids):
        dup = collections.Counter(ids.values()).most_common(1)[0][0]
        raise ValueError(f"Two files share the example id {dup!r}; ids must be unique.")

    def key(f: str) -> str:
        return hashlib.sha256(f"{seed}:{ids[f]}".encode()).hexdigest()

    order = sorted(filenames, key=key)
    if not equal_split:
        return order
    groups = collections.defaultdict(list)
    for f in order:
        groups[ids[f].split("_")[0]].append(f)
    columns = [groups[g] for g in sorted(groups)]
    depth = max(len(c) for c in columns)
    return [c[i] for i in range(depth) for c in columns if i < len(c)]


def _check_sizes(n: int, sup_size: int, dev_size: int, what: str) -> None:
    dev = max(dev_size, 0)
    if dev >= n and dev > 0:
        raise ValueError(f"--dev_size={dev_size} leaves no labeled image of the {n} in {what}.")
    if sup_size != -1 and sup_size + dev > n:
        extra = f" (after --dev_size={dev_size})" if dev else ""
        raise ValueError(
            f"--sup_size={sup_size} is larger than the {n - dev} labeled train images in "
            f"{what}{extra}."
        )


def select_labeled(
    filenames: Sequence[str],
    sup_size: int,
    seed: int,
    equal_split: bool = False,
    dev_size: int = -1,
    what: str = "the train split",
) -> list[str]:
    """The labeled subset of a train split, sorted.

    Args:
      filenames: FILENAMEs (or ids) of every labeled train example.
      sup_size: how many to keep; -1 = all (except the dev split).
      seed: seed of the permutation.
      equal_split: balance the subset over groups (cities, sequences).
      dev_size: size of the dev split held out of it; -1 = none.
      what: where the files come from, for error messages.

    Returns:
      The chosen FILENAMEs, sorted.

    Raises:
      ValueError: if sup_size (+ dev_size) exceeds the number of files.
    """
    _check_sizes(len(filenames), sup_size, dev_size, what)
    order = _order(filenames, seed, equal_split)
    if dev_size > 0:
        order = order[: len(order) - dev_size]
    return sorted(order if sup_size == -1 else order[:sup_size])


def select_dev(
    filenames: Sequence[str],
    dev_size: int,
    seed: int,
    equal_split: bool = False,
    what: str = "the train split",
) -> list[str]:
    """The dev split: the last `dev_size` files of the order, sorted.

    Raises:
      ValueError: if dev_size <= 0 or it leaves no labeled file.
    """
    if dev_size <= 0:
        raise ValueError(f"The dev split needs --dev_size > 0, got {dev_size}.")
    _check_sizes(len(filenames), -1, dev_size, what)
    return sorted(_order(filenames, seed, equal_split)[-dev_size:])


def split_subset(filenames: Sequence[str], split: str, cfg: config_lib.DataConfig, what: str):
    """FILENAMEs of `split`: train = the labeled subset, dev = the dev split.

    Args:
      filenames: for train and dev, every labeled train FILENAME; for any
        other split, that split's FILENAMEs (returned as they are).
      split: "train", "dev", or a split read as a whole ("val", ...).
      cfg: the data config (sup_size, dev_size, seed, use_equal_split).
      what: where the files come from, for error messages.
    """
    if split == "train":
        return select_labeled(
            filenames, cfg.sup_size, cfg.seed, cfg.use_equal_split, cfg.dev_size, what
        )
    if split == "dev":
        return select_dev(filenames, cfg.dev_size, cfg.seed, cfg.use_equal_split, what)
    return list(filenames)


def write_file_list(path: str, filenames: Sequence[str]) -> None:
    """Writes one FILENAME per line (the labeled subset's record)."""
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("".join(f"{name}\n" for name in filenames))


def read_file_list(path: str) -> list[str]:
    """Inverse of write_file_list (blank lines and `#` comments skipped)."""
    with tf.io.gfile.GFile(path) as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]
