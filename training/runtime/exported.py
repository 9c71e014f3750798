"""Models trained elsewhere, served from `torch.export` programs: `NAME.pt2` beside a `NAME.json` sidecar.

The program is the network only; the sidecar says what it is (family, data shape and range, the
family's sampler configuration from `training/sampling/sampler_config.py`). Each family's program has one
signature, and an adapter turns it into the module every sampler of this project already calls:

    ebm   x [B, *shape] -> energy [B]        (x, y [B] -> energy [B] when data.classes is given; y = -1: none)
    gan   z [B, latent_dim] -> x [B, *shape]
    flow  z [B, *shape] -> (x [B, *shape], log p(x) [B])   samples and bits/dim from one pass
          companion NAME.forward.pt2: x [B, *shape] -> (z [B, *shape], log|det dz/dx| [B])   scores of given data
          companion NAME.dequantizer.pt2 (data.dequantization "variational"): (x [B, *shape], eps [B, *shape]) ->
              (u [B, *shape] in [0, 1], log q(u | x) [B])   the variational bound of given data's bits/dim
    flow with sampler.solver (a CNF)  v(x [B, *shape], t [B]) -> v [B, *shape]   (x, t, y [B] with data.classes)

log p is in nats over the data space as data.range states it; bits/dim count bins (high - low) / data.levels wide
(docs/exporting.md, "Units of log p and bits/dim").

Loading runs no code from the file, whatever its bytes. `torch.export.load` is never called: it unpickles
payloads marked `use_pickle`, custom and opaque objects, legacy `model.pt` records and, when weights-only
loading fails, the sample inputs; and an archive its reader refuses is read again, through Python's
zipfile, as the pre-2.8 format, whose `serialized_*.pt` it unpickles with `weights_only=False`. Instead
`read_program` hands the bytes to `training/runtime/pt2_archive.py` (the one reader of the file: a strict zip
parse, bounded sizes, only raw tensor records, inert shape expressions; its docstring lists exactly what
is refused), builds each tensor from its vetted raw bytes, and passes the graph JSON and those tensors to
torch's current-format deserializer (no sample inputs: they are never loaded). After that every
operator must be an ATen or prims operator, a symbolic-shape operator or a control-flow higher-order
operator, and the inputs plain positional tensors. Running the program (the probe below, then sampling)
does what its graph says: its ATen operators may allocate what their arguments ask.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch._export.serde import schema
from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
from torch.export.passes import move_to_device_pass

from training.families import family_stating
from training.families.base import Signature
from training.runtime.checkpoint import CheckpointError, ModelConfig, first_line, read_model_file
from training.runtime.loaded import LoadedModel
from training.runtime.pt2_archive import TensorRecord, VettedArchive, check_archive
from training.runtime.pt2_graph import check_operators
from training.runtime.pt2_zip import MAX_ARCHIVE_BYTES
from training.runtime.stated import StatedData, check_stated, parse_json
from training.sampling.sampler_config import sampler_for

PROGRAM_SUFFIX = ".pt2"
SIDECAR_SUFFIX = ".json"
# Companion programs `NAME.<role>.pt2` beside `NAME.pt2`: read, checked and swapped with it as one bundle; each family
# says which roles it takes (Family.companion_roles) and what it does with them (Family.program_module).
# A GAN's critic (DDLS, scores); a flow's data -> noise direction; a flow's variational dequantizer q(u | x).
COMPANION_ROLES = ("critic", "forward", "dequantizer")
FAMILIES = ("ebm", "gan", "flow")  # the families whose programs are served (each with its family's signature)
SIDECAR_KEYS = ("family", "data", "sampler", "ensemble", "metrics")
DATA_KEYS = tuple(StatedData.model_fields)  # shape, range, classes, dataset, levels, dequantization(_samples)
EXPORTED_ARCH = {"name": "torch.export", "kwargs": {}}
MIN_BATCH = 4096  # a program must take batches at least this large (a server steps up to its chain budget at once)

# --- reading: vetted records -> an ExportedProgram -----------------------------------------------------------


def _tensors(archive: VettedArchive, declared: list[TensorRecord]) -> dict[str, torch.Tensor]:
    """Each declared weight or constant as a view of a copy of its record's raw bytes (views that share a
    record share one storage, as torch.export.save found them); parameters as nn.Parameter."""
    storages: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for tensor in declared:
        storage = storages.get(tensor.record)
        if storage is None:
            data = archive.records[tensor.record]
            storage = (
                torch.frombuffer(bytearray(data), dtype=tensor.dtype)
                if len(data)
                else torch.empty(0, dtype=tensor.dtype)
            )
            storages[tensor.record] = storage
        view = torch.as_strided(storage, tensor.sizes, tensor.strides, tensor.storage_offset)
        if tensor.is_param:
            tensors[tensor.fqn] = nn.Parameter(view, requires_grad=tensor.requires_grad)
        else:
            tensors[tensor.fqn] = view.requires_grad_(tensor.requires_grad) if tensor.requires_grad else view
    return tensors


def companion_role(name: str) -> str | None:
    """The role of a companion file name (`NAME.critic.pt2` -> "critic"); None for a model's own program."""
    for role in COMPANION_ROLES:
        if name.endswith(f".{role}{PROGRAM_SUFFIX}") and len(name) > len(role) + len(PROGRAM_SUFFIX) + 1:
            return role
    return None


