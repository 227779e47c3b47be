"""mlsae-lens: Multi-Layer Sparse Autoencoders for TransformerLens and SAELens.

Importing this package registers the ``multilayer_topk`` architecture with SAELens, so
``sae_lens.SAE.load_from_disk`` returns a :class:`MultiLayerSAE`.
"""

from sae_lens import register_sae_class, register_sae_training_class
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

from mlsae_lens.errors import MLSAEError
from mlsae_lens.sae import (
    ARCHITECTURE,
    MultiLayerSAE,
    MultiLayerSAEConfig,
    MultiLayerTrainingSAE,
    MultiLayerTrainingSAEConfig,
    SavedMultiLayerSAEConfig,
    SavedMultiLayerTrainingSAEConfig,
    TopKOutput,
)
from mlsae_lens.layer_view import (
    LAYER_VIEW_ARCHITECTURE,
    LayerViewSAE,
    LayerViewSAEConfig,
    steering_hook,
)

__version__ = "0.1.0"

# SAELens raises on duplicate registration; guard so a module reload stays harmless. The Saved*
# config classes are what SAELens' loaders build: a cfg.json without standardize_convention
# loads as "legacy" (see mlsae_lens.sae).
if ARCHITECTURE not in SAE_CLASS_REGISTRY:
    register_sae_class(ARCHITECTURE, MultiLayerSAE, SavedMultiLayerSAEConfig)
if ARCHITECTURE not in SAE_TRAINING_CLASS_REGISTRY:
    register_sae_training_class(
        ARCHITECTURE, MultiLayerTrainingSAE, SavedMultiLayerTrainingSAEConfig
    )
# One layer of an MLSAE as a single-hook SAE (``MultiLayerSAE.layer_view``).
if LAYER_VIEW_ARCHITECTURE not in SAE_CLASS_REGISTRY:
    register_sae_class(LAYER_VIEW_ARCHITECTURE, LayerViewSAE, LayerViewSAEConfig)

__all__ = [
    "LayerViewSAE",
    "LayerViewSAEConfig",
    "MLSAEError",
    "MultiLayerSAE",
    "MultiLayerSAEConfig",
    "MultiLayerTrainingSAE",
    "MultiLayerTrainingSAEConfig",
    "TopKOutput",
    "steering_hook",
    "__version__",
]
