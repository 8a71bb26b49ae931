"""Model families, one module each (sd15.py, sdxl.py, flux.py): everything family-specific as
data plus a few hooks (studio.models.families.family.Family). A new family is one module and
one entry in FAMILIES (registry.py). Families are stored by name ("sd15", "sdxl", "flux") in
configs, metadata and files."""
from __future__ import annotations

from studio.models.families.family import BlockTable, Family, Part, Piece, ResourceGuide, SingleFileEncoder
from studio.models.families.registry import (BUILTIN, BUILTIN_MODELS, DEFAULT, FAMILIES, UNSUPPORTED, all_prefixes,
                                             family_from_diffusers_keys, family_from_metadata,
                                             family_from_pipeline_class, family_from_prefixes,
                                             family_from_unet_names, family_of_pipeline, get_family, part_attrs)

__all__ = ["BUILTIN", "BUILTIN_MODELS", "DEFAULT", "FAMILIES", "BlockTable", "Family", "Part", "Piece", "ResourceGuide",
           "SingleFileEncoder", "UNSUPPORTED", "all_prefixes", "family_from_diffusers_keys", "family_from_metadata",
           "family_from_pipeline_class", "family_from_prefixes", "family_from_unet_names", "family_of_pipeline",
           "get_family", "part_attrs"]