def companion_paths(program: Path) -> dict[str, Path]:
    """The companion files a program may have beside it, by role (present or not)."""
    return {role: program.with_name(f"{program.stem}.{role}{PROGRAM_SUFFIX}") for role in COMPANION_ROLES}


# torch's deserializer keeps the program being read in a module global (_CURRENT_DESERIALIZER): two programs read at
# once (a load abandoned at model_load_timeout_s still reading while the next model loads) refused the second with
# "_CURRENT_DESERIALIZER is already set". One program is deserialized at a time.
_DESERIALIZING = threading.Lock()


def read_program(payload: bytes | bytearray | memoryview, source: str) -> torch.export.ExportedProgram:
    """The ExportedProgram in a `.pt2` archive's bytes: vetted by `check_archive`, then deserialized from
    the vetted JSON and raw tensor bytes by torch's current-format deserializer; no legacy fallback and no
    unpickling on any path."""
    archive = check_archive(payload, source)
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, archive.graph)
        with _DESERIALIZING:
            program = ExportedProgramDeserializer().deserialize(
                serialized, _tensors(archive, archive.weights), _tensors(archive, archive.constants), None
            )
    except Exception as error:  # a graph of the right strings but the wrong structure, or tensors it does not take
        raise CheckpointError(f"{source}: the program cannot be deserialized ({first_line(error)})") from error
    check_operators(program, source)
    return program


# --- the sidecar ---------------------------------------------------------------------------------------


MAX_SIDECAR_BYTES = 1024 * 1024  # a sidecar is a few hundred bytes of JSON; its metrics are bounded too


def read_sidecar(path: Path) -> ModelConfig:
    """NAME.json read through the checked reader (a regular file inside its folder, at most MAX_SIDECAR_BYTES),
    then parsed by `parse_sidecar`."""
    if not os.path.lexists(path):
        raise CheckpointError(
            f"{path.name} is missing: an exported program is served with a JSON sidecar such as "
            '{"family": "ebm", "data": {"shape": [1, 28, 28], "range": [-1.0, 1.0]}, "sampler": {}}'
        )
    return parse_sidecar(read_model_file(path, path.parent, MAX_SIDECAR_BYTES), path)


