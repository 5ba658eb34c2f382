"""A user's own package: a model and a dataset that live outside harness/."""
