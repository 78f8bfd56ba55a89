"""The paper's Tables 1-8 as data: methods (recipes), rows, columns and how each is evaluated.

Every row is a base config plus ``--set`` overrides, so any row can also be trained by hand:
``cmafnet train --config baseline_paper --set model.name=resnet50 --set loss.name=focal``.
The same method in two tables (e.g. ResNet-50 in Tables 1, 2, 3) has the same run folder, so it
is trained once and reused.
"""

from __future__ import annotations

from dataclasses import replace

from cmafnet.data.datasets import BreakHis
from cmafnet.errors import ConfigError
from cmafnet.evaluation.table import Column, Unit
from cmafnet.experiments.spec import FigureDef, Recipe, Row, RunSpec, Scale, TableDef, base_config_name

SEEDS_DEFAULT = 5
IMBALANCE_RATIOS: tuple[str | None, ...] = (None, "80:20", "90:10", "95:5", "99:1")  # None = original 70:30


def _baseline(key: str, label: str, *extra: str) -> Recipe:
    return Recipe(key, label, "baseline", (f"model.name={key.split('-')[0]}", *extra))


# ------------------------------------------------------------------------------------------ methods
R = {
    r.key: r
    for r in (
        _baseline("resnet50", "ResNet-50"),
        _baseline("densenet121", "DenseNet-121"),
        _baseline("efficientnet_b3", "EfficientNet-B3"),
        _baseline("convnext_tiny", "ConvNeXt-T"),
        _baseline("vit_s16", "ViT-S/16"),
        _baseline("swin_t", "Swin-T"),
        _baseline("deit_s", "DeiT-S"),
        _baseline("transfuse", "TransFuse"),
        _baseline("hrfnet", "HRFNet"),
        _baseline("mmtm", "MMTM"),
        _baseline("resnet50-focal", "ResNet-50 + Focal", "loss.name=focal"),
        _baseline("resnet50-cb", "ResNet-50 + CB", "loss.name=cb"),
        # LDAM-DRW needs the normalised (cosine) classifier of Cao et al.
        _baseline(
            "efficientnet_b3-ldam", "EfficientNet-B3 + LDAM", "loss.name=ldam", "model.head.normalized=true"
        ),
        _baseline("transfuse-bsm", "TransFuse + BalancedSoftmax", "loss.name=balanced_softmax"),
        Recipe("cmafnet", "CMAF-Net", "cmafnet"),
    )
}

# One-stage schedule ("w/o progressive training"): the three stages' total length in one stage,
# everything trained with the full objective from the start.
ONE_STAGE = {
    "paper": "train.stages=[{name: single, epochs: 100, lr: 1.0e-4, schedule: warmup_cosine, "
    "warmup_epochs: 2, train: all, loss: objective}]",
    "smoke": "train.stages=[{name: single, epochs: 3, lr: 1.0e-3, schedule: cosine, train: all, loss: objective}]",
}
ONE_STAGE_TOKEN = "@one_stage"  # replaced per scale at expansion


def _row(key: str, label: str | None = None, paper: str | None = None, **kw) -> Row:
    return Row(R[key], label=label, paper_label=paper, **kw)


def _ablation(suffix: str, label: str, group: str, *overrides: str) -> Row:
    return Row(
        R["cmafnet"], label=label, paper_label=label, key_suffix=suffix, overrides=overrides, group=group
    )


ARCH, IB, LOSS, TRAIN = (
    "Architecture Components",
    "Information Bottleneck Components",
    "Loss Function Components",
    "Training Strategy",
)

MAGS = tuple(f"{m}X" for m in BreakHis.MAGNIFICATIONS)  # the paper's column names


def _m(key: str, header: str, unit: Unit = "percent") -> Column:
    """A metric of the run's evaluation on its test split (threshold 0.5 / argmax)."""
    return Column(key, header, f"metrics.{key}", unit)


def _fps(latency_ms: float) -> float | None:
    return 1000.0 / latency_ms if latency_ms > 0 else None


def _tau(suffix: str, label: str, kind: str, a: float, b: float | None = None) -> Row:
    ov = (f"model.fusion.tau_init.kind={kind}", f"model.fusion.tau_init.a={a}")
    return _ablation(suffix, label, "", *ov, *((f"model.fusion.tau_init.b={b}",) if b is not None else ()))


