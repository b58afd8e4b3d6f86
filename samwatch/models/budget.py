"""What a job plans to hold, against ``limits.max_job_memory``: batch sizes shrink to fit it, and a
job that cannot fit even one prompt (or point) at a time is refused before it allocates.

The plan counts what grows with a batch: the mask decoder's activations per prompt, and the
masks each prompt gives (prompt jobs: float32 at the image's size, with the copies SAM's
postprocessing makes; automask: low-res logits, as masks reach image pixels one at a time within
their box, models/mask_windows.py). It leaves out what does not depend on the job's choices: the
loaded model and the image encoder's run (both part of the daemon's level with the model loaded).
Figures: bench/bench_memory.py.
"""

from __future__ import annotations

from samwatch.errors import JobError

MiB = 1 << 20
#: Mask decoder working memory per prompt at SAM's 64×64 embedding (its 4× upscaling to 256×256
#: with 32 channels, and the transformer's per-prompt copy of the embedding), and per call;
#: measured for vit_t on 1024², ONNX Runtime (1 prompt: 54 MiB, 16: 396, 64: 1297) and eager PyTorch
#: (1: 59, 16: 517, 64: 1864: 29 MiB a prompt), rounded up to the larger.
DECODER_BYTES_PER_PROMPT = 30 * MiB
DECODER_BYTES_PER_CALL = 32 * MiB
#: Low-res logits of one mask (256 × 256 float32).
LOW_RES_MASK_BYTES = 256 * 256 * 4
#: Full-size float32 copies of each mask SAM's postprocessing holds at once (the upsampled
#: logits, the cut-out of the padding, the resize to the image, the threshold).
POSTPROCESS_COPIES = 3
#: One mask's window at image pixels (logits, the steps of its upsampling, the thresholds), at most.
WINDOW_COPIES = 4


def fit_batch(requested: int, *, per_item: int, fixed: int, budget: int | None, what: str, hint: str) -> int:
    """``requested``, or the largest batch whose ``fixed + batch × per_item`` bytes fit ``budget``;
    JobError ``job_memory_exceeded`` when not even one item fits. ``what`` names an item."""
    if budget is None:
        return requested
    if fixed + per_item > budget:
        raise JobError(
            "job_memory_exceeded",
            f"This job would hold about {(fixed + per_item) / MiB:.0f} MiB even one {what} at a time, more than "
            f"limits.max_job_memory ({budget / MiB:.0f} MiB); {hint}, or raise limits.max_job_memory.",
            field="limits.max_job_memory", planned_bytes=fixed + per_item, max_job_memory=budget,
        )
    return max(1, min(requested, (budget - fixed) // per_item))


def prompt_batch(requested: int, image_hw: tuple[int, int], masks_per_prompt: int, budget: int | None) -> int:
    """Prompts decoded at once on an image of ``image_hw``."""
    pixels = image_hw[0] * image_hw[1]
    return fit_batch(
        requested, per_item=DECODER_BYTES_PER_PROMPT + masks_per_prompt * pixels * 4 * POSTPROCESS_COPIES,
        fixed=DECODER_BYTES_PER_CALL, budget=budget, what="prompt",
        hint="use a smaller tiling.tile_size (prompts are decoded in windows of that size) or Single Mask",
    )


def automask_batch(requested: int, crop_pixels: int, masks_per_point: int, budget: int | None) -> int:
    """Automask points decoded at once, for crops of up to ``crop_pixels``."""
    return fit_batch(
        requested, per_item=DECODER_BYTES_PER_PROMPT + masks_per_point * LOW_RES_MASK_BYTES,
        fixed=DECODER_BYTES_PER_CALL + WINDOW_COPIES * 4 * crop_pixels, budget=budget, what="point",
        hint="use a smaller tiling.tile_size (automask runs tile by tile)",
    )
