"""The one list of model families, `FAMILIES` (name -> family), and the lookups: by name, and
the detectors that tell a pipeline's, a file's or a model's family. A new family is one module
and one entry in FAMILIES below."""
from __future__ import annotations

from typing import Any, Mapping

from studio.errors import StudioError
from studio.models.families import flux, sd15, sdxl
from studio.models.families.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (sd15.FAMILY, sdxl.FAMILY, flux.FAMILY)}
#: A file or model with nothing that says otherwise has SD 1.x's layout.
DEFAULT = sd15.FAMILY
#: The built-in tiny model has SD 1.x's architecture.
BUILTIN = sd15.FAMILY
#: The built-in tiny models by base-model name (assets/<name>) and their families.
BUILTIN_MODELS: dict[str, Family] = {"builtin": sd15.FAMILY, "builtin-flux": flux.FAMILY}
#: Families people have adapters for that the studio does not support, by metadata prefix.
UNSUPPORTED = {"Stable Diffusion 2.x": ("sd_v2", "stable-diffusion-v2")}

def get_family(name: str | None) -> Family:
    """The family of that name (the default for None)."""
    if name is None:
        return DEFAULT
    try:
        return FAMILIES[name]
    except KeyError:
        raise StudioError(f"Unknown model family {name!r}; known: {', '.join(FAMILIES)}.") from None


def family_of_pipeline(pipe: Any) -> Family:
    """The family whose denoiser and text encoders the pipeline has (all of them)."""
    for candidate in sorted(FAMILIES.values(), key=lambda f: -len(f.text_encoders)):
        if all(getattr(pipe, attr, None) is not None for attr in (candidate.denoiser, *candidate.text_encoders)):
            return candidate
    return DEFAULT


def family_from_pipeline_class(class_name: str) -> Family | None:
    return next((f for f in FAMILIES.values() if class_name in f.pipeline_classes), None)


def family_from_metadata(metadata: Mapping[str, str], source: str = "The file") -> Family | None:
    """The family an adapter's `ss_base_model_version` or `modelspec.architecture` names;
    StudioError for a family the studio does not support."""
    values = [str(metadata.get(key, "")).lower() for key in ("ss_base_model_version", "modelspec.architecture")]
    for value in values:
        found = next((f for f in FAMILIES.values() if value and f.means(value)), None)
        if found is not None:
            return found
    for label, prefixes in UNSUPPORTED.items():
        if any(value.startswith(prefixes) for value in values) or (
                metadata.get("ss_v2") == "True" and label == "Stable Diffusion 2.x"):
            raise StudioError(f"{source} is an adapter for {label}; only "
                              f"{' and '.join(f.label for f in FAMILIES.values())} are supported.")
    return None


def family_from_prefixes(prefixes: set[str], source: str = "The file") -> Family | None:
    """The one family whose kohya prefixes include all of `prefixes`, when the text-encoder
    prefixes tell (lora_unet alone does not); StudioError when no family has them all."""
    owners = [f for f in FAMILIES.values() if prefixes <= {x for p in f.parts for x in (p.prefix, *p.alias_prefixes)}]
    if not owners:
        raise StudioError(f"{source} mixes modules of different model families ({', '.join(sorted(prefixes))}).")
    return owners[0] if len(owners) == 1 else None


def family_from_unet_names(names: list[str]) -> Family:
    """The family whose UNet naming the kohya module names follow (LDM names or diffusers paths)."""
    for candidate in FAMILIES.values():
        if candidate.unet_name_hint is not None and any(candidate.unet_name_hint.match(n) for n in names):
            return candidate
    return DEFAULT


def family_from_diffusers_keys(attrs: set[str], paths: list[str]) -> Family | None:
    """The family a diffusers/peft adapter's model attributes or denoiser paths show, if any:
    the one family that has every model the file adapts, else the one of those whose paths
    only it has."""
    owners = [f for f in FAMILIES.values() if attrs <= {p.attr for p in f.parts}]
    if len(owners) == 1:
        return owners[0]
    for candidate in owners:
        if candidate.diffusers_path_hint is not None and any(candidate.diffusers_path_hint.search(p) for p in paths):
            return candidate
    return None


def all_prefixes() -> tuple[str, ...]:
    """Every kohya module-name prefix of every family (aliases too), longest first (lora_te1
    before lora_te)."""
    return tuple(sorted({prefix for f in FAMILIES.values() for p in f.parts for prefix in (p.prefix, *p.alias_prefixes)},
                        key=len, reverse=True))


def part_attrs() -> tuple[str, ...]:
    """Every pipeline attribute of an adaptable model of any family (unet, transformer, ...)."""
    return tuple(dict.fromkeys(p.attr for f in FAMILIES.values() for p in f.parts))
