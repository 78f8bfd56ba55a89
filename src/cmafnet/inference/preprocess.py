"""The run's evaluation preprocessing for inference (stain normalisation, resize, mean/std)."""

from __future__ import annotations

import torch
from torch import nn

from cmafnet.data.transforms import GPUPreprocess
from cmafnet.errors import RunFolderError
from cmafnet.run import LoadedRun


class _Restained(nn.Sequential):
    """A stain normaliser in front of the run's preprocessing (which then normalises no stain):
    uint8 ``(B, 3, H, W)`` -> float ``(B, 3, S, S)``."""

    @property
    def last_fallback(self) -> torch.Tensor | None:
        return self[0].last_fallback


def build_preprocess(run: LoadedRun, device: torch.device, stain: str = "run") -> tuple[nn.Module, str]:
    """The run's evaluation preprocessing: uint8 ``(B, 3, H, W)`` -> normalised float at ``img_size``.

    ``GPUPreprocess(train=False)`` (Macenko with the run's stain reference when the run trained with
    it, resize, mean/std). ``stain`` (``--stain-norm``) replaces the stain step: ``none``,
    ``macenko`` (the run's reference, else the standard H&E one) or ``reinhard`` (the LAB statistics
    of the run's training patches). Returns the module and a short description for the outputs.
    """
    cfg = run.config
    ref = run.meta.get("stain_reference")
    trained_with = cfg.data.stain.enabled
    on = trained_with if stain == "run" else stain == "macenko"
    data_cfg = cfg.data.model_copy(update={"stain": cfg.data.stain.model_copy(update={"enabled": on})})
    pre = GPUPreprocess(data_cfg, cfg.model.img_size, train=False, stain_reference=ref).to(device).eval()
    trained = "as in training" if trained_with else "not in training"
    if stain == "reinhard":
        from cmafnet.data.reinhard import ReinhardNormalizer

        stats = run.meta.get("reinhard_reference")
        if stats is None:
            raise RunFolderError(f"--stain-norm reinhard: {run.path}/run.json has no reinhard_reference "
                                 "(its training patches held too little tissue to measure)")  # fmt: skip
        desc = f"Reinhard to the run's training patches ({stats.get('source')}; {trained})"
        return _Restained(ReinhardNormalizer.from_dict(stats).to(device), pre).eval(), desc
    if not on:
        return pre, f"no stain normalisation ({'as in training' if not trained_with else 'switched off'})"
    what = (
        f"the run's stain reference ({ref.get('source', 'run.json')})"
        if ref
        else "the standard H&E reference"
    )
    return pre, f"Macenko with {what} ({trained})"
