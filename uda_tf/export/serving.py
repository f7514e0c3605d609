"""The serving graph shared by the SavedModel and TFLite exports.

Signature names, input and output keys, and the in-graph input checks and
decoding: `serve_images` (uint8 pixels -> classes and probabilities) and
`decode_images` (PNG/JPEG bytes -> uint8 pixels). Every check runs in the
graph, so that TF Serving, the SavedModel CLI and Python report the same
message.
"""

import keras
import tensorflow as tf

SERVING_DEFAULT = "serving_default"
PREDICT_ENCODED = "predict_encoded"
PREDICT_ENCODED_CLASSES = "predict_encoded_classes"
IMAGES = "images"
IMAGE_BYTES = "image_bytes"
CLASSES = "classes"
PROBABILITIES = "probabilities"

# Largest encoded image that predict_encoded decodes: 2^25 pixels (e.g.
# 8192 x 4096, sixteen Cityscapes frames), 100 MB once decoded to RGB.
DEFAULT_MAX_PIXELS = 1 << 25

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
# Signature (8) + IHDR length (4) + "IHDR" (4) + width (4) + height (4).
_PNG_HEADER_BYTES = 24


def serve_images(model: keras.Model, images: tf.Tensor) -> dict[str, tf.Tensor]:
    """Runs the network on raw pixels, after checking their shape in the graph.

    Args:
      model: network mapping float32 pixels [N, H, W, 3] in [0, 255] to
        logits [N, H, W, K].
      images: uint8 [N, H, W, 3], N, H, W >= 1; the rank need not be known
        when tracing.

    Returns:
      {"classes": int32 [N, H, W], "probabilities": float32 [N, H, W, K]}.

    Raises:
      tf.errors.InvalidArgumentError: (when run) on another rank, a channel
        count other than 3 or an empty batch or image; the message names the
        expected shape and the one received.
    """
    shape = tf.shape(images)
    padded = tf.concat([shape, tf.zeros([4], tf.int32)], axis=0)
    ok = tf.logical_and(tf.equal(tf.size(shape), 4), tf.equal(padded[3], 3))
    ok = tf.logical_and(ok, tf.reduce_min(padded[:3]) >= 1)
    check = tf.debugging.Assert(
        ok,
        [
            (
                f"{SERVING_DEFAULT}: expected {IMAGES} as uint8 [N, H, W, 3] "
                "(RGB, N, H, W >= 1), got a tensor of shape"
            ),
            shape,
        ],
        summarize=8,
    )
    with tf.control_dependencies([check]):
        images = tf.ensure_shape(tf.identity(images), [None, None, None, 3])
    logits = tf.cast(model(tf.cast(images, tf.float32), training=False), tf.float32)
    return {
        CLASSES: tf.argmax(logits, axis=-1, output_type=tf.int32),
        PROBABILITIES: tf.nn.softmax(logits, axis=-1),
    }


def hex_prefix(data: tf.Tensor, num_bytes: int = 8) -> tf.Tensor:
    """The first `num_bytes` bytes of `data` as hex, e.g. "47 49 46 38" (string []).

    Error messages show untrusted bytes so, never raw: a raw byte that is not
    UTF-8 makes Python (tf.saved_model.load, saved_model_cli) fail with a
    UnicodeDecodeError while formatting the message.
    """
    digits = tf.constant([f"{i:02x}" for i in range(256)])
    head = tf.io.decode_raw(tf.strings.substr(data, 0, num_bytes), tf.uint8)
    return tf.strings.reduce_join(tf.gather(digits, tf.cast(head, tf.int32)), separator=" ")


