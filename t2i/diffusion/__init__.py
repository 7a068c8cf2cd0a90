"""The diffusion core: noise paths, parameterisations, objectives, samplers, guidance and conditioning.

Model-agnostic and rank-generic: it works on images ``[B, C, H, W]`` and on embedding vectors ``[B, D]``.
"""

from t2i.nn.noise import Seeds, randn_like

from .conditioning import LowresAugment, SelfConditioning, gaussian_blur, self_conditioned_for_training
from .ddpm import DDPM_VARIANCES, ddpm_step, forward_transition
from .guidance import (
    SkipLayerGuidance,
    check_guidance_interval,
    classifier_free_guidance,
    dynamic_threshold,
    static_threshold,
    step_interval_to_time,
)
from .inpaint import sample_repaint
from .objectives import DenoisingObjective, flow_matching_objective, loss_weight
from .parameterization import (
    PREDICTIONS,
    Denoiser,
    EpsDenoiser,
    FlowDenoiser,
    VDenoiser,
    X0Denoiser,
    join_variance,
    prediction_target,
    split_variance,
    x0_from_prediction,
)
from .paths import NoisePath, RectifiedFlow, VPPath, append_dims
from .samplers import (
    SAMPLERS,
    check_sampler,
    check_sampling_setting,
    get_sampler,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2m_ve,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from .tiling import TiledDenoiser
from .timesteps import TIME_SAMPLERS, LogitNormalTime, ModeTime, UniformTime, make_time_sampler