def parse_sidecar(payload: bytes, path: Path) -> ModelConfig:
    """The ModelConfig an exported program is served with, from the bytes of NAME.json as the checked reader
    read them (never the path again): family, data, sampler (the family's typed sampler configuration; unknown
    keys refused), and optionally ensemble and metrics, checked by the schema checkpoints are checked by
    (training/runtime/stated.py `check_stated`), plus what only a program's sidecar must say."""
    source = path.name
    raw = parse_json(payload, source)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source} must hold a JSON object with {', '.join(SIDECAR_KEYS[:3])}")
    unknown = sorted(set(raw) - set(SIDECAR_KEYS))
    if unknown:
        raise CheckpointError(f"{source}: unknown keys {unknown}; known: {', '.join(SIDECAR_KEYS)}")
    family = raw.get("family")
    if family not in FAMILIES:
        raise CheckpointError(f"{source}: family must be one of {', '.join(FAMILIES)}, not {family!r}")
    data, sampler, metrics = raw.get("data"), raw.get("sampler", {}), raw.get("metrics", {})
    ensemble = raw.get("ensemble")
    if not isinstance(data, dict) or "shape" not in data:
        raise CheckpointError(f'{source}: data must be an object with a "shape", e.g. {{"shape": [1, 28, 28]}}')
    config = {
        "family": family, "arch": EXPORTED_ARCH, "data": data, "sampler": sampler, "metrics": metrics,
        "ensemble": ensemble,
    }  # fmt: skip
    check_stated(config, source)
    family_stating(family, sampler).check_sidecar(data, sampler, source)
    return ModelConfig(
        family=family,
        arch=dict(EXPORTED_ARCH),
        data=data,
        sampler=sampler,
        training={"exported": path.with_suffix(PROGRAM_SUFFIX).name},
        metrics=metrics,
        ensemble=ensemble,
    )


# --- loading ---------------------------------------------------------------------------------------------


def _user_inputs(program: torch.export.ExportedProgram) -> list[torch.Tensor]:
    inputs = set(program.graph_signature.user_inputs)
    return [node.meta["val"] for node in program.graph.nodes if node.op == "placeholder" and node.name in inputs]


def _check_signature(
    program: torch.export.ExportedProgram, config: ModelConfig, source: str, expected: Signature
) -> None:
    """The program takes the positional tensors `expected` (its family's signature, or a companion's), of the
    sidecar's shapes after a dynamic batch dimension that admits at least MIN_BATCH."""
    family, classes = config.family, config.data.get("classes")
    inputs = _user_inputs(program)
    plain = pytree.tree_structure((tuple(torch.zeros(0) for _ in expected), {}))
    if program.call_spec.in_spec != plain or len(inputs) != len(expected):
        wanted = ", ".join(f"{name} {[None, *size]}" for name, size in expected)
        raise CheckpointError(
            f"{source}: a {family} program takes {wanted} as positional tensors"
            f"{' (data.classes makes the energy conditional)' if classes else ''}; this one takes "
            f"{len(inputs)} inputs in the structure {program.call_spec.in_spec}"
        )
    for (name, size), value in zip(expected, inputs, strict=True):
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: input {name} is not a tensor")
        if [int(dim) for dim in value.shape[1:]] != size:
            raise CheckpointError(
                f"{source}: input {name} is [B, {', '.join(map(str, value.shape[1:]))}]; the sidecar makes it "
                f"[B, {', '.join(map(str, size))}]"
            )
        batch = value.shape[0] if value.dim() else None
        if not isinstance(batch, torch.SymInt):
            raise CheckpointError(
                f"{source}: the batch dimension of input {name} is fixed at {batch}; export with "
                'dynamic_shapes={"' + name + '": {0: torch.export.Dim("batch")}} so any number of chains fits'
            )
        bounds = program.range_constraints.get(batch.node.expr)
        if bounds is not None and bounds.upper < MIN_BATCH:
            raise CheckpointError(
                f"{source}: the batch dimension of input {name} stops at {bounds.upper}; the server batches up "
                f"to {MIN_BATCH} (export with Dim('batch') and no max, or max >= {MIN_BATCH})"
            )


