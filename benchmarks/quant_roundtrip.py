"""Round-trip error of quantized FFN rows on the real models: quantize -> dequantize, per format.

    python benchmarks/quant_roundtrip.py [--models smollm2,gemma3-270m]

This is the error ``unpatch`` leaves after ``patch(..., weights="int8" | "int4")`` (the parameters
come back holding the dequantized values). Prints, per model and format, the relative RMS error over
all FFN weights and the largest error as a fraction of its 32-value block's largest magnitude.
"""

from __future__ import annotations

import argparse

import torch

from glass_kernels import models, quant
from glass_kernels.ffn.registry import find_ffn_sites
from glass_kernels.patch.quantized import wtype_of


def roundtrip_error(weights: list[torch.Tensor], wtype: str) -> tuple[float, float]:
    """(relative RMS error, max |error| / block max) of quantize -> dequantize over ``weights``."""
    err2 = ref2 = worst = 0.0
    for w in weights:
        w = w.detach().float()
        e = quant.dequantize(quant.quantize(w, wtype), wtype) - w
        err2 += float((e * e).sum())
        ref2 += float((w * w).sum())
        blocks = w.reshape(w.shape[0], -1, quant.BLOCK).abs().amax(-1, keepdim=True).clamp_min(1e-30)
        worst = max(worst, float((e.reshape(w.shape[0], -1, quant.BLOCK).abs() / blocks).max()))
    return (err2 / ref2) ** 0.5, worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    args = ap.parse_args(argv)
    print("| model | format | relative RMS error | max error / block max |\n|---|---|---|---|")
    for name in args.models.split(","):
        model, _ = models.load_model(name)
        weights = []
        for site in find_ffn_sites(model):  # neuron-major rows, as the quantized FFN stores them
            weights += [t.contiguous() for t in site.handler.weights(site.module) if isinstance(t, torch.Tensor)]
        for label in ("int8", "int4"):
            rms, worst = roundtrip_error(weights, wtype_of(label))
            print(f"| {name} | {label} ({wtype_of(label)}) | {100 * rms:.2f}% | {100 * worst:.2f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
