"""Take a fitted steering to the runtimes people deploy.

- `gguf_cvec`: llama.cpp control vectors (`--control-vector FILE.gguf`) for residual-stream adds.
- `lm_eval_steer`: lm-evaluation-harness's `steered` model (`steer_path=FILE.pt`).
- `hf_fold`: a plain Hugging Face folder with a static edit folded into the weights as a bias.

Every format applies its edit at every token, so only static edits (scope 'all', all rows) export;
anything a format cannot express exactly is refused with an `ExportError` that says why.
"""

from finesteer.export.api import FORMATS, export_artifact
from finesteer.export.common import ExportError, intervention_of, static_edits
from finesteer.export.gguf_cvec import control_vectors, read_control_vector, write_control_vector
from finesteer.export.hf_fold import export_hf, folded_model, verify_hf
from finesteer.export.lm_eval_steer import hookpoint, steer_config, write_steer_file

__all__ = [
    "FORMATS",
    "ExportError",
    "control_vectors",
    "export_artifact",
    "export_hf",
    "folded_model",
    "hookpoint",
    "intervention_of",
    "read_control_vector",
    "static_edits",
    "steer_config",
    "verify_hf",
    "write_control_vector",
    "write_steer_file",
]
