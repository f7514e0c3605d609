"""absl flag definitions mirroring the original UDA's image/main.py."""
