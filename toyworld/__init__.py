"""The toy world the built-in model knows, and the tools around it (not part of the studio
package: tests, benchmarks and the built-in model's training use it).

    world.py             procedural pictures and captions: flat shapes on plain backgrounds
    evaluate.py          reads generated pictures back: colour, shape, background
    fidelity.py          what a LoRA teaches and keeps on the built-in model (bench, tests)
    builtin_training.py  trains the built-in model (`python -m toyworld.builtin_training`)
    random_weights.py    full-size SD 1.5 / SDXL pipelines with random weights (real-size tests, bench)
"""
