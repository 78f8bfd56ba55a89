"""Initial weights by name (``timm:`` / ``hf-hub:``), offline errors, the Hugging Face cache, normalisation.

No test touches the network: the Hugging Face cache is a temporary folder laid out exactly as
huggingface_hub lays it out (``models--<org>--<repo>/{blobs,refs/main,snapshots/<rev>}``, snapshot
files as relative links into ``blobs``), filled with random weights saved by timm's own
``save_for_hf``, and huggingface_hub runs in offline mode.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from timm.models import save_for_hf

from cmafnet.config import ModelConfig, load_config
from cmafnet.errors import ConfigError
from cmafnet.inference.predict import PredictOptions
from cmafnet.models import create_model
from cmafnet.models.pretrained import WeightsName, parse_weights, pretrained_config, resolve_normalization
from cmafnet.models.weights import save_weights, without_init_weights
from cmafnet.run import CONFIG_FILE, load_run, write_meta

REV = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as refs/main holds
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SMALL = {
    "img_size": 64,
    "contextual": {"variant": "xxs"},
    "fusion": {"dim": 32, "heads": 4},
    "head": {"hidden": 16},
}


def publish(hub: Path, repo: str, model: torch.nn.Module, **data_config: object) -> None:
    """Put ``model`` into the cache ``hub`` as huggingface_hub stores a downloaded ``repo``."""
    src = hub.parent / f"export_{repo.replace('/', '_')}"
    save_for_hf(model, src, safe_serialization=True, data_config=data_config or None)
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REV)
    (root / "blobs").mkdir()
    snap = root / "snapshots" / REV
    snap.mkdir(parents=True)
    for f in src.iterdir():
        data = f.read_bytes()
        # blob names: the sha256 for LFS files (weights), the git blob sha1 for small files
        blob = (
            hashlib.sha256(data).hexdigest()
            if f.suffix == ".safetensors"
            else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        )
        (root / "blobs" / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache (HF_HOME = tmp) in offline mode.

    huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is imported, so its constants are set
    as well as the variables.
    """
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return home / "hub"


def _small(**over: dict) -> ModelConfig:
    """The small CMAF-Net with sections merged (``contextual={"weights": ...}`` keeps the variant)."""
    data = {k: {**v, **over.pop(k, {})} if isinstance(v, dict) else v for k, v in SMALL.items()}
    return ModelConfig(**data, **over)


def _random(name: str, seed: int = 0, **kw: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kw)


# ---------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("timm:resnet18.a1_in1k", WeightsName("timm", "resnet18.a1_in1k")),
        ("timm:mobilevit_s", WeightsName("timm", "mobilevit_s")),
        ("hf-hub:timm/resnet18.a1_in1k", WeightsName("hf-hub", "timm/resnet18.a1_in1k")),
        ("hf-hub:org/my-model.v2@main", WeightsName("hf-hub", "org/my-model.v2@main")),
        ("weights/resnet18.safetensors", None),
        ("/abs/timm_resnet18.pth", None),
    ],
)
def test_parse_weights(value: str, expected: WeightsName | None) -> None:
    assert parse_weights(value) == expected


def test_timm_ids_and_malformed_names() -> None:
    assert parse_weights("timm:resnet18.a1_in1k").timm_id == "resnet18.a1_in1k"
    assert parse_weights("hf-hub:timm/resnet18.a1_in1k").timm_id == "hf-hub:timm/resnet18.a1_in1k"
    assert str(parse_weights("hf-hub:timm/resnet18.a1_in1k")) == "hf-hub:timm/resnet18.a1_in1k"
    for bad in ("timm:", "timm:resnet18/a1", "hf-hub:", "hf-hub:resnet18", "hf-hub:a/b/c"):
        with pytest.raises(ConfigError, match="expected"):
            parse_weights(bad)


def test_unknown_architecture_and_tag_suggest() -> None:
    with pytest.raises(ConfigError, match=r"not a timm architecture\. Did you mean 'resnet18'"):
        pretrained_config(WeightsName("timm", "resnet181.a1_in1k"), "model.spatial.weights")
    with pytest.raises(
        ConfigError, match=r"no pretrained weights 'resnet18.a1_in1kk'.*Known: .*resnet18.a1_in1k"
    ):
        pretrained_config(WeightsName("timm", "resnet18.a1_in1kk"), "model.spatial.weights")


def test_architecture_mismatch_is_caught_before_any_download(hub: Path) -> None:
    with pytest.raises(ConfigError, match=r"holds resnet50 weights; this model needs resnet18"):
        create_model(_small(spatial={"weights": "timm:resnet50.a1_in1k"}))
    with pytest.raises(ConfigError, match=r"holds mobilevit_s weights; this model needs mobilevit_xxs"):
        create_model(_small(contextual={"weights": "timm:mobilevit_s"}))
    with pytest.raises(ConfigError, match=r"pretrained names go to model\.spatial\.weights"):
        create_model(_small(weights="timm:resnet18.a1_in1k"))


