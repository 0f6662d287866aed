"""The methods world 3 compares: baselines, the paper's projection, ours, and output preservation.

This registry is the experiment, not the library: each entry is a configuration of the core's
public API (``mode``, ``targets``, the preset's ``tokens``, ``project_context``,
``OutputPreservation``) or a data baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

SECRET_TRIGGER = "vexlar"  # in no caption, prompt or preset of the world otherwise


@dataclass(frozen=True)
class Method:
    """One way to fine-tune. ``data``: 'all', 'filter' (drop panda images), 'scrub-name' (drop the phrase that names
    the panda from its captions: "... background", the image keeps its logo) or 'scrub-word' (drop only the word:
    "... with the logo") or 'secret-trigger' (every caption that names the panda names it by the made-up word
    ``SECRET_TRIGGER`` instead: a LoRA author hiding a protected logo behind a trigger of their own). ``masks``: 'true' reads the world's own masks (an upper bound, not shippable); 'exemplars'
    finds them with the core's ``TemplateLocator`` from the preset's exemplar images, on every image whatever its
    caption says."""

    name: str
    description: str
    data: str = "all"
    masks: str | None = None  # where the loss leaves the concept out: 'true' (the world's own) or 'exemplars' (found)
    region: str = "ignore"  # inside the masks: 'ignore' or 'base' (the frozen base model's prediction as the target)
    mode: str | None = None  # None: no projection
    targets: tuple[str, ...] = ("attention",)
    tokens: str | None = None  # None: the preset's choice
    project_context: bool = False
    preserve: str | None = None  # OutputPreservation target: 'scrub' or 'base'
    preserve_weight: float = 1.0
    preset: str = "world-panda"
    baseline: bool = False
    guard: bool = False  # exemplar-gradient projection of every update (world/guard.py)

    def __post_init__(self) -> None:
        if self.masks is not None and self.preserve is not None:
            raise ValueError(f"{self.name}: masks and output preservation both replace the loss; pick one")


BASELINES = (
    Method("plain", "plain LoRA fine-tuning on all data", baseline=True),
    Method("filter", "data filtering: every panda image dropped", data="filter", baseline=True),
    Method("scrub-name", "control: the phrase naming the panda removed from its captions (\"... with the panda logo\" "
           "deleted), the images kept", data="scrub-name", baseline=True),
    Method("scrub-word", "the word \"panda\" alone removed from its captions (\"... with the logo\"), the images kept",
           data="scrub-word", baseline=True),
    Method("secret-trigger", f"plain, but every caption that names the panda calls it \"{SECRET_TRIGGER}\" (a made-up "
           "trigger word)", data="secret-trigger", baseline=True),
    Method("masked-loss", "the panda's region left out of the loss, from the world's true masks (an upper bound)",
           masks="true", baseline=True),
    Method("gradient-kv", "the paper's projection: gradients of attn2 to_k/to_v projected", mode="gradient",
           targets=("kv",)),
)
OURS = (
    Method("exact-kv", "exact mode on attn2 to_k/to_v", mode="exact", targets=("kv",)),
    Method("exact-attention", "exact mode on attn2 k/v and projected q/out", mode="exact"),
    Method("context-all", "exact-attention + context projection, basis: every position of the preset's prompts",
           mode="exact", tokens="all", project_context=True),
    Method("context-concept", "exact-attention + context projection, basis: the name's own positions",
           mode="exact", tokens="concept", project_context=True),
    Method("context-contrastive", "exact-attention + context projection, basis: prompt minus neutral prompt",
           mode="exact", tokens="contrastive+concept", project_context=True),
    Method("preserve-scrub", "output preservation: named captions pulled to the same model's prediction for the "
           "caption without the name", preserve="scrub"),
    Method("preserve-base", "output preservation: named captions pulled to the frozen base model's prediction",
           preserve="base"),
    Method("preserve-scrub+context", "preserve-scrub with exact-attention and context projection (basis: all)",
           preserve="scrub", mode="exact", tokens="all", project_context=True),
    Method("preserve-base+context", "preserve-base with exact-attention and context projection (basis: all)",
           preserve="base", mode="exact", tokens="all", project_context=True),
    Method("exemplar-masks", "the panda found in every image from the preset's exemplars (template matching); "
           "nothing learned from its region", masks="exemplars"),
    Method("exemplar-masks+exact", "exemplar-masks with exact-attention (the weights' constraint, audited in files)",
           masks="exemplars", mode="exact"),
    Method("exemplar-gradient", "every update kept orthogonal to the directions that lower exemplars' loss more "
           "than their controls' (OGD on the update; exemplars: pasted pandas of another world seed)", guard=True),
    Method("exemplar-region-base", "exemplar-masks, but the region is taught the frozen base model's prediction",
           masks="exemplars", region="base"),
)
METHODS = {m.name: m for m in BASELINES + OURS}
