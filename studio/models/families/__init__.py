"""Model families, one module each (sd15.py, sdxl.py): everything family-specific as data plus
a few hooks (studio.models.families.family.Family). A new family is one module and one entry in
FAMILIES (registry.py). Families are stored by name ("sd15", "sdxl") in configs, metadata and files."""
from __future__ import annotations

from studio.models.families.family import Family, GpuGuide, Part, SingleFileEncoder
from studio.models.families.registry import (BUILTIN, DEFAULT, FAMILIES, UNSUPPORTED, all_prefixes,
                                             family_from_diffusers_keys, family_from_metadata,
                                             family_from_pipeline_class, family_from_prefixes,
                                             family_from_unet_names, family_of_pipeline, get_family)

__all__ = ["BUILTIN", "DEFAULT", "FAMILIES", "Family", "GpuGuide", "Part", "SingleFileEncoder", "UNSUPPORTED",
           "all_prefixes", "family_from_diffusers_keys", "family_from_metadata", "family_from_pipeline_class",
           "family_from_prefixes", "family_from_unet_names", "family_of_pipeline", "get_family"]
