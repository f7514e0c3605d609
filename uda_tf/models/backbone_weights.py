"""Loading ImageNet backbone weights from a local file (never downloaded).

Two file formats are read, with h5py:
  - Keras 3 weights files (`*.weights.h5`, from `model.save_weights` or
    `model.get_layer("backbone").save_weights`): taken as they are, i.e. as
    weights of a network fed `PixelNormalization` outputs.
  - Legacy Keras HDF5 files, the format of the `keras.applications` ImageNet
    files (`resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`,
    `resnet101_..._notop.h5`, `mobilenet_v2_weights_tf_dim_ordering_tf_kernels_
    1.0_224_no_top.h5`, `xception_weights_tf_dim_ordering_tf_kernels_notop.h5`).
    These networks were trained on `preprocess_input` images (ResNet: 'caffe',
    BGR minus the ImageNet mean; MobileNetV2, Xception: 'tf', x / 127.5 - 1),
    so the loader folds that preprocessing into the first conv: its kernel is
    scaled by STD_RGB (and its input channels reversed for 'caffe') and the
    constant offset goes to the conv bias (ResNet) or to the moving mean of
    the batch norm that follows (MobileNetV2, Xception). The folded network on
    normalised pixels equals the original on its own preprocessing, except
    within a few pixels of the border, where the zero padding now stands for
    the ImageNet mean colour instead of the preprocessed zero.

Layers are matched by name (case-insensitively, since MobileNetV2's are
lower-cased here). A file layer with a Keras auto name ("conv2d_3",
"batch_normalization_3": Xception's shortcut convs) is matched to the one
unmatched backbone layer with the same weight shapes. Every backbone layer
must be found with the right shapes; extra file layers (a classifier top,
MobileNetV2's Conv_1) are skipped and logged.
"""

import os
import re

import h5py
import keras
import numpy as np
from absl import logging

from uda_tf import common

# keras.applications.imagenet_utils 'caffe' mean, in RGB order.
_CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)
# First conv of each backbone -> (preprocessing mode, the batch norm after it).
_FIRST_CONV = {
    "conv1_conv": ("caffe", None),
    "conv1": ("tf", "bn_conv1"),
    "block1_conv1": ("tf", "block1_conv1_bn"),
}
_AUTO_NAME = re.compile(r"^(conv2d|batch_normalization)(_\d+)?$")


def read_weights_file(path: str) -> tuple[dict[str, list[np.ndarray]], bool]:
    """Reads every layer's weights from a Keras HDF5 file.

    Args:
      path: a Keras 3 `.weights.h5` file or a legacy Keras `.h5` file.

    Returns:
      ({layer name: [arrays in the layer's weight order]}, is_legacy).

    Raises:
      ValueError: the file is missing or not a Keras weights file.
    """
    if not os.path.isfile(path):
        raise ValueError(f"--backbone_weights={path!r}: no such file.")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"--backbone_weights={path!r} is not an HDF5 file: {e}") from e
    with f:
        root = f.get("model_weights", f)
        if "layer_names" in root.attrs:
            return _read_legacy(root), True
        if "layers" in f:
            weights = {}
            _read_keras3(f, weights, path)
            return weights, False
    raise ValueError(f"--backbone_weights={path!r} is not a Keras weights file.")


def _decode(name) -> str:
    return name.decode("utf8") if isinstance(name, bytes) else str(name)


def _read_legacy(root) -> dict[str, list[np.ndarray]]:
    weights = {}
    for layer_name in (_decode(n) for n in root.attrs["layer_names"]):
        group = root[layer_name]
        names = [_decode(n) for n in group.attrs.get("weight_names", [])]
        if names:
            weights[layer_name] = [np.asarray(group[n]) for n in names]
    return weights


def _read_keras3(group, weights, path) -> None:
    for key, layer_group in group.get("layers", {}).items():
        if "layers" in layer_group:  # A nested model.
            _read_keras3(layer_group, weights, path)
        variables = layer_group.get("vars")
        if variables is None or not len(variables):
            continue
        name = _decode(variables.attrs.get("name", key))
        if name in weights:
            raise ValueError(f"--backbone_weights={path!r} has two layers named {name!r}.")
        weights[name] = [np.asarray(variables[str(i)]) for i in range(len(variables))]