TABLE5_ROWS = tuple(_row(k) for k in ("resnet50", "transfuse", "cmafnet"))
RATIO_KEYS = tuple(r or "70:30" for r in IMBALANCE_RATIOS)
CLASSIFICATION = (
    _m("sensitivity", "Sensitivity (%)"),
    _m("specificity", "Specificity (%)"),
    _m("balanced_accuracy", "Balanced Acc (%)"),
    _m("auprc", "AUPRC", "fraction"),
)
SENS_BACC = FigureDef("bars", ("sensitivity", "balanced_accuracy"), "%")

# Data, laid out by hand: one table per entry, its columns next to its rows.
# fmt: off
TABLES: dict[str, TableDef] = {
    "table1": TableDef(
        "table1",
        "Performance comparison on IDC (natural imbalance), mean ± std over seeds",
        tuple(
            [_row(k, group="CNN Baselines")
             for k in ("resnet50", "densenet121", "efficientnet_b3", "convnext_tiny")]
            + [_row(k, group="Vision Transformers") for k in ("vit_s16", "swin_t", "deit_s")]
            + [_row(k, group="Fusion Methods") for k in ("transfuse", "hrfnet", "mmtm")]
            + [_row(k, group="With Imbalance Methods")
               for k in ("resnet50-focal", "resnet50-cb", "efficientnet_b3-ldam", "transfuse-bsm")]
            + [_row("cmafnet", "CMAF-Net (Ours)", group="Ours")]
        ),
        (*CLASSIFICATION, _m("mcc", "MCC", "fraction"), _m("f1", "F1", "fraction"),
         Column("params_m", "Params (M)", "params_m", "number")),
        SENS_BACC,
        notes=("Metrics on the IDC test split at threshold 0.5 (argmax).",),
        compute_reference="cmafnet",
    ),
    "table2": TableDef(
        "table2",
        "Sensitivity under controlled imbalance (minority undersampled in the training split)",
        tuple(_row(k) for k in
              ("resnet50", "densenet121", "efficientnet_b3", "transfuse", "transfuse-bsm", "cmafnet")),
        tuple(
            Column(k, k + ("" if r else " (original)"), "metrics.sensitivity", ratio=r)
            for k, r in zip(RATIO_KEYS, IMBALANCE_RATIOS, strict=True)
        ),
        FigureDef("lines", RATIO_KEYS, "sensitivity (%)", "majority:minority (training split)"),
        retention_of="cmafnet",
        ratios=IMBALANCE_RATIOS,
        notes=("Sensitivity (%) on the natural-ratio test split; the minority is undersampled in the "
               "training split only.",),
        compute_reference="cmafnet",
    ),
    "table3": TableDef(
        "table3",
        "Zero-shot BreakHis (binary) per magnification: IDC-trained models, sensitivity",
        tuple(_row(k) for k in ("resnet50", "efficientnet_b3", "transfuse", "cmafnet")),
        (*(Column(m, m.replace("X", "×"), f"{{adapt}}by_magnification.{m}.sensitivity") for m in MAGS),
         Column("average", "Average", derive="mean", of=MAGS),
         Column("std_dev", "Std Dev", derive="std", of=MAGS),
         Column("specificity", "Specificity", "{adapt}metrics.specificity", paper=False),
         Column("bacc", "Bal. acc.", "{adapt}metrics.balanced_accuracy", paper=False),
         Column("auroc", "AUROC", "{adapt}metrics.auroc", paper=False),
         Column("verdict", "Diagnosis", "{adapt}diagnosis.verdict", "text", paper=False)),
        FigureDef("bars", MAGS, "zero-shot sensitivity (%)"),
        lines="adaptation",
        evaluation="zeroshot",
        notes=(
            "Sensitivity (%) of the IDC-trained runs applied to every BreakHis image (binary "
            "benign/malignant); the paper's Fig. 5 gives these values as sensitivities. Average / Std Dev are "
            "over magnifications. Specificity, balanced accuracy and AUROC are over every image; BreakHis is "
            "about 69 % malignant, so calling everything malignant scores sensitivity 100, specificity 0, "
            "balanced accuracy 50 and AUROC 50 (the trivial rows, last). Diagnosis: the AUROC's patient-level interval "
            "against chance (cmafnet evaluate --zero-shot). One line per test-time adaptation "
            "(docs/experiments.md, Zero-shot transfer); site calibration scores only the patients it did not "
            "calibrate on.",
        ),
    ),
    "table4": TableDef(
        "table4",
        "8-class BreakHis per magnification (trained on BreakHis subtypes)",
        tuple(_row(k, paper=p) for k, p in (("resnet50", None), ("efficientnet_b3", None),
              ("vit_s16", "ViT S/16"), ("transfuse", None), ("cmafnet", None))),
        tuple(
            Column(k, h, f"by_magnification.{{mag}}.{k}", "fraction" if k == "mcc" else "percent")
            for k, h in (("macro_f1", "Macro-F1"), ("weighted_f1", "Weighted-F1"),
                         ("balanced_accuracy", "Balanced Acc."), ("mcc", "MCC"))
        ),
        FigureDef("bars", ("macro_f1", "balanced_accuracy"), "%"),
        row_header="Method / magnification",
        lines="magnification",
        dataset="breakhis",
        evaluation="subtype",
        notes=("One 8-class model per method and seed on all magnifications, evaluated per magnification.",),
    ),
    "table5": TableDef(
        "table5",
        "Per-class recall on BreakHis 8-class (same runs as Table 4)",
        TABLE5_ROWS,
        tuple(Column(r.name, r.name, "metrics.per_class_recall.{cls}", row=r.key) for r in TABLE5_ROWS),
        FigureDef("bars", tuple(r.name for r in TABLE5_ROWS), "recall (%)"),
        row_header="Subtype",
        paper_key="subtype",
        lines="class",
        dataset="breakhis",
        evaluation="subtype",
        notes=("Recall (%) per subtype on the BreakHis test split (all magnifications).",),
    ),
    "table6": TableDef(
        "table6",
        "Ablations of CMAF-Net on IDC (each row = config overrides of the paper config)",
        (
            _ablation("", "CMAF-Net (Full)", "Full"),
            _ablation("no_contextual", "w/o Contextual branch (CNN only)", ARCH,
                      "model.contextual.enabled=false"),
            _ablation("no_spatial", "w/o Spatial branch (ViT only)", ARCH, "model.spatial.enabled=false"),
            _ablation("concat", "Simple concatenation", ARCH, "model.fusion.kind=concat"),
            _ablation("no_temp", "w/o Temperature learning", ARCH, "model.fusion.learn_temperature=false",
                      "model.fusion.tau_init.kind=fixed", "model.fusion.tau_init.a=1.0"),
            _ablation("single_head", "w/o Multi-head attention", ARCH, "model.fusion.heads=1"),
            _ablation("no_gate", "w/o Gating mechanism", ARCH, "model.fusion.gate=false"),
            _ablation("beta2_0", "w/o IB regularization (β₂ = 0)", IB, "regularizers.beta2=0"),
            _ablation("no_diversity", "w/o Diversity loss", IB, "regularizers.diversity=0"),
            _ablation("no_entropy", "w/o Entropy regularization", IB, "regularizers.entropy=0"),
            _ablation("fixed_beta", "Fixed β (no scheduling)", IB, "regularizers.beta_schedule=fixed"),
            _ablation("ce", "Standard Cross-Entropy", LOSS, "loss.name=ce"),
            _ablation("focal", "Standard Focal Loss", LOSS, "loss.name=focal"),
            _ablation("cb", "CB Loss", LOSS, "loss.name=cb"),
            _ablation("no_cdg", "A-CBFL w/o class-dependent γ", LOSS, "loss.class_dependent_gamma=false"),
            _ablation("no_dyn", "A-CBFL w/o dynamic weighting", LOSS, "loss.dynamic_alpha=false"),
            _ablation("one_stage", "w/o Progressive training", TRAIN, ONE_STAGE_TOKEN),
            _ablation("no_sam", "w/o SAM optimization", TRAIN, "train.sam.enabled=false"),
            _ablation("no_aug", "w/o Domain augmentation", TRAIN, "data.augment.enabled=false"),
        ),
        (*CLASSIFICATION, Column("delta_sensitivity", "Δ Sens", derive="delta_first", of=("sensitivity",))),
        SENS_BACC,
        row_header="Configuration",
        paper_key="configuration",
        notes=("Δ Sens: difference of mean sensitivities to the Full row (percentage points).",),
    ),
    "table7": TableDef(
        "table7",
        "Temperature initialisation: convergence epoch (first epoch at 90% of final val balanced accuracy)",
        (
            _tau("tau_fixed1", "Fixed (τ=1.0)", "fixed", 1.0),
            _tau("tau_fixed05", "Fixed (τ=0.5)", "fixed", 0.5),
            _tau("tau_uniform", "Uniform(0.5, 1.5)", "uniform", 0.5, 1.5),
            _tau("tau_normal", "Normal(1.0, 0.1)", "normal", 1.0, 0.1),
            # the paper config's default (lognormal(0, 0.1)): the same run as CMAF-Net elsewhere
            _ablation("", "LogNormal(0, 0.1)", ""),
            _tau("tau_lognormal05", "LogNormal(0, 0.5)", "lognormal", 0.0, 0.5),
            _tau("tau_lognormal1", "LogNormal(0, 1.0)", "lognormal", 0.0, 1.0),
        ),
        (Column("convergence_epoch", "Conv. epoch", "convergence.epoch", "number"),
         _m("sensitivity", "Sensitivity"), _m("balanced_accuracy", "Balanced Acc."),
         Column("stability_sd", "Stability (sd)", "convergence.stability", "number")),
        FigureDef("bars", ("convergence_epoch",), "convergence epoch"),
        row_header="Initialization",
        paper_key="initialization",
        notes=(
            "Conv. epoch: first epoch (over all stages) whose validation balanced accuracy reaches 90% of the "
            "final epoch's, mean ± std over seeds. Stability: std (points) of validation balanced accuracy over "
            "the last 10 epochs, mean ± std over seeds (the paper does not define its column).",
        ),
    ),
    "table8": TableDef(
        "table8",
        "Efficiency: params, forward GMACs, peak training memory, throughput, batch-1 latency",
        tuple(_row(k) for k in ("resnet50", "efficientnet_b3", "transfuse", "cmafnet")),
        (Column("params_m", "Params (M)", "bench.params_M", "number"),
         Column("flops_g", "GMACs", "bench.gmacs", "number"),
         Column("memory_gb", "Peak train memory (GiB)", "bench.train_peak_GiB", "number"),
         Column("train_img_s", "Train img/s (recipe step)", "bench.train_sam_img_s|bench.train_img_s",
                "number", paper=False),
         Column("infer_img_s", "Infer img/s", "bench.infer_img_s", "number", paper=False),
         Column("fps", "Batch-1 FPS", "bench.latency_ms", "number", fn=_fps)),
        FigureDef("bars", ("params_m", "flops_g", "memory_gb"), "M params / GMACs / GiB"),
        evaluation="profile",
        seeded=False,
        notes=(
            "Measured on {device} at {img_size} px, batch {batch} (train/infer), {amp} autocast, by "
            "cmafnet.bench. GMACs = FLOPs / 2 (the paper's 'FLOPs (G)'); the paper's FPS matches batch-1 "
            "latency (docs/decisions/performance.md), compare it with our Batch-1 FPS. Train img/s is the training recipe's step: "
            "with SAM (two forward/backward passes) for CMAF-Net, plain AdamW for baselines; peak memory is "
            "that of the plain step.",
        ),
    ),
}
# fmt: on


