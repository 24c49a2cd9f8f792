"""The network a converter starts from: a ``train.py`` checkpoint, a timm state dict, or timm's
pretrained weights, with the data settings it expects."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["load_reference"]


def load_reference(checkpoint: str | None = None, model_name: str | None = None, pretrained: bool = False,
                   model_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the network to convert, in eval mode.

    Args:
        checkpoint: a ``train.py`` checkpoint (model and data settings recorded in it) or a plain
            timm state dict (then ``model_name`` names the architecture).
        model_name: timm name; with a ``train.py`` checkpoint it must match the recorded one.
        pretrained: load timm's hub weights for ``model_name`` (no checkpoint).
        model_kwargs: ``timm.create_model`` keyword arguments (state dict or pretrained).

    Returns:
        The model and the data settings it expects: the dataset hyper-parameters recorded at
        training time, or (hub weights) the model's own ``pretrained_cfg`` normalisation.
    """
    from csdlab.lit.module import build_model, load_classifier, read_checkpoint

    if checkpoint is not None:
        if pretrained:
            raise ValueError("give either a checkpoint or pretrained=True, not both")
        ckpt = read_checkpoint(checkpoint)
        if isinstance(ckpt, dict) and "hyper_parameters" in ckpt:  # a train.py checkpoint
            model, _ = load_classifier(checkpoint, expected_model=model_name)
            return model, dict(ckpt.get("datamodule_hyper_parameters") or {})
        if model_name is None:
            raise ValueError(f"{checkpoint} is a plain state dict: name its timm architecture with "
                             "model_name (and model_kwargs if it is not the default configuration)")
        model = build_model(model_name, model_kwargs)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{checkpoint} does not match {model_name} {model_kwargs or {}}: "
                             f"{str(e).splitlines()[0]}") from e
        return model.eval(), _model_data_config(model)
    if model_name is None or not pretrained:
        raise ValueError("give a checkpoint (model.checkpoint PATH), or model_name NAME with pretrained=true "
                         "(timm hub weights)")
    model = build_model(model_name, model_kwargs, pretrained=True).eval()
    return model, _model_data_config(model)


def _model_data_config(model: nn.Module) -> dict[str, Any]:
    from csdlab.lit.data import data_config_for

    return data_config_for(model)
