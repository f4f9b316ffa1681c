"""The binary trainer: data, models, binarisation, weight methods, the loop, checkpoints.

Plain PyTorch (+ pydantic for configs); imports neither Ray nor MLflow. The package itself
imports no torch, so its configs (`bnew_core.config`) serve a sweep's planning without it:
`from bnew_core.train import train` for the loop."""
