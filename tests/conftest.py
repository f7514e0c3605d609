"""Test session setup: quiet TensorFlow, two logical CPUs for strategy tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf

# Two logical CPU devices, so MirroredStrategy tests can run two replicas on
# one machine. This must happen before any op runs, hence here.
_cpus = tf.config.list_physical_devices("CPU")
if _cpus and tf.config.get_logical_device_configuration(_cpus[0]) is None:
    tf.config.set_logical_device_configuration(
        _cpus[0],
        [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
    )
