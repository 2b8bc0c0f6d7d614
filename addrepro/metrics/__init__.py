"""What is measured on a model: per-place loss and accuracy, naive-sum, carry-conditioned, confusion, grad norms."""
