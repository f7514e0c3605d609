#!/bin/bash
# UDA for semantic segmentation on Cityscapes, in the shape of the original's
# image/scripts/run_cifar10_gpu.sh: one run per labeled-set size, flags one
# per line, and "$@" last so that the caller adds or overrides flags (absl
# keeps the last occurrence).
#
#   bash run_cityscapes.sh --data_dir=data/cityscapes --backbone_weights=resnet50.h5
#   bash run_cityscapes.sh --data_dir=data/cityscapes --unsup_ratio=0   # supervised only
#   bash run_cityscapes.sh --data_dir=data/cityscapes --strategy=mirrored --train_batch_size=16
#
# Without --data_dir it runs one short demo instead (CPU, no download, under
# 5 minutes on 2 cores): a generated Cityscapes-format tree, a small U-Net
# trained with UDA, evaluation, colourised predictions, export.
# DEMO=long bash run_cityscapes.sh runs the longer, better one (4x the pixels,
# 2x the filters, 2x the steps: about 15 CPU-minutes).
set -e

task_name=cityscapes

data_dir=""
model_dir=""
for arg in "$@"; do
  case "${arg}" in
    --data_dir=*) data_dir="${arg#--data_dir=}" ;;
    --model_dir=*) model_dir="${arg#--model_dir=}" ;;
  esac
done

if [ -z "${data_dir}" ]; then
  # The demo: 32 train images (8 of them labeled, 8 others held out as the dev
  # split, evaluated at step 0 and every save_steps), 8 val, 32 extra; the
  # unlabeled pool is the 32 train and the 32 extra images. Each step: 4
  # labeled crops + 4 unlabeled originals + their 4 RandAugment views.
  case "${DEMO:-short}" in
    short)
      # Expected: dev mIoU 0.006 at step 0, 0.21, 0.30, 0.42, then 0.51 at
      # step 200 (chance is about 0.05); val mIoU 0.53. The whole script
      # takes 3.8 CPU-minutes (228 CPU-s measured: training and evaluation
      # about 3, export under 1), so under 4 minutes even on one core.
      height=64 width=128 unet_filters=8 train_steps=200 save_steps=50
      learning_rate=0.1 tflite=float32,int8 compare_images=4 suffix="" ;;
    long)
      # Expected: dev mIoU from 0.002 at step 0 to about 0.67, val mIoU about
      # 0.73; about 15 CPU-minutes (10-15 minutes on 2 cores).
      height=128 width=256 unet_filters=16 train_steps=400 save_steps=100
      learning_rate=0.05 tflite=float32,float16,int8 compare_images=8 suffix=_long ;;
    *)
      echo "run_cityscapes.sh: DEMO=${DEMO} is invalid: expected short (default) or long." >&2
      exit 2 ;;
  esac
  model_name=unet
  demo_data=data/fake_cityscapes_${height}x${width}
  model_dir=${model_dir:-ckpt/${task_name}_${model_name}_demo${suffix}}
  export_dir=${model_dir}/export
  if [ ! -d "${demo_data}/gtFine" ]; then
    python -m uda_tf.data.fake_cityscapes \
      --output_dir=${demo_data} \
      --num_train=32 \
      --num_val=8 \
      --num_extra=32 \
      --height=${height} \
      --width=${width} \
      --seed=0
  fi
  python -m uda_tf.main \
    --use_tpu=False \
    --do_train=True \
    --do_eval=True \
    --task_name=${task_name} \
    --data_dir=${demo_data} \
    --model_dir=${model_dir} \
    --model_name=${model_name} \
    --unet_depth=3 \
    --unet_filters=${unet_filters} \
    --sup_size=8 \
    --dev_size=8 \
    --use_train_extra=True \
    --unsup_ratio=1 \
    --uda_confidence_thresh=0.5 \
    --uda_softmax_temp=0.9 \
    --crop_height=${height} \
    --crop_width=${width} \
    --min_scale=0.75 \
    --max_scale=1.5 \
    --train_batch_size=4 \
    --eval_batch_size=4 \
    --train_steps=${train_steps} \
    --save_steps=${save_steps} \
    --iterations=25 \
    --learning_rate=${learning_rate} \
    --weight_decay_rate=1e-4 \
    --moving_average_decay=0.99 \
    --num_vis_images=4 \
    "$@"
  python -m uda_tf.export \
    --model_dir=${model_dir} \
    --export_dir=${export_dir} \
    --tflite=${tflite} \
    --compare_images=${compare_images}
  echo
  echo "Demo done. Outputs:"
  echo "  generated data:          ${demo_data}"
  echo "  FLAGS.json, checkpoints: ${model_dir}"
  echo "  dev mIoU along training: ${model_dir}/dev_results.txt (step mIoU: $(awk '{printf "%s%d %.3f", (NR>1 ? ", " : ""), $1, $2}' ${model_dir}/dev_results.txt); chance is about 0.05)"
  echo "  mIoU, per-class IoU:     ${model_dir}/results.txt ($(grep mean_iou ${model_dir}/results.txt))"
  echo "  training log (CSV):      ${model_dir}/training_log.csv"
  echo "  TensorBoard:             tensorboard --logdir=${model_dir}"
  echo "  colourised predictions:  ${model_dir}/predictions"
  echo "  SavedModel and TFLite:   ${export_dir}"
  exit 0
fi

# Cityscapes: DeepLabv3+ ResNet-50 (pass --backbone_weights=<ImageNet .h5>),
# 512x1024 crops, labeled batch 8 + 8 original + 8 augmented unlabeled
# images per step (mixed precision; about 24 GB of GPU memory).
# Expected mIoU (val): not yet measured with this code; compare each size with
# the same command plus --unsup_ratio=0 (results.txt in each model_dir).
model_name=deeplabv3plus
for sup_size in 186 372 744 1488; do
  python -m uda_tf.main \
    --use_tpu=False \
    --do_train=True \
    --do_eval=True \
    --task_name=${task_name} \
    --model_name=${model_name} \
    --backbone=resnet50 \
    --output_stride=16 \
    --sup_size=${sup_size} \
    --unsup_ratio=1 \
    --use_train_extra=False \
    --train_batch_size=8 \
    --eval_batch_size=2 \
    --crop_height=512 \
    --crop_width=1024 \
    --train_steps=40000 \
    --save_steps=2000 \
    --iterations=100 \
    --learning_rate=0.01 \
    --weight_decay_rate=1e-4 \
    --uda_confidence_thresh=0.8 \
    --uda_softmax_temp=0.4 \
    --mixed_precision=True \
    --model_dir=ckpt/${task_name}_${model_name}_${sup_size} \
    "$@"
done
