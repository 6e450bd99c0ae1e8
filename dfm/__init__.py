"""dfm core: discrete flow matching paths (autoregressive and masked), their losses and samplers, mixing and routing.

Tensors in, tensors out; depends on torch only.
"""

from dfm.decode import DecodeConfig, DecodeResult, StepOutput, decode_step, generate
from dfm.errors import DfmError
from dfm.loss import dfm_loss, masked_dfm_loss, masked_elbo
from dfm.masked_path import MaskedPath
from dfm.masked_sampler import euler_sample
from dfm.mixing import exclude_log_weights, mix_log_probs, normalize_log_weights, top_k_log_weights
from dfm.path import ARPath, ProbPath, check_velocity
from dfm.pool import ExpertPool, Weigher
from dfm.posterior import BayesPosterior, bayes_log_posterior
from dfm.routing import Routing, Selection, parse_routing, select_experts
from dfm.sampling import filter_log_probs, sample_tokens
from dfm.schedulers import CosineScheduler, PolynomialScheduler, scheduler

__all__ = [
    "ARPath",
    "ProbPath",
    "BayesPosterior",
    "CosineScheduler",
    "DecodeConfig",
    "DecodeResult",
    "DfmError",
    "ExpertPool",
    "MaskedPath",
    "PolynomialScheduler",
    "Routing",
    "Selection",
    "StepOutput",
    "Weigher",
    "bayes_log_posterior",
    "check_velocity",
    "decode_step",
    "dfm_loss",
    "euler_sample",
    "exclude_log_weights",
    "filter_log_probs",
    "generate",
    "masked_dfm_loss",
    "masked_elbo",
    "mix_log_probs",
    "normalize_log_weights",
    "parse_routing",
    "sample_tokens",
    "scheduler",
    "select_experts",
    "top_k_log_weights",
]
