"""A training run: the driver, the worker groups, the step's schedule, the run folder, faults, logs."""
