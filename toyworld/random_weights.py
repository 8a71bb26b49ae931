"""Full-size models with random weights: each family's real architecture (the config
skeletons in assets/skeletons) for the tests' real-size lane and bench/realsize.py, where
memory, time, key layouts and dtypes matter and the weights' values do not.

    random_pipeline(family, dtype)   the family's pipeline, every part at full size
    skeleton_component(skeleton, c)  one part from its config (bench/gpu.py saves them)
    weighted_components(skeleton)    the parts that hold weights
"""
from __future__ import annotations


def fill_random(module, dtype) -> None:
    """Weights ~ U(-a, a), a = sqrt(3 / fan_in): variance 1/fan_in, as N(0, 1/fan_in), drawn
    in place (3x cheaper than randn, scale and copy: 1.0 s against 3.3 s per 1e8 values
    here), norms 1, biases 0; built on the meta device and filled in `dtype`, so no
    full-precision copy of SDXL's 3.5B parameters ever lives in memory."""
    import torch

    module.to_empty(device="cpu")
    module.to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                bound = (3 / p[0].numel()) ** 0.5
                p.uniform_(-bound, bound, generator=generator)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if name.endswith("position_ids"):  # CLIP's token positions: a buffer, not a weight
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
            elif b.is_floating_point():
                b.zero_()


def weighted_components(skeleton) -> list[str]:
    """The parts of the skeleton's pipeline that hold weights (UNet or transformer, VAE, text
    encoders), as its model_index.json names them."""
    import json

    index = json.loads((skeleton / "model_index.json").read_text(encoding="utf-8"))
    return [name for name, value in sorted(index.items())
            if isinstance(value, list) and value[0] in ("diffusers", "transformers")
            and (skeleton / name / "config.json").is_file()]


def skeleton_component(skeleton, component: str):
    """A pipeline part (a name of weighted_components) built from its config in the
    `skeleton` folder, with the framework's own initial weights, on the current torch.device
    (meta: no weights at all)."""
    import json

    import diffusers
    import transformers

    library, class_name = json.loads((skeleton / "model_index.json").read_text(encoding="utf-8"))[component]
    if library == "diffusers":
        cls = getattr(diffusers, class_name)
        return cls.from_config(cls.load_config(skeleton / component))
    config = transformers.AutoConfig.from_pretrained(skeleton / component)
    return getattr(transformers, config.architectures[0])(config)


def random_pipeline(family: str, dtype):
    """The family's full-size pipeline (assets/skeletons) with random weights in `dtype`."""
    import diffusers
    import torch

    from studio.models.families import get_family
    from studio.models.skeletons import skeleton_dir

    skeleton = skeleton_dir(family)
    parts = {}
    for component in weighted_components(skeleton):
        with torch.device("meta"):
            model = skeleton_component(skeleton, component)
        fill_random(model, dtype)
        parts[component] = model
    cls = getattr(diffusers, get_family(family).pipeline_classes[0])
    return cls.from_pretrained(skeleton, local_files_only=True, **parts, **get_family(family).pipeline_kwargs)
