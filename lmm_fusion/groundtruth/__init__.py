"""Ground truth: the expert that defines the task, its messages in and out, and the one scorer."""
