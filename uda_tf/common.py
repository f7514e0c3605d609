"""Names shared across the package: element keys, the ignore label, stream ids.

Element format (what every reader yields, before batching):
  labeled:   {IMAGE: uint8 [H, W, 3], MASK: uint8 [H, W] (trainIds, 255 =
             ignore), FILENAME: string []}
  unlabeled: {IMAGE: uint8 [H, W, 3], FILENAME: string []}

Training batch (what `uda_tf.data.streams.train_dataset` yields, one dict per step):
  IMAGE         uint8   [B, h, w, 3]   labeled crops
  MASK          uint8   [B, h, w]      their trainIds
  ORI_IMAGE     uint8   [rB, h, w, 3]  unlabeled crops (only if unsup_ratio > 0)
  ORI_VALID     uint8   [rB, h, w]     1 where the ori pixel came from the
                                       image, 0 on scale/crop padding
  AUG_IMAGE     uint8   [rB, h, w, 3]  RandAugment + Cutout of ORI_IMAGE
  AUG_TRANSFORM float32 [rB, 8]        the aug view's projective transform,
                                       tf.raw_ops.ImageProjectiveTransformV3
                                       convention: maps an output (aug) pixel
                                       to the input (ori) pixel it came from.
  MIX_MASK      uint8   [rB, h, w]     only with --unsup_mix=cutmix: 1 where
                                       the AUG_IMAGE pixel came from the
                                       partner's aug view (augment/mix.py)
  MIX_PARTNER   int32   [rB]           only with --unsup_mix=cutmix: that
                                       partner's index in the (global)
                                       unlabeled batch

Evaluation batch (`uda_tf.data.streams.eval_dataset`): IMAGE (the network's
input, at --resize_factor), MASK uint8 [b, H, W] at the labels' stored size,
FILENAME, and STORED_IMAGE uint8 [b, H, W, 3] (the image at that size, for
pictures) when IMAGE is smaller or larger.

Images stay uint8 in [0, 255] through tf.data; models normalise inside
(`MEAN_RGB`, `STD_RGB`), so that the mean colour fill is 0 after
normalisation and exported models take raw pixels.
"""

IMAGE = "image"
MASK = "mask"
FILENAME = "filename"
ORI_IMAGE = "ori_image"
ORI_VALID = "ori_valid"
AUG_IMAGE = "aug_image"
AUG_TRANSFORM = "aug_transform"
MIX_MASK = "mix_mask"
MIX_PARTNER = "mix_partner"
STORED_IMAGE = "stored_image"

IGNORE_LABEL = 255

# ImageNet statistics, in [0, 255] RGB: backbone weights are ImageNet ones.
MEAN_RGB = (123.675, 116.28, 103.53)
STD_RGB = (58.395, 57.12, 57.375)
# The mean colour as uint8, the fill of padded and warped-in image pixels.
MEAN_RGB_UINT8 = (124, 116, 104)

# Stream ids for per-example seeds:
# seed = stateless_fold_in([cfg.seed, stream_id], example_index).
SUP_STREAM = 0
UNSUP_STREAM = 1
EVAL_STREAM = 2
# One seed per training batch (CutMix): fold_in([cfg.seed, MIX_STREAM], batch_index).
MIX_STREAM = 3
