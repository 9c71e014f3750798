"""What every model family answers: the one interface the CLI, the server, export and evaluate ask instead of
branching on a family's name (k-diffusion's shape: the model type is chosen once, then every caller sees one
interface).

A family owns what differs between kinds of model: its typed sampler config, the request fields it reads and
its refusals of the others, how it draws (the server's pool kind, the CLI's draw), how it scores (its row of
training/sampling/scoring.py's SCORE_FAMILIES), its export signature, how it is described, and which evaluate
figures and record keys it has. The defaults here are a one-pass sampler's: no chains, no labels, no steps.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.runtime.checkpoint import Checkpoint, CheckpointError, ModelConfig
from training.runtime.loaded import LoadedModel
from training.sampling.langevin import StepCallback
from training.sampling.replay_buffer import ReplayBuffer
from training.sampling.sampler_config import SamplerConfig, to_dict

WeightGroup = tuple[str, dict[str, Any], dict[str, torch.Tensor]]  # (what, its arch, its tensors)
Signature = list[tuple[str, list[int]]]  # an exported program's positional inputs: (name, size after the batch)


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """How a family's module is traced by torch.export: the wrapper, example inputs, their dynamic dimensions,
    and what the sidecar says beyond the checkpoint's own data and sampler."""

    wrapper: nn.Module
    example: tuple[torch.Tensor, ...]
    dynamic: dict[str, Any]
    data_dropped: tuple[str, ...] = ()
    sampler_set: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_set: dict[str, Any] = dataclasses.field(default_factory=dict)  # data keys stated beyond the checkpoint's
    sampler_dropped: tuple[str, ...] = ()  # checkpoint-only keys a program's sidecar does not state (a GAN's weights)
    companions: dict[str, ExportPlan] = dataclasses.field(default_factory=dict)  # role -> NAME.<role>.pt2's plan


@dataclasses.dataclass(frozen=True)
class DrawRequest:
    """One draw's arguments, built once by training/families/__init__.py `draw_samples` (which says what each
    means); each family reads the fields it uses, so a new argument touches this class and its reader only."""

    seeds: torch.Tensor  # [B]
    steps: int | None = None
    init: str | None = None
    generator: torch.Generator | None = None
    callback: StepCallback | None = None
    labels: torch.Tensor | None = None
    buffer: ReplayBuffer | None = None
    chain_steps: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32


@dataclasses.dataclass(frozen=True)
class ProgramParts:
    """What a family builds from an exported program and its companions: the module its sampler calls, the
    extras it starts with, and a critic served beside it (a GAN's, for DDLS and scores)."""

    module: nn.Module
    extras: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    critic: nn.Module | None = None