# Table 3's lines after each raw zero-shot row (Adaptation.label() of cmafnet.inference.adapt.Adaptation)
ZERO_SHOT_ADAPTATIONS = ("stain macenko", "stain reinhard", "TTA d4", "AdaBN", "AdaBN balanced",
                         "site calibration k=4")  # fmt: skip


# ------------------------------------------------------------------- frozen foundation-model probes
FOUNDATION_TABLES = ("table1", "table3")  # where --foundation adds probe rows (IDC-trained runs)
PROBE_GROUP = "Frozen foundation models (linear probe, eva's protocol)"


def foundation_rows(names: tuple[str, ...]) -> tuple[Row, ...]:
    """Two rows per catalogue model: the store's patches as they are, and resampled to its native scale.

    Both tables share the runs (same row keys), so Table 3 evaluates Table 1's probes zero-shot.
    """
    from cmafnet.models.foundation import foundation_entry

    rows: list[Row] = []
    for name in dict.fromkeys(names):  # in order, once each
        e = foundation_entry(name, "--foundation")
        recipe = Recipe(f"probe-{name}", f"{e.name} (linear probe)", "probe",
                        (f"model.probe.foundation={name}", f"model.img_size={e.img_size}"))  # fmt: skip
        rows.append(Row(recipe, group=PROBE_GROUP))
        rows.append(Row(recipe, label=f"{e.name} (linear probe, at {e.mpp:g} µm/px)", key_suffix="scaled",
                        overrides=("model.probe.match_scale=true",), group=PROBE_GROUP))  # fmt: skip
    return tuple(rows)


