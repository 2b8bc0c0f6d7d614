"""Training: the config schema, the LightningModule, its callbacks, ensemble packing and job planning."""
