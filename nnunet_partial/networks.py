"""Architecture changes of nnunet-partial (the one place for them): the MultiMix network.

:class:`MultiMixNetwork` wraps the network nnU-Net builds for the plans (``PlainConvUNet``,
``ResidualEncoderUNet``; 2D and 3D: anything with ``encoder`` returning the list of skips and
dynamic_network_architectures' ``UNetDecoder``) and adds, for MultiMix (METHODS §5):

- a **classification branch**: global average pooling of the deepest encoder features (the
  bottleneck, ``skips[-1]``) + one linear layer -> ``num_image_classes`` logits;
- the **saliency bridge**: ``S = |∂ z_ĉ / ∂ x|`` with ``z_ĉ`` the logit of the predicted class
  ``ĉ = argmax z``, computed by a separate pass through the encoder in eval mode on a detached
  copy of the input with ``torch.autograd.grad`` (gradients w.r.t. the input only: no parameter
  ``.grad`` is written, so nothing reaches the optimiser), normalised per case and channel to
  [0, 1] and detached. ``[x, S]`` (2·C channels) is downsampled by average pooling to the
  resolution of the **second-deepest skip** (``skips[-2]``) and concatenated to it. nnU-Net's
  decoder concatenates ``transpconv(skips[-1])`` with ``skips[-2]`` before its first stage
  (``decoder.stages[0]``), so that stage sees ``[upsampled bottleneck, skip, x↓, S↓]``; its first
  convolution is widened by 2·C input channels (He-initialised as nnU-Net's). Decoder code is
  nnU-Net's, unchanged.

``forward(x)`` returns what nnU-Net's network returns (a list with deep supervision, a tensor
without), so nnU-Net's loss, validation and ``nnUNetv2_predict`` use it as they are;
``forward(x, return_classification=True)`` returns ``(segmentation, class_logits)`` and
``forward(x, classify_only=True)`` the class logits alone (encoder + head, no bridge, no
decoder). ``decoder`` / ``encoder`` are the wrapped network's: nnU-Net's
``set_deep_supervision_enabled`` toggles ``decoder.deep_supervision`` through them.

The bridge needs input gradients at prediction time, when nnU-Net's predictor runs under
``torch.inference_mode()`` (and autocast on CUDA): the saliency pass leaves inference mode
locally (``torch.inference_mode(False)`` + ``torch.enable_grad()``) on a clone of the input.

In eval mode with ``record_classification`` set, every forward appends the softmax class
probabilities of its batch to ``recorded_probabilities`` (``nnunet-partial predict-class`` reads
them per case; nnunet_partial/commands/predict_class.py).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F


def _widen_first_conv(stage: nn.Module, extra_in: int) -> None:
    """Give the first convolution of ``stage`` (a StackedConvBlocks) ``extra_in`` more input channels,
    appended after the existing ones. nnU-Net's blocks keep the conv twice (``.conv`` and inside
    ``.all_modules``): both references are replaced."""
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He
    block = stage.convs[0]
    old = block.conv
    new = type(old)(old.in_channels + extra_in, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, old.groups, bias=old.bias is not None)
    new.apply(InitWeights_He(1e-2))  # nnU-Net's initialisation of its convolutions
    block.conv = new
    block.all_modules[0] = new
    if hasattr(block, "input_channels"):
        block.input_channels = new.in_channels


class MultiMixNetwork(nn.Module):
    """nnU-Net's U-Net + classification head + saliency bridge; see the module docstring."""

    def __init__(self, network: nn.Module, num_input_channels: int, num_image_classes: int = 2,
                 saliency_bridge: bool = True):
        super().__init__()
        encoder, decoder = getattr(network, "encoder", None), getattr(network, "decoder", None)
        if encoder is None or decoder is None or not hasattr(decoder, "stages") or not hasattr(encoder, "output_channels"):
            raise TypeError(f"{type(network).__name__} is not one of nnU-Net's encoder/decoder U-Nets (PlainConvUNet, "
                            "ResidualEncoderUNet): MultiMix needs encoder.output_channels and decoder.stages")
        if num_image_classes < 2:
            raise ValueError(f"MultiMix needs at least 2 image classes, got {num_image_classes}")
        self.network = network
        self.num_input_channels = int(num_input_channels)
        self.saliency_bridge = bool(saliency_bridge)
        self.classifier = nn.Linear(int(encoder.output_channels[-1]), int(num_image_classes))
        if self.saliency_bridge:
            _widen_first_conv(decoder.stages[0], 2 * self.num_input_channels)
        self.record_classification = False
        self.recorded_probabilities: List[torch.Tensor] = []

    @property
    def encoder(self) -> nn.Module:
        return self.network.encoder

    @property
    def decoder(self) -> nn.Module:
        return self.network.decoder

    @property
    def num_image_classes(self) -> int:
        return self.classifier.out_features

    # ------------------------------------------------------------------ pieces
    def classify(self, deepest: torch.Tensor) -> torch.Tensor:
        """(B, F, *spatial) deepest encoder features -> (B, n_classes) logits (global average pooling + linear)."""
        return self.classifier(deepest.mean(dim=tuple(range(2, deepest.ndim))))

    def saliency(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) input -> (B, C, *spatial) detached saliency ``|∂ z_ĉ / ∂ x|`` in [0, 1] (per case
        and channel divided by its maximum), ``ĉ`` the predicted class; encoder in eval mode, no parameter
        gradient written. Works under ``no_grad`` / ``inference_mode`` and autocast."""
        encoder = self.encoder
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                xi = x.detach().clone().requires_grad_(True)   # a normal tensor even if x is an inference tensor
                logits = self.classify(encoder(xi)[-1])
                score = logits.gather(1, logits.detach().argmax(1, keepdim=True)).sum()
                # scaled so that fp16 gradients under autocast do not underflow; the map is normalised below
                (grad,) = torch.autograd.grad(score * 1024.0, xi, only_inputs=True)
        finally:
            encoder.train(was_training)
        sal = grad.detach().float().abs()
        peak = sal.flatten(2).amax(2).clamp_min(1e-12)
        sal = sal / peak.view(*peak.shape, *([1] * (sal.ndim - 2)))
        return sal.to(x.dtype)

    def bridge_features(self, x: torch.Tensor, size) -> torch.Tensor:
        """``[x, saliency(x)]`` average-pooled to the spatial ``size`` of the second-deepest skip."""
        both = torch.cat((x, self.saliency(x).to(x.dtype)), 1)
        pool = F.adaptive_avg_pool3d if x.ndim == 5 else F.adaptive_avg_pool2d
        return pool(both, tuple(int(s) for s in size))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, return_classification: bool = False, classify_only: bool = False,
                classify_also: Optional[torch.Tensor] = None):
        """See the module docstring. ``classify_also`` (B', C, *spatial): more images to classify in the same
        call (MultiMix's strong views), returned as a third element; one forward call per training step keeps
        DDP's one-forward-one-backward contract."""
        skips = self.encoder(x)
        class_logits = self.classify(skips[-1])
        if self.record_classification and not self.training:
            self.recorded_probabilities.append(torch.softmax(class_logits.detach().float(), 1).cpu())
        if classify_only:
            return class_logits
        if self.saliency_bridge:
            bridge = self.bridge_features(x, skips[-2].shape[2:])
            skips = [*skips[:-2], torch.cat((skips[-2], bridge.to(skips[-2].dtype)), 1), skips[-1]]
        segmentation = self.decoder(skips)
        if classify_also is not None:
            return segmentation, class_logits, self.classify(self.encoder(classify_also)[-1])
        return (segmentation, class_logits) if return_classification else segmentation

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, except that the classifier takes the number of classes of ``state_dict``:
        ``nnUNetv2_predict`` builds the network without dataset.json's ``class_names`` (nnU-Net's
        ``build_network_architecture`` gets no dataset metadata), so the checkpoint says how many there are."""
        weight = state_dict.get("classifier.weight")
        if weight is not None and weight.shape[0] != self.classifier.out_features:
            p = self.classifier.weight
            self.classifier = nn.Linear(self.classifier.in_features, int(weight.shape[0])).to(p.device, p.dtype)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def build_multimix_network(plain_network: nn.Module, num_input_channels: int, num_image_classes: int = 2,
                           saliency_bridge: bool = True) -> MultiMixNetwork:
    return MultiMixNetwork(plain_network, num_input_channels, num_image_classes, saliency_bridge)


def multimix_module(network: nn.Module) -> Optional[MultiMixNetwork]:
    """The :class:`MultiMixNetwork` behind DDP (``.module``) / ``torch.compile`` (``._orig_mod``), or None."""
    from nnunet_partial.trainers.common import unwrap
    net = unwrap(network)
    return net if isinstance(net, MultiMixNetwork) else None


# ---------------------------------------------------------------------- MLDS: the extra pseudo-label head
# (nnUNetTrainerMLDSSelfTaught / MeanTaught, nnunet_partial/trainers/mlds.py, which re-exports both classes)
class _CleanAndPseudoHead(nn.Module):
    """nnU-Net's outermost 1x1 output conv and a second one on the same features; channels concatenated."""

    def __init__(self, clean: nn.Module):
        super().__init__()
        self.clean = clean
        self.pseudo = type(clean)(clean.in_channels, clean.out_channels, 1, 1, 0, bias=True)
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He
        self.pseudo.apply(InitWeights_He(1e-2))  # nnU-Net's initialisation of its own heads

    def forward(self, x):
        return torch.cat((self.clean(x), self.pseudo(x)), 1)


class PseudoHeadNetwork(nn.Module):
    """nnU-Net's network with a separate pseudo-label head at the outermost decoder level.

    Returns what nnU-Net's network returns (the clean heads; a list with deep supervision), plus, in
    training mode with deep supervision, the pseudo head's logits as the **last** list element.
    ``decoder`` / ``encoder`` are the wrapped network's (nnU-Net toggles ``decoder.deep_supervision``).
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        seg_layers = getattr(getattr(network, "decoder", None), "seg_layers", None)
        if seg_layers is None:
            raise TypeError(f"{type(network).__name__} has no decoder.seg_layers (nnU-Net's U-Net decoders): the "
                            "self-/mean-taught trainers cannot add their pseudo-label head to it")
        self.num_classes = int(seg_layers[-1].out_channels)
        seg_layers[-1] = _CleanAndPseudoHead(seg_layers[-1])
        self.network = network

    @property
    def decoder(self):
        return self.network.decoder

    @property
    def encoder(self):
        return self.network.encoder

    def forward(self, x):
        out = self.network(x)
        c = self.num_classes
        if not isinstance(out, (list, tuple)):
            return out[:, :c]
        clean = [out[0][:, :c], *out[1:]]
        return clean + [out[0][:, c:]] if self.training else clean
