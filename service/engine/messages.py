"""What travels between the HTTP side and the device worker: small typed classes, one direction each.

HTTP -> worker: a `SampleOrder` or a `ScoreOrder` (and the `Handle` it keeps, to cancel). Worker -> HTTP:
`Frame`s while chains run, then one `SampleResult` (a `ScoreResult`) or one of the errors below. No class
here imports torch at run time, so the scheduler (which holds handles) stays torch-free.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from service.catalogue.registry import ServedModel


class QueueFull(Exception):
    """The bounded queue is full: the caller should answer 503 with Retry-After."""


class CancelledByClient(Exception):
    """The client went away; nobody reads this result."""


class WorkerFailure(Exception):
    """A batch failed on the device (for example out of memory); only its requests see this."""


class ChainDiverged(Exception):
    """A request's own samples went non-finite: its chains (its settings were too wild for the model), or a
    generator's or flow's output for it; it alone ends, with a 422."""


class TooLarge(Exception):
    """A request whose chains could never fit the device budget, even alone (its reason names the limit): a 422."""


class DeadlinePassed(TimeoutError):
    """The request's deadline passed before its chains finished."""


class Handle:
    """What the HTTP side keeps of a submitted order: its deadline, and a way to cancel it from any thread."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # on the worker's clock
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Drop the order's chains at the worker's next step (harmless once it finished)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class SampleOrder:
    """What a client asked for, with every default already filled in from the checkpoint's sampler config.

    Every family reads model, n, seed and temperature; the Langevin fields are read by the pools of Langevin
    chains (an EBM's images, a GAN's latents under DDLS); a CNF's ODE chains read steps, label, guidance, init,
    the image and its mask, and trajectory_every.
    """

    model: ServedModel
    n: int
    seed: int
    temperature: float  # an EBM's gradient is divided by it; a CNF's prior (a GAN's latent, a flow's base) scaled
    steps: int = 1  # Langevin steps (a GAN's DDLS steps: 0 for its plain pass), a CNF's solver steps; 1: one pass
    step_size: float = 0.0
    noise: float = 0.0
    momentum: float = 0.0
    init: str = "noise"  # "buffer" | "noise" | "image"
    label: int | None = None  # class index for a class-conditional energy or CNF; None: its sampler's unlabelled rule
    guidance: float = 1.0  # labelled chains: E(x) + guidance (E(x, y) - E(x)); a CNF's v likewise
    tolerance: float = 0.0  # a chain stops once its RMS move in a step is below this; 0: every chain runs `steps`
    trajectory_every: int | None = None
    max_frames: int | None = None  # flows: an iterative inverse (i-ResNet) is thinned to this many frames
    start_image: torch.Tensor | None = None  # [*shape] in the data range, for init "image"
    free_mask: torch.Tensor | None = None  # [*shape] bool: True where chains may move (inpainting)


@dataclass
class Frame:
    """One kept trajectory state, streamed as the worker makes it."""

    step: int
    steps: int  # the steps this request runs (a flow's: the states of its inverse)
    x: torch.Tensor  # [n, *shape] on the CPU
    energy: torch.Tensor | None  # [n] (EBMs and DDLS past step 0; a CNF's ODE chains have none)
    stopped: list[int] = field(default_factory=list)  # chains (indices) that arrived before this step and stopped

    @property
    def nbytes(self) -> int:
        """The memory holding this frame takes."""
        return self.x.nbytes + (0 if self.energy is None else self.energy.nbytes)


@dataclass
class SampleResult:
    samples: torch.Tensor  # [n, *shape] on the CPU, in the data range
    steps: int  # steps actually run (a flow's trajectory: the states of its inverse)
    queue_seconds: float
    run_seconds: float
    energy: torch.Tensor | None = None  # [n] energy at each chain's last step (EBMs)
    bits_per_dim: torch.Tensor | None = None  # [n] flows: -log2 p(sample) per dimension, 256 levels
    frames: list[torch.Tensor] = field(default_factory=list)  # trajectory [n, H, W, C] uint8 pixels, at frame_steps
    frame_steps: list[int] = field(default_factory=list)
    chain_steps: list[int] | None = None  # steps each chain ran (EBMs; fewer than `steps` where a chain stopped)


@dataclass
class ScoreOrder:
    """Images to score (POST /score): decoded exactly, checked against the model, labels filled in."""

    model: ServedModel
    images: torch.Tensor  # [n, *shape] on the CPU, in the data range
    labels: torch.Tensor | None = None  # [n] class per image (conditional energies and CNFs); None: unconditional

    @property
    def n(self) -> int:
        return len(self.images)


@dataclass
class ScoreResult:
    scores: dict[str, torch.Tensor]  # score name -> [n] per image, on the CPU (training/sampling/scoring.py)
    queue_seconds: float
    run_seconds: float
    likelihood: dict | None = None  # a CNF's: the solver, tolerances and trace estimator its solves used


Order = SampleOrder | ScoreOrder  # what the worker takes
Deliver = Callable[["SampleResult | ScoreResult | BaseException"], None]  # called once, from the worker thread
FrameSink = Callable[[Frame], None]  # called from the worker thread at every kept frame (streaming)
