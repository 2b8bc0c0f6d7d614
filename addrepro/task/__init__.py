"""The task: the addition problem, its tokens, carries, batch streams and conditioned evaluation sets."""
