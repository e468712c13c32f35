"""Loss functions of nnunet-partial. Each is a pure function or a small nn.Module with the
tensor shapes in its docstring."""
from nnunet_partial.losses.marginal import (MarginalDCandCELoss, MarginalDiceLoss, marginal_cross_entropy,
                                            marginal_log_probs)

__all__ = ["MarginalDCandCELoss", "MarginalDiceLoss", "marginal_cross_entropy", "marginal_log_probs"]
