"""The paper's maths: the target, the loss and their float32 rows (pure torch: no Ray, no I/O)."""
