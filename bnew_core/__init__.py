"""The binary trainer: data, models, binarisation, weight methods, the loop, checkpoints.

Plain PyTorch (+ pydantic for configs); imports neither Ray nor MLflow.
"""

from .callbacks import Callback, Metrics, TrialResult
from .config import BnewError, TrialConfig, load_trial_config
from .train import train

__all__ = ["Callback", "Metrics", "TrialResult", "BnewError", "TrialConfig", "load_trial_config", "train"]
