"""File checks for the readers: a host-side scan, and checked decoding.

Two lines of defence against bad input, both naming the file:
- `scan_pairs` runs when a labeled dataset is built, before training: it
  reads each image and label file once, checks its header (PIL: the format,
  size and mode), then decodes it with the decoder training uses
  (tf.io.decode_image / decode_png), so a missing, truncated, corrupt (a
  broken CRC or zlib stream, even before an intact IEND) or non-image file,
  a label that is not 8-bit greyscale, an image/label size mismatch or a
  label value not allowed is a ValueError naming the file. `scan_images`
  checks the headers and ends of the unlabeled pool's files only (Cityscapes'
  20,000 train_extra frames would take minutes to decode).
- `decode_image` / `labeled_element` run inside tf.data: they check the same
  properties plus the label values on every decode, with the file name in the
  error (tf.debugging.Assert; an InvalidArgumentError at iteration). Data
  that does not decode fails with the file named too (`call_or_fail`).
"""

import concurrent.futures
import dataclasses
import functools
import io
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from uda_tf import common

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
JPEG_START = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SCAN_THREADS = 16
_CORRUPT_DATA = ": corrupt image data: it does not decode (the decoder error is logged above)."


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


def _read(path: str) -> bytes:
    try:
        with _open(path) as f:
            return f.read()
    except (FileNotFoundError, tf.errors.NotFoundError):
        raise ValueError(f"{path}: file not found.") from None


def _header(path: str, *, label: bool) -> tuple[int, int]:
    """(width, height) of an image file from its header and end; ValueError naming it."""
    try:
        with _open(path) as f:
            head = f.read(32)
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 1024))
            tail = f.read()
            f.seek(0)
            return _check_header(path, f, head, tail, label=label)
    except (FileNotFoundError, tf.errors.NotFoundError):
        raise ValueError(f"{path}: file not found.") from None


def _check_header(path: str, f, head: bytes, tail: bytes, *, label: bool) -> tuple[int, int]:
    """The checks of `_header` on an open file `f` with its first and last bytes."""
    try:
        with Image.open(f) as im:
            width, height, mode = im.width, im.height, im.mode
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


@functools.cache
def _allowed_values(label_map: LabelMap) -> np.ndarray:
    """bool [256]: whether each stored value is allowed."""
    return np.array([not label_map.invalid_values([v]) for v in range(256)])


def _decoded(path: str, *, label: bool, label_map: LabelMap | None = None) -> tuple[int, int]:
    """Reads and fully decodes one file (as training does); (width, height).

    Raises:
      ValueError: naming the file: the header checks of `_header`, data that
        does not decode (a corrupt CRC or zlib stream), or label values not
        allowed by `label_map`.
    """
    data = _read(path)
    size = _check_header(path, io.BytesIO(data), data[:32], data[-1024:], label=label)
    try:
        with tf.device("/cpu:0"):
            if label:
                pixels = tf.io.decode_png(data, channels=1).numpy()[:, :, 0]
            else:
                pixels = tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as e:
        kind = "PNG" if data.startswith(PNG_SIGNATURE) else "JPEG"
        reason = e.message.split(" [Op:")[0].strip()
        raise ValueError(f"{path}: corrupt {kind} data: it does not decode ({reason}).") from None
    if label_map is not None:
        invalid = ~_allowed_values(label_map)[pixels]
        if invalid.any():
            bad = np.unique(pixels[invalid]).tolist()
            raise ValueError(
                f"{path}: label values {bad} are not allowed; expected {label_map.expected}."
            )
    return size


def _check_pair(pair: Pair, label_map: LabelMap | None) -> None:
    image_size = _decoded(pair.image_path, label=False)
    label_size = _decoded(pair.label_path, label=True, label_map=label_map)
    if image_size != label_size:
        raise ValueError(
            f"{pair.label_path}: label is {label_size[0]}x{label_size[1]} (WxH) but its image "
            f"{pair.image_path} is {image_size[0]}x{image_size[1]}."
        )