def load_backbone_weights(backbone: keras.Model, path: str) -> None:
    """Sets every weight of `backbone` from `path`, or none of them.

    Args:
      backbone: a model from `backbones.build_backbone`.
      path: the weights file (see the module docstring).

    Raises:
      ValueError: naming the backbone layer that is missing from the file, or
        whose weights have another count or shape (expected vs found).
    """
    file_weights, legacy = read_weights_file(path)
    matches = _match_layers(backbone, file_weights, path)
    values = {}
    for layer, file_name in matches.items():
        arrays = file_weights[file_name]
        expected = [tuple(w.shape) for w in layer.weights]
        found = [tuple(a.shape) for a in arrays]
        if expected != found:
            raise ValueError(
                f"--backbone_weights={path!r} does not fit layer {layer.name!r} (file layer "
                f"{file_name!r}): expected weight shapes {expected}, found {found}."
            )
        values[layer.name] = [a.astype(np.float32) for a in arrays]
    if legacy:
        _fold_preprocessing(values, path)
    for layer in matches:
        layer.set_weights(values[layer.name])
    extra = sorted(set(file_weights) - set(matches.values()))
    logging.info(
        "Loaded %d backbone layers from %s%s; skipped file layers: %s",
        len(matches),
        path,
        " (keras.applications preprocessing folded in)" if legacy else "",
        extra or "none",
    )


def _match_layers(backbone, file_weights, path) -> dict:
    lower = {name.lower(): name for name in file_weights}
    matches, unmatched = {}, []
    for layer in backbone.layers:
        if not layer.weights:
            continue
        name = layer.name if layer.name in file_weights else lower.get(layer.name.lower())
        if name is None:
            unmatched.append(layer)
        else:
            matches[layer] = name
    taken = set(matches.values())
    auto = [n for n in file_weights if n not in taken and _AUTO_NAME.match(n)]
    for layer in unmatched:
        shapes = [tuple(w.shape) for w in layer.weights]
        candidates = [n for n in auto if [a.shape for a in file_weights[n]] == shapes]
        if len(candidates) != 1:
            raise ValueError(
                f"--backbone_weights={path!r} does not fit: backbone layer {layer.name!r} "
                f"(weight shapes {shapes}) is not in the file"
                + (f" ({len(candidates)} unnamed candidates)." if candidates else ".")
            )
        matches[layer] = candidates[0]
        auto.remove(candidates[0])
    return matches


def _fold_preprocessing(values: dict[str, list[np.ndarray]], path: str) -> None:
    """Rewrites the first conv (and BN) for PixelNormalization inputs, in place."""
    found = [name for name in _FIRST_CONV if name in values]
    if len(found) != 1:
        raise ValueError(
            f"--backbone_weights={path!r}: cannot tell the input preprocessing of this "
            f"backbone (first conv candidates found: {found})."
        )
    conv_name = found[0]
    mode, bn_name = _FIRST_CONV[conv_name]
    mean = np.asarray(common.MEAN_RGB, np.float32)
    std = np.asarray(common.STD_RGB, np.float32)
    kernel = values[conv_name][0]  # [k, k, 3, C]
    if mode == "caffe":
        kernel = kernel[:, :, ::-1, :]  # BGR -> RGB input channels.
        scale, offset = std, mean - np.asarray(_CAFFE_MEAN_RGB, np.float32)
    else:
        scale, offset = std / 127.5, mean / 127.5 - 1.0
    values[conv_name][0] = kernel * scale[None, None, :, None]
    shift = np.einsum("hwio,i->o", kernel, offset)  # [C]
    if bn_name is None:
        values[conv_name][1] = values[conv_name][1] + shift
    else:
        # BN weights: gamma, beta, moving_mean, moving_variance.
        values[bn_name][2] = values[bn_name][2] - shift
