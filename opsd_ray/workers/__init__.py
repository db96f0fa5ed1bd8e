"""The workers of a run (Ray actors, or called in process): rollout, scoring, learner, and the engines."""