def probe(model: LoadedModel, batches: tuple[int, ...] = (2, 1, 3)) -> None:
    """Run the module as the samplers will, on small batches, as its family probes it (output shapes and finite
    values; an energy's gradient in x on the first batch); then the other batch sizes (the batch dimension
    really is dynamic)."""
    family = family_stating(model.config.family, model.config.sampler)
    for batch in batches:
        try:
            family.probe_program(model, batch, batch == batches[0])
        except CheckpointError:
            raise
        except Exception as error:
            what = "the probe batch" if batch == batches[0] else f"a batch of {batch} (is the batch dimension dynamic?)"
            raise CheckpointError(f"{model.name}: the program fails on {what}: {first_line(error)}") from error


def load_exported(
    path: str | Path,
    device: torch.device | str = "cpu",
    payload: bytes | None = None,
    sidecar: bytes | None = None,
    companions: Mapping[str, bytes] | None = None,
) -> LoadedModel:
    """A `NAME.pt2` program, its `NAME.json` sidecar and its companions `NAME.<role>.pt2` as a LoadedModel every
    sampler, pool and command takes; CheckpointError with the reason when any of them cannot be served. `payload`,
    `sidecar` and `companions` are the bytes the checked reader read (training/runtime/load.py `read_model_files`);
    left out (None), they are read here by that reader."""
    path = Path(path)
    if (role := companion_role(path.name)) is not None:
        owner = path.with_name(path.name.removesuffix(f".{role}{PROGRAM_SUFFIX}") + PROGRAM_SUFFIX)
        missing = "" if os.path.lexists(owner) else ", which is not there"
        raise CheckpointError(f"{path.name} is the {role} program of {owner.name}{missing}; it is served with it")
    sidecar_path = path.with_suffix(SIDECAR_SUFFIX)
    config = read_sidecar(sidecar_path) if sidecar is None else parse_sidecar(sidecar, sidecar_path)
    if payload is None:
        payload = read_model_file(path, path.parent, MAX_ARCHIVE_BYTES)
    if companions is None:
        companions = read_companions(path, path.parent, MAX_ARCHIVE_BYTES)
    family = family_stating(config.family, config.sampler)
    unlifted = _runnable(payload, path.name, config, device, family.signature(config))
    parts: dict[str, nn.Module] = {}
    for role, data in sorted(companions.items()):
        name = f"{path.stem}.{role}{PROGRAM_SUFFIX}"
        if role not in family.companion_roles:
            takes = ", ".join(family.companion_roles) or "none"
            raise CheckpointError(
                f"{name}: {config.family} programs take no {role} program beside them (companions they take: {takes})"
            )
        parts[role] = _runnable(data, name, config, device, family.companion_signature(config, role))
    sampler = sampler_for(config.family, config.sampler)
    built = family.program_module(unlifted, config, sampler, parts)
    model = LoadedModel(
        name=path.stem, config=config, module=built.module.eval(), sampler=sampler, extras=built.extras,
        critic=built.critic,
    )  # fmt: skip
    probe(model)
    return model


def read_companions(path: Path, folder: Path, max_bytes: int) -> dict[str, bytes]:
    """The bytes of each companion file present beside program `path`, each read once by the checked reader."""
    return {
        role: read_model_file(companion, folder, max_bytes)
        for role, companion in companion_paths(path).items()
        if os.path.lexists(companion)
    }


def _runnable(
    payload: bytes, source: str, config: ModelConfig, device: torch.device | str, expected: Signature
) -> nn.Module:
    """One program's bytes as a module that runs on `device`: read without running code, its inputs checked
    against `expected`."""
    program = read_program(payload, source)
    try:
        _check_signature(program, config, source, expected)
    except CheckpointError:
        raise
    except Exception as error:  # a deserialized graph whose signature or call graph torch cannot read back
        raise CheckpointError(f"{source}: the program's inputs cannot be read ({first_line(error)})") from error
    device = torch.device(device)
    if device.type != "cpu":
        program = move_to_device_pass(program, device)
    try:
        return program.module()
    except Exception as error:
        raise CheckpointError(f"{source}: the program cannot be run ({first_line(error)})") from error
