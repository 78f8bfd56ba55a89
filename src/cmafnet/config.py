"""Typed, validated configuration.

A YAML file is validated into :class:`Config`. Unknown keys, wrong types and out-of-range values
raise :class:`~cmafnet.errors.ConfigError` with the full key path and, for unknown keys, the
nearest valid key. ``--set a.b=c`` overrides are parsed as YAML scalars and applied before
validation, so they are validated like the file itself.

Defaults follow the paper where it gives a value and ``docs/decisions.md`` where it does not.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cmafnet.errors import ConfigError
from cmafnet.registry import suggest
from cmafnet.yamlio import yaml_load

CONFIG_DIR = Path(__file__).parent / "configs"


class _Section(BaseModel):
    # every number finite: an .inf or .nan (e.g. train.budget.macs=.inf) is refused here, not by a traceback
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------- model
class TauInit(_Section):
    """Initial distribution of the per-head temperatures (Table 7)."""

    kind: Literal["fixed", "uniform", "normal", "lognormal"] = "lognormal"
    a: float = 0.0  # fixed: value; uniform: low; normal/lognormal: mean (of log tau for lognormal)
    b: float = 0.1  # uniform: high; normal/lognormal: std; ignored for fixed

    @model_validator(mode="after")
    def _check(self) -> TauInit:
        if self.kind == "fixed" and self.a <= 0:
            raise ValueError("fixed temperature 'a' must be > 0")
        if self.kind == "uniform" and not (0 < self.a < self.b):
            raise ValueError("uniform needs 0 < a < b")
        if self.kind in ("normal", "lognormal") and self.b < 0:
            raise ValueError("std 'b' must be >= 0")
        if self.kind == "normal" and self.a <= 0:
            raise ValueError("normal mean 'a' must be > 0 (temperatures are positive)")
        return self


class SpatialConfig(_Section):
    enabled: bool = True  # False = "w/o spatial branch (ViT only)"
    backbone: str = "resnet18"  # timm name, features_only
    skip_merge: bool = True  # 1x1 convs from stages 2-4 resized to the last grid
    spatial_gate: bool = True  # channel avg+max pool -> 7x7 conv -> sigmoid
    weights: str | None = None  # local file (safetensors or torch weights_only)


class ContextualConfig(_Section):
    enabled: bool = True  # False = "w/o contextual branch (CNN only)"
    variant: Literal["xxs", "xs", "s"] = "s"
    attention: Literal["full", "nystrom"] = "full"
    num_landmarks: int = Field(16, ge=1)  # Nystrom landmarks per sequence (>= the tokens: exact)
    pinv: Literal["iterative", "exact"] = "iterative"  # Nystrom pseudo-inverse (iterative: the paper's)
    pinv_iters: int = Field(6, ge=1)  # iterations of the iterative pseudo-inverse (Nystromformer: 6)
    patch_size: int = Field(2, ge=1)  # MobileViT unfold patch (see docs/decisions.md on "8x8")
    scale_aware_pos: bool = True  # gradient-magnitude positional embedding
    learned_pos: bool = True  # learned positional embedding per transformer stage
    weights: str | None = None


class FusionConfig(_Section):
    kind: str = "cmaf"  # registry name: cmaf | concat
    dim: int = Field(480, ge=8)  # fusion width D
    heads: int = Field(8, ge=1)  # 1 = "w/o multi-head attention"
    learn_temperature: bool = True  # False = tau fixed at tau_init (use fixed a=1 for the ablation)
    tau_init: TauInit = TauInit()
    gate: bool = True  # False = "w/o gating mechanism" (F_fused = F_att + F_s residual sum)
    attn_dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide(self) -> FusionConfig:
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")
        return self


class HeadConfig(_Section):
    hidden: int = Field(256, ge=0)  # 0 = a single linear layer
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    normalized: bool = False  # cosine classifier (LDAM's normalised linear layer)


class KNNConfig(_Section):
    """The k-nearest-neighbour probe head (scikit-learn's ``KNeighborsClassifier`` semantics)."""

    k: int = Field(20, ge=1)
    metric: Literal["cosine", "euclidean"] = "cosine"
    weights: Literal["uniform", "distance"] = "uniform"  # distance: votes weighted by 1 / distance


class ProbeConfig(_Section):
    """``model.name: probe``: a frozen pretrained backbone read by a linear or kNN head (docs/foundation.md)."""

    foundation: str | None = None  # catalogue name (cmafnet info --foundation): architecture, input, scale
    # the frozen weights: timm:<arch>.<tag>, hf-hub:<org>/<repo>, a local file, or random (a seeded random
    # stand-in); None = the catalogue entry's Hub repository
    backbone: str | None = None
    arch: str | None = None  # timm architecture of a local file or random stand-in (else the catalogue's)
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)  # timm keyword arguments over the catalogue's
    embedding: Literal["cls", "cls+mean", "pool"] | None = None  # None: the catalogue's, else pool (timm's)
    native_mpp: float | None = Field(None, gt=0.0)  # µm/px the backbone was trained at (else the catalogue's)
    head: Literal["linear", "knn"] = "linear"
    knn: KNNConfig = KNNConfig()
    cache: bool = True  # train the head on embeddings extracted once and memory-mapped (data.features)
    cache_dir: str | None = None  # None: $CMAFNET_FEATURE_CACHE, else ~/.cache/cmafnet/features
    match_scale: bool = (
        False  # resample inputs to native_mpp (tiles, mean embedding); else warn on a mismatch
    )
    # written by training into the run's config: the µm/px the model's input shows, and the content hash
    # of the frozen backbone (checked whenever the run's model is rebuilt)
    input_mpp: float | None = Field(None, gt=0.0)
    fingerprint: str | None = None


