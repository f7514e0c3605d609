"""`python -m uda_tf.export`: see `uda_tf.export.cli`."""

from absl import app

from uda_tf.export import cli

if __name__ == "__main__":
    cli.define_flags()
    app.run(cli.main)
