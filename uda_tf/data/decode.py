"""File checks for the readers: a quick host-side scan, and checked decoding.

Two lines of defence against bad input, both naming the file:
- `scan_pairs` / `scan_images` run when a dataset is built, before training:
  they read each file's header (PIL reads a PNG's size without decoding it)
  and its last bytes, so a missing, truncated or non-image file, a label that
  is not 8-bit greyscale, or an image/label size mismatch is a ValueError.
  `scan_label_values` decodes labels to check their values (used for the
  small datasets of the simple layout, where a wrong value is likely).
- `decode_image` / `labeled_element` run inside tf.data: they check the same
  properties plus the label values on every decode, with the file name in the
  error (tf.debugging.Assert; an InvalidArgumentError at iteration).
"""

import concurrent.futures
import dataclasses
import os
from collections.abc import Sequence

import tensorflow as tf
from PIL import Image

from uda_tf import common

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
JPEG_START = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SCAN_THREADS = 16


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """How stored label values become MASK values.

    The allowed stored values are 0..num_ids-1 and `extra_id` (Cityscapes:
    labelIds 0..33 and 255 for -1; class ids: 0..K-1 and the stored ignore).

    Attributes:
      table: 256 ints, the MASK value of each stored uint8 value; the entry
        of 255 must be the ignore label (the fill of raw-label crops).
      num_ids: stored values below it are allowed.
      extra_id: one more allowed stored value.
      expected: what the allowed values are, for error messages.
    """

    table: tuple[int, ...]
    num_ids: int
    extra_id: int
    expected: str

    def invalid_values(self, values: Sequence[int]) -> list[int]:
        return [int(v) for v in values if not (v < self.num_ids or v == self.extra_id)]


@dataclasses.dataclass(frozen=True)
class Pair:
    """One labeled example on disk: absolute paths and the element's FILENAME."""

    image_path: str
    label_path: str
    filename: str


def _open(path: str):
    return open(path, "rb") if "://" not in path else tf.io.gfile.GFile(path, "rb")


def _header(path: str, *, label: bool) -> tuple[int, int]:
    """(width, height) of an image file; ValueError naming it if unusable."""
    try:
        with _open(path) as f:
            head = f.read(32)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 1024))
            tail = f.read()
            f.seek(0)
            with Image.open(f) as im:
                width, height, mode = im.width, im.height, im.mode
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found.") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: not a readable PNG or JPEG image ({e}).") from None
    if head.startswith(PNG_SIGNATURE):
        if not tail.endswith(PNG_END):
            raise ValueError(f"{path}: truncated or corrupt PNG (it does not end with IEND).")
    elif head.startswith(JPEG_START):
        if label:
            raise ValueError(f"{path}: labels must be PNG (JPEG compression changes values).")
        if JPEG_END not in tail:
            raise ValueError(f"{path}: truncated or corrupt JPEG (no end-of-image marker).")
    else:
        raise ValueError(f"{path}: not a PNG or JPEG file.")
    if label and (mode != "L" or head[24:26] != b"\x08\x00"):
        hint = " (a palette PNG: save the class ids themselves as greyscale)" if mode == "P" else ""
        raise ValueError(
            f"{path}: labels must be 8-bit greyscale PNGs (PIL mode 'L') holding the ids, "
            f"got mode {mode!r} with bit depth {head[24]}{hint}."
        )
    return width, height


def _check_pair(pair: Pair) -> None:
    image_size = _header(pair.image_path, label=False)
    label_size = _header(pair.label_path, label=True)
    if image_size != label_size:
        raise ValueError(
            f"{pair.label_path}: label is {label_size[0]}x{label_size[1]} (WxH) but its image "
            f"{pair.image_path} is {image_size[0]}x{image_size[1]}."
        )


def _parallel(fn, items) -> list:
    with concurrent.futures.ThreadPoolExecutor(_SCAN_THREADS) as pool:
        return list(pool.map(fn, items))


def scan_pairs(pairs: Sequence[Pair]) -> None:
    """Checks every image and label file header; raises the first problem.

    Raises:
      ValueError: naming the file: unreadable, truncated, not PNG/JPEG, a
        label that is not 8-bit greyscale PNG, or sizes that differ.
    """
    _parallel(_check_pair, pairs)


def scan_images(paths: Sequence[str]) -> None:
    """Checks image file headers. Raises: ValueError naming the file."""
    _parallel(lambda p: _header(p, label=False), paths)


def scan_label_values(pairs: Sequence[Pair], label_map: LabelMap) -> None:
    """Decodes every label and checks its values against `label_map`.

    Raises:
      ValueError: naming the first label file with a value not allowed.
    """

    def check(pair: Pair) -> None:
        with _open(pair.label_path) as f, Image.open(f) as im:
            counts = im.histogram()
        bad = label_map.invalid_values([v for v in range(256) if counts[v]])
        if bad:
            raise ValueError(
                f"{pair.label_path}: label values {bad} are not allowed; expected "
                f"{label_map.expected}."
            )

    _parallel(check, pairs)


def list_images(folder: str) -> list[str]:
    """Image files (png/jpg/jpeg) under `folder`, recursively, sorted."""
    found = []
    for root, _, names in tf.io.gfile.walk(folder):
        found += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


