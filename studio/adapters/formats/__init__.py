"""Adapter file formats: kohya / LyCORIS (what A1111, Forge, ComfyUI and CivitAI use),
diffusers and peft, for SD 1.5 and SDXL; and the bridge to peft adapters in memory.

    modules.py   one adapted layer in file terms (LoRA / LoCon, LoHa, LoKr, DoRA): parsing,
                 checking, and the exact weight-delta formulas of A1111 / ComfyUI
    naming.py    kohya names <-> diffusers / transformers module paths (SDXL UNet names in
                 the LDM layout via studio.models.single_file), sd-scripts' target-module rule
    peft_bridge.py  peft layers -> modules (export), modules -> peft layers (attach)
    files.py     reading and writing files, metadata, A1111's hashes, metadata editing;
                 a method's own layout (T-LoRA's) is read by the method, which
                 studio.adapters.load_adapter passes in (the formats import no method)
    header_keys.py  the header entries that mark the studio's own layouts (a method's,
                 a mixture's), torch-free for the methods that studio.config lists

`studio.adapters` is the public face; import from there.

Layout decisions (see the docstrings where they are implemented):

- alpha: the file's `alpha` always gives the scale the loaders apply (alpha / rank), so
  it is whatever reproduces peft's scale exactly: `lora_alpha` for plain LoRA, and
  `lora_alpha * sqrt(r)` for rsLoRA (peft scales by lora_alpha / sqrt(r)). Stored as
  float32 whatever the save precision, so fp16 files keep the exact scale.
- LoKr: LyCORIS loaders scale by alpha / rank of the decomposed factor, and by 1 when
  both Kronecker factors are full matrices; peft always scales by alpha / r. With a
  decomposed factor the file alpha is peft's alpha (both factors have rank r); with two
  full factors peft's scale is multiplied into `lokr_w1` and no alpha is written.
- DoRA: see `modules.py` (`dora_merge`): `dora_scale` is written with shape [out, 1] (or
  [out, 1, 1, 1] for convs), the output-axis layout that ComfyUI and Forge select by
  `dora_scale.shape[0] == out`, with values chosen so that *their* formula reproduces
  peft's DoRA exactly.
"""
