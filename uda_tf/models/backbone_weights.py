"""Loading ImageNet backbone weights from a local file (never downloaded).

Two file formats are read, with h5py:
  - Keras 3 weights files (`*.weights.h5`, from `model.save_weights` or
    `model.get_layer("backbone").save_weights`): taken as they are, i.e. as
    weights of a network fed the same `input_normalization` (a DeepLabV3Plus
    of the same backbone).
  - Legacy Keras HDF5 files, the format of the `keras.applications` ImageNet
    files (`resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`,
    `resnet101_..._notop.h5`, `mobilenet_v2_weights_tf_dim_ordering_tf_kernels_
    0.35_224_no_top.h5`, `mobilenet_7_5_224_tf_no_top.h5`,
    `xception_weights_tf_dim_ordering_tf_kernels_notop.h5`; see
    ../shared/data/weights/README.md for the torchvision MobileNetV2 file).
    These networks were trained on `preprocess_input` images (ResNet: 'caffe',
    BGR minus the ImageNet mean; the MobileNets and Xception: 'tf',
    x / 127.5 - 1). When the model's input normalisation is that one (the
    default for the keras MobileNets and Xception), the file is loaded as it
    is and the network is keras.applications' exactly. Otherwise the loader
    folds the file's preprocessing into the first conv: its kernel is scaled
    per input channel (and its input channels reversed for 'caffe') and the
    constant offset goes to the conv bias (ResNet) or to the moving mean of
    the batch norm that follows (the MobileNets, Xception). The folded
    network equals the original except within a few pixels of the border,
    where the first conv's zero padding stands for the colour that the
    model's normalisation maps to 0 (for ResNet, the ImageNet mean: caffe's to
    0.5 levels; for the torchvision MobileNetV2 file, whose conversion folded
    torchvision's mean/std into it, this folding gives torchvision's own
    first conv back, border included).

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

from uda_tf.models import backbones

# keras.applications.imagenet_utils 'caffe' mean, in RGB order.
_CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)
# First conv of each backbone -> (preprocessing mode, the batch norms that
# may follow it: MobileNetV2's, MobileNet's).
_FIRST_CONV = {
    "conv1_conv": ("caffe", ()),
    "conv1": ("tf", ("bn_conv1", "conv1_bn")),
    "block1_conv1": ("tf", ("block1_conv1_bn",)),
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


def load_backbone_weights(backbone: keras.Model, path: str, *, input_normalization: str) -> None:
    """Sets every weight of `backbone` from `path`, or none of them.

    Args:
      backbone: a model from `backbones.build_backbone`.
      path: the weights file (see the module docstring).
      input_normalization: how the backbone's inputs are normalised, a key of
        `backbones.NORMALIZATIONS` (a DeepLabV3Plus's `input_normalization`).

    Raises:
      ValueError: naming the backbone layer that is missing from the file, or
        whose weights have another count or shape (expected vs found).
    """
    if input_normalization not in backbones.NORMALIZATIONS:
        raise ValueError(
            f"input_normalization={input_normalization!r} is invalid: expected one of "
            f"{tuple(backbones.NORMALIZATIONS)}."
        )
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
    folded = legacy and _fold_preprocessing(values, path, input_normalization)
    for layer in matches:
        layer.set_weights(values[layer.name])
    extra = sorted(set(file_weights) - set(matches.values()))
    logging.info(
        "Loaded %d backbone layers from %s%s; skipped file layers: %s",
        len(matches),
        path,
        f" (keras.applications preprocessing folded into {input_normalization!r})"
        if folded
        else "",
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


def _fold_preprocessing(values: dict[str, list[np.ndarray]], path: str, normalization: str) -> bool:
    """Rewrites the first conv (and BN) for `normalization` inputs, in place.

    The file's network takes p = (x[perm] - file_mean) / file_std (perm: RGB
    -> BGR for 'caffe'); the model feeds n = (x - mean) / std, so p equals
    n[perm] * scale + offset with scale = std[perm] / file_std and offset =
    (mean[perm] - file_mean) / file_std.

    Returns:
      Whether anything changed (False when the file's preprocessing is the
      model's normalisation).
    """
    found = [name for name in _FIRST_CONV if name in values]
    if len(found) != 1:
        raise ValueError(
            f"--backbone_weights={path!r}: cannot tell the input preprocessing of this "
            f"backbone (first conv candidates found: {found})."
        )
    conv_name = found[0]
    mode, bn_names = _FIRST_CONV[conv_name]
    if mode == normalization:
        return False
    mean, std = (np.asarray(v, np.float32) for v in backbones.NORMALIZATIONS[normalization])
    if mode == "caffe":  # BGR minus the mean, in the file's (BGR) channel order.
        perm = [2, 1, 0]
        file_mean, file_std = np.asarray(_CAFFE_MEAN_RGB[::-1], np.float32), np.float32(1)
    else:
        perm = [0, 1, 2]
        file_mean, file_std = (np.asarray(v, np.float32) for v in backbones.NORMALIZATIONS[mode])
    scale = std[perm] / file_std
    offset = (mean[perm] - file_mean) / file_std
    kernel = values[conv_name][0]  # [k, k, 3, C], input channels in the file's order.
    shift = np.einsum("hwio,i->o", kernel, offset)  # [C]
    # Rescale each file channel, then order the input channels as RGB.
    values[conv_name][0] = (kernel * scale[None, None, :, None])[:, :, perm, :]
    bn_name = next((n for n in bn_names if n in values), None)
    if bn_name is None:
        values[conv_name][1] = values[conv_name][1] + shift
    else:
        # BN weights: gamma, beta, moving_mean, moving_variance.
        values[bn_name][2] = values[bn_name][2] - shift
    return True
