"""Data: from files on disk to the training and evaluation batches.

cityscapes       the Cityscapes label tables (ids -> trainIds, names, palette)
decode           file checks and decoding of images and masks, label maps
base             `Source` (a tf.data source plus its counts) and the selection
                 of labeled and dev examples shared by every reader
folder           Cityscapes folders and simple image/label folders (CamVid)
tfrecord         TFRecords written by `preprocess`, and their reader
tfds_source      TensorFlow Datasets' cityscapes builder
sources          picks the reader for a config: labeled and unlabeled sources
streams          tf.data streams: crops, RandAugment views, batching
fake_cityscapes  a generated Cityscapes-format tree for tests and the demo
preprocess       `python -m uda_tf.data.preprocess`: folders -> TFRecords
"""