# ---------------------------------------------------------------- in tf.data


def _tail(contents: tf.Tensor, n: int) -> tf.Tensor:
    start = tf.maximum(tf.strings.length(contents) - n, 0)
    return tf.strings.substr(contents, start, n)


def _assert(ok: tf.Tensor, path: tf.Tensor, problem: str, *data) -> tf.Operation:
    """Asserts `ok`; the error reads "<path><problem>" followed by `data`."""
    return tf.debugging.Assert(ok, [tf.strings.join([path, problem]), *data], summarize=16)


def decode_image(contents: tf.Tensor, path: tf.Tensor) -> tf.Tensor:
    """Decodes a PNG or JPEG to uint8 [H, W, 3], checking it names `path`.

    A truncated PNG or a file that is neither PNG nor JPEG fails with an
    InvalidArgumentError whose message holds `path`.
    """
    head = tf.strings.substr(contents, 0, 8)
    is_png = tf.equal(head, PNG_SIGNATURE)
    is_jpeg = tf.equal(tf.strings.substr(contents, 0, 3), JPEG_START)
    ok = (is_png & tf.equal(_tail(contents, 12), PNG_END)) | is_jpeg
    check = _assert(ok, path, ": truncated, corrupt, or not a PNG/JPEG image.")
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_label(contents: tf.Tensor, path: tf.Tensor) -> tf.Tensor:
    """Decodes an 8-bit greyscale PNG label to uint8 [H, W], checking it."""
    is_png = tf.equal(tf.strings.substr(contents, 0, 8), PNG_SIGNATURE)
    complete = tf.equal(_tail(contents, 12), PNG_END)
    # IHDR bytes 24-25: bit depth 8, colour type 0 (greyscale).
    grey8 = tf.equal(tf.strings.substr(contents, 24, 2), b"\x08\x00")
    check = _assert(
        is_png & complete & grey8,
        path,
        ": a label must be a complete 8-bit greyscale PNG (truncated, corrupt, or wrong mode).",
    )
    with tf.control_dependencies([check]):
        label = tf.io.decode_png(contents, channels=1)
    return label[:, :, 0]


def check_label(raw: tf.Tensor, label_map: LabelMap, path: tf.Tensor) -> tf.Tensor:
    """`raw`, after asserting that all its values are allowed by `label_map`.

    Args:
      raw: uint8 [H, W], as stored.
      label_map: the dataset's LabelMap.
      path: string scalar, the label file named in the error.

    Returns:
      `raw` (uint8 [H, W]), unchanged.
    """
    others = tf.where(tf.equal(raw, label_map.extra_id), tf.zeros_like(raw), raw)
    ok = tf.reduce_max(others) < label_map.num_ids

    def fail():  # Only on failure: list the offending values.
        counts = tf.math.bincount(tf.cast(tf.reshape(raw, [-1]), tf.int32), minlength=256)
        allowed = [v < label_map.num_ids or v == label_map.extra_id for v in range(256)]
        bad = tf.where((counts > 0) & ~tf.constant(allowed))[:, 0]
        message = f"are not allowed; expected {label_map.expected}."
        with tf.control_dependencies([_assert(False, path, ": label values", bad, message)]):
            return tf.identity(raw)

    return tf.cond(ok, lambda: raw, fail)


def map_label(raw: tf.Tensor, label_map: LabelMap) -> tf.Tensor:
    """Stored values -> MASK values (uint8, same shape), by `label_map.table`."""
    return tf.gather(tf.constant(label_map.table, tf.uint8), tf.cast(raw, tf.int32))


def labeled_element(
    image_bytes: tf.Tensor,
    label_bytes: tf.Tensor,
    *,
    filename: tf.Tensor,
    image_path: tf.Tensor,
    label_path: tf.Tensor,
    label_map: LabelMap,
    map_labels: bool = True,
) -> dict[str, tf.Tensor]:
    """Decodes and checks one labeled example into the common element format.

    Args:
      image_bytes, label_bytes: the encoded files.
      filename: the element's FILENAME.
      image_path, label_path: the files' names for error messages.
      label_map: the dataset's LabelMap.
      map_labels: False keeps the stored (checked) values in MASK, for the
        training stream, which maps them after cropping (cheaper).

    Returns:
      {IMAGE: uint8 [H, W, 3], MASK: uint8 [H, W], FILENAME: string []}.
    """
    image = decode_image(image_bytes, image_path)
    raw = decode_label(label_bytes, label_path)
    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.shape(raw)))
    check = _assert(
        same, label_path, ": label size", tf.shape(raw), "differs from its image", tf.shape(image)
    )
    with tf.control_dependencies([check]):
        mask = check_label(raw, label_map, label_path)
    if map_labels:
        mask = map_label(mask, label_map)
    return {common.IMAGE: image, common.MASK: mask, common.FILENAME: filename}


def unlabeled_element(
    image_bytes: tf.Tensor, *, filename: tf.Tensor, image_path: tf.Tensor
) -> dict[str, tf.Tensor]:
    """{IMAGE: uint8 [H, W, 3], FILENAME: string []} from encoded bytes."""
    return {common.IMAGE: decode_image(image_bytes, image_path), common.FILENAME: filename}
