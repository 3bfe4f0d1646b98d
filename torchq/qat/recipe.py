"""A recipe's `qat:` section: fine-tune the calibrated model by distillation, then export it."""

from __future__ import annotations

import itertools
import time

from .config import QATConfig
from .distill import DistillReport, distill
from .prepare import prepare_qat


def fine_tune(recipe, model, float_model, calibration_batches, args, kwargs, log) -> tuple[float, DistillReport]:
    """prepare_qat + distill as the recipe's qat section says; returns (seconds, report)."""
    from ..recipes import call_user, resolve_import

    q = recipe.spec.qat
    t = time.perf_counter()
    config = QATConfig(
        learn_ranges=q.learn_ranges, learn_weight_scales=q.learn_weight_scales, steps=q.steps, lr=q.lr, scale_lr=q.scale_lr,
        distillation=q.distillation, eval_every=q.eval_every, dynamo=recipe.spec.export.exporter == "dynamo",
    )
    if q.loader is not None:
        at = recipe.origin("qat.loader")
        batches = call_user(resolve_import(q.loader, "qat.loader", at), "qat.loader", at, kwargs_at=recipe.origin("qat.kwargs"), **q.kwargs)
    else:
        batches = calibration_batches
    data = list(itertools.islice(batches, q.num_batches))
    log(f"QAT: distilling to the float model for {q.steps} steps on {len(data)} batches ({max(1, len(data) // 5)} held back)")
    prepare_qat(model, config, example_inputs=args, kwargs=kwargs or None)
    report = distill(model, float_model, data, config=config)
    log(f"QAT: held-back distance {report.start:.4g} -> {report.best:.4g} (best at step {report.best_step} of {report.steps})")
    return time.perf_counter() - t, report
