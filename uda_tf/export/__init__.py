"""Export for serving: `serving` (the graph both formats share), `saved_model`
(TF Serving), `tflite` (LiteRT conversion and checks) and `cli`
(`python -m uda_tf.export`). Nothing here imports in a circle: serving imports
no sibling, saved_model and tflite import serving, cli imports them all.
"""
