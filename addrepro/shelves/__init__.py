"""The shelf science: the atlas of exact shelf levels, shelf detection in curves, loss spikes."""
