"""Dataset layouts: IDC (Kaggle), BreakHis (original) and a generic folder / CSV manifest.

Each dataset knows its classes, its published counts, how to list its files, how to turn a path
into a record (patient, label, subtype, magnification, coordinates) and which image sizes it
accepts. Ingest (:mod:`cmafnet.data.ingest`) does the decoding; these classes only parse names.

A parse result is either a record dict or a ``(reason, detail)`` tuple with a reason from
:mod:`cmafnet.data.validation`.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from cmafnet.data import scale
from cmafnet.data.safety import image_size, one_line, text_stream
from cmafnet.data.validation import BAD_NAME, IMAGE_EXTENSIONS, LABEL_MISMATCH, SizePolicy
from cmafnet.errors import ConfigError, InputDataError

Parsed = dict[str, Any] | tuple[str, str]


class Dataset:
    """Base class: subclasses set the constants and implement :meth:`parse`."""

    name: ClassVar[str] = ""
    CLASSES: ClassVar[tuple[str, ...]] = ()
    SUBTYPES: ClassVar[tuple[str, ...]] = ()
    PUBLISHED: ClassVar[dict[str, Any]] = {}
    # (index column, PUBLISHED key, name in the difference lines) compared by :meth:`validate`
    COUNTED: ClassVar[tuple[tuple[str, str, str], ...]] = (("label_name", "per_class", "class"),)
    DEFAULT_MPP: ClassVar[float | None] = None  # µm/px without --mpp
    DEFAULT_MPP_SOURCE: ClassVar[str] = "unknown (pass --mpp)"

    def __init__(
        self, root: str | Path, size: tuple[int, int] | None = None, *, mpp: float | None = None
    ) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise InputDataError(f"{self.root}: source folder not found")
        self.size = size
        self.mpp = None if mpp is None else scale.check_mpp(mpp)

    @property
    def patient_source(self) -> str:
        """Where each image's patient comes from (``meta.json`` ``patient_source``)."""
        return "file name (dataset layout)"

    def options_key(self) -> str:
        """Options that change the store's content beyond the size policy (ingest fingerprint; "" = none)."""
        return f"mpp={self.mpp}" if self.mpp is not None else ""

    @property
    def mpp_source(self) -> str:
        """Where the recorded microns per pixel come from (``meta.json`` ``mpp_source``)."""
        return "--mpp argument" if self.mpp is not None else self.DEFAULT_MPP_SOURCE

    def source_mpp(self, record: dict[str, Any], orig_hw: tuple[int, int]) -> float | None:
        """µm/px of one source image (before ingest's padding/resizing), or None when unknown."""
        return self.mpp if self.mpp is not None else self.DEFAULT_MPP

    def files(self) -> list[Path]:
        """Entries under the root with an image extension, sorted (hidden files and folders skipped).

        Devices, FIFOs and broken links named like images are listed, so that decoding rejects them
        with their reason (it never opens them) instead of their vanishing silently.
        """
        return sorted(
            p
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and not p.is_dir()
        )

    def parse(self, path: Path) -> Parsed:  # pragma: no cover - abstract
        raise NotImplementedError

    def size_policy(self) -> SizePolicy:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, index: pd.DataFrame) -> list[str]:
        """Compare an ingested index with the published counts; one line per difference."""
        pub = self.PUBLISHED
        notes = [
            f"{key}: found {n:,}, published {pub[key]:,}"
            for key, n in (("images", len(index)), ("patients", int(index["patient"].nunique())))
            if key in pub and n != pub[key]
        ]
        for col, key, what in self.COUNTED:
            counts = Counter(index[col].tolist())
            notes += [
                f"{what} {k}: found {counts.get(k, 0):,}, published {n:,}"
                for k, n in pub.get(key, {}).items()
                if counts.get(k, 0) != n
            ]
        return notes