def get_table(name: str, foundation: tuple[str, ...] = ()) -> TableDef:
    """Table ``name``; ``foundation``: catalogue models whose probe rows it gains (Tables 1 and 3).

    Raises:
        ConfigError: an unknown table or model, or probe rows asked of another table.
    """
    if name not in TABLES:
        from cmafnet.registry import suggest

        raise ConfigError(
            f"unknown experiment '{name}'.{suggest(name, list(TABLES))} Known: {', '.join(TABLES)}"
        )
    if not foundation:
        return TABLES[name]
    if name not in FOUNDATION_TABLES:
        raise ConfigError(f"--foundation: probe rows go into {' and '.join(FOUNDATION_TABLES)}, not {name}")
    return replace(TABLES[name], rows=TABLES[name].rows + foundation_rows(tuple(foundation)))


MATCHED_SUFFIX = "__{ref}_compute"  # row key of a baseline trained at the reference row's compute
EQUAL_EPOCHS, MATCHED = "equal epochs", "{ref}'s compute"  # the two views' row labels


def matched_row_key(row_key: str, reference: str) -> str:
    """``resnet50`` -> ``resnet50__cmafnet_compute``: the row of a baseline given the reference's compute."""
    return row_key + MATCHED_SUFFIX.format(ref=reference)