class ModelConfig(_Section):
    name: str = "cmafnet"  # registry name (cmafnet or a baseline)
    num_classes: int = Field(2, ge=2)
    img_size: int = Field(224, ge=32)
    spatial: SpatialConfig = SpatialConfig()
    contextual: ContextualConfig = ContextualConfig()
    fusion: FusionConfig = FusionConfig()
    head: HeadConfig = HeadConfig()
    bottleneck: bool = True  # variational mu/logvar heads on each branch's tokens
    weights: str | None = None  # whole-model weights file
    grad_checkpointing: bool = False
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    probe: ProbeConfig = ProbeConfig()  # model.name: probe

    @model_validator(mode="after")
    def _one_branch(self) -> ModelConfig:
        if self.name == "cmafnet" and not (self.spatial.enabled or self.contextual.enabled):
            raise ValueError("at least one of spatial.enabled / contextual.enabled must be true")
        return self


# ------------------------------------------------------------------------------------------ loss
class LossConfig(_Section):
    """The classification loss. ``name`` is a registry name; unused fields are ignored by it."""

    name: str = "acbfl"  # acbfl | ce | focal | cb | ldam | balanced_softmax
    # A-CBFL (Eq. 14 with corrections of docs/decisions.md)
    gamma_base: float = Field(2.0, ge=0.0)
    class_dependent_gamma: bool = True
    dynamic_alpha: bool = True  # False = fixed square-root weighting
    alpha_decay: float = Field(0.1, gt=0.0)  # exponential rate per epoch: w(t) = exp(-rate * t)
    entropy_weight: float = Field(0.1, ge=0.0)  # lambda of the confidence penalty (-lambda H(p))
    margin: bool = True  # LDAM-style logit margins inside A-CBFL
    # shared by baselines
    focal_gamma: float = Field(2.0, ge=0.0)
    cb_beta: float = Field(0.9999, ge=0.0, lt=1.0)
    cb_loss_type: Literal["softmax", "focal"] = "softmax"
    max_margin: float = Field(0.5, ge=0.0)  # LDAM C so that the largest margin is this
    ldam_s: float = Field(30.0, gt=0.0)
    drw_epoch: int | None = Field(None, ge=0)  # deferred re-weighting start (epoch in stage); None = 80%
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class RegularizerConfig(_Section):
    beta1: float = Field(0.01, ge=0.0)  # KL (I(Z;X) bound) weight per branch
    beta2: float = Field(0.005, ge=0.0)  # redundancy I(Z_s;Z_t) weight (penalised, +beta2)
    beta_schedule: Literal["ramp", "fixed"] = "ramp"
    ramp_epochs: float = Field(10.0, ge=0.0)  # linear ramp length in epochs (stage 2 onwards)
    redundancy_estimator: Literal["gaussian", "hsic"] = "gaussian"
    diversity: float = Field(0.01, ge=0.0)
    entropy: float = Field(0.01, ge=0.0)
    orthogonality: float = Field(0.01, ge=0.0)


