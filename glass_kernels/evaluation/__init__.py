"""Quality evaluation and benchmark reports (issue 5).

* ``metrics``: KL, perplexity, top-1 agreement, Jaccard (token-weighted accumulators).
* ``data``: the prompt set (tune / held-out split) and the "text" calibration corpus.
* ``run``: the evaluation driver (dense continuations, teacher-forced scoring of every method).
* ``report``: results.json + report.md + plots; ``bench_report``: pytest-benchmark JSON -> report.
* ``cli``: ``python -m glass_kernels eval`` / ``bench``.

Submodules are imported on use (torch / transformers / matplotlib only when needed).
"""
