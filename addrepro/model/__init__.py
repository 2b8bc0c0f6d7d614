"""The model: the stacked-weight transformer, its optimiser and its export to TransformerLens."""
