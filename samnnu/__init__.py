"""samnnu: Segment Anything adapted to medical image segmentation, self-configured like nnU-Net.

Importing this package does not import nnunetv2: call :func:`samnnu.config.setup_environment`
first (the command-line entry points do), so that nnU-Net sees its paths.
"""

__version__ = "0.1.0"