def _png_size(data: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """Height and width from a PNG's IHDR chunk: int64 [2]."""
    padded = tf.strings.join([data, b"\0" * _PNG_HEADER_BYTES])
    header = tf.io.decode_raw(tf.strings.substr(padded, 12, 12), tf.uint8)
    is_ihdr = tf.logical_and(
        tf.strings.length(data) >= _PNG_HEADER_BYTES,
        tf.equal(tf.strings.substr(data, 12, 4), b"IHDR"),
    )
    check = tf.debugging.Assert(
        is_ihdr,
        [
            f"{PREDICT_ENCODED}: {IMAGE_BYTES}[i] is a truncated or corrupt PNG (no IHDR); i =",
            index,
        ],
    )
    powers = tf.constant([1 << 24, 1 << 16, 1 << 8, 1], tf.int64)
    with tf.control_dependencies([check]):
        big_endian = tf.reshape(tf.cast(header[4:], tf.int64), [2, 4])
    width_height = tf.reduce_sum(big_endian * powers, axis=1)
    return tf.reverse(width_height, axis=[0])


def encoded_image_size(data: tf.Tensor, index: tf.Tensor | int = 0) -> tf.Tensor:
    """Reads (height, width) from a PNG or JPEG header, without decoding it.

    Args:
      data: string [], the bytes of one file.
      index: int [], its position in the request, for the error messages.

    Returns:
      int64 [2]: height, width.

    Raises:
      tf.errors.InvalidArgumentError: (when run) if the bytes start with
        neither the PNG nor the JPEG signature, or the header is cut short.
    """
    index = tf.cast(index, tf.int64)
    is_png = tf.equal(tf.strings.substr(data, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, len(_JPEG_SOI)), _JPEG_SOI)
    check = tf.debugging.Assert(
        tf.logical_or(is_png, is_jpeg),
        [
            (
                f"{PREDICT_ENCODED}: {IMAGE_BYTES}[i] is neither a PNG nor a JPEG file "
                "(bad signature); i ="
            ),
            index,
            "its first bytes (hex):",
            hex_prefix(data),
        ],
    )
    with tf.control_dependencies([check]):
        return tf.cond(
            is_jpeg,
            lambda: tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64),
            lambda: _png_size(data, index),
        )


def decode_images(image_bytes: tf.Tensor, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tf.Tensor:
    """Decodes a batch of PNG/JPEG files of one size, refusing oversized ones.

    The sizes are read from the headers and checked before anything is
    decoded, so that a small file declaring a huge image (a decompression bomb)
    costs nothing.

    Args:
      image_bytes: string [N], N >= 1, PNG or JPEG files (grey, RGB or RGBA;
        8 or 16 bits) that all have the same height and width; the rank need
        not be known when tracing.
      max_pixels: the largest height * width accepted.

    Returns:
      uint8 [N, H, W, 3] RGB.

    Raises:
      tf.errors.InvalidArgumentError: (when run) naming the image and the
        problem: another rank than 1, not PNG/JPEG (its first bytes in hex), a
        truncated header, more than `max_pixels` pixels, sizes that differ
        within the batch, or undecodable data.
    """
    shape = tf.shape(image_bytes)
    rank_check = tf.debugging.Assert(
        tf.equal(tf.size(shape), 1),
        [
            (
                f"{PREDICT_ENCODED}: expected {IMAGE_BYTES} as string [N] (one PNG or JPEG "
                "file per element, N >= 1), got a tensor of shape"
            ),
            shape,
        ],
        summarize=8,
    )
    with tf.control_dependencies([rank_check]):
        image_bytes = tf.reshape(image_bytes, [-1])
    num_images = tf.size(image_bytes, out_type=tf.int64)
    sizes = tf.map_fn(
        lambda args: encoded_image_size(*args),
        (image_bytes, tf.range(num_images)),
        fn_output_signature=tf.TensorSpec([2], tf.int64),
    )  # [N, 2]
    pixels = tf.reduce_prod(sizes, axis=1)  # [N]
    checks = [
        tf.debugging.Assert(num_images >= 1, [f"{PREDICT_ENCODED}: {IMAGE_BYTES} holds no image"]),
        tf.debugging.Assert(
            tf.reduce_all(pixels <= max_pixels),
            [
                (
                    f"{PREDICT_ENCODED}: an image is larger than --max_pixels={max_pixels} "
                    "(height * width); refused before decoding. Sizes [height, width]:"
                ),
                sizes,
            ],
            summarize=16,
        ),
        tf.debugging.Assert(
            tf.reduce_all(pixels >= 1),
            [f"{PREDICT_ENCODED}: an image header declares 0 pixels. Sizes:", sizes],
        ),
        tf.debugging.Assert(
            tf.reduce_all(tf.equal(sizes, sizes[:1])),
            [
                (
                    f"{PREDICT_ENCODED}: the images of one request must have the same size; "
                    "send differently sized images in separate requests. Sizes [height, width]:"
                ),
                sizes,
            ],
            summarize=16,
        ),
    ]
    with tf.control_dependencies(checks):
        image_bytes = tf.identity(image_bytes)
    images = tf.map_fn(
        lambda data: tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False),
        image_bytes,
        fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
    )
    return tf.ensure_shape(images, [None, None, None, 3])
