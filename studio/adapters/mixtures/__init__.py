"""Mixtures of adapters (MoLE / AutoLoRA / X-LoRA / LAG "arrow"): several frozen adapter
files weighted by gates, kept as one file that loads wherever an adapter loads.

- `file.py`: the mixture file (one .safetensors: members by data hash, gate kind and gate
  tensors), reading, writing, finding the members beside it.
- `gates.py`: the gate values, one torch module for the engine (no grad) and the trainer
  (gates learn): per member x LBW block, fixed, per timestep band, or from the prompt.
- `live.py`: gated member deltas added to layer outputs by forward hooks, per sample (what
  training differentiates) or per token ("arrow" routing, which no merge can express).

The engine turns a step- and prompt-independent gate into one LBW vector per member (the
existing block weights) and a banded gate into LBW vectors that change with the step
(the existing step schedule), so merged mixes stay exact and cost what a fused model costs.
"""
