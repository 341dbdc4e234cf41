"""The YAML grid of a schedule study (``latentdiff-schedule-study``): datasets x schedules x seeds.

.. code-block:: yaml

    budget_images: 24000          # training length of every cell (images), the same for all
    seeds: [0, 1]                 # one trainer seed per repeat (weights, data order, noise draws)
    baseline: edm                 # the schedule every other one is compared with (paired over seeds)
    train:                        # TrainConfig fields shared by every cell (flags of latentdiff-train)
      config: quickstart
      micro_batch: 16
    sampler: {solver: heun, nfe: 35, sigma_max: "80", samples: 128, batch: 64}
    eval: {metrics: "fwd,swd,kid", kid_subset_size: 64, kid_subsets: 50, inception_weights: null}  # + fwd_level
    datasets:                     # encoded datasets with a validation split (latentdiff-encode --val-fraction)
      px16: {path: data/px16}
      px32: {path: data/px32, train: {model_overrides: {patch_size: 4}}}   # per-dataset train fields
    schedules:                    # name -> noise fields of TrainConfig
      edm: {noise: edm}
      pm-2.0: {noise: edm, p_mean: -2.0}
      wsnr: {noise: wsnr}
      wsnr-nodc: {noise: wsnr, wsnr_include_dc: false}
      resolution: {noise: resolution}
      sd3: {noise: edm, noise_base: logit_normal}

Relative dataset paths are relative to the YAML file.  Cells are ordered dataset-major, then seed, then
schedule, so that complete seeds of the first dataset finish first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from latentdiff.utils.errors import ConfigError

__all__ = ["SCHEDULE_FIELDS", "Cell", "StudyGrid", "load_grid"]

# the TrainConfig fields a schedule may set (everything that chooses the training sigma distribution)
SCHEDULE_FIELDS = ("noise", "noise_base", "p_mean", "p_std", "logit_m", "logit_s", "resolution_ref",
                   "wsnr_reference", "wsnr_include_dc")
TOP_FIELDS = ("budget_images", "seeds", "baseline", "train", "sampler", "eval", "datasets", "schedules")
SAMPLER_FIELDS = {"solver": "heun", "nfe": 35, "sigma_max": "80", "samples": 128, "batch": 64}
EVAL_FIELDS = {"metrics": "fwd,swd,kid", "kid_subset_size": 64, "kid_subsets": 50, "inception_weights": None}
EVAL_OPTIONAL = ("fwd_level",)  # passed to latentdiff-eval only when set (its default otherwise)
# train fields a cell sets itself
RESERVED_TRAIN = ("dataset", "run_dir", "duration_images", "seed", "max_steps", *SCHEDULE_FIELDS)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Cell:
    """One trainer run + sampling + evaluation."""

    dataset: str
    schedule: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.schedule}/seed{self.seed}"


@dataclass
class StudyGrid:
    budget_images: int
    seeds: list
    baseline: str
    datasets: dict  # name -> Path
    schedules: dict  # name -> {TrainConfig noise field: value}
    train: dict = field(default_factory=dict)
    sampler: dict = field(default_factory=lambda: dict(SAMPLER_FIELDS))
    eval: dict = field(default_factory=lambda: dict(EVAL_FIELDS))
    dataset_train: dict = field(default_factory=dict)  # dataset name -> train fields replacing grid.train's

    def train_fields(self, dataset: str) -> dict:
        """``train`` with the dataset's own ``train`` entries on top (``model_overrides`` merged key by key)."""
        out = dict(self.train)
        for k, v in self.dataset_train.get(dataset, {}).items():
            out[k] = {**out.get(k, {}), **v} if k == "model_overrides" and isinstance(v, dict) else v
        return out

    def cells(self) -> list[Cell]:
        return [Cell(d, s, seed) for d in self.datasets for seed in self.seeds for s in self.schedules]

    def to_dict(self) -> dict:
        return {"budget_images": self.budget_images, "seeds": list(self.seeds), "baseline": self.baseline,
                "datasets": {k: str(v) for k, v in self.datasets.items()}, "schedules": self.schedules,
                "train": self.train, "dataset_train": self.dataset_train, "sampler": self.sampler, "eval": self.eval}


def _fail(where: str, msg: str):
    raise ConfigError(f"{where}: {msg}")