def view_label(label: str, reference_label: str | None) -> str:
    """A baseline row's label in one of the two views (``reference_label`` None: equal epochs)."""
    view = EQUAL_EPOCHS if reference_label is None else MATCHED.format(ref=reference_label)
    return f"{label} ({view})"


def check_match_compute(name: str) -> TableDef:
    """The table, if ``--match-compute`` applies to it.

    Raises:
        ConfigError: a table without a compute reference row.
    """
    table = get_table(name)
    if table.compute_reference is None:
        raise ConfigError(
            f"--match-compute: {name} has no CMAF-Net row to match; it applies to "
            f"{', '.join(k for k, t in TABLES.items() if t.compute_reference is not None)}"
        )
    return table


def expand(
    name: str,
    seeds: int = SEEDS_DEFAULT,
    scale: Scale = "paper",
    match_compute: bool = False,
    foundation: tuple[str, ...] = (),
) -> list[RunSpec]:
    """All runs of a table (rows x columns x seeds), in table order.

    Args:
        name: ``table1`` ... ``table8``.
        seeds: number of seeds (0 .. seeds-1); ignored for unseeded tables (Table 8).
        scale: ``paper`` (paper.yaml / baseline_paper.yaml) or ``smoke`` (tiny, for tests and demos).
        match_compute: also train every baseline row at the training MACs its table's reference row
            (CMAF-Net) recorded for the same seed and column (``train.budget.match``). These runs come
            after all the others, so a call that does the whole table trains their references first.
        foundation: catalogue models whose probe rows Tables 1 and 3 gain (:func:`foundation_rows`); probes
            are not compute-matched (eva's protocol fixes their training).
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if match_compute:
        check_match_compute(name)
    table = get_table(name, foundation)
    out = []
    for row in table.rows:
        own = tuple(ONE_STAGE[scale] if o == ONE_STAGE_TOKEN else o for o in row.overrides)
        data = ("model.num_classes=8",) if table.dataset == "breakhis" else ()
        for col in table.ratios:
            ratio = (f"data.imbalance={col}",) if col is not None else ()
            for seed in range(seeds if table.seeded else 1):
                ov = (*row.recipe.overrides, *own, *ratio, *data, f"train.seed={seed}")
                out.append(
                    RunSpec(
                        table=name,
                        row=row.key,
                        label=row.name,
                        column=col,
                        seed=seed,
                        dataset=table.dataset,
                        evaluation=table.evaluation,
                        base=base_config_name(row.recipe.base, scale),
                        overrides=ov,
                    )
                )
    if match_compute:
        out += _matched(table, out)
    return out


def _matched(table: TableDef, specs: list[RunSpec]) -> list[RunSpec]:
    """The baseline runs again, each at the compute of the reference run of its seed and column."""
    ref_key = table.compute_reference
    ref_row = next(r for r in table.rows if r.key == ref_key)
    refs = {(s.column, s.seed): s for s in specs if s.row == ref_key}
    baselines = {r.key for r in table.rows if r.recipe.base == "baseline"}
    return [
        replace(
            s,
            row=matched_row_key(s.row, ref_key),
            label=view_label(s.label, ref_row.recipe.label),
            match=refs[(s.column, s.seed)].run_id,
        )
        for s in specs
        if s.row in baselines
    ]
