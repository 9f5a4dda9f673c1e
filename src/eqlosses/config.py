"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

A configuration is a tree of dataclasses. ``load_config(path, overrides)`` reads a YAML file
(any subset of the keys; the rest keep their defaults), applies ``section.key=value``
overrides (values parsed as YAML scalars: ``3``, ``0.5``, ``true``, ``null``, ``[1, 2]``) and
checks every key: an unknown key is an error that lists the valid ones. The ``loss`` section
is open: besides ``name`` it takes the chosen loss's keyword arguments (``loss.tau=1.5``),
which the loss itself validates when it is built.

Resuming a run reads the run's own ``config.yaml`` (:func:`resume_config`): settings given
again must agree with it, except the few in :data:`RESUME_MAY_CHANGE`, which only change where
the run computes and what it prints or writes alongside.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

__all__ = ["DataConfig", "ModelConfig", "LossConfig", "OptimConfig", "EvalConfig",
           "ClassificationConfig", "DetectionConfig", "SegmentationConfig", "CONFIGS",
           "ConfigError", "load_config", "apply_overrides", "to_dict", "from_dict",
           "save_config", "validate", "resume_config", "explicit_settings",
           "RESUME_MAY_CHANGE", "RUN_LOCATION_KEYS"]


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied."""


@dataclass
class DataConfig:
    #: ``embedded`` (the Fashion-MNIST-LT subset shipped with the package), ``fashion_mnist``
    #: (IDX files under ``root``, made long-tailed here), ``list`` (ImageNet-LT style list
    #: files) or ``folder`` (torchvision image folders ``root/train``, ``root/val``).
    name: str = "embedded"
    root: Optional[str] = None
    train_list: Optional[str] = None
    val_list: Optional[str] = None
    #: long-tailed profile for ``fashion_mnist``: n_k = n_max * imbalance^(-k / (C - 1))
    imbalance: float = 100.0
    n_max: Optional[int] = None
    subset_seed: int = 0
    #: ``instance``, ``class_balanced``, ``sqrt`` or ``rfs``
    sampler: str = "instance"
    rfs_threshold: float = 0.001
    batch_size: int = 128
    eval_batch_size: int = 512
    num_workers: int = 0
    augment: bool = True
    #: input size for image-list / image-folder data (resized and cropped)
    image_size: int = 224
    #: a validation split carved from the training data, evaluated *instead of* the test set
    #: (choose settings on it, never on the test set; both off by default).
    #: ``val_fraction`` in (0, 1): a seeded, stratified hold-out of each class of the
    #: training set, round(fraction * n_k) images but at least ``val_min_per_class``, and
    #: never a class's last training image (a one-image class stays whole in training).
    #: ``val_per_class`` > 0 (``fashion_mnist`` only): a balanced set of that many images per
    #: class from the training-split images the long-tailed subset leaves out; the training
    #: subset is unchanged. ``val_seed`` seeds either draw.
    val_fraction: float = 0.0
    val_min_per_class: int = 1
    val_per_class: int = 0
    val_seed: int = 0


@dataclass
class ModelConfig:
    #: ``small_cnn`` (28x28 inputs, CPU-friendly) or a torchvision ResNet
    #: (``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``)
    name: str = "small_cnn"
    width: int = 32
    #: cosine classifier: normalised features and weights times ``cosine_scale``
    cosine: bool = False
    cosine_scale: float = 30.0
    #: a local state-dict file to initialise the backbone from (nothing is downloaded)
    pretrained: Optional[str] = None


@dataclass
class LossConfig:
    name: str = "softmax_eql"
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    epochs: int = 30
    schedule: str = "cosine"  # cosine | step | constant
    milestones: List[int] = field(default_factory=lambda: [20, 25])
    step_gamma: float = 0.1
    warmup_epochs: float = 1.0
    grad_clip: Optional[float] = None
    #: ``auto`` (float16 with loss scaling on CUDA, off on CPU), ``off``, ``fp16``, ``bf16``
    amp: str = "auto"


@dataclass
class EvalConfig:
    #: many > many_above, few < few_below training images, medium in between
    many_above: int = 100
    few_below: int = 20
    every_epochs: int = 1


@dataclass
class RunConfig:
    """What every task's configuration has: the run's name and place, seeding, device and
    how often it logs, records statistics and checkpoints."""

    task: str = "cls"  # set by each task's configuration class
    name: Optional[str] = None
    output_dir: str = "runs"
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    log_every: int = 20
    stats_every: int = 10
    checkpoint_every_steps: int = 0
    tensorboard: bool = True
    progress: bool = True
    #: seconds the processes of a multi-process run wait for each other in a collective
    #: (and at start-up) before failing with a clear error: a peer that died or hangs
    dist_timeout: float = 1800.0


@dataclass
class ClassificationConfig(RunConfig):
    task: str = "cls"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------

@dataclass
class DetDataConfig:
    #: ``canvas`` (the generated LVIS-format benchmark under ``root``; generated there with
    #: the default specification when the folder does not exist), ``lvis`` or ``coco``
    #: (annotation files and image folders given below)
    name: str = "canvas"
    root: Optional[str] = "data/canvas-det"
    train_ann: Optional[str] = None
    val_ann: Optional[str] = None
    train_images: Optional[str] = None
    val_images: Optional[str] = None
    #: ``instance`` or ``rfs`` (repeat-factor sampling with ``rfs_threshold``, LVIS: 0.001)
    sampler: str = "instance"
    rfs_threshold: float = 0.001
    batch_size: int = 4
    eval_batch_size: int = 8
    num_workers: int = 0
    #: random horizontal flip of training images (seeded per epoch and image)
    flip: bool = True
    #: drop training images without annotations (kept by default: LVIS negatives)
    skip_empty: bool = False
    #: evaluate on the first N validation images only (quick checks); null = all
    max_val_images: Optional[int] = None
    #: ``canvas`` only, the canvases evaluated: ``val`` (the held-out validation canvases:
    #: the benchmark's test set) or ``dev`` (development canvases carved from the training
    #: items, for choosing settings; generate with ``eqlosses data make-detection
    #: --dev-per-class N``). For ``lvis`` / ``coco`` give a development JSON as ``val_ann``.
    eval_split: str = "val"


@dataclass
class DetModelConfig:
    #: ``faster_rcnn``, ``mask_rcnn``, ``retinanet`` or ``fcos``
    arch: str = "faster_rcnn"
    #: ``tiny``, ``mobilenet_v3``, ``resnet18`` (CPU-sized) or ``resnet50`` (the standard)
    backbone: str = "mobilenet_v3"
    min_size: int = 128
    max_size: int = 128
    #: local state-dict files (nothing is downloaded)
    pretrained: Optional[str] = None
    pretrained_backbone: Optional[str] = None
    #: passed to the torchvision detector, e.g. ``box_batch_size_per_image: 128``
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DetEvalConfig:
    every_epochs: int = 1
    #: the LVIS test protocol: score threshold 1e-4, 300 detections per image, per-class NMS
    score_thresh: float = 1e-4
    detections_per_img: int = 300
    nms_thresh: float = 0.5
    #: LVIS groups by training image count: rare <= rare_max, common <= common_max
    rare_max: int = 10
    common_max: int = 100


@dataclass
class DetectionConfig(RunConfig):
    task: str = "det"
    data: DetDataConfig = field(default_factory=DetDataConfig)
    model: DetModelConfig = field(default_factory=DetModelConfig)
    loss: LossConfig = field(default_factory=lambda: LossConfig(name="sigmoid_eql"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=0.02, weight_decay=1e-4, epochs=12, schedule="step", milestones=[8, 11],
        warmup_epochs=0.5))
    eval: DetEvalConfig = field(default_factory=DetEvalConfig)


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------

@dataclass
class SegDataConfig:
    #: ``canvas`` (the generated benchmark under ``root``; generated there with the default
    #: specification when the folder does not exist), ``ade20k`` (``ADEChallengeData2016``
    #: at ``root``: 150 classes, label 0 ignored) or ``folder`` (the same layout with a
    #: ``classes.json``)
    name: str = "canvas"
    root: Optional[str] = "data/canvas-seg"
    #: ``instance`` or ``rfs`` (repeat-factor sampling over the classes present per image)
    sampler: str = "instance"
    rfs_threshold: float = 0.001
    batch_size: int = 8
    eval_batch_size: int = 16
    num_workers: int = 0
    #: training augmentation: random scale in [scale_min, scale_max], crop, flip
    augment: bool = True
    crop_size: Optional[int] = 128
    scale_min: float = 0.75
    scale_max: float = 1.25
    ignore_index: int = 255


@dataclass
class SegModelConfig:
    #: ``deeplabv3``, ``fcn``, ``lraspp`` (torchvision) or a small CPU model (see
    #: ``eqlosses.tasks.segmentation_models``)
    arch: str = "lraspp"
    backbone: Optional[str] = "mobilenet_v3_large"
    pretrained: Optional[str] = None
    pretrained_backbone: Optional[str] = None
    #: passed to the model builder, e.g. ``width: 32`` (tiny_deeplab), ``output_stride: 8``
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SegEvalConfig:
    every_epochs: int = 1
    #: groups of classes by their share of training pixels: head > head_above,
    #: tail < tail_below, body in between
    head_above: float = 0.01
    tail_below: float = 0.001


@dataclass
class SegmentationConfig(RunConfig):
    task: str = "seg"
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=0.01, weight_decay=1e-4, epochs=20, schedule="cosine", warmup_epochs=1.0))
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)


#: task name -> configuration class
CONFIGS = {"cls": ClassificationConfig, "det": DetectionConfig, "seg": SegmentationConfig}
AnyConfig = Union[ClassificationConfig, DetectionConfig, SegmentationConfig]


def _yaml():
    try:
        import yaml
    except ImportError:  # pragma: no cover - exercised without the extra only
        raise ImportError("YAML configs need PyYAML, a dependency of eqlosses: "
                          "pip install pyyaml") from None
    return yaml


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A plain nested dict (the loss section flattened to ``name`` plus its arguments)."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, LossConfig):
            out[f.name] = {"name": value.name, **value.kwargs}
        elif dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        else:
            out[f.name] = value
    return out


def _set(cfg: Any, path: List[str], value: Any, where: str) -> None:
    key = path[0]
    if isinstance(cfg, LossConfig):
        if len(path) != 1:
            raise ConfigError(f"{where}: loss options are flat (loss.<name>=value), got "
                              f"{'.'.join(path)}")
        if key == "name":
            cfg.name = _check_type("str", value, where)
        else:
            cfg.kwargs[key] = value
        return
    names = {f.name: f for f in dataclasses.fields(cfg)}
    if key not in names:
        raise ConfigError(f"{where}: unknown key '{key}' in {type(cfg).__name__}; valid keys: "
                          f"{', '.join(sorted(names))}")
    current = getattr(cfg, key)
    if dataclasses.is_dataclass(current):
        if len(path) == 1:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{key}' is a section; give a mapping or "
                                  f"{key}.<option>=value")
            for sub, subvalue in value.items():
                _set(current, [str(sub)], subvalue, where)
        else:
            _set(current, path[1:], value, where)
        return
    if isinstance(current, dict) and len(path) > 1:  # an open mapping, e.g. model.options
        current[".".join(path[1:])] = value
        return
    if len(path) != 1:
        raise ConfigError(f"{where}: '{key}' is not a section")
    setattr(cfg, key, _check_type(names[key].type, value, f"{where}: {key}"))


def _check_type(annotation: Any, value: Any, where: str) -> Any:
    text = str(annotation)
    if value is None:
        if "Optional" in text or "None" in text:
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {text})")
    if "bool" in text and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if text in ("int", "Optional[int]") and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if "float" in text and not "List" in text:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if text in ("str", "Optional[str]") and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if text.startswith("Dict") and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    if text.startswith("List"):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if "int" in text and not all(isinstance(v, int) and not isinstance(v, bool)
                                     for v in value):
            raise ConfigError(f"{where}: expected a list of integers, got {value!r}")
    return value


#: (section, key) -> (lowest allowed value, whether the bound is inclusive)
_LOWER_BOUNDS = {
    ("", "log_every"): (1, True), ("", "stats_every"): (1, True),
    ("", "checkpoint_every_steps"): (0, True), ("", "dist_timeout"): (0, False),
    ("data", "batch_size"): (1, True), ("data", "eval_batch_size"): (1, True),
    ("data", "num_workers"): (0, True), ("data", "imbalance"): (1, True),
    ("data", "n_max"): (1, True), ("data", "rfs_threshold"): (0, False),
    ("data", "val_fraction"): (0, True), ("data", "val_min_per_class"): (0, True),
    ("data", "val_per_class"): (0, True),
    ("data", "image_size"): (8, True), ("model", "width"): (1, True),
    ("model", "cosine_scale"): (0, False), ("optim", "lr"): (0, False),
    ("optim", "epochs"): (1, True), ("optim", "warmup_epochs"): (0, True),
    ("optim", "weight_decay"): (0, True), ("optim", "momentum"): (0, True),
    ("optim", "step_gamma"): (0, False), ("optim", "grad_clip"): (0, False),
    ("eval", "many_above"): (0, True), ("eval", "few_below"): (1, True),
    ("eval", "every_epochs"): (1, True), ("eval", "detections_per_img"): (1, True),
    ("eval", "score_thresh"): (0, True), ("model", "min_size"): (16, True),
    ("model", "max_size"): (16, True), ("data", "crop_size"): (16, True),
    ("data", "scale_min"): (0, False), ("data", "max_val_images"): (1, True),
    ("eval", "head_above"): (0, True), ("eval", "tail_below"): (0, True),
}


def validate(cfg: AnyConfig) -> AnyConfig:
    """Range checks that types alone cannot express; raises ConfigError naming the key."""
    for (section, key), (low, inclusive) in _LOWER_BOUNDS.items():
        value = getattr(getattr(cfg, section) if section else cfg, key, None)
        if value is None:
            continue
        if value < low or (value == low and not inclusive):
            name = f"{section}.{key}" if section else key
            relation = ">=" if inclusive else ">"
            raise ConfigError(f"{name} must be {relation} {low}, got {value}")
    if isinstance(cfg, SegmentationConfig):
        if cfg.data.scale_min > cfg.data.scale_max:
            raise ConfigError(f"data.scale_min ({cfg.data.scale_min}) must not exceed "
                              f"data.scale_max ({cfg.data.scale_max})")
        if cfg.eval.tail_below > cfg.eval.head_above:
            raise ConfigError(f"eval.tail_below ({cfg.eval.tail_below}) must not exceed "
                              f"eval.head_above ({cfg.eval.head_above})")
    if isinstance(cfg, DetectionConfig) and cfg.eval.rare_max > cfg.eval.common_max:
        raise ConfigError(f"eval.rare_max ({cfg.eval.rare_max}) must not exceed "
                          f"eval.common_max ({cfg.eval.common_max})")
    if isinstance(cfg, ClassificationConfig) and not cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be < 1, got {cfg.data.val_fraction}")
    if isinstance(cfg, ClassificationConfig) and cfg.data.val_fraction and \
            cfg.data.val_per_class:
        raise ConfigError("data.val_fraction and data.val_per_class choose two different "
                          "validation splits; set one of them")
    if isinstance(cfg, ClassificationConfig) and cfg.eval.few_below > cfg.eval.many_above + 1:
        raise ConfigError(f"eval.few_below ({cfg.eval.few_below}) must not exceed "
                          f"eval.many_above + 1 ({cfg.eval.many_above + 1})")
    _validate_loss(cfg)
    return cfg


def _validate_loss(cfg: AnyConfig) -> None:
    """The loss's name and arguments, checked against its declared traits for the task's head
    (:func:`eqlosses.losses.check_loss_config`) before any data is loaded."""
    from .losses import check_loss_config

    arch = getattr(cfg.model, "arch", None) if cfg.task == "det" else None
    try:
        check_loss_config(cfg.task, cfg.loss.name, cfg.loss.kwargs, arch=arch)
    except ValueError as err:
        where = f" (model.arch={arch})" if arch else ""
        raise ConfigError(f"loss{where}: {err}") from None


def _config_for(task: Any, where: str) -> AnyConfig:
    if task not in CONFIGS:
        raise ConfigError(f"{where}: unknown task {task!r}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[task]()


def from_dict(data: Dict[str, Any], cfg: Optional[AnyConfig] = None,
              where: str = "config") -> AnyConfig:
    """Apply a nested mapping onto ``cfg`` (default: a fresh default configuration of the
    mapping's ``task``, classification when it names none)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level, got "
                          f"{type(data).__name__}")
    if cfg is None:
        cfg = _config_for(data.get("task", "cls"), where)
    elif data.get("task", cfg.task) != cfg.task:
        raise ConfigError(f"{where}: this is a '{data['task']}' configuration, but a "
                          f"'{cfg.task}' one is needed here")
    for key, value in data.items():
        _set(cfg, [str(key)], value, where)
    return cfg


