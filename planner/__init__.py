"""EdgeFit's engine: pure Python + torch/optuna/numpy. Never imports Django or Celery."""
