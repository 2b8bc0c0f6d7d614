"""addrepro: train small transformers on n-digit addition and study their per-place loss shelves."""