def _parse_override(item: str, yaml: Any) -> tuple:
    """``"section.key=value"`` -> (``["section", "key"]``, the value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. loss.tau=1.5")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': cannot parse the value: {err}") from None
    return key.strip().split("."), value


def apply_overrides(cfg: AnyConfig, overrides: List[str]) -> AnyConfig:
    """Apply ``section.key=value`` strings; values are parsed as YAML scalars."""
    yaml = _yaml()
    for item in overrides:
        path, value = _parse_override(item, yaml)
        if path == ["task"] and value != cfg.task:
            raise ConfigError(f"override '{item}': the task is fixed by the command "
                              f"(this is a '{cfg.task}' configuration)")
        _set(cfg, path, value, f"override '{item}'")
    return cfg


def load_config(path: Union[str, Path, None] = None, overrides: Optional[List[str]] = None,
                task: Optional[str] = None, check: bool = True) -> AnyConfig:
    """Defaults, then the YAML file (if any), then the overrides.

    ``task`` (``cls``, ``det`` or ``seg``) picks the configuration type; when None, the file's
    ``task`` key does (classification without one). A file of another task is an error.
    Keys and types are always checked; ``check=False`` skips :func:`validate` (ranges and the
    loss), for settings that only locate a run or are compared with a saved configuration.
    """
    data: Dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        yaml = _yaml()
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if task is None:
        task = data.get("task", "cls") if isinstance(data, dict) else "cls"
    cfg = _config_for(task, "load_config")
    if path is not None:
        from_dict(data, cfg, where=str(path))
    cfg = apply_overrides(cfg, overrides or [])
    return validate(cfg) if check else cfg


def save_config(cfg: AnyConfig, path: Union[str, Path]) -> Path:
    """Write the resolved configuration as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_yaml().safe_dump(to_dict(cfg), sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# Resuming a run from its saved configuration
# --------------------------------------------------------------------------------------------

#: keys a resumed run may change: where it computes and what it prints or writes alongside.
#: None of them changes the model, the loss, the optimisation or the order of the samples.
RESUME_MAY_CHANGE = ("device", "progress", "log_every", "stats_every",
                     "checkpoint_every_steps", "tensorboard", "dist_timeout",
                     "data.num_workers", "data.eval_batch_size")
#: keys that say where a run is (``output_dir/name``): they locate it, nothing else
RUN_LOCATION_KEYS = ("output_dir", "name")

_MISSING = object()


def _is_section(cfg: Any, path: List[str]) -> bool:
    node = cfg
    for key in path:
        if not dataclasses.is_dataclass(node) or isinstance(node, LossConfig):
            return False
        node = getattr(node, key, None)
    return dataclasses.is_dataclass(node)


def _flatten(cfg: Any, path: List[str], value: Any, source: str, out: Dict[str, str]) -> None:
    if isinstance(value, dict) and _is_section(cfg, path):
        for key, sub in value.items():
            _flatten(cfg, path + [str(key)], sub, source, out)
    elif path:
        out[".".join(path)] = source


def explicit_settings(cfg: AnyConfig, path: Union[str, Path, None] = None,
                      overrides: Optional[List[str]] = None) -> Dict[str, str]:
    """The dotted keys that the file ``path`` and the ``overrides`` set (sections given as
    mappings are flattened; ``model.options`` and the like count as one key), each mapped to
    where it was set (the file, or the override itself). ``cfg`` tells sections apart."""
    yaml = _yaml()
    out: Dict[str, str] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if isinstance(data, dict):
            _flatten(cfg, [], data, str(path), out)
    for item in overrides or []:
        keys, value = _parse_override(item, yaml)
        _flatten(cfg, keys, value, f"--set {item}", out)
    return out


def _get(cfg: Any, key: str) -> Any:
    """The value at a dotted key (``_MISSING`` when the configuration has none)."""
    path = key.split(".")
    node = cfg
    for i, part in enumerate(path):
        rest = ".".join(path[i:])
        if isinstance(node, LossConfig):
            return node.name if rest == "name" else node.kwargs.get(rest, _MISSING)
        if dataclasses.is_dataclass(node):
            if part not in {f.name for f in dataclasses.fields(node)}:
                return _MISSING
            node = getattr(node, part)
        elif isinstance(node, dict):
            return node.get(rest, _MISSING)
        else:
            return _MISSING
    return node


def _loss_default(loss_name: str, key: str) -> Any:
    """The default of the loss's keyword argument ``key`` (``_MISSING`` when unknown), from
    :func:`eqlosses.losses.default_hparams`."""
    from .losses import default_hparams

    try:
        return default_hparams(loss_name).get(key, _MISSING)
    except ValueError:  # an unknown loss: no default to compare
        return _MISSING


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def resume_config(run_dir: Union[str, Path], given: AnyConfig,
                  path: Union[str, Path, None] = None,
                  overrides: Optional[List[str]] = None) -> AnyConfig:
    """The configuration to resume the run in ``run_dir`` with: its own ``config.yaml``.

    ``given`` is what the user configured now (``load_config(path, overrides)``). The keys
    that ``path`` and ``overrides`` set must agree with the run's, except those in
    :data:`RESUME_MAY_CHANGE`, which are applied, and :data:`RUN_LOCATION_KEYS`, which only
    locate the run. A disagreement raises :class:`ConfigError` naming each key with both
    values and how to proceed; so does a run directory without ``config.yaml`` or a run of
    another task.
    """
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"no run to resume in {run_dir}: {saved_path} does not exist")
    yaml = _yaml()
    try:
        data = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{saved_path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{saved_path}: expected a mapping at the top level, got "
                          f"{type(data).__name__}")
    task = data.get("task", "cls")
    if task != given.task:
        raise ConfigError(f"{run_dir} holds a '{task}' run, not a '{given.task}' one: resume "
                          f"it with `eqlosses train {task} --resume --run {run_dir}`")
    saved = from_dict(data, _config_for(task, str(saved_path)), where=str(saved_path))
    conflicts, changes = [], []
    for key, source in explicit_settings(given, path, overrides).items():
        if key == "task" or key in RUN_LOCATION_KEYS:
            continue
        new, old = _get(given, key), _get(saved, key)
        if key in RESUME_MAY_CHANGE:
            changes.append((key, new, source))
            continue
        if old is _MISSING and key.startswith("loss."):
            default = _loss_default(saved.loss.name, key[len("loss."):])
            if default is not _MISSING and default == new:
                continue
            had = (f"no {key} (the loss's default {_show(default)} applied)"
                   if default is not _MISSING else f"no {key}")
        elif old is _MISSING:
            had = f"no {key}"
        elif old == new:
            continue
        else:
            had = f"{key}={_show(old)}"
        conflicts.append(f"{key}={_show(new)} (from {source}) but the run has {had}")
    if conflicts:
        raise ConfigError(
            f"cannot resume {run_dir} with other settings than it was trained with: "
            + "; ".join(conflicts) + f". To continue the run as it was, drop "
            f"{'this setting' if len(conflicts) == 1 else 'these settings'} (the run's own "
            f"{saved_path} is used); to train with them, start a new run under another name "
            f"(--set name=NEW, or --run DIR), or start this one again with --overwrite "
            f"instead of --resume. A resumed run may change only "
            f"{', '.join(RESUME_MAY_CHANGE)}.")
    for key, value, source in changes:
        _set(saved, key.split("."), value, source)
    return validate(saved)