# ------------------------------------------------------------------------------------------- IDC
class IDC(Dataset):
    """Kaggle IDC: ``<root>/<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<C>.png``, 50x50 RGB.

    Edge patches smaller than 50x50 are padded with white to 50x50 (original size recorded).
    """

    name = "idc"
    CLASSES = ("non-IDC", "IDC")
    PUBLISHED = {"images": 277_524, "patients": 279, "per_class": {"non-IDC": 198_738, "IDC": 78_786}}
    PATCH = (50, 50)
    # Edge patches are smaller because they were cut at the slide border, not resized: same µm/px.
    DEFAULT_MPP, DEFAULT_MPP_SOURCE = scale.IDC_MPP, scale.IDC_MPP_SOURCE
    _NAME = re.compile(r"^(?P<patient>[A-Za-z0-9-]+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<label>[01])\.png$")

    def parse(self, path: Path) -> Parsed:
        m = self._NAME.match(path.name)
        if not m:
            return BAD_NAME, "expected <patient>_idx5_x<X>_y<Y>_class<0|1>.png"
        label = int(m["label"])
        if path.parent.name in ("0", "1") and int(path.parent.name) != label:
            return LABEL_MISMATCH, f"folder {path.parent.name}, name class{label}"
        if path.parent.name in ("0", "1") and path.parent.parent.name != m["patient"]:
            return LABEL_MISMATCH, f"patient folder {path.parent.parent.name}, name {m['patient']}"
        return {
            "patient": m["patient"],
            "label": label,
            "label_name": self.CLASSES[label],
            "subtype": "",
            "magnification": -1,
            "x": int(m["x"]),
            "y": int(m["y"]),
        }

    def size_policy(self) -> SizePolicy:
        return SizePolicy(out_hw=self.size or self.PATCH, canvas_hw=self.PATCH, allow_smaller=True)


# -------------------------------------------------------------------------------------- BreakHis
class BreakHis(Dataset):
    """BreakHis v1 original layout::

        BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype>/SOB_<B|M>_<code>_<patient>/
            <mag>X/SOB_<B|M>_<code>-<patient>-<mag>-<idx>.png

    700x460 RGB (some 700x456, padded with white to 460 rows). The patient id is the slide code
    (``14-22549AB``), so patient ``14-13412``, filed under DC and LC, is one patient: 82 patient
    folders, 81 patient ids.
    """

    name = "breakhis"
    CLASSES = ("benign", "malignant")
    SUBTYPES = ("A", "F", "PT", "TA", "DC", "LC", "MC", "PC")
    SUBTYPE_FOLDERS = {
        "A": "adenosis", "F": "fibroadenoma", "PT": "phyllodes_tumor", "TA": "tubular_adenoma",
        "DC": "ductal_carcinoma", "LC": "lobular_carcinoma", "MC": "mucinous_carcinoma",
        "PC": "papillary_carcinoma",
    }  # fmt: skip
    MAGNIFICATIONS = (40, 100, 200, 400)
    # Spanhol et al. 2016, Table 1 / 2. "patients" counts patient folders (82); the ids are 81.
    PUBLISHED = {
        "images": 7_909,
        "patient_folders": 82,
        "per_class": {"benign": 2_480, "malignant": 5_429},
        "per_subtype": {
            "A": 444,
            "F": 1_014,
            "PT": 453,
            "TA": 569,
            "DC": 3_451,
            "LC": 626,
            "MC": 792,
            "PC": 560,
        },
        "per_magnification": {40: 1_995, 100: 2_081, 200: 2_013, 400: 1_820},
    }
    COUNTED = (
        ("label_name", "per_class", "label_name"),
        ("subtype", "per_subtype", "subtype"),
        ("magnification", "per_magnification", "magnification"),
    )
    CANVAS = (460, 700)
    _NAME = re.compile(
        r"^SOB_(?P<bm>[BM])_(?P<code>[A-Z]+)-(?P<patient>\d+-\d+[A-Z]*)-(?P<mag>\d+)-(?P<idx>\d+)\.png$"
    )

    def parse(self, path: Path) -> Parsed:
        m = self._NAME.match(path.name)
        if not m or m["code"] not in self.SUBTYPES or int(m["mag"]) not in self.MAGNIFICATIONS:
            return BAD_NAME, "expected SOB_<B|M>_<subtype>-<patient>-<40|100|200|400>-<idx>.png"
        code, mag, bm = m["code"], int(m["mag"]), m["bm"]
        label = int(bm == "M")
        if (self.SUBTYPES.index(code) >= 4) != bool(label):
            return LABEL_MISMATCH, f"subtype {code} is not {'malignant' if label else 'benign'}"
        # The layout is checked where present: contradicting folders are rejected, missing
        # levels (a flattened copy) are tolerated.
        parts = path.parts[:-1]
        if re.fullmatch(r"\d+X", path.parent.name) and path.parent.name != f"{mag}X":
            return LABEL_MISMATCH, f"folder {path.parent.name}, name magnification {mag}"
        slide = f"SOB_{bm}_{code}_{m['patient']}"
        if len(parts) >= 2 and parts[-2].startswith("SOB_") and parts[-2] != slide:
            return LABEL_MISMATCH, f"folder {parts[-2]}, name {slide}"
        for folder in parts:
            if folder in ("benign", "malignant") and folder != self.CLASSES[label]:
                return LABEL_MISMATCH, f"folder {folder}, name {bm}"
            if folder in self.SUBTYPE_FOLDERS.values() and folder != self.SUBTYPE_FOLDERS[code]:
                return LABEL_MISMATCH, f"folder {folder}, name subtype {code}"
        return {
            "patient": m["patient"],
            "label": label,
            "label_name": self.CLASSES[label],
            "subtype": code,
            "magnification": mag,
            "x": -1,
            "y": -1,
        }

    def size_policy(self) -> SizePolicy:
        return SizePolicy(
            out_hw=self.size or self.CANVAS, canvas_hw=self.CANVAS, extra_hw=frozenset({(456, 700)})
        )

    @property
    def mpp_source(self) -> str:
        if self.mpp is not None:
            return "--mpp argument (the 40X value; other magnifications scaled by 40/M)"
        return scale.BREAKHIS_MPP_SOURCE

    def source_mpp(self, record: dict[str, Any], orig_hw: tuple[int, int]) -> float | None:
        # The values hold for the native 700 px width; a copy saved at another width scales with it.
        native = scale.breakhis_mpp(int(record["magnification"]), self.mpp)
        return native * self.CANVAS[1] / orig_hw[1]

    def validate(self, index: pd.DataFrame) -> list[str]:
        notes = super().validate(index)
        folders = index.drop_duplicates(["patient", "subtype"]).shape[0]
        if folders != self.PUBLISHED["patient_folders"]:
            notes.insert(
                int(len(index) != self.PUBLISHED["images"]),  # after the images line, as published
                f"patient folders: found {folders}, published {self.PUBLISHED['patient_folders']} "
                f"({index['patient'].nunique()} patient ids)",
            )
        return notes


