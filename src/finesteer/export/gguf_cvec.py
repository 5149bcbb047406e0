"""llama.cpp control vectors: residual-stream vectors as a GGUF file for `--control-vector`.

The file is what llama.cpp's `cvector-generator` writes and `common_control_vector_load` reads:
architecture `controlvector`, `controlvector.model_hint` (the llama.cpp architecture name),
`controlvector.layer_count`, and one 1-D float32 tensor `direction.{il}` per layer il = 1 … n_layers − 1,
added by llama.cpp to the residual stream at the output of layer il (0-based) at every token, × the
strength given with `--control-vector-scaled` (1 with `--control-vector`). llama.cpp keeps no vector
for layer 0 (`direction.0` is an error), so an edit after block 0 cannot be exported.

A finesteer edit maps exactly when it adds a vector to the residual stream at every position:
`Add` at `resid_post` of layer L ≥ 1 → `direction.L`, or at `resid_pre` of layer L ≥ 2 (the same
tensor as `resid_post` of L − 1). Head-level edits (`hook_z`, `hook_q`), attention/MLP outputs and
the other ops are not residual-stream vectors and are refused with the format that can take them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from finesteer.export.common import ExportError, intervention_of, static_edits
from finesteer.fit.steering import Steering
from finesteer.interventions.edit import Intervention
from finesteer.interventions.ops import Add

TARGET = "llama.cpp control vector"
ARCH = "controlvector"

# HF `model_type` → llama.cpp architecture name (the model hint; llama.cpp converts Mistral as llama).
LLAMA_CPP_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "olmo2": "olmo2",
    "granite": "granite",
}


def control_vectors(intervention: Intervention, n_layers: int, hidden_size: int) -> dict[int, Tensor]:
    """llama.cpp layer index → the float32 vector added at its output (summed over edits)."""
    directions: dict[int, Tensor] = {}
    for edit in static_edits(intervention, TARGET):
        site = edit.site
        if site.head is not None or site.component in ("z", "q"):
            raise ExportError(
                f"{TARGET}: {site} is a head-level edit, not a residual-stream vector (llama.cpp adds "
                "control vectors to the residual stream after a layer); export it with `finesteer export "
                "hf` (folded into o_proj's bias) or `finesteer export lm-eval`"
            )
        if site.component not in ("resid_post", "resid_pre"):
            raise ExportError(
                f"{TARGET}: {site} is not the residual stream (llama.cpp adds control vectors after a "
                "layer); export it with `finesteer export lm-eval` or `finesteer export hf`"
            )
        if not isinstance(edit.op, Add):
            raise ExportError(
                f"{TARGET}: the edit at {site} is '{edit.op.kind}'; a control vector can only add a vector"
            )
        layer = site.layer if site.component == "resid_post" else site.layer - 1
        if layer < 1:
            raise ExportError(
                f"{TARGET}: {site} is the residual stream after layer {layer}; llama.cpp has no control "
                "vector for layer 0 (its `direction.N` tensors start at N = 1): steer a later layer"
            )
        vector = edit.op.scale * edit.op.vector.detach().to(torch.float32).cpu()
        if vector.shape[0] != hidden_size:
            raise ExportError(
                f"{TARGET}: the vector at {site} has {vector.shape[0]} values, not {hidden_size}"
            )
        directions[layer] = directions.get(layer, torch.zeros(hidden_size)) + vector
    return directions


def write_control_vector(
    steering: Steering | Intervention,
    path: str | Path,
    *,
    n_layers: int,
    hidden_size: int,
    family: str = "",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the GGUF control vector; every layer 1 … n_layers − 1 gets a tensor (zeros where unedited).

    `family` is the HF model type (llama, qwen2 …), written as llama.cpp's model hint.
    """
    import gguf

    directions = control_vectors(intervention_of(steering, TARGET), n_layers, hidden_size)
    out = Path(path)
    if out.suffix != ".gguf":
        raise ExportError(f"{TARGET}: the output file must end in .gguf, got {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), ARCH)
    writer.add_string(f"{ARCH}.model_hint", LLAMA_CPP_ARCH.get(family, family))
    writer.add_int32(f"{ARCH}.layer_count", n_layers - 1)
    for key, value in (metadata or {}).items():
        writer.add_string(f"{ARCH}.finesteer.{key}", str(value))
    for layer in range(1, n_layers):
        vector = directions.get(layer, torch.zeros(hidden_size))
        writer.add_tensor(f"direction.{layer}", vector.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def read_control_vector(path: str | Path) -> tuple[dict[str, Any], dict[int, Tensor]]:
    """Read a control-vector GGUF back with the `gguf` package: (string/int metadata, layer → vector).

    Checks what llama.cpp's loader checks: tensor names `direction.N` with N ≥ 1, float32, 1-D, one width.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents() if hasattr(field, "contents") else field.parts[field.data[0]]
        meta[name] = value
    vectors: dict[int, Tensor] = {}
    width = None
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit() or int(index) < 1:
            raise ExportError(f"{path}: tensor '{tensor.name}' is not direction.N with N ≥ 1")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise ExportError(f"{path}: tensor '{tensor.name}' is not a 1-D float32 vector")
        if width is not None and int(tensor.shape[0]) != width:
            raise ExportError(f"{path}: tensor '{tensor.name}' has another width than the others")
        width = int(tensor.shape[0])
        vectors[int(index)] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    return meta, vectors
