"""The kernels behind :mod:`rdml_dist.divergence`: the closed-form passes of the mimicry gradients (:mod:`.mimicry`)
and the compiled Rényi step (:mod:`.native`, over the extension built from ``renyi_passes.c`` at install)."""