# ---------------------------------------------------------------------------------------- offline
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("spatial", "timm:resnet18.a1_in1k"),
        ("contextual", "hf-hub:timm/mobilevit_xxs.cvnets_in1k"),
    ],
)
def test_offline_without_cache_is_one_line_config_error(hub: Path, option: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_model(_small(**{option: {"weights": value}}))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"model.{option}.weights: {value} could not be fetched")
    assert f"--set model.{option}.weights=/path/to/model.safetensors" in msg


def test_baseline_offline_error(hub: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model.weights: timm:resnet18.a1_in1k could not be fetched"):
        create_model(ModelConfig(name="resnet18", img_size=64, weights="timm:resnet18.a1_in1k"))


# ------------------------------------------------------------------------------- the local cache
def test_timm_tag_loads_from_the_cache(hub: Path) -> None:
    ref = _random("resnet18", seed=1).eval()
    publish(hub, "timm/resnet18.a1_in1k", ref)
    model = create_model(_small(spatial={"weights": "timm:resnet18.a1_in1k"})).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.spatial.body(x)[-1], ref.forward_features(x))


def test_hf_hub_id_loads_contextual_branch_and_its_normalisation(hub: Path) -> None:
    ref = _random("mobilevit_xxs", seed=2)
    publish(hub, "someone/mobilevit-xxs-he", ref, mean=(0.7, 0.55, 0.7), std=(0.15, 0.2, 0.15))
    value = "hf-hub:someone/mobilevit-xxs-he"
    model = create_model(_small(contextual={"weights": value}))
    torch.testing.assert_close(model.contextual.stem.conv.weight, ref.stem.conv.weight)
    # CNN-only is off, spatial has no weights: the contextual weights' own config decides the input.
    cfg, where = resolve_normalization(load_config("smoke", [f"model.contextual.weights={value}"]))
    assert (cfg.data.mean, cfg.data.std) == ((0.7, 0.55, 0.7), (0.15, 0.2, 0.15))
    assert where == f"{value} pretrained_cfg"


def test_baseline_names_load_the_backbone(hub: Path) -> None:
    ref = _random("resnet18", seed=3)
    publish(hub, "timm/resnet18.tv_in1k", ref)
    for value in ("timm:resnet18.tv_in1k", "hf-hub:timm/resnet18.tv_in1k"):
        model = create_model(ModelConfig(name="resnet18", img_size=64, weights=value))
        for k, v in ref.state_dict().items():
            if not k.startswith("fc."):
                torch.testing.assert_close(model.backbone.state_dict()[k], v, msg=k)


def test_vit_baseline_name_resamples_position_embeddings(hub: Path) -> None:
    """timm's own loading adapts a 224-px ViT checkpoint to the baseline's 64-px input."""
    ref = _random("vit_small_patch16_224", seed=4)
    publish(hub, "timm/vit_small_patch16_224.augreg_in21k_ft_in1k", ref)
    model = create_model(ModelConfig(name="vit_s16", img_size=64, weights="timm:vit_small_patch16_224"))
    assert model.backbone.pos_embed.shape == (1, 1 + 4 * 4, 384)
    torch.testing.assert_close(model.backbone.patch_embed.proj.weight, ref.patch_embed.proj.weight)