# -------------------------------------------------------------------------------------- training
class SAMConfig(_Section):
    enabled: bool = True
    rho: float = Field(0.05, ge=0.0)
    adaptive: bool = False


class ClipConfig(_Section):
    kind: Literal["autoclip", "agc", "norm", "none"] = "autoclip"
    percentile: float = Field(10.0, gt=0.0, le=100.0)  # AutoClip percentile of the norm history
    history: int = Field(1000, ge=1)
    max_norm: float = Field(1.0, gt=0.0)  # for kind=norm
    agc_clip: float = Field(0.01, gt=0.0)  # for kind=agc


class StageConfig(_Section):
    name: str
    epochs: int = Field(ge=0)
    lr: float = Field(gt=0.0)
    schedule: Literal["cosine", "warmup_cosine", "cyclic", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    train: Literal["branches", "fusion", "all"] = "all"
    loss: Literal["ce", "objective"] = "objective"  # stage 1: ce on the temporary branch heads
    cyclic_cycles: int = Field(2, ge=1)
    # optimiser steps of the stage when not epochs x steps per epoch (its last epoch is cut short);
    # written by train.budget into the run's config, so a compute-matched run reruns from its folder
    steps: int | None = Field(None, ge=1)


class BudgetConfig(_Section):
    """A run's training compute, when not its stages' epochs: ``macs`` (training MACs, as the run
    records them: forward MACs per image x images x passes x 3) or ``match`` (a run folder whose recorded
    training MACs to spend). The stages' step counts are derived from it, in proportion to their epochs."""

    macs: float | None = Field(None, gt=0.0)
    match: str | None = None

    @model_validator(mode="after")
    def _one(self) -> BudgetConfig:
        if (self.macs is None) == (self.match is None):
            raise ValueError("give exactly one of macs (a number) or match (a run folder)")
        return self


def _paper_stages() -> list[StageConfig]:
    return [
        StageConfig(name="branches", epochs=30, lr=1e-3, schedule="cosine", train="branches", loss="ce"),
        StageConfig(
            name="fusion", epochs=40, lr=1e-4, schedule="warmup_cosine", warmup_epochs=2, train="fusion"
        ),
        StageConfig(name="end_to_end", epochs=30, lr=1e-5, schedule="cyclic", train="all"),
    ]


class TrainConfig(_Section):
    stages: list[StageConfig] = Field(default_factory=_paper_stages)

    @field_validator("stages")
    @classmethod
    def _trains_something(cls, stages: list[StageConfig]) -> list[StageConfig]:
        # An empty list (or only 0-epoch stages) would "finish" with an untrained model.
        if not stages:
            raise ValueError("the stage list is empty; at least one stage with epochs > 0 is needed")
        if not any(s.epochs > 0 for s in stages):
            raise ValueError("every stage has 0 epochs; at least one stage with epochs > 0 is needed")
        return stages

    batch_size: int = Field(128, ge=1)  # the effective (global) batch of one optimiser step
    # micro-batches per optimiser step (paper §5.4: 128 = 2 x 64 "with gradient accumulation"); BatchNorm
    # sees batch_size / accumulate_steps / world images at a time, the update sees batch_size
    accumulate_steps: int = Field(1, ge=1)
    budget: BudgetConfig | None = None  # None: the stages' epochs decide the compute
    eval_batch_size: int = Field(256, ge=1)
    weight_decay: float = Field(1e-4, ge=0.0)
    sam: SAMConfig = SAMConfig()
    clip: ClipConfig = ClipConfig()
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    channels_last: bool = True
    compile: bool = False
    # replay each training step from a CUDA graph (cmafnet.training.graphs): CUDA, bf16/none,
    # fused AdamW, one process; the schedules still advance every step (device scalars)
    cuda_graph: bool = False
    sdpa_backend: Literal["auto", "flash", "efficient", "math"] = "auto"
    fused_adamw: bool = True
    early_stopping_patience: int | None = Field(10, ge=1)  # epochs without val balanced-acc gain
    seed: int = 0
    deterministic: bool = False
    max_nonfinite_steps: int = Field(20, ge=1)  # consecutive non-finite steps before stopping
    max_steps_per_epoch: int | None = Field(None, ge=1)  # smoke runs
    # mid-epoch checkpoints (an epoch of the paper config is ~1,500 steps); the epoch end always saves
    checkpoint_every_steps: int | None = Field(None, ge=1)
    checkpoint_every_minutes: float | None = Field(None, gt=0.0)
    log_every: int = Field(20, ge=1)
    tensorboard: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    @model_validator(mode="after")
    def _micro_batches(self) -> TrainConfig:
        if self.batch_size % self.accumulate_steps:
            raise ValueError(
                f"batch_size ({self.batch_size}) must split into accumulate_steps ({self.accumulate_steps}) "
                "equal micro-batches"
            )
        return self


# ------------------------------------------------------------------------------------------ data
class AugmentConfig(_Section):
    enabled: bool = True  # False = "w/o domain augmentation"
    flips: bool = True
    rotation: float = Field(30.0, ge=0.0, le=180.0)  # degrees, uniform in [-r, r]; 0 disables
    color_jitter: bool = True
    brightness: float = Field(0.1, ge=0.0)
    contrast: float = Field(0.1, ge=0.0)
    saturation: float = Field(0.1, ge=0.0)
    hue: float = Field(0.04, ge=0.0, le=0.5)
    elastic: bool = True
    elastic_alpha: float = Field(1.0, ge=0.0)
    elastic_sigma: float = Field(8.0, gt=0.0)
    hed: bool = True
    hed_sigma: float = Field(0.03, ge=0.0)  # HED stain jitter (Tellez et al.) scale
    hed_bias: float = Field(0.01, ge=0.0)


class StainConfig(_Section):
    enabled: bool = True
    method: Literal["macenko"] = "macenko"
    Io: float = Field(240.0, gt=0.0)
    alpha: float = Field(1.0, gt=0.0, lt=50.0)
    beta: float = Field(0.15, gt=0.0)
    reference: str | None = None  # image file to fit the target stain matrix; None = standard HE


class DataConfig(_Section):
    imbalance: str | None = None  # e.g. "90:10" (majority:minority) applied to the training split
    stain: StainConfig = StainConfig()
    augment: AugmentConfig = AugmentConfig()
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    # Input normalisation; None = what the model's weights state (timm pretrained_cfg, or the
    # weights file's own config), resolved when training starts and written to the run's config.
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    device_cache: bool = True  # keep the uint8 store on the training device when it fits

    @model_validator(mode="after")
    def _ratio(self) -> DataConfig:
        if self.imbalance is not None:
            parse_ratio(self.imbalance)
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std {self.std} must be positive")
        return self


def parse_ratio(text: str) -> tuple[float, float]:
    """Parse 'maj:min' (e.g. '90:10') into fractions that sum to 1."""
    try:
        a, b = (float(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"ratio '{text}' must look like '90:10'") from None
    if a <= 0 or b <= 0:
        raise ValueError(f"ratio '{text}' needs two positive numbers")
    return a / (a + b), b / (a + b)


class EvalConfig(_Section):
    target_sensitivity: float = Field(0.95, gt=0.0, le=1.0)  # operating threshold chosen on validation
    ece_bins: int = Field(15, ge=2)
    bootstrap: int = Field(1000, ge=0)


class Config(_Section):
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    regularizers: RegularizerConfig = RegularizerConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()


# --------------------------------------------------------------------------------------- loading
def _field_names(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """Field names valid at ``path`` inside ``model`` (for 'did you mean')."""
    cur: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        args = getattr(ann, "__args__", ()) or ()
        nxt = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return []
        cur = nxt
    return list(getattr(cur, "model_fields", {}))


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
    key = ".".join(str(x) for x in loc) or "<root>"
    if e["type"] == "extra_forbidden":
        hint = suggest(str(loc[-1]), _field_names(Config, loc[:-1]))
        return f"{key}: unknown key.{hint}"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "missing":
        return f"{key}: required"
    if isinstance(e.get("input"), dict):  # a whole section: the message names the values at fault
        return f"{key}: {msg}"
    got = repr(e.get("input"))
    return f"{key}: {msg} (got {got if len(got) <= 80 else got[:77] + '...'})"


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Return a copy of ``data`` with each 'a.b=c' override set (the value typed as a YAML scalar).

    Missing sections are created; a numeric part indexes a list (``train.stages.0.lr=1e-3``).
    A list absent from the file is filled from the schema default first, so stage overrides work
    on configs that do not spell the stages out.
    """
    data = copy.deepcopy(data)
    for text in overrides or []:
        if "=" not in text:
            raise ConfigError(f"override '{text}' must look like key.path=value")
        key, raw = text.split("=", 1)
        if not key:
            raise ConfigError(f"override '{text}' has an empty key")
        path = key.split(".")
        cur: Any = data
        for i, part in enumerate(path):
            at: Any = part
            if isinstance(cur, list):
                if not part.isdigit() or int(part) >= len(cur):
                    raise ConfigError(f"{key}: no list item '{part}'")
                at = int(part)
            elif i < len(path) - 1 and cur.get(part) is None:
                cur[part] = _default_at(path[: i + 1])
            if i == len(path) - 1:
                cur[at] = yaml_load(raw, f"--set {text}") if raw != "" else None
            elif not isinstance(cur := cur[at], (dict, list)):
                raise ConfigError(f"{key}: '{part}' is not a section")
    return data


def _default_at(path: list[str]) -> Any:
    """The schema default list at ``path`` (as plain data), else an empty section."""
    obj: Any = Config().model_dump(mode="json")
    for part in path:
        try:
            obj = obj[int(part)] if isinstance(obj, list) else obj[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return {}
    return obj if isinstance(obj, list) else {}


def config_from_dict(data: dict | None, overrides: list[str] | None = None) -> Config:
    """Validate a plain dict (plus overrides) into a :class:`Config`."""
    data = apply_overrides(data or {}, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or shipped config name) and apply ``--set`` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)  # a path, or a shipped config name such as 'paper' or 'smoke'
        if not p.exists() and not (p := CONFIG_DIR / f"{path}.yaml").exists():
            raise ConfigError(f"config '{path}' not found.{suggest(str(path), list_configs())}")
        try:
            data = yaml_load(p.read_text(), str(p)) or {}
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{p}: unreadable ({str(err).splitlines()[0][:120]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    return config_from_dict(data, overrides)


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML (what a run folder stores)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def list_configs() -> list[str]:
    return sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
