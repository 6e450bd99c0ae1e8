"""The name under which a Hugging Face model's forward takes its KV cache.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns and goes in 5.40);
older releases of the supported range, and models not yet moved, know only ``past_key_values``.
"""

from __future__ import annotations

import functools
import inspect

from transformers import Cache, PreTrainedModel


@functools.cache
def _argument_of(forward_class: type) -> str:
    parameters = inspect.signature(forward_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: PreTrainedModel, cache: Cache) -> dict[str, Cache]:
    """``{name: cache}`` for ``model(**inputs, **cache_kwargs(model, cache))``."""
    return {_argument_of(type(model)): cache}
