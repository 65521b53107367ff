"""Write the served weights as a Hugging Face ``BertForMaskedLM`` checkpoint folder.

Upstream Geneformer (``perturber_utils.load_model("Pretrained", ...)``) loads a folder with
``BertForMaskedLM.from_pretrained``: ``config.json`` + ``model.safetensors``. The encoder weights are
the ones every exported encoder was traced from; the masked-LM head (not used by the served encoders,
needed by ``BertForMaskedLM``) is the loaded model's own. The gene dictionaries are copied beside them
so the folder is also a valid ``gftriton export --model DIR`` input.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from geneformer_triton.model.loading import LoadedGeneformer

LOGGER = logging.getLogger(__name__)


def save_checkpoint(loaded: LoadedGeneformer, folder: str | Path) -> Path:
    """Save ``loaded`` (fp32, eval) as ``folder/config.json`` + ``folder/model.safetensors`` (+ dictionaries)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(folder, safe_serialization=True)
    if loaded.vocabulary is not None:
        loaded.vocabulary.save(folder)
    (folder / "gftriton_checkpoint.json").write_text(json.dumps(
        {"model_name": loaded.name, "weights_source": loaded.source, "weights_sha256": loaded.weights_sha256,
         "random_weights": loaded.random_weights}, indent=2) + "\n")
    LOGGER.info("wrote checkpoint %s (BertForMaskedLM, %s)", folder, loaded.name)
    return folder
