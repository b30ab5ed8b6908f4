"""Model loading, embedded models, architecture adapters and neuron sites."""

from neuroshield.models.adapters import (
    ArchitectureAdapter,
    AttentionGeometry,
    UnsupportedArchitectureError,
    adapter_for,
    register_adapter,
    supported_model_types,
)
from neuroshield.models.hooks import site_hooks
from neuroshield.models.loading import LoadedModel, ModelLoadError, config_hash, dtype_name, load_model
from neuroshield.models.sites import SITE_KINDS, Site, SiteKind, count_parameters, resolve_sites
from neuroshield.models import vlm  # noqa: E402,F401 - registers the vision-language adapters (after loading)
from neuroshield.models.vlm import encode_prompt, encode_record, model_inputs

__all__ = [
    "dtype_name",
    "ArchitectureAdapter", "AttentionGeometry", "UnsupportedArchitectureError", "adapter_for", "register_adapter",
    "supported_model_types", "site_hooks", "LoadedModel", "ModelLoadError", "config_hash", "load_model",
    "SITE_KINDS", "Site", "SiteKind", "count_parameters", "resolve_sites", "encode_prompt", "encode_record",
    "model_inputs",
]