def _parallel(fn, items) -> list:
    with concurrent.futures.ThreadPoolExecutor(_SCAN_THREADS) as pool:
        return list(pool.map(fn, items))


def scan_pairs(pairs: Sequence[Pair], label_map: LabelMap | None = None) -> None:
    """Reads and decodes every image and label once; raises the first problem.

    Costs one read and decode per file, in `_SCAN_THREADS` threads; measured
    (README, "What happens when things break"): ~3 CPU-ms per CamVid frame
    (240x180 JPEG + PNG), ~60 per 2048x1024 frame (Cityscapes' 3,475 labeled
    frames: ~3.5 CPU-minutes).

    Args:
      pairs: the labeled examples.
      label_map: if given, the label values are checked against it.

    Raises:
      ValueError: naming the file: unreadable, truncated, corrupt data, not
        PNG/JPEG, a label that is not 8-bit greyscale PNG, sizes that differ,
        or label values not allowed.
    """
    _parallel(lambda pair: _check_pair(pair, label_map), pairs)


def scan_images(paths: Sequence[str]) -> None:
    """Checks image file headers and ends (not the data). Raises: ValueError naming the file."""
    _parallel(lambda p: _header(p, label=False), paths)


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


def _empty(spec: tf.TensorSpec) -> tf.Tensor:
    shape = [0 if d is None else d for d in spec.shape.as_list()]
    return tf.fill(shape, "") if spec.dtype == tf.string else tf.zeros(shape, spec.dtype)


def call_or_fail(fn: Callable, inputs, where: tf.Tensor, problem: str):
    """`fn(inputs)`, or an InvalidArgumentError reading "<where><problem>" if it fails.

    An op that fails inside tf.data (a decoder's "Invalid PNG data, size
    24708", a parse error) does not say which file it was reading. Here `fn`
    runs in a one-element dataset whose error, if any, is logged (as a
    warning) and replaced by an assertion naming `where`; nothing is skipped.

    Args:
      fn: maps `inputs` (a tensor or a structure of tensors) to a structure of
        tensors of known rank.
      inputs: its argument.
      where: string [], the file (and record) for the message.
      problem: what failed, appended to `where`.

    Returns:
      `fn(inputs)`.
    """
    attempt = tf.data.Dataset.from_tensors((inputs,)).map(lambda x: (fn(x), True))
    fallback = tf.data.Dataset.from_tensors(
        (tf.nest.map_structure(_empty, attempt.element_spec[0]), False)
    )
    attempt = attempt.ignore_errors(log_warning=True).concatenate(fallback)
    outputs, ok = attempt.take(1).get_single_element()
    with tf.control_dependencies([_assert(ok, where, problem)]):
        return tf.nest.map_structure(tf.identity, outputs)


def decode_image(contents: tf.Tensor, path: tf.Tensor) -> tf.Tensor:
    """Decodes a PNG or JPEG to uint8 [H, W, 3], checking it names `path`.

    A truncated PNG, a file that is neither PNG nor JPEG, or data that does
    not decode fails with an InvalidArgumentError whose message holds `path`.
    """
    head = tf.strings.substr(contents, 0, 8)
    is_png = tf.equal(head, PNG_SIGNATURE)
    is_jpeg = tf.equal(tf.strings.substr(contents, 0, 3), JPEG_START)
    ok = (is_png & tf.equal(_tail(contents, 12), PNG_END)) | is_jpeg
    check = _assert(ok, path, ": truncated, corrupt, or not a PNG/JPEG image.")

    def decode(data):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return image

    with tf.control_dependencies([check]):
        contents = tf.identity(contents)
    return call_or_fail(decode, contents, path, _CORRUPT_DATA)


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
        contents = tf.identity(contents)
    return call_or_fail(
        lambda data: tf.io.decode_png(data, channels=1)[:, :, 0], contents, path, _CORRUPT_DATA
    )


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
