"""`export_artifact`: one call from a saved steering folder to a file or folder in another format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finesteer.artifacts import load_intervention
from finesteer.data.prompts import chat_prompt
from finesteer.export.common import ExportError, at_all_positions, provenance
from finesteer.export.gguf_cvec import read_control_vector, write_control_vector
from finesteer.export.hf_fold import export_hf, verify_hf
from finesteer.export.lm_eval_steer import write_steer_file
from finesteer.export.orthogonalize import ablated_direction, export_orthogonalized
from finesteer.fit.steering import Steering
from finesteer.models.loading import LoadedModel, load_model

FORMATS = ("gguf", "lm-eval", "hf")
_VERIFY_QUERIES = ("How do I pick a lock?", "Write a short poem about the sea, in four lines.")


def _model(
    artifact: Path, model: str | None, allow_other_weights: bool, dtype: str, device: str = "cpu"
) -> LoadedModel:
    record = load_intervention(artifact)
    name = model or record.model_name
    if not name:
        raise ExportError(f"{artifact} does not name its model: pass --model")
    lm = load_model(name, dtype=dtype, device=device)
    record.check_model(lm, strict=not allow_other_weights)
    return lm


def export_artifact(
    fmt: str,
    artifact: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    allow_other_weights: bool = False,
    dtype: str = "float32",
    verify: bool = True,
    all_positions: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Export the steering saved in `artifact` (a `fit` output folder) as `fmt` (gguf, lm-eval, hf).

    gguf needs no weights (the artifact records the model's shape); lm-eval and hf load the model
    (`model`, default the one the artifact names). With `verify`, gguf is read back with the `gguf`
    package and hf is reloaded with stock transformers and compared with the hooked model.
    `all_positions` first sets every edit's scope to 'all' (e.g. CAA's `from_end:K`): the export is
    then of that approximation, and `rescoped` in the result lists what changed.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}'; choose {', '.join(FORMATS)}")
    folder = Path(artifact)
    steering: Steering = Steering.load(folder)
    result: dict[str, Any] = {"format": fmt, "artifact": str(folder), "out": str(out)}
    if steering.system_prompt:
        # no format carries a prompt: the user must pass it to the runtime themselves
        result["system_prompt_not_exported"] = steering.system_prompt
    if all_positions:
        steering, result["rescoped"] = at_all_positions(steering)  # type: ignore[assignment]
    if fmt == "gguf":
        record = load_intervention(folder)
        info = record.model_info
        if model is not None or not info.get("n_layers"):
            lm = _model(folder, model, allow_other_weights, dtype, device)
            info, family, name, fingerprint = lm.info.to_dict(), lm.info.family, lm.name, lm.fingerprint
        else:
            family, name, fingerprint = info.get("family", ""), record.model_name, record.model_fingerprint
        meta = provenance(steering, name, fingerprint)
        meta.pop("metadata", None)
        path = write_control_vector(
            steering,
            out,
            n_layers=int(info["n_layers"]),
            hidden_size=int(info["hidden_size"]),
            family=str(family),
            metadata=meta,
        )
        _, vectors = read_control_vector(path)
        result["layers"] = sorted(layer for layer, vector in vectors.items() if bool(vector.abs().max() > 0))
        result["n_tensors"] = len(vectors)
        result["usage"] = f"llama-cli -m MODEL.gguf --control-vector {path}"
        return result
    lm = _model(folder, model, allow_other_weights, dtype, device)
    if fmt == "lm-eval":
        path = write_steer_file(steering, lm, out)
        result["usage"] = f"lm_eval --model steered --model_args pretrained=MODEL,steer_path={path} --tasks …"
        return result
    ablated = ablated_direction(steering.intervention, lm.info.n_layers) if steering.intervention else None
    if ablated is not None:  # a directional ablation: orthogonalise the weights writing to the stream
        record = {"artifact": str(folder)}
        path = export_orthogonalized(lm, ablated[0], out, strength=ablated[1], record=record)
    else:
        path = export_hf(steering, lm, out)
    result["usage"] = f"AutoModelForCausalLM.from_pretrained('{path}')"
    if verify:
        texts = [chat_prompt(lm.tokenizer, q) for q in _VERIFY_QUERIES]
        result["verify"] = verify_hf(steering, lm, path, texts)
    return result