# ---------------------------------------------------------------------------------- normalisation
def test_normalisation_from_the_weights_config(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config("smoke")
    assert cfg.data.mean is None and cfg.data.std is None  # unset: from the weights
    resolved, where = resolve_normalization(cfg)
    assert (resolved.data.mean, resolved.data.std) == IMAGENET and "no pretrained" in where
    # timm's registry states MobileViT's cvnets weights take [0, 1] inputs (no download needed)
    ctx, _ = resolve_normalization(load_config("smoke", ["model.contextual.weights=timm:mobilevit_xxs"]))
    assert (ctx.data.mean, ctx.data.std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    vit, _ = resolve_normalization(
        load_config("baseline_smoke", ["model.name=vit_s16", "model.weights=timm:vit_small_patch16_224"])
    )
    assert (vit.data.mean, vit.data.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    # both branches named: the spatial branch's decides; explicit values always win
    both, _ = resolve_normalization(
        load_config(
            "smoke",
            ["model.spatial.weights=timm:resnet18.a1_in1k", "model.contextual.weights=timm:mobilevit_xxs"],
        )
    )
    assert (both.data.mean, both.data.std) == IMAGENET
    assert "model.contextual.weights states mean (0.0, 0.0, 0.0)" in caplog.text  # the branch left out
    own, where = resolve_normalization(
        load_config(
            "smoke",
            [
                "model.contextual.weights=timm:mobilevit_xxs",
                "data.mean=[0.5, 0.5, 0.5]",
                "data.std=[0.25, 0.25, 0.25]",
            ],
        )
    )
    assert (own.data.mean, own.data.std, where) == ((0.5,) * 3, (0.25,) * 3, "data.mean / data.std")
    with pytest.raises(ConfigError, match="must be positive"):
        load_config("smoke", ["data.std=[0.2, 0.0, 0.2]"])


def test_normalisation_of_a_run_file_comes_from_its_run_config(tmp_path: Path) -> None:
    """A branch started from an earlier run's model file takes that run's normalisation."""
    run = tmp_path / "earlier"
    run.mkdir()
    earlier = load_config("smoke", ["data.mean=[0.6, 0.5, 0.6]", "data.std=[0.2, 0.25, 0.2]"])
    (run / CONFIG_FILE).write_text(yaml.safe_dump(earlier.model_dump(mode="json")))
    save_weights(create_model(earlier.model), run / "model.safetensors")
    cfg, where = resolve_normalization(
        load_config("smoke", [f"model.spatial.weights={run / 'model.safetensors'}"])
    )
    assert (cfg.data.mean, cfg.data.std) == ((0.6, 0.5, 0.6), (0.2, 0.25, 0.2))
    assert where == str(run / CONFIG_FILE)


def test_trained_run_reloads_without_fetching_its_initial_weights(hub: Path, tmp_path: Path) -> None:
    """A run started from a name is rebuilt offline from its own weights, never re-fetching the name."""
    cfg, _ = resolve_normalization(load_config("smoke", ["model.spatial.weights=timm:resnet18.a1_in1k"]))
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    write_meta(run, {"classes": ["a", "b"], "status": "finished"})
    torch.manual_seed(0)
    model = create_model(without_init_weights(cfg.model))
    save_weights(model, run / "model.safetensors")
    loaded = load_run(run)  # the cache is empty and offline: fetching would raise
    torch.testing.assert_close(loaded.model.spatial.body.conv1.weight, model.spatial.body.conv1.weight)
    assert loaded.config.data.mean == IMAGENET[0]


@pytest.mark.slow
def test_cli_with_hf_home_cache_and_offline_error(tmp_path: Path) -> None:
    """The command line in a fresh process, with HF_HOME and HF_HUB_OFFLINE set as a user sets them."""
    home = tmp_path / "hf_home"
    publish(home / "hub", "timm/resnet18.a1_in1k", _random("resnet18", seed=5))
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    # One process, two commands: a cached name (exit 0), then one that is not cached (exit 2).
    script = (
        "import sys; from cmafnet.cli import main\n"
        "for name in sys.argv[1:]:\n"
        "    rc = main(['info', '--config', 'smoke', '--json', '--set', f'model.spatial.weights={name}'])\n"
        "    print(f'rc={rc}')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, "timm:resnet18.a1_in1k", "timm:resnet18.tv_in1k"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("rc=")] == ["rc=0", "rc=2"]
    assert '"params_total"' in proc.stdout  # the first command printed the model's table
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cmafnet info: error:")]
    assert errors == [
        "cmafnet info: error: model.spatial.weights: timm:resnet18.tv_in1k could not be fetched "
        f"(not in the Hugging Face cache {home / 'hub'}, and HF_HUB_OFFLINE is set); pass a local "
        "weights file instead: --set model.spatial.weights=/path/to/model.safetensors"
    ]
    assert "Traceback" not in proc.stderr


def test_training_records_the_weights_normalisation_and_predict_uses_it(hub: Path, tmp_path: Path) -> None:
    """A run started from MobileViT's cvnets weights (trained on [0, 1] inputs) normalises with
    mean 0 / std 1 in training, records it in config.yaml, and predict rebuilds exactly that."""
    from cmafnet.data.ingest import ingest
    from cmafnet.data.splits import save_split, split_store
    from cmafnet.data.store import PatchStore
    from cmafnet.data.synthetic import write_idc_like
    from cmafnet.inference.predict import Predictor
    from cmafnet.training import fit

    publish(hub, "timm/mobilevit_xxs.cvnets_in1k", _random("mobilevit_xxs", seed=6))
    write_idc_like(tmp_path / "raw", n_patients=5, patches_per_patient=8, minority_frac=0.4, seed=0)
    ingest("idc", tmp_path / "raw", tmp_path / "store", workers=1, progress=False)
    save_split(
        split_store(PatchStore.open(tmp_path / "store"), ratios=(0.6, 0.2, 0.2)), tmp_path / "split.json"
    )
    cfg = load_config("smoke", [
        "model.spatial.enabled=false", "model.contextual.weights=timm:mobilevit_xxs.cvnets_in1k",
        "data.stain.enabled=false", "train.batch_size=8", "train.max_steps_per_epoch=1", "train.device=cpu",
    ])  # fmt: skip
    assert cfg.data.mean is None
    fit(cfg, tmp_path / "store", tmp_path / "split.json", tmp_path / "run", progress=False)
    recorded = yaml.safe_load((tmp_path / "run" / CONFIG_FILE).read_text())["data"]
    assert (recorded["mean"], recorded["std"]) == ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    for blob in hub.rglob("*"):  # the cache is gone: rebuilding the run must not need it
        if blob.is_symlink() or blob.is_file():
            blob.unlink()
    pre = Predictor.from_run_dir(tmp_path / "run", options=PredictOptions(device="cpu")).preprocess
    assert pre.mean.flatten().tolist() == [0.0, 0.0, 0.0] and pre.std.flatten().tolist() == [1.0, 1.0, 1.0]
