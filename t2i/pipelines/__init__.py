"""Pipelines: composition only (encode -> sample with a guided denoiser -> decode)."""

from .sd3 import PRESETS as SD3_PRESETS
from .sd3 import SD3Pipeline, SD3Preset
