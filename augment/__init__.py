"""RandAugment as UDA samples it, applied jointly to images and masks."""
