"""The binary trainer: data, models, binarisation, weight methods, the loop, checkpoints.

Plain PyTorch (+ pydantic for configs); imports neither Ray nor MLflow.
"""

import os

# libgomp spin-waits by default: when another process holds one of the cores, a 2-thread CPU step
# ran 5-15x slower (measured 1.6-4 s instead of 0.24 s a step on a busy 2-core machine). Passive
# waiting removes that cliff. It only takes effect if torch is not imported yet (it is read when
# libgomp loads), so the trainer's entry points import bnew_core first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .callbacks import Callback, Metrics, TrialResult
from .config import BnewError, TrialConfig, load_trial_config
from .train import train

__all__ = ["Callback", "Metrics", "TrialResult", "BnewError", "TrialConfig", "load_trial_config", "train"]
