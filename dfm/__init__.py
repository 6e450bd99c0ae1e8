"""dfm core: the discrete flow matching view of autoregressive generation, mixing and routing.

Tensors in, tensors out; depends on torch and einops only.
"""

from dfm.decode import DecodeConfig, DecodeResult, StepOutput, decode_step, generate
from dfm.errors import DfmError
from dfm.loss import dfm_loss
from dfm.mixing import exclude_log_weights, mix_log_probs, normalize_log_weights, top_k_log_weights
from dfm.path import ARPath, check_velocity
from dfm.pool import ExpertPool, Weigher
from dfm.posterior import BayesPosterior, bayes_log_posterior
from dfm.routing import Routing, Selection, parse_routing, select_experts
from dfm.sampling import filter_log_probs, sample_tokens

__all__ = [
    "ARPath", "BayesPosterior", "DecodeConfig", "DecodeResult", "DfmError", "ExpertPool", "Routing",
    "Selection", "StepOutput", "Weigher", "bayes_log_posterior", "check_velocity", "decode_step",
    "dfm_loss", "exclude_log_weights", "filter_log_probs", "generate", "mix_log_probs",
    "normalize_log_weights", "parse_routing", "sample_tokens", "select_experts", "top_k_log_weights",
]
