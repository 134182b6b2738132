"""medsr: SR3 conditional diffusion super-resolution for medical scans, built on MONAI."""

from medsr.errors import MedsrError

__version__ = "0.1.0"
__all__ = ["MedsrError", "__version__"]
