"""Training: typed configs, one generic loop with task plug-ins, EMA, optimisers, checkpoints, multi-process.

Import the pieces from their modules (``t2i.train.loop.Trainer``, ``t2i.train.config.load_config``); this package
file re-exports the common entry points and imports nothing heavy beyond torch.
"""

from .config import TrainConfig, load_config
from .ema import EMA, ema_decay
from .loop import Trainer, train
from .optim import LRSchedule, build_optimizer, lr_factor, param_groups