# ---------------------------------------------------------------------------------------- folder
class Folder(Dataset):
    """User data: ``<root>/<class>/[<patient>/]<images>`` or a CSV manifest ``path,label[,patient][,mpp]``.

    Classes are the sorted class folder names (or sorted distinct manifest labels). The patient of
    an image is, in this order: ``patient_regex`` applied to the file name (named group
    ``patient``, else the first group, else the whole match; a name that does not match is
    rejected), the manifest's ``patient`` column, the ``<patient>`` folder. Without any of them
    every image is its own patient (splits are then by image), which the ingest summary and the
    split say.
    The store size is ``--size`` (every image resized to it) or the most common image size (other
    sizes rejected as unexpected).
    """

    name = "folder"
    OWN_PATIENT = "none given: each image is its own patient (splits are by image)"

    def __init__(
        self,
        root: str | Path,
        size: tuple[int, int] | None = None,
        *,
        mpp: float | None = None,
        patient_regex: str | None = None,
    ) -> None:
        super().__init__(root, size, mpp=mpp)
        try:
            self.patient_regex = None if patient_regex is None else re.compile(patient_regex)
        except re.error as err:
            raise ConfigError(
                f"--patient-regex {patient_regex!r} is not a valid regular expression ({err})"
            ) from None
        self.n_own_patient = 0  # images that became their own patient (counted while parsing)
        self.manifest: pd.DataFrame | None = None
        if self.root.is_file():
            if self.root.suffix.lower() != ".csv":
                raise InputDataError(f"{self.root}: expected a folder or a .csv manifest")
            try:
                df = pd.read_csv(text_stream(self.root, "CSV manifest"), dtype=str)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
                raise InputDataError(f"{self.root}: not a readable CSV manifest ({one_line(err)})") from None
            missing = {"path", "label"} - set(df.columns)
            if missing:
                raise InputDataError(f"{self.root}: manifest lacks column(s) {sorted(missing)}")
            # an empty path resolves to the manifest's folder: rejected as "not a regular file"
            df["abspath"] = [str((self.root.parent / p).resolve()) for p in df["path"].fillna("")]
            dup = df["abspath"][df["abspath"].duplicated()]
            if len(dup):
                raise InputDataError(
                    f"{self.root}: {len(dup)} duplicate path(s) in the manifest, e.g. {dup.iloc[0]}"
                )
            if "mpp" in df.columns:
                for k, v in df["mpp"].dropna().items():
                    scale.check_mpp(v, f"{self.root}: row {k + 2} column mpp")
            self.manifest = df.set_index("abspath")
            self.CLASSES = tuple(sorted(df["label"].dropna().unique()))
        else:
            self.CLASSES = tuple(
                sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            )
        if len(self.CLASSES) < 2:
            raise InputDataError(f"{self.root}: need at least two classes, found {list(self.CLASSES)}")

    def options_key(self) -> str:
        key = super().options_key()
        return key + (f"|patient_regex={self.patient_regex.pattern}" if self.patient_regex else "")

    @property
    def patient_source(self) -> str:
        if self.patient_regex is not None:
            return f"--patient-regex {self.patient_regex.pattern!r} on the file name"
        if self.manifest is not None and "patient" in self.manifest.columns:
            return "manifest column 'patient'"
        return "<class>/<patient>/<image> folders" if self.n_own_patient == 0 else self.OWN_PATIENT

    @property
    def mpp_source(self) -> str:
        if self.manifest is not None and "mpp" in self.manifest.columns:
            return "manifest column 'mpp'" + (" (else --mpp)" if self.mpp is not None else "")
        return super().mpp_source

    def source_mpp(self, record: dict[str, Any], orig_hw: tuple[int, int]) -> float | None:
        value = record.get("_mpp")
        return float(value) if value is not None else self.mpp

    def files(self) -> list[Path]:
        if self.manifest is not None:
            return [Path(p) for p in self.manifest.index]
        return super().files()

    def parse(self, path: Path) -> Parsed:
        patient, mpp = None, None
        if self.manifest is not None:
            row = self.manifest.loc[str(path)]
            name = row["label"]
            value = row.get("patient")  # None without the column
            patient = value if isinstance(value, str) and value else None
            value = row.get("mpp")
            mpp = float(value) if isinstance(value, str) and value.strip() else None
        else:
            rel = path.relative_to(self.root)
            if len(rel.parts) not in (2, 3):
                return BAD_NAME, "expected <class>/<image> or <class>/<patient>/<image>"
            name = rel.parts[0]
            patient = rel.parts[1] if len(rel.parts) == 3 else None
        if self.patient_regex is not None:
            m = self.patient_regex.search(path.name)
            if not m:
                return BAD_NAME, f"file name does not match --patient-regex {self.patient_regex.pattern!r}"
            patient = (
                m.group("patient")
                if "patient" in self.patient_regex.groupindex
                else m.group(1 if self.patient_regex.groups else 0)
            )
        if not patient:
            patient = path.stem
            self.n_own_patient += 1
        if name not in self.CLASSES:
            return BAD_NAME, f"label {name!r} not among {list(self.CLASSES)}"
        return {
            "patient": patient,
            "label": self.CLASSES.index(name),
            "label_name": name,
            "subtype": "",
            "magnification": -1,
            "x": -1,
            "y": -1,
            "_mpp": mpp,
        }

    def size_policy(self) -> SizePolicy:
        if self.size:
            return SizePolicy(out_hw=self.size, canvas_hw=self.size, resize_any=True)
        # headers only, a cheap majority vote; None: unsafe or unreadable, rejected later with its reason
        sizes = Counter(hw for p in self.files()[:2000] if (hw := image_size(p)) is not None)
        if not sizes:
            raise InputDataError(f"{self.root}: no readable image to take the store size from")
        hw = sizes.most_common(1)[0][0]
        return SizePolicy(out_hw=hw, canvas_hw=hw)


DATASETS: dict[str, type[Dataset]] = {"idc": IDC, "breakhis": BreakHis, "folder": Folder}


def get_dataset(
    name: str,
    root: str | Path,
    size: tuple[int, int] | None = None,
    *,
    mpp: float | None = None,
    patient_regex: str | None = None,
) -> Dataset:
    """Instantiate a dataset parser by name (``idc``, ``breakhis``, ``folder``).

    ``patient_regex`` applies to folder data only (IDC and BreakHis names carry the patient).
    """
    from cmafnet.registry import suggest

    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}'.{suggest(name, list(DATASETS))}")
    if patient_regex is not None:
        if name != "folder":
            raise ConfigError(
                f"--patient-regex applies to 'ingest folder' only; {name} file names carry the patient"
            )
        return Folder(root, size, mpp=mpp, patient_regex=patient_regex)
    return DATASETS[name](root, size, mpp=mpp)