class Family:
    """One kind of model. Subclasses set the class attributes and override what their kind does differently."""

    name: str  # what the CLI, the server and the tests call it: "ebm", "gan", "flow", "cnf"
    stated: str  # the `family` its checkpoints and sidecars state (a CNF's say "flow")
    sampler_type: type[SamplerConfig]
    pool: str  # the server's pool kind that runs its requests: "langevin" | "ode" | "one_pass"
    readers: str = ""  # how a refusal names the models that read `fields` ("EBMs"); "" if it reads none
    fields: tuple[str, ...] = ()  # the request fields beyond the common ones and temperature it may read
    keeps_buffers = False  # replay buffers, ensembles and --state-dir (energies)
    exact_log_det = False  # a flow, whose log-det is exact: what evaluate's refusals of log-det flags say of it
    likelihood = ""  # evaluate's test likelihood figures: "" none | "exact" (one pass) | "ode" (a CNF's solve)
    starts_from_images = False  # whether a request's uploaded image (and mask) start its chains (init "image")
    companion_roles: tuple[str, ...] = ()  # the companion programs NAME.<role>.pt2 it takes (exported.COMPANION_ROLES)

    # --- what it is ----------------------------------------------------------------------------------------

    def describe(self, model: LoadedModel) -> str:
        """How a refusal names the model's kind: 'EBM', 'CNF sampled by its ODE', ..."""
        raise NotImplementedError

    def score_kind(self, model: LoadedModel) -> str:
        """Its key of scoring.SCORE_FAMILIES; ValueError (the reason) where it cannot score an image."""
        raise ValueError(f"{model.name} is a {self.stated} model; scores exist for EBMs, flows and GANs with a critic")

    def shown_sampler(self, model: LoadedModel) -> dict[str, Any]:
        """Its sampler settings as GET /models shows them: those that apply to it as served."""
        return to_dict(model.sampler)

    # --- loading -------------------------------------------------------------------------------------------

    def served_weights(self, checkpoint: Checkpoint, sampler: SamplerConfig) -> dict[str, torch.Tensor]:
        """The tensors its module is built with."""
        return checkpoint.weights

    def weight_groups(self, checkpoint: Checkpoint) -> list[WeightGroup]:
        """Every group of tensors a file holds for an architecture, checked against it before anything is built."""
        return [("weights", checkpoint.config.arch, checkpoint.weights)]

    def critic(self, checkpoint: Checkpoint) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """A critic's arch and weights served beside the module (a GAN's, for DDLS); None for none."""
        return None

    def owns(self, model: LoadedModel) -> bool:
        """Whether a model of its stated family is this family's (families sharing one stated name are asked in
        turn: training/families/__init__.py `family_of`)."""
        return True

    def states(self, sampler: dict[str, Any]) -> bool:
        """Whether a sidecar of its stated family with this `sampler` is this family's (families sharing a stated
        name are asked in turn: training/families/__init__.py `family_stating`)."""
        return True

    def test_likelihood(self, model: LoadedModel) -> str:
        """Its `likelihood` for this model: "" where the model cannot give one (an exported flow without its
        data-to-noise program)."""
        return self.likelihood

    def check_loaded(self, model: LoadedModel) -> None:
        """CheckpointError where a built model cannot serve what its config says (before the probe)."""

    def probe_steps(self, model: LoadedModel) -> int:
        """The steps of the one probe draw every file passes before it is served: as a request would draw."""
        return 1

    # --- exported programs ---------------------------------------------------------------------------------

    def signature(self, config: ModelConfig) -> Signature:
        """Its program's positional inputs (the export signature)."""
        raise NotImplementedError

    def check_sidecar(self, data: dict[str, Any], sampler: dict[str, Any], source: str) -> None:
        """CheckpointError for what a sidecar of this family must say and does not (its schema is checked)."""
        if data.get("classes") is not None:
            raise CheckpointError(f"{source}: data.classes: only energies (family ebm) are class-conditional")

    def companion_signature(self, config: ModelConfig, role: str) -> Signature:
        """The positional inputs of its companion program of `role` (one of `companion_roles`)."""
        raise NotImplementedError

    def program_module(
        self, program: nn.Module, config: ModelConfig, sampler: SamplerConfig, companions: dict[str, nn.Module]
    ) -> ProgramParts:
        """A loaded program (and its companions, by role: only roles in `companion_roles`) as what it serves."""
        raise NotImplementedError

    def probe_program(self, model: LoadedModel, batch: int, first: bool) -> None:
        """Run a loaded program's module on a batch of `batch` as its sampler will; CheckpointError for outputs
        of the wrong shape or not finite (`first`: the first probe batch, where more is checked)."""
        raise NotImplementedError

    def export_plan(self, model: LoadedModel, batch: Any) -> ExportPlan:
        """How `python -m training export` traces it; ValueError where it cannot be exported."""
        raise ValueError(f"{model.name} is a {self.stated} model; only ebm, gan and flow models are exported")

    # --- drawing -------------------------------------------------------------------------------------------

    def draw(self, members: list[LoadedModel], request: DrawRequest) -> torch.Tensor:
        """Samples [B, *shape] in the data range, one per chain seed, as the server draws them."""
        raise NotImplementedError

    def chain_steps(self, model: LoadedModel, steps: int | None) -> int:
        """The steps each chain takes (at most) when `steps` (None: the default) are asked; 0 for one pass."""
        return 0

    def start_description(
        self, members: list[LoadedModel], init: str | None, buffer: ReplayBuffer | None, files: list[Path] | None
    ) -> str:
        """Where `sample` starts its chains or latents, said on every run."""
        raise NotImplementedError

    def override_sampler(self, members: list[LoadedModel], args: argparse.Namespace) -> None:
        """--step-size, --noise, --guidance and --tolerance replace the checkpoints' own for this command only;
        ValueError for those the family does not read."""
        raise NotImplementedError

    def _replace_sampler(self, members: list[LoadedModel], args: argparse.Namespace) -> None:
        asked = ("step_size", "noise", "guidance", "tolerance")
        changes = {key: getattr(args, key) for key in asked if getattr(args, key) is not None}
        for member in members if changes else []:
            member.sampler = dataclasses.replace(member.sampler_as(self.sampler_type), **changes)

    # --- the server's requests (plain values: training/ knows nothing of service/) ---------------------------

    def chain_fields(self, model: LoadedModel) -> tuple[str, ...]:
        """The request fields its chains read (guidance only where it is class-conditional)."""
        return tuple(name for name in self.fields if name != "label")

    def request_fields(self, model: LoadedModel) -> list[str]:
        """The request fields it reads beyond the common ones: temperature, a conditional model's label, its
        chains' fields."""
        conditional = model.classes is not None
        chain = [name for name in self.chain_fields(model) if conditional or name != "guidance"]
        return ["temperature", *(["label"] if conditional else []), *chain]

    def refused_apart(self, model: LoadedModel) -> tuple[str, ...]:
        """Fields it refuses with a message of its own (`refusals`) rather than 'applies to ...'."""
        return ()

    def refusals(self, body: Any, model: LoadedModel, name: str, has_buffer: bool) -> list[str]:
        """Why a request (service/schemas.py SampleRequest) does not fit the model served as `name` (with a
        replay buffer or not), beyond fields it does not read: one sentence each."""
        return []

    def requested_steps(self, model: LoadedModel, steps: int | None) -> int:
        """The steps a request's chains take (its `steps`, None: the default); 1 for one pass."""
        return 1

    def pools(self, model: LoadedModel) -> tuple[str, ...]:
        """The server's pool kinds its requests may run in, its own first; "ddls": a GAN's latent chains."""
        return (self.pool,)

    def pool_for(self, model: LoadedModel, steps: int) -> str:
        """The pool kind a request with `steps` runs in."""
        return self.pool

    def order_settings(
        self, model: LoadedModel, body: Any, steps: int, every: int | None, frames: tuple[bool, int]
    ) -> dict[str, Any]:
        """The sampler settings of a request's order beyond n, seed, temperature and steps: the request's where it
        gives them, the checkpoint's otherwise. `frames`: (whether frames are wanted, the most kept)."""
        wants_frames, max_frames = frames
        return {"trajectory_every": 1 if wants_frames else None, "max_frames": max_frames}

    def one_pass(
        self,
        model: LoadedModel,
        module: nn.Module,
        seeds: torch.Tensor,
        scale: torch.Tensor,
        device: torch.device,
        keep_states: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """A one-pass pool's batch of `module` (the model's, as the pool holds it) on `device`: images [B, *shape]
        (unclamped) from seeds [B] at temperatures [B, 1], the intermediate states if asked for, and bits/dim [B]
        where the same pass gives them."""
        raise NotImplementedError

    one_pass_name = ""  # what a one-pass pool's refusal calls its pass ("generator")

    # --- evaluate and the records it files ------------------------------------------------------------------

    def evaluates_labels(self, init: str | None) -> tuple[bool, bool]:
        """(whether evaluate draws asked-for labels, whether unlabelled chains draw their seeded class)."""
        return False, False

    def evaluate_key(self, init: str) -> str:
        """The metrics key `evaluate --record` files its figures under, before labels and noise name theirs."""
        return "evaluate"

    def chain_tolerance(self, model: LoadedModel) -> float:
        """The RMS move below which its chains stop early; 0: every chain runs its steps."""
        return 0.0

    def sampler_report(self, model: LoadedModel, args: argparse.Namespace, chain_steps: torch.Tensor | None) -> dict:
        """The sampler settings evaluate reports beside its figures."""
        return {"n": args.n}

    def record_key(self, key: str, model: LoadedModel, args: argparse.Namespace, report: dict) -> str:
        """`key` with what the family's own settings add to it (steps or guidance other than the defaults)."""
        return key

    def pinned(self, key: str, record: dict[str, Any]) -> set[str]:
        """The sampler fields an evaluate record under `key` does not depend on the defaults for."""
        return set()

    def check_new_sampler(self, new: SamplerConfig, checkpoint: Checkpoint, source: str) -> None:
        """ValueError for new defaults `set-sampler` cannot give this checkpoint."""

    def rekeyed(self, key: str, record: dict[str, Any], new: SamplerConfig, changed: set[str]) -> str:
        """Where a kept evaluate record goes once the defaults change."""
        return key

    def evaluation_words(self, key: str, figures: dict[str, Any]) -> list[str]:
        """The `evaluate` flags that renew the record under `key` (the zoo's), beyond the files and --label."""
        return []