def _mapping(v, where: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        _fail(where, f"must be a mapping, got {type(v).__name__}")
    return v


def _names(d: dict, where: str) -> None:
    if not d:
        _fail(where, "needs at least one entry")
    for k in d:
        if not isinstance(k, str) or not _NAME.match(k):
            _fail(where, f"name {k!r} must be letters, digits and _.+- (it becomes a directory name)")


def _with_defaults(v, defaults: dict, where: str, optional=()) -> dict:
    v = _mapping(v, where)
    unknown = sorted(set(v) - set(defaults) - set(optional))
    if unknown:
        _fail(where, f"unknown field(s) {unknown}; known: {sorted([*defaults, *optional])}")
    return {**defaults, **v}


def _schedules(v, where: str) -> dict:
    v = _mapping(v, where)
    _names(v, where)
    out = {}
    for name, fields in v.items():
        fields = _mapping(fields, f"{where}.{name}")
        unknown = sorted(set(fields) - set(SCHEDULE_FIELDS))
        if unknown:
            _fail(f"{where}.{name}", f"unknown schedule field(s) {unknown}; a schedule sets only {list(SCHEDULE_FIELDS)}")
        out[name] = dict(fields)
    return out


def _train_fields(v, where: str) -> dict:
    train = dict(_mapping(v, where))
    clash = sorted(set(train) & set(RESERVED_TRAIN))
    if clash:
        _fail(where, f"field(s) {clash} are set per cell (budget_images, seeds, datasets, schedules)")
    return train


def _datasets(v, base: Path, where: str) -> tuple[dict, dict]:
    v = _mapping(v, where)
    _names(v, where)
    out, train = {}, {}
    for name, d in v.items():
        d = _mapping(d, f"{where}.{name}")
        if "path" not in d or set(d) - {"path", "train"}:
            _fail(f"{where}.{name}", f"takes 'path' (required) and 'train', got {sorted(d)}")
        p = Path(d["path"])
        p = p if p.is_absolute() else (base / p)
        if not (p / "dataset.json").is_file():
            _fail(f"{where}.{name}.path", f"{p}/dataset.json not found; encode the dataset first "
                                         "(latentdiff-encode ... --val-fraction 0.2)")
        if not (p / "val" / "dataset.json").is_file():
            _fail(f"{where}.{name}.path", f"{p}/val/dataset.json not found: the study evaluates against the "
                                         "validation split; re-encode with --val-fraction 0.2")
        out[name] = p.resolve()
        if "train" in d:
            train[name] = _train_fields(d["train"], f"{where}.{name}.train")
    return out, train


def _seeds(v, where: str) -> list:
    if not isinstance(v, list) or not v or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in v):
        _fail(where, f"must be a non-empty list of non-negative integers, got {v!r}")
    if len(set(v)) != len(v):
        _fail(where, f"has repeated seeds {v!r}")
    return list(v)


def parse_grid(raw, base: Path, where: str = "grid") -> StudyGrid:
    """Validate a grid mapping (see the module docstring); ``base`` resolves relative dataset paths."""
    raw = _mapping(raw, where)
    unknown = sorted(set(raw) - set(TOP_FIELDS))
    if unknown:
        _fail(where, f"unknown field(s) {unknown}; known: {list(TOP_FIELDS)}")
    missing = [k for k in ("budget_images", "seeds", "datasets", "schedules") if k not in raw]
    if missing:
        _fail(where, f"missing field(s) {missing}")
    b = raw["budget_images"]
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        _fail(f"{where}.budget_images", f"must be a positive integer (training images per cell), got {b!r}")
    schedules = _schedules(raw["schedules"], f"{where}.schedules")
    baseline = raw.get("baseline", next(iter(schedules)))
    if baseline not in schedules:
        _fail(f"{where}.baseline", f"{baseline!r} is not one of the schedules {list(schedules)}")
    train = _train_fields(raw.get("train"), f"{where}.train")
    datasets, dataset_train = _datasets(raw["datasets"], base, f"{where}.datasets")
    return StudyGrid(
        budget_images=b, seeds=_seeds(raw["seeds"], f"{where}.seeds"), baseline=baseline,
        datasets=datasets, dataset_train=dataset_train, schedules=schedules, train=train,
        sampler=_with_defaults(raw.get("sampler"), SAMPLER_FIELDS, f"{where}.sampler"),
        eval=_with_defaults(raw.get("eval"), EVAL_FIELDS, f"{where}.eval", EVAL_OPTIONAL),
    )


def load_grid(path) -> StudyGrid:
    """Read and validate a grid YAML file (:class:`ConfigError` naming the file and the field)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study grid {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"study grid {path} is not valid YAML ({e})") from None
    return parse_grid(raw, path.parent.resolve(), where=str(path))
