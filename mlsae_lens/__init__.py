"""mlsae-lens: Multi-Layer Sparse Autoencoders for TransformerLens and SAELens.

Importing this package registers the ``multilayer_topk`` architecture with SAELens, so
``sae_lens.SAE.load_from_disk`` returns a :class:`MultiLayerSAE`. The registration happens
as soon as SAELens is loaded (at once if it already is, else right after its import), and
the classes below are imported on first use: ``mlsae-lens --help`` then loads neither torch
nor SAELens, which take seconds to import.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from mlsae_lens.errors import MLSAEError

if TYPE_CHECKING:
    from mlsae_lens.activations_store import MultiLayerActivationsStore
    from mlsae_lens.layer_view import LayerViewSAE, LayerViewSAEConfig, steering_hook
    from mlsae_lens.runner_config import MultiLayerSAERunnerConfig
    from mlsae_lens.sae import (
        ARCHITECTURE,
        MultiLayerSAE,
        MultiLayerSAEConfig,
        MultiLayerTrainingSAE,
        MultiLayerTrainingSAEConfig,
        TopKOutput,
    )
    from mlsae_lens.trainer import MultiLayerSAETrainer
    from mlsae_lens.training import MultiLayerSAETrainingRunner

__version__ = "0.1.0"

_SAE_NAMES = ("ARCHITECTURE", "MultiLayerSAE", "MultiLayerSAEConfig", "MultiLayerTrainingSAE",
              "MultiLayerTrainingSAEConfig", "TopKOutput")
_LAYER_VIEW_NAMES = ("LAYER_VIEW_ARCHITECTURE", "LayerViewSAE", "LayerViewSAEConfig", "steering_hook")
# Training through SAELens' runner API: runner, config, store and trainer as SAELens subclasses.
_TRAINING_EXPORTS = {
    "MultiLayerSAETrainingRunner": "mlsae_lens.training",
    "MultiLayerSAERunnerConfig": "mlsae_lens.runner_config",
    "MultiLayerActivationsStore": "mlsae_lens.activations_store",
    "MultiLayerSAETrainer": "mlsae_lens.trainer",
}
_EXPORTS = {**dict.fromkeys(_SAE_NAMES, "mlsae_lens.sae"),
            **dict.fromkeys(_LAYER_VIEW_NAMES, "mlsae_lens.layer_view"), **_TRAINING_EXPORTS}
# The modules that register their classes with SAELens when imported.
_REGISTERING_MODULES = ("mlsae_lens.sae", "mlsae_lens.layer_view")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mlsae_lens' has no attribute {name!r}")


def _import_registering_modules() -> None:
    for module in _REGISTERING_MODULES:
        if module not in sys.modules:  # one being imported now registers itself when done
            importlib.import_module(module)


class _RegisterAfterSAELens(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first ``import sae_lens`` it hands back SAELens' own spec
    with a loader that registers our architectures once SAELens has loaded."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:  # noqa: ARG002
        if fullname != "sae_lens":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("sae_lens")
        if spec is not None and isinstance(spec.loader, importlib.abc.Loader) and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    """SAELens' loader, followed by the registration (a wrapper: loaders may be shared)."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        # SAELens keeps its own loader (importlib.resources and friends ask the module's spec).
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _import_registering_modules()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


if "sae_lens" in sys.modules:
    _import_registering_modules()
elif not any(isinstance(f, _RegisterAfterSAELens) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterSAELens())

__all__ = [
    "ARCHITECTURE",
    "LayerViewSAE",
    "LayerViewSAEConfig",
    "MLSAEError",
    "MultiLayerActivationsStore",
    "MultiLayerSAE",
    "MultiLayerSAEConfig",
    "MultiLayerSAERunnerConfig",
    "MultiLayerSAETrainer",
    "MultiLayerSAETrainingRunner",
    "MultiLayerTrainingSAE",
    "MultiLayerTrainingSAEConfig",
    "TopKOutput",
    "steering_hook",
    "__version__",
]
