"""backei: the BackEISNN spiking layers (adaptive self-feedback, dynamic E/I neurons) of the Rust
crate of the same name, for PyTorch: `backei.torch.BackEI` and `backei.torch.MultiStepLIF`.
`backei._backei` is the compiled extension (PyO3) over backei's C ABI layer."""

__all__ = ["torch"]
