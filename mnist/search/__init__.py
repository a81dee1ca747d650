"""Hyperparameter search with Optuna (search=optuna): the search space, read from Hydra's sweep overrides."""
